"""``modelport card``: a Hugging Face model card (README.md) for a model file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modelport.cli.commands import COMMANDS, ExitCode
from modelport.reporting.card import build_card
from modelport.transfer import placing

EXAMPLES = """examples:
  modelport card model.safetensors                   # print the card
  modelport card ./my-model -o ./my-model/README.md  # the card inside a model folder
  modelport card checkpoint.pt --json

The card's loading code names the file as seen from the card's folder (-o), or from the
file's own folder when printed. --no-digests skips the sha256 and the weights digest (two
more reads of the whole file).
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "card",
        help=COMMANDS["card"].help,
        description="Write a Hugging Face model card for a model file or folder: front "
        "matter the hub reads (library_name, tags, pipeline_tag, base_model when a config "
        "tells them), what the file holds, the code that loads it with its format's own "
        "library, the scan verdict and its provenance. Executes nothing from the file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="model file or directory")
    parser.add_argument(
        "-o", "--output", type=Path, help="the card to write (README.md); default: print it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--no-digests", action="store_true", help="skip the sha256 and the weights digest"
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"card": text, "front_matter": {...}}'
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = Path(args.file)
    target: Path | None = args.output
    if target is not None:
        placing.check_target(source, target, args.overwrite)
    made = build_card(
        source,
        relative_to=None if target is None else target.parent,
        digests=not args.no_digests,
    )
    if target is not None:
        write(target, made.text, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(made.to_json(), indent=2))
    elif target is None:
        print(made.text, end="")
    else:
        print(f"wrote {target}")
    return ExitCode.OK


def write(target: Path, text: str, *, overwrite: bool) -> None:
    """Written beside the target and moved into place; an existing card is replaced only
    with ``overwrite``, even one that appeared while this one was being written."""
    placing.install_bytes(target, text.encode("utf-8"), overwrite=overwrite)
