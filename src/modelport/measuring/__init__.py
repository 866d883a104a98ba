"""Tensor statistics: what the values of a file's tensors look like, in bounded memory.

``accumulating`` is the arithmetic on one chunk of values; ``stats`` streams every tensor
through it in worker threads; ``flags`` names what looks wrong (NaN, constant tensors,
duplicates, layer norms far from their neighbours, mixed dtypes); ``stats_records`` holds
the results. Below ``loading`` so that ``ModelFile.stats`` can measure the file it holds;
``stats`` imports numpy and ml_dtypes, so ``loading`` imports it on first use.

Imports transfer and the core types only.
"""
