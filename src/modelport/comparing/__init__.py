"""Comparing weights: a tensor-by-tensor diff of two files and a container-independent hash.
Imports loading and below."""
