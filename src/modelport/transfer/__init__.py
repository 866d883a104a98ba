"""Byte movement: streaming tensor bytes in bounded memory, checking what was written, placing
finished outputs, progress. Imports only the core types (errors, dtypes, tensors, limits)."""
