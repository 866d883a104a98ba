"""Opening a file by content, its inspect report, and loading its weights as torch tensors behind
the scanner's gate. Imports scanning, formats and below."""
