"""``modelport rebuild``: weights + the class that uses them -> a whole model, loaded back and
checked against eager before success is reported."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from modelport.cli._recipe import rebuild_recipe
from modelport.cli.cmd_export import (
    INT_HIGH,
    add_inputs_file,
    add_model_arguments,
    add_verification_options,
    parse_dynamic,
    parse_input,
    show_side_outputs,
    side_outputs,
    side_targets,
    write_report,
)
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.reporting.verification import rebuild_facts
from modelport.torch_models.example_inputs import read_example_inputs
from modelport.torch_models.model_spec import check_model_spec
from modelport.torch_models.rebuilding import TARGETS, RebuildReport, rebuild

EXAMPLES = """examples:
  modelport rebuild --model tests.models:TinyResNet --init '{"classes": 10}' \\
      model.safetensors model.pt
  modelport rebuild --model mypkg.nets:Net weights.bin net.pt2 --to pt2 --input x:1,3,224,224
  modelport rebuild --model mypkg.nets:Net weights.bin net.pt2 --example-inputs inputs.npz \\
      --dynamic x:0=batch --report rebuild.md
  modelport rebuild --model ./bert-dir weights.safetensors bert.pt --json
  modelport rebuild --model mypkg.nets:Net weights.bin net.pt --card --report rebuild.html

--model imports and runs YOUR code (pkg.module:Name); a directory with config.json is built
with transformers from the config (no hub, no remote code); a TorchScript or .pt2 file or,
with --trust-code, a whole-model pickle is loaded as `modelport export --help` describes
(--trust-code runs Python code from that one file: the one place modelport does). The
weights are read by modelport (never unpickled). --to pickle (the default) writes
torch.save(model): loading it needs torch.load(weights_only=False) and the class importable;
torchscript, pt2, executorch and tflite need example inputs (--input or --example-inputs).
--card writes README.md beside OUT (a model card, this rebuild as its provenance); --report
FILE writes Markdown, or for FILE.html the page `modelport report` writes about OUT, opened
by the same verification.

exit codes: 0 written and verified, 1 verification failed, 2 error
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "rebuild",
        help=COMMANDS["rebuild"].help,
        description="Build the model, load the weights strictly, save the whole model, load "
        "the file back and compare it with the eager model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", help="weights in any format modelport reads")
    parser.add_argument("output", help="output file")
    add_model_arguments(parser)
    parser.add_argument(
        "--to",
        choices=TARGETS,
        help="format (default by name: .pt2, .pte, .tflite; else torch.save)",
    )
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME:SHAPE[:DTYPE]",
        help="an example input, e.g. x:1,3,32,32 (repeat; named after forward's arguments, "
        "as for export); needed for torchscript and pt2, optional for pickle (then outputs "
        "are compared too)",
    )
    add_inputs_file(inputs)
    parser.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="NAME:AXIS=DIM[,AXIS=DIM]",
        help="dynamic axes of the example inputs, e.g. x:0=batch (verified at other sizes)",
    )
    add_verification_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_model_spec(args.model)  # a typo costs milliseconds, not torch's import
    report_path, card = side_targets(args, (Path(args.output), Path(args.weights)))
    inputs: Any = dict(parse_input(spec, INT_HIGH) for spec in args.inputs) or None
    if args.example_inputs:  # read once the model is built: names match its forward
        inputs = functools.partial(
            read_example_inputs, args.example_inputs, allow_unsafe=args.allow_unsafe
        )

    dynamic = dict(parse_dynamic(spec) for spec in args.dynamic)
    with contextlib.redirect_stdout(sys.stderr):  # exporters talk on stdout
        report = rebuild(
            args.model,
            args.weights,
            args.output,
            init=args.init,
            to=args.to,
            example_inputs=inputs,
            dynamic=dynamic,
            allow_unsafe=args.allow_unsafe,
            trust_code=args.trust_code,
            rtol=args.rtol,
            atol=args.atol,
            overwrite=args.overwrite,
        )
    if report_path is not None:
        write_report(report_path, report.path, rebuild_facts(report, rebuild_recipe(args)))
    if card is not None:
        sides = side_outputs()
        provenance = sides.rebuild_provenance(args, report)
        sides.write_card(card, report.path, provenance, overwrite=args.overwrite)
    if args.json:
        written = {} if card is None else {"card": str(card)}
        print(json.dumps({**report.to_json(), **written}, indent=2))
    else:
        _show(report)
        show_side_outputs(report_path, card)
    return ExitCode.OK if report.verified else ExitCode.NO


def _show(report: RebuildReport) -> None:
    out = Console(soft_wrap=True)
    files = ", ".join(str(f) for f in report.files)
    out.print(f"wrote {files} ({report.format}, {report.seconds:.1f} s)", highlight=False)
    for note in report.warnings:
        out.print(f"  warning: {note}", highlight=False)
    if report.verified:
        what = []
        if report.tensors_compared:
            what.append(f"{report.tensors_compared} state-dict tensors bit for bit")
        if report.outputs:
            samples = sorted({c.sample for c in report.outputs})
            what.append(
                f"outputs on {len(samples)} inputs (max abs error {report.max_abs_error:.3g})"
            )
        out.print(f"  loaded back and verified: {'; '.join(what)}", highlight=False)
    else:
        out.print("  [red]verification FAILED[/red]: the saved model differs from eager")
        for name in report.mismatched[:10]:
            out.print(f"    state-dict tensor {name} differs", highlight=False)
        for check in [c for c in report.outputs if not c.ok][:10]:
            out.print(
                f"    {check.name} on {check.sample}: max abs {check.max_abs:.3g} "
                f"(atol {check.atol:g}, rtol {check.rtol:g})",
                highlight=False,
            )
    out.print(f"  load with: {report.load_with}", highlight=False)
    out.print(f"  requires: {report.requires}", highlight=False)
