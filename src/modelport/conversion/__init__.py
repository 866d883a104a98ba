"""Writing a file in another format: choosing the tensors and names, writing through the
formats' writers, and verifying the result bit for bit. Imports loading and below."""
