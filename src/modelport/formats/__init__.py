"""The format registry: every reader, in the order sniffers are tried.

Order matters only where one format is a special case of another's container: TorchScript
and ``torch.export`` archives are zips that also hold a ``data.pkl``, so they come before the
plain torch zip reader. Adding a format means one module and one line here.
"""

from __future__ import annotations

from modelport.formats import safetensors, torch_zip
from modelport.formats._base import Contents, Format, FormatReader, Probe

READERS: tuple[FormatReader, ...] = (
    safetensors.READER,
    torch_zip.READER,
)

__all__ = ["READERS", "Contents", "Format", "FormatReader", "Probe"]
