"""The formats layer: one module per format behind one reader/writer protocol (``protocol``).

``registry`` names every reader in sniffing order (imported as a probe reaches it) and
decides a path's format by its bytes; ``sniffing`` names the common non-models (empty files,
Git LFS pointers, HTML pages) before any reader runs. Adding a format means one module and
one line in ``registry``. Imports the core types, transfer, pickles and tree.
"""
