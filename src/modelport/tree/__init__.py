"""A file's object tree as names: flattening, aliases, extras, the one weights rule, typed JSON.
Imports the core types, transfer and pickles."""
