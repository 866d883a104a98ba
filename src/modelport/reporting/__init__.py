"""Reports: one self-contained HTML page that shows a file (or two side by side) to a person,
and the model card that says what a file holds.

The statistics the page shows come from ``measuring``. ``model_report`` gathers a file's
identity, scan, structure, statistics, its folder's ``config.json`` and, with a model named,
whether the weights fit it (and the diff of two files); ``html`` with ``html_parts``,
``html_model`` and ``page_assets`` renders them.
``verification`` holds what ``export`` and ``rebuild`` did and how they checked it, once for
both their reports: ``cli.markdown`` writes it as Markdown, ``html_verification`` as the
page's first section.

Imports torch_models, comparing, loading, measuring, scanning, transfer and below; ``fleet``
and ``cli`` import it.
"""
