"""Running torch models: building the model a user names, export, rebuild, check, input binding and
output agreement. The only layer that runs user code, and only the code the user names.
Imports conversion, loading and below."""
