"""What ``export`` and ``rebuild`` write beside their output, with the renderers the rest of
modelport uses (one per format):

- ``--card``: a Hugging Face model card, ``README.md`` beside OUT, rendered by
  ``reporting.card`` as ``modelport card`` and ``convert --card`` render theirs, with the
  command as its provenance: the source and its digests, the command line that makes OUT
  again, and how OUT was verified;
- ``--report FILE`` ending in ``.html`` (or ``.htm``): the page ``modelport report`` writes
  (``reporting.html``) about OUT, opened by the command's verification: the same facts
  (``reporting.verification``) a Markdown report (``cli.markdown``) shows, which the
  command writes itself with nothing from here.

Imported through ``importlib`` by a run that asks for one of them, as ``main`` imports a
command: the reporting modules cost start-up that a ``--model`` typo should not pay.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from modelport.cli._recipe import export_recipe, rebuild_recipe
from modelport.comparing.fingerprint import fingerprint
from modelport.errors import ModelportError, SuspiciousModelWarning
from modelport.loading import model_file
from modelport.reporting import html, model_report
from modelport.reporting.card import Provenance, build_card
from modelport.reporting.verification import Verification
from modelport.torch_models.agreement import OutputCheck
from modelport.torch_models.export_report import ExportReport
from modelport.torch_models.rebuilding import RebuildReport
from modelport.transfer import placing
from modelport.transfer.hashing import sha256_of


def write_html_report(target: Path, written: Path, facts: Verification) -> None:
    """The page ``modelport report`` writes about ``written``, with the command's ``facts``
    as its first section, in ``target`` (checked before the work, so it replaces what is
    there)."""
    page = html.render(model_report.build([written], verification=facts))
    placing.install_bytes(target, page.encode("utf-8", "replace"), overwrite=True)


def write_card(target: Path, written: Path, provenance: Provenance, *, overwrite: bool) -> None:
    """The model card of ``written`` in ``target``, ``provenance`` its making."""
    made = build_card(written, provenance=provenance, relative_to=target.parent)
    placing.install_bytes(target, made.text.encode("utf-8"), overwrite=overwrite)


def export_provenance(args: argparse.Namespace, report: ExportReport) -> Provenance:
    """An export's provenance: the source, the command line, how the file was verified."""
    if report.verified is None:
        verification = "not verified (--no-verify)"
    else:
        verification = (
            f"run in {report.runtime or report.format} and compared with eager PyTorch: "
            + _outputs_verdict(report.outputs)
        )
    return _provenance(args, export_recipe(args), verification, report.warnings)


def rebuild_provenance(args: argparse.Namespace, report: RebuildReport) -> Provenance:
    """A rebuild's provenance: the weights, the command line, how the file was checked."""
    checked = []
    if report.tensors_compared:
        differ = len(report.mismatched)
        checked.append(
            f"{report.tensors_compared} state-dict tensors compared bit for bit with the "
            + ("eager model's: all equal" if not differ else f"eager model's: {differ} differ")
        )
    if report.outputs:
        checked.append(_outputs_verdict(report.outputs))
    verification = f"loaded back with {report.load_with} and compared: " + "; ".join(
        checked or ["nothing compared"]
    )
    notes = (f"requires: {report.requires}", *report.warnings)
    return _provenance(args, rebuild_recipe(args), verification, notes)


def _outputs_verdict(checks: Sequence[OutputCheck]) -> str:
    samples = sorted({c.sample for c in checks})
    worst = max((c.max_abs for c in checks), default=0.0)
    failed = sum(not c.ok for c in checks)
    where = f"on {len(samples)} input sets ({', '.join(samples)})"
    if failed:
        return f"FAILED: {failed} of {len(checks)} outputs outside tolerance {where}"
    return f"every output within its dtype's tolerance {where}; max abs error {worst:.3g}"


def _provenance(
    args: argparse.Namespace, recipe: str, verification: str, notes: Sequence[str]
) -> Provenance:
    """The source (the weights, else the model file or folder, else the model's code) with
    its digests, and ``recipe``, the command line that makes the output again."""
    built = f"model built from --model {args.model}" + (f" --init {args.init}" if args.init else "")
    named = Path(args.weights) if args.weights else Path(args.model)
    if not named.exists():
        return Provenance(
            source=str(args.model),
            source_format="Python code",
            recipe=recipe,
            verification=verification,
            notes=(built, *notes),
        )
    return Provenance(
        source=str(named),
        source_format=_format_of(named),
        source_sha256=sha256_of(named),
        source_weights_digest=_weights_digest(named),
        recipe=recipe,
        verification=verification,
        notes=(built, *notes),
    )


def _format_of(path: Path) -> str:
    try:
        with model_file.open(path) as opened:
            return opened.format.value
    except ModelportError:
        return ""


def _weights_digest(path: Path) -> str:
    """``modelport hash``'s digest of the source's weights (read, never run), or ""."""
    with warnings.catch_warnings():  # the card shows the output's verdict, not the source's
        warnings.simplefilter("ignore", SuspiciousModelWarning)
        try:
            return fingerprint(path, allow_unsafe=True).digest
        except ModelportError:
            return ""
