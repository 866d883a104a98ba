"""``modelport report``: one self-contained HTML page about a model file, or two side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modelport.cli.commands import COMMANDS, ExitCode
from modelport.errors import UsageError
from modelport.reporting import html, model_report
from modelport.torch_models.model_spec import check_model_spec
from modelport.transfer import placing

EXAMPLES = """examples:
  modelport report model.safetensors -o model.html
  modelport report before.pt after.safetensors -o diff.html
  modelport report model.gguf --json > stats.json
  modelport report ckpt.pt --model mypkg.nets:ResNet --init '{"classes": 10}' -o ckpt.html

The page needs no network and no server: open it from file://, mail it, attach it to a CI
run. Tensor values are read in bounded memory; --no-digests skips the two extra full reads
(sha256 of the file and the weights digest) for very large files.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help=COMMANDS["report"].help,
        description="Write one HTML file that shows a model file: identity (format, sha256, "
        "weights digest), the scan verdict with every finding, the module tree, metadata, "
        "and a sortable, filterable table of per-tensor statistics with a histogram per row "
        "and flags (NaN/Inf, all-zero, duplicates, layer norms far from their neighbours, "
        "mixed dtypes). With two files, also their diff. With --model, whether the weights "
        "fit that model, as check says. Executes nothing from the files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="model file or directory")
    parser.add_argument("file_b", nargs="?", help="a second file to compare with the first")
    parser.add_argument(
        "-o", "--output", type=Path, help="the HTML file to write (default: NAME.report.html)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--threads", type=_positive, default=None, help="threads for the statistics"
    )
    parser.add_argument(
        "--no-digests", action="store_true", help="skip the sha256 and weights digest"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report's data as JSON instead of writing HTML (unless -o is given)",
    )
    parser.add_argument(
        "--model",
        metavar="pkg.module:Name|DIR|FILE",
        help="show whether the weights fit this model, as `modelport check` does: "
        "pkg.module:Name (your code, imported and called), an HF directory (built from its "
        "config.json), a TorchScript or .pt2 file",
    )
    parser.add_argument(
        "--init", metavar="JSON", help="arguments for --model's Name, as JSON (object or list)"
    )
    parser.set_defaults(run=run)


def _write(target: Path, page: str, *, overwrite: bool) -> None:
    """Written beside the target and moved into place, so a reader never sees half a page;
    UTF-8 whatever the locale (a name that is no valid Unicode shows a replacement mark)."""
    placing.install_bytes(target, page.encode("utf-8", "replace"), overwrite=overwrite)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    paths = [Path(args.file), *([Path(args.file_b)] if args.file_b else [])]
    if args.model is not None:
        check_model_spec(args.model)  # a typo costs milliseconds, not the whole report
    elif args.init is not None:
        raise UsageError("--init gives the arguments of --model's Name; name the model too")
    target = args.output
    if target is None and not args.json:
        target = Path(f"{paths[0].name}.report.html")
    if target is not None:
        if target.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"{target}: the report is HTML; name it *.html")
        for path in paths:
            placing.check_target(path, target, args.overwrite)
    report = model_report.build(
        paths,
        threads=args.threads,
        digests=not args.no_digests,
        model=args.model,
        init=args.init,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=repr))
    if target is not None:
        _write(target, html.render(report), overwrite=args.overwrite)
        flagged = sum(len(s.stats.flags) for s in report.sections)
        verdicts = ", ".join(s.scan.verdict for s in report.sections)
        fits = [("fits" if s.fit.ok else "does not fit") for s in report.sections if s.fit]
        fit = f"; model: {', '.join(fits)}" if fits else ""
        if not args.json:
            print(f"wrote {target} (scan: {verdicts}; {flagged} flags{fit})")
    return ExitCode.OK
