"""GGUF: the spec's constants and tables, the reader, and the writer (which needs only the spec)."""
