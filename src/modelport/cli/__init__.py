"""The command line: argument wiring and rendering (rich tables, JSON, SARIF, Markdown) over
the layers below, one module per command, imported only when argv names it (``commands``).
The top layer: it may import any other."""
