"""The one restricted unpickler: a machine that interprets every opcode and never imports or
calls anything from the file (``machine``), the resolvers that give those opcodes meaning
(``reading`` for readers, ``judging`` for the scanner), inert records for everything unknown
(``records``), modelport's own pure reconstructors (``torch_types``, ``numpy_types``,
``modules``) and the immutable policy tables (``policy``, ``torch_nn_classes``).

Imports only the core types (errors, dtypes, tensors, limits).
"""
