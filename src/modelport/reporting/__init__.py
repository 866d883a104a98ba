"""Statistics and reports: what the values of a file's tensors look like, and one self-contained
HTML page that shows a file (or two side by side) to a person.

``accumulating`` is the arithmetic on one chunk of values; ``stats`` streams every tensor
through it in worker threads and in bounded memory; ``flags`` names what looks wrong (NaN,
constant tensors, duplicates, layer norms far from their neighbours, mixed dtypes);
``model_report`` gathers a file's identity, scan, structure, statistics, its folder's
``config.json`` and, with a model named, whether the weights fit it (and the diff of two
files); ``html`` with ``html_parts``, ``html_model`` and ``page_assets`` renders them.
``verification`` holds what ``export`` and ``rebuild`` did and how they checked it, once for
both their reports: ``cli.markdown`` writes it as Markdown, ``html_verification`` as the
page's first section.

Imports torch_models, comparing, loading, scanning, transfer and below; ``fleet`` and ``cli``
import it.
"""
