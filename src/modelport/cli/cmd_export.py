"""``modelport export``: a torch model to ONNX, TorchScript, .pt2, ExecuTorch or LiteRT,
verified against eager in the target's own runtime."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from modelport import dtypes
from modelport.cli._recipe import export_recipe
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.cli.markdown import markdown
from modelport.errors import UsageError
from modelport.reporting.verification import Verification, export_facts
from modelport.torch_models.checking import resolve_fitting
from modelport.torch_models.example_inputs import read_example_inputs
from modelport.torch_models.export_report import ExportReport
from modelport.torch_models.exporting import EXPORTERS, FORMATS, bundle, export
from modelport.torch_models.model_spec import check_model_spec
from modelport.torch_models.quiet import quiet_libraries
from modelport.transfer import placing

EXAMPLES = """examples:
  modelport export --model tests.models:TinyResNet --init '{"classes": 10}' \\
      --input x:2,3,32,32 --dynamic x:0=batch --to onnx model.onnx
  modelport export --model mypkg.nets:build --weights model.safetensors \\
      --example-inputs inputs.npz --to pt2 model.pt2 --report export.md
  modelport export --model ./bert-dir --input input_ids:2,16:int64 --to onnx bert.onnx --json
  modelport export --model ./gpt2-dir --input input_ids:2,16:int64 \\
      --input attention_mask:2,16:int64 --dynamic input_ids:0=batch,1=seq \\
      --dynamic attention_mask:0=batch,1=seq --to onnx gpt2.onnx
  modelport export --model scripted.pt --input x:1,3,224,224 --to onnx --exporter legacy m.onnx
  modelport export --model tests.models:TinyResNet --input x:1,3,32,32 --to executorch m.pte
  modelport export --model tests.models:TinyResNet --input x:1,3,32,32 --to tflite m.tflite
  modelport export --model tests.models:Router --input x:2,5,8 --input mask:2,5 \\
      --input scale: --output-names scores,hidden,pooled --to onnx router.onnx

--model imports and runs YOUR code (pkg.module:Name); a directory with config.json is built
with transformers from the config (no hub, no remote code), a diffusers component folder
(unet/, vae/) with the diffusers class its config names, its weights read by modelport.
A TorchScript file is loaded with torch.jit.load (it runs the file's TorchScript, which cannot
import Python), a .pt2 with torch.export.load when modelport's scan finds it safe. A whole-model
pickle (torch.save(model)), or a checkpoint dict holding one (ultralytics' best.pt: its model,
else its ema), needs --trust-code: torch.load(weights_only=False) runs code from the file.
That is the one place modelport ever runs Python code from a file: only the --model file,
after scanning it (an unsafe verdict also needs --allow-unsafe).

--card writes README.md beside OUT: a model card with this command (source, recipe,
verification) as its provenance. --report FILE writes Markdown (the inputs, every output's
error against its tolerance, the runtime, the recipe), or for FILE.html the page `modelport
report` writes about OUT, opened by that same verification.

--example-inputs reads tensors (npz, torch.save dict, safetensors: by content, nothing runs)
named after forward's arguments; one tensor for a one-argument forward may have any name.
Inputs (from either) named after forward's arguments are passed by position while they
fill those arguments in order, and by keyword after the first one left out (GPT-2:
input_ids and attention_mask, no past_key_values); other names go first, by position.
ONNX inputs keep the names (--input-names renames them); ONNX outputs are named after what
forward returns: the keys of a dict or ModelOutput (last_hidden_state, logits), tuple
positions as output_0, output_1 (--output-names renames them). OUT holds the weights while
they fit in one protobuf (2 GB); above that, or with --external-data, they go to OUT.data.
A --model that is neither a file, a directory nor a findable pkg.module:Name is refused
before torch is imported.

exit codes: 0 exported and verified, 1 verification failed, 2 error
"""

INT_HIGH = 100  # random integer inputs lie in [0, INT_HIGH) or [0, config.vocab_size)
CARD_NAME: Final = "README.md"  # --card, beside OUT
HTML_SUFFIXES: Final = (".html", ".htm")  # --report FILE: the HTML page, else Markdown


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "export",
        help=COMMANDS["export"].help,
        description="Build the model, export it, run the exported file in its own runtime on "
        "several random inputs and compare every output with eager PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="output file (ONNX: OUT, and OUT.data above 2 GB)")
    add_model_arguments(parser)
    parser.add_argument("--weights", metavar="FILE", help="weights in any readable format")
    parser.add_argument("--to", choices=FORMATS, default="onnx", help="format (default onnx)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME:SHAPE[:DTYPE]",
        help="an example input, e.g. x:1,3,32,32 or ids:2,16:int64 (repeat; named after "
        "forward's arguments, which may be left out: those after a gap go by keyword)",
    )
    add_inputs_file(inputs)
    parser.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="NAME:AXIS=DIM[,AXIS=DIM]",
        help="dynamic axes, e.g. x:0=batch (the same DIM name ties axes together)",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset version")
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="dynamo",
        help="ONNX exporter: dynamo (torch.export-based, default) or legacy (TorchScript-based)",
    )
    parser.add_argument(
        "--input-names",
        type=_names,
        metavar="A,B",
        help="ONNX input names, one per input in forward's order (default: the inputs' names)",
    )
    parser.add_argument(
        "--output-names",
        type=_names,
        metavar="A,B",
        help="ONNX output names, one per output tensor (default: the keys of a dict or "
        "ModelOutput, output_0, output_1... for a tuple)",
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="ONNX: weights in OUT.data even when they fit in OUT (default: only above 2 GB)",
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    add_verification_options(parser)
    parser.set_defaults(run=run)


def _names(text: str) -> list[str]:
    """``a,b`` -> ["a", "b"] (argparse type of --input-names / --output-names)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--init``, as ``export``, ``rebuild`` and ``check`` take them
    (``models.build_model`` reads the JSON)."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="pkg.module:Name|DIR|FILE",
        help="pkg.module:Name (class or factory), an HF directory (transformers, or a "
        "diffusers component such as unet/), a TorchScript or .pt2 file, or a whole-model "
        "pickle or checkpoint dict holding one (with --trust-code)",
    )
    parser.add_argument(
        "--init", metavar="JSON", help="arguments for Name, as JSON (an object or a list)"
    )


def add_inputs_file(group: Any) -> None:
    group.add_argument(
        "--example-inputs",
        metavar="FILE",
        help="example inputs from a file (npz, .pt, safetensors), named after forward's arguments",
    )


def add_verification_options(parser: argparse.ArgumentParser) -> None:
    """The options ``export`` and ``rebuild`` share: tolerances, the report, overwriting,
    trusting the model file, JSON."""
    parser.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default by dtype)")
    parser.add_argument(
        "--report",
        metavar="FILE",
        help="write a report: Markdown (what was written, the inputs, every comparison, the "
        "recipe), or for FILE.html the page `modelport report` writes about OUT, that same "
        "report its first section",
    )
    parser.add_argument(
        "--card",
        action="store_true",
        help="also write a model card (README.md) beside OUT: what it holds, the code that "
        "loads it, and this command (source, recipe, verification) as its provenance",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a whole-model pickle (or a checkpoint dict holding one) as --model: "
        "loading it RUNS CODE from that file",
    )
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="read files the scanner judged unsafe (with --trust-code: run them)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    check_model_spec(args.model)  # a typo costs milliseconds, not torch's import
    report_path, card = side_targets(args, bundle(Path(args.output), args.to))
    # the libraries' loggers stay off; modelport's own warnings (CodeExecutionWarning) show
    with quiet_libraries(whole_process=True):
        report = _export(args)
    if report_path is not None:
        facts = export_facts(report, model_source(args), export_recipe(args))
        write_report(report_path, report.path, facts)
    if card is not None:
        sides = side_outputs()
        provenance = sides.export_provenance(args, report)
        sides.write_card(card, report.path, provenance, overwrite=args.overwrite)
    if args.json:
        written = {} if card is None else {"card": str(card)}
        print(json.dumps({**report.to_json(), **written}, indent=2))
    else:
        _show(report)
        show_side_outputs(report_path, card)
    return ExitCode.NO if report.verified is False else ExitCode.OK


def side_targets(
    args: argparse.Namespace, outputs: tuple[Path, ...]
) -> tuple[Path | None, Path | None]:
    """Where ``--report`` and ``--card`` write, checked before the work: never over an
    output, an existing file only with ``--overwrite``, never both in one file."""
    report = Path(args.report) if args.report else None
    card = Path(args.output).with_name(CARD_NAME) if args.card else None
    if report is not None and card is not None and report.resolve() == card.resolve():
        raise UsageError(f"{report}: --report and --card would write the same file")
    for side in (report, card):
        if side is not None:
            placing.check_side_output(side, outputs, args.overwrite)
    return report, card


def side_outputs() -> Any:
    """``cli._side_outputs`` (the card and the HTML page), imported when a run asks for
    one of them: its reporting modules are start-up a plain export does not pay."""
    return importlib.import_module("modelport.cli._side_outputs")


def write_report(target: Path, written: Path, facts: Verification) -> None:
    """``--report``: ``facts`` as Markdown, or for a ``.html`` name as the first section of
    the page about ``written``."""
    if target.suffix.lower() in HTML_SUFFIXES:
        side_outputs().write_html_report(target, written, facts)
    else:
        placing.write_text(target, markdown(facts))


def show_side_outputs(report: Path | None, card: Path | None) -> None:
    if report is not None:
        print(f"  report: {report}")
    if card is not None:
        print(f"  card: {card}")


def _export(args: argparse.Namespace) -> ExportReport:
    """Build the model and its example inputs as ``args`` say, then export and verify."""
    model = resolve_fitting(
        args.model,
        init=args.init,
        weights=args.weights,
        allow_unsafe=args.allow_unsafe,
        trust_code=args.trust_code,
    )
    if args.example_inputs:
        inputs = read_example_inputs(args.example_inputs, model, allow_unsafe=args.allow_unsafe)
    else:
        high = getattr(getattr(model, "config", None), "vocab_size", None) or INT_HIGH
        inputs = dict(parse_input(spec, int(high)) for spec in args.inputs)
    dynamic = dict(parse_dynamic(spec) for spec in args.dynamic)
    # the exporters print progress on both streams: stdout is modelport's (the JSON
    # object), stderr its messages; what the exporters print is dropped
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return export(
            model,
            args.output,
            inputs,
            to=args.to,
            dynamic=dynamic,
            opset=args.opset,
            exporter=args.exporter,
            verify=args.verify,
            rtol=args.rtol,
            atol=args.atol,
            overwrite=args.overwrite,
            input_names=args.input_names,
            output_names=args.output_names,
            external_data=args.external_data,
        )


def model_source(args: argparse.Namespace) -> str:
    """How the command line named the model, for the report."""
    parts = [f"--model {args.model}"]
    if args.init:
        parts.append(f"--init {args.init}")
    if args.weights:
        parts.append(f"--weights {args.weights}")
    if getattr(args, "example_inputs", None):
        parts.append(f"--example-inputs {args.example_inputs}")
    return " ".join(parts)


def parse_input(spec: str, high: int = INT_HIGH) -> tuple[str, Any]:
    """``NAME:1,3,32,32[:float32]`` -> (name, random example tensor). Integer inputs are
    ids below ``high`` (the model's vocabulary), except masks (``attention_mask``,
    any name ending in ``mask``), which are all ones: nothing hidden."""
    import torch

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise UsageError(f"--input {spec!r}: expected NAME:SHAPE[:DTYPE]")
    try:
        shape = [int(s) for s in parts[1].split(",") if s.strip()]
    except ValueError as exc:
        raise UsageError(f"--input {spec!r}: shape must be integers like 1,3,32,32") from exc
    if any(s < 0 for s in shape):
        raise UsageError(f"--input {spec!r}: negative size")
    dtype = (
        getattr(torch, dtypes.canonical_name(parts[2]), None) if len(parts) == 3 else torch.float32
    )
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--input {spec!r}: unknown dtype {parts[2]!r}")
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return parts[0], torch.rand(shape, generator=generator) < 0.5
    if dtype.is_floating_point:
        return parts[0], torch.randn(shape, generator=generator).to(dtype)
    if parts[0].endswith("mask"):
        return parts[0], torch.ones(shape, dtype=dtype)
    return parts[0], torch.randint(0, high, shape, generator=generator, dtype=dtype)


def parse_dynamic(spec: str) -> tuple[str, dict[int, str]]:
    """``NAME:0=batch,1=seq`` -> (name, {0: "batch", 1: "seq"})."""
    name, sep, rest = spec.partition(":")
    axes: dict[int, str] = {}
    for item in rest.split(","):
        axis, eq, dim = item.partition("=")
        if not sep or not name or not eq or not dim.isidentifier() or not axis.isdigit():
            raise UsageError(f"--dynamic {spec!r}: expected NAME:AXIS=DIM[,AXIS=DIM]")
        axes[int(axis)] = dim
    return name, axes


def _show(report: ExportReport) -> None:
    out = Console(soft_wrap=True)
    files = ", ".join(str(f) for f in report.files)
    out.print(f"wrote {files} ({report.format}, {report.seconds:.1f} s)", highlight=False)
    for note in report.warnings:
        out.print(f"  warning: {note}", highlight=False)
    if report.verified is None:
        out.print("  not verified (--no-verify)", highlight=False)
        return
    samples = sorted({c.sample for c in report.outputs})
    if report.verified:
        out.print(
            f"  verified against eager on {len(samples)} inputs ({', '.join(samples)}) "
            f"in {report.runtime}: "
            f"max abs error {report.max_abs_error:.3g}",
            highlight=False,
        )
        if any(c.padded for c in report.outputs):
            out.print(
                "  (positions attention_mask marks as padding were not compared)",
                highlight=False,
            )
        return
    out.print("  [red]verification FAILED[/red]: the export differs from eager")
    for check in [c for c in report.outputs if not c.ok][:10]:
        out.print(
            f"    {check.name} on {check.sample}: max abs {check.max_abs:.3g}, max rel "
            f"{check.max_rel:.3g} (atol {check.atol:g}, rtol {check.rtol:g})",
            highlight=False,
        )
