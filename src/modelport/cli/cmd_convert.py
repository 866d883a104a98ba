"""``modelport convert``: any weights format into another, streamed and verified bit for bit."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich.console import Console

import modelport
from modelport import dtypes
from modelport.cli import _many_files
from modelport.cli._output import WIDE_HELP, human_bytes, people_console
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.conversion.converting import (
    CASTS,
    GGUF_TYPES,
    TARGETS,
    ConvertReport,
    gguf_type_name,
)
from modelport.conversion.options import ConvertOptions
from modelport.errors import UsageError
from modelport.formats.registry import is_model_folder
from modelport.transfer import placing

if TYPE_CHECKING:
    from modelport.fleet.records import Record
    from modelport.fleet.running import Plan

EXAMPLES = """examples:
  modelport convert pytorch_model.bin model.safetensors
  modelport convert checkpoint.ckpt weights.safetensors --dtype bfloat16 --strip-prefix auto
  modelport convert whole_model.pt weights.pt --exclude 'head.*'
  modelport convert model.safetensors model.npz --dry-run --json
  modelport convert ./my-model ./my-model-sharded --to hf --shard-size 2GB
  modelport convert ./sd-pipeline ./sd-pipeline-fp16 --to hf --dtype float16
  modelport convert ./my-model ./my-model-bin --to hf-bin

many conversions: a manifest, one JSON object a line, each a source, a target and the
options as the flags name them ({"source": "a.bin", "target": "a.safetensors", "dtype":
"bf16", "strip_prefix": "auto", "include": ["layers.*"], "no_verify": true}); flags given
here apply to every entry that does not set its own
  modelport convert --from-file manifest.jsonl --jsonl done.jsonl    (every core; rerun to resume)
  modelport convert --from-file - --dtype bfloat16 --jobs 4 < manifest.jsonl
  modelport convert --from-file manifest.jsonl --shard 2/4 --jsonl part2.jsonl  (machine 2 of 4)

exit codes: 0 converted and verified (with --from-file: every entry), 1 verification failed
(and no other error), 2 error or refused (with --from-file: an entry failed; its record says why)
"""

DTYPE_HELP = "cast floating tensors (ints untouched); also fp16/f16/half, bf16, fp32/f32/float"
GGUF_TYPE_HELP = (
    "GGUF target: store floating tensors as this type; the q* types, tq1_0/tq2_0 (ternary) "
    "and mxfp4 quantize matrices exactly as gguf-py does, while norms, biases and rows of "
    "partial blocks stay float, as in llama.cpp's converter; the --dtype spellings work too"
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help=COMMANDS["convert"].help,
        description="Read SRC by content, take its model weights (or what you select), and "
        "write DST. The output is written beside DST, read back and compared with the source "
        "before it replaces anything. Nothing stored in SRC is ever executed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", help="model file or directory")
    parser.add_argument(
        "target", nargs="?", help="output file (a directory for --to hf and hf-bin)"
    )
    parser.add_argument(
        "--to",
        choices=sorted(TARGETS),
        help="output format (default: from DST); hf: a Hugging Face folder of safetensors "
        "in the source library's layout (transformers, diffusers model or pipeline, PEFT "
        "adapter); hf-bin: the same with pytorch_model.bin-style torch files",
    )
    parser.add_argument("--dtype", type=dtypes.canonical_name, choices=CASTS, help=DTYPE_HELP)
    parser.add_argument(
        "--gguf-type", type=gguf_type_name, choices=sorted(GGUF_TYPES), help=GGUF_TYPE_HELP
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="GGML block-quantized tensors and MLX-quantized layers become float32 (or "
        "--dtype), under their own names",
    )
    select = parser.add_argument_group("what to take")
    select.add_argument("--extract", metavar="KEY", help="take the tensors under KEY (a.b.c)")
    select.add_argument(
        "--all",
        dest="take_all",
        action="store_true",
        help="the whole file: every tensor, and a checkpoint's other values (epoch, "
        "optimizer state, ...) with their structure, stored as typed JSON, never pickle",
    )
    select.add_argument(
        "--drop-unrepresentable",
        action="store_true",
        help="with --all: leave out the values the target cannot hold instead of refusing; "
        "the report lists them. A torch target holds plain data only: objects (an "
        "argparse.Namespace) are left out, and one holding tensors keeps its state as a "
        "dict. Other targets keep objects (class path and state, as typed JSON) and leave "
        "out only what typed JSON cannot hold (sparse tensors, bytes left in a pickle, "
        "tensors in an object's unnamed parts)",
    )
    select.add_argument("--ema", action="store_true", help="take the EMA weights")
    select.add_argument("--include", action="append", default=[], metavar="GLOB")
    select.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    _add_name_options(parser.add_argument_group("names"))
    _add_output_options(parser.add_argument_group("output"))
    _many_files.add_options(
        parser,
        "many conversions",
        "Convert every entry of a manifest instead of SRC into DST, each in a worker process "
        "of its own, with a time and memory budget per entry.",
        "convert the entries of MANIFEST, one JSON object a line ('-': standard input)",
        _many_files.DEFAULT_CONVERT_TIMEOUT,
        "MANIFEST",
    )
    parser.set_defaults(run=run)


def _add_output_options(output: Any) -> None:
    output.add_argument(
        "--shard-size",
        metavar="SIZE",
        help="--to hf / hf-bin: largest shard (5GB, 500MB, 50KB, 2GiB or bytes; default 5GB)",
    )
    output.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    output.add_argument("--fsync", action="store_true", help="flush to disk before returning")
    output.add_argument("--no-verify", dest="verify", action="store_false")
    output.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    output.add_argument(
        "--sha256",
        action="store_true",
        help="record the source's sha256 in the output (reads it all once)",
    )
    output.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="extract tensors from a file the scanner judged unsafe",
    )
    output.add_argument(
        "--card",
        action="store_true",
        help="also write a model card (README.md) beside DST, or inside it for --to hf: what "
        "it holds, the code that loads it, and this conversion as its provenance",
    )
    output.add_argument(
        "--json", action="store_true", help="print one JSON object (with --from-file: a list)"
    )
    output.add_argument("--wide", action="store_true", help=WIDE_HELP)


def _add_name_options(names: Any) -> None:
    names.add_argument("--strip-prefix", metavar="P", help="remove P, or 'auto' for a wrapper")
    names.add_argument("--add-prefix", metavar="P")
    names.add_argument("--rename", action="append", default=[], metavar="REGEX=REPL")
    names.add_argument(
        "--materialize-ties",
        action="store_true",
        help="write every name, even tensors tied to another",
    )
    names.add_argument(
        "--from-tf",
        choices=("auto", "off"),
        default="auto",
        help="auto (default): a transformers tf_model.h5 with its config.json (or a folder "
        "holding only those) takes the PyTorch model's names and layouts (needs torch and "
        "transformers); off: keep the TensorFlow names",
    )


def run(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.from_file or _many_files.options_given(args):
        return _run_manifest(args, _many_files_plan(args, options))
    if args.source is None or args.target is None:
        raise UsageError("name SRC and DST, or a manifest of conversions with --from-file")
    if args.from_tf == "auto" and not (options.extract or options.take_all):
        args.source, options = _pytorch_names(Path(args.source), options)
    card = _card_path(args) if args.card and not args.dry_run else None
    if args.json:
        report = modelport.convert(args.source, args.target, options)
        written = {} if card is None else {"card": str(_write_card(card, report, options, args))}
        print(json.dumps({**report.to_json(), **written}, indent=2))
        return ExitCode.OK
    report = _convert_with_progress(args, options)
    show(people_console(wide=args.wide), report, args.dtype or args.gguf_type)
    if card is not None:
        print(f"  card: {_write_card(card, report, options, args)}")
    return ExitCode.OK


def _many_files_plan(args: argparse.Namespace, options: ConvertOptions) -> Plan:
    if not args.from_file:
        raise UsageError(
            "--jsonl, --jobs, --timeout, --max-memory, --shard and --scheduler go with "
            "--from-file MANIFEST"
        )
    if args.source is not None:
        raise UsageError("name SRC and DST, or --from-file MANIFEST, not both")
    if args.card:
        raise UsageError("--card is for one conversion; run `modelport card` on each output")
    return _many_files.convert_plan(args, options)


def _run_manifest(args: argparse.Namespace, plan: Plan) -> int:
    """Every entry in a worker, said in the manifest's order as they finish: a line for
    each output (or one JSON list), an error line on stderr for each entry that failed."""
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for record in _many_files.records(plan):
        if record.status == "ok":
            results.append(record.result)
            if not args.json:
                print(_converted(record), flush=True)
            continue
        failure = {**_many_files.error_json(record), "target": record.target}
        failed.append(failure["error"]["type"])
        results.append(failure)
        if not args.json:
            message = failure["error"]["message"]
            print(f"error: {record.path} -> {record.target}: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    if not failed:
        return ExitCode.OK
    only_unverified = all(kind == "VerificationError" for kind in failed)
    return ExitCode.NO if only_unverified else ExitCode.ERROR


def _converted(record: Record) -> str:
    """One line for an entry converted, as the first line ``show`` prints for one."""
    result = record.result
    action = "would write" if result["dry_run"] else "wrote"
    checked = ", verified" if result["verified"] else ""
    return (
        f"{action} {result['target']} ({result['target_format']}): {result['tensor_count']} "
        f"tensors, {human_bytes(result['bytes_written'])}, from {record.path}{checked}"
    )


@dataclasses.dataclass(frozen=True)
class _CardTarget:
    """Where ``--card`` writes, and whether a README was there before the conversion."""

    path: Path
    existed: bool


def _card_path(args: argparse.Namespace) -> _CardTarget:
    """README.md inside a folder output, beside a file output; checked before the work."""
    target = Path(args.target)
    folder = args.to in ("hf", "hf-bin") or target.is_dir()
    path = target / "README.md" if folder else target.with_name("README.md")
    if path.parent.is_dir():
        placing.check_side_output(path, (target,), args.overwrite)
    return _CardTarget(path, path.exists())


def _cards() -> ModuleType:
    """The card writer, imported for ``--card`` alone: it brings numpy and the report's
    code, a tenth of a second a conversion without a card need not pay."""
    return importlib.import_module("modelport.reporting.card")


def _write_card(
    card: _CardTarget, report: ConvertReport, options: ConvertOptions, args: argparse.Namespace
) -> Path:
    """The output's card, its provenance this conversion. A README the conversion itself
    carried over from a Hugging Face source is replaced: the card describes the new files."""
    cards = _cards()
    made = cards.build_card(
        _card_subject(Path(report.target)),
        provenance=cards.conversion_provenance(report, options),
        relative_to=card.path.parent,
    )
    overwrite = args.overwrite or not card.existed
    placing.install_bytes(card.path, made.text.encode("utf-8"), overwrite=overwrite)
    return card.path


def _options(args: argparse.Namespace) -> ConvertOptions:
    renames = []
    for rule in args.rename:
        pattern, sep, replacement = rule.partition("=")
        if not sep:
            raise modelport.errors.UsageError(f"--rename {rule!r}: expected REGEX=REPL")
        renames.append((pattern, replacement))
    return ConvertOptions(
        to=args.to,
        dtype=args.dtype,
        gguf_type=args.gguf_type,
        dequantize=args.dequantize,
        sha256=args.sha256,
        extract=args.extract,
        take_all=args.take_all,
        drop_unrepresentable=args.drop_unrepresentable,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        strip_prefix=args.strip_prefix,
        add_prefix=args.add_prefix,
        renames=tuple(renames),
        materialize_ties=args.materialize_ties,
        ema=args.ema,
        overwrite=args.overwrite,
        fsync=args.fsync,
        verify=args.verify,
        dry_run=args.dry_run,
        allow_unsafe=args.allow_unsafe,
        shard_size=args.shard_size,
    )


def _pytorch_names(source: Path, options: ConvertOptions) -> tuple[str, ConvertOptions]:
    """A transformers ``tf_model.h5`` converted under the PyTorch names and layouts of the
    model its ``config.json`` describes (kernels transposed, renamed); other sources as named."""
    if not (source.suffix == ".h5" or source.is_dir()):  # no TF weights: no import of them
        return str(source), options
    tf_names = importlib.import_module("modelport.torch_models.tf_names")
    h5_path = tf_names.tf_weights_file(source)
    if h5_path is None:
        return str(source), options
    name_map = tf_names.pytorch_layout(h5_path, options.include, options.exclude)
    return str(h5_path), dataclasses.replace(options, name_map=name_map)


def _card_subject(target: Path) -> Path:
    """What the card describes: the output, or, for a folder that is no model folder by
    itself (weights written --to hf from a file with no config.json), its one weights file."""
    if not target.is_dir() or is_model_folder(target):
        return target
    weights = [p for p in sorted(target.iterdir()) if p.suffix in (".safetensors", ".bin")]
    return weights[0] if len(weights) == 1 else target


def _convert_with_progress(args: argparse.Namespace, options: ConvertOptions) -> ConvertReport:
    """The conversion with a progress bar on stderr, when stderr is a terminal (no bar in
    logs and pipes, and then no import of ``rich.progress``, a fiftieth of a second)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return modelport.convert(args.source, args.target, options)
    bars = importlib.import_module("rich.progress")
    with bars.Progress(
        bars.TextColumn("converting"),
        bars.BarColumn(),
        bars.DownloadColumn(),
        bars.TransferSpeedColumn(),
        bars.TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("convert", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result: ConvertReport = modelport.convert(
            args.source, args.target, options, on_progress=progress
        )
        return result


def show(out: Console, report: ConvertReport, dtype: str | None) -> None:
    """What was written, what was left out or noted, casts and their errors, verification."""
    action = "would write" if report.dry_run else "wrote"
    out.print(
        f"{action} {report.target} ({report.target_format}): {len(report.tensors)} tensors, "
        f"{human_bytes(report.bytes_written)}, from {report.source_format}",
        highlight=False,
    )
    out.print(f"  took: {report.selection}", highlight=False)
    if report.left_out:
        out.print(f"  left out: {', '.join(report.left_out)}", highlight=False)
    if report.aliases:
        out.print(
            f"  tied tensors stored once: {len(report.aliases)} aliases recorded", highlight=False
        )
    for note in report.notes:
        out.print(f"  note: {note}", highlight=False)
    if report.casts:
        worst = max(report.casts, key=lambda c: c.max_abs_error)
        overflowed = [c for c in report.casts if c.overflow]
        out.print(
            f"  cast {len(report.casts)} tensors to {dtype}: largest error "
            f"{worst.max_abs_error:.3g} ({worst.name}), "
            f"{sum(c.overflow for c in overflowed)} values overflowed to inf",
            highlight=False,
        )
        for cast in overflowed[:10]:
            out.print(f"    {cast.name}: {cast.overflow} overflowed", highlight=False)
    if report.dry_run:
        for name, dtype, shape, nbytes in report.tensors[:50]:
            out.print(f"  {name}  {dtype}{list(shape)}  {human_bytes(nbytes)}", highlight=False)
    elif report.verified:
        how = "equal to the same cast of the source" if report.casts else "bit for bit"
        out.print(
            f"  verified: every tensor read back {how} ({report.seconds:.2f} s)", highlight=False
        )
