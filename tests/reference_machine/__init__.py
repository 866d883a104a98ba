"""The pickle machine as it was before its fast rewrite, kept only as the reference the
differential test (``tests/test_pickle_machine_differential.py``) holds the new machine to:
the loop, the opcodes and the two resolvers (scanning and reading) exactly as they ran. The
policy tables, records and symbols they work on are shared with ``modelport.pickles``.
Remove this package together with that test once the new machine has stood on its own."""
