"""The command line: thin wiring over the Python API."""
