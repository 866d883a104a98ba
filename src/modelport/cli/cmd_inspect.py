"""``modelport inspect``: what is in a model file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

import modelport
from modelport.cli import _many_files
from modelport.cli._output import console_width, human_bytes, json_default
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.errors import UsageError
from modelport.loading.inspect_report import InspectReport
from modelport.transfer.remote import is_url
from modelport.tree import quantization

if TYPE_CHECKING:
    from rich.console import Console
    from rich.tree import Tree

    from modelport.fleet.running import Plan

EXAMPLES = (
    """examples:
  modelport inspect model.safetensors
  modelport inspect checkpoint.pt --tensors
  modelport inspect scripted.pt --code
  modelport inspect ./my-hf-model --json

"""
    + _many_files.MANY_FILES.format(command="inspect")
    + """
Several files print one line each (format, tensors, parameters, size, safety); --json gives
a list of the objects one file gives.
"""
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help=COMMANDS["inspect"].help,
        description="Read a model file or directory by content and summarise it. Never "
        "executes anything stored in the file and reads no tensor data.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _many_files.add_arguments(
        parser, "model files or directories (a folder that is no model: its models)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    parser.add_argument("--code", action="store_true", help="print TorchScript code")
    parser.add_argument(
        "--depth",
        type=int,
        default=DEFAULT_DEPTH,
        metavar="N",
        help=f"module tree levels shown (default {DEFAULT_DEPTH}); deeper ones are counted",
    )
    parser.set_defaults(run=run)


DEFAULT_DEPTH = 3


def run(args: argparse.Namespace) -> int:
    plan = _many_files.plan(args, "inspect", {"code": args.code})
    if plan is not None:
        return _run_fleet(args, plan)
    path = args.paths[0]
    if args.code and is_url(path):
        raise UsageError("--code reads a local file; inspect a URL without it")
    report = modelport.inspect(path)
    if args.json:
        payload = report.to_json()
        if args.code:
            with modelport.open(path) as model:
                payload["code"] = model.code
        print(json.dumps(payload, indent=2, default=json_default))
        return ExitCode.OK
    from rich.console import Console  # the people path only: --json goes without rich

    console = Console(width=console_width())
    show_summary(console, report, depth=args.depth)
    if args.tensors:
        show_tensors(console, report)
    if args.code:
        with modelport.open(path) as model:
            for name, text in model.code.items():
                console.print(f"── {name} ──", style="bold", markup=False, highlight=False)
                console.print(text, markup=False, highlight=False)
            if not model.code:
                console.print("[dim]no code in this file[/dim]")
    return ExitCode.OK


def _run_fleet(args: argparse.Namespace, plan: Plan) -> int:
    """Inspect in workers: one line per file (or the list of --json objects), in the order
    named; errors on stderr as one file's are."""
    if (args.tensors or args.code) and not args.json:
        raise UsageError(
            "--tensors and --code show one file; for several, add --json (each object lists "
            "its tensors, and its code with --code)"
        )
    results: list[Any] = []
    failed = False
    for record in _many_files.records(plan):
        failed = failed or record.status != "ok"
        if args.json:
            results.append(
                record.result if record.status == "ok" else _many_files.error_json(record)
            )
        elif record.status == "ok":
            print(_one_line(record.result), flush=True)
        else:
            print(f"error: {_many_files.error_json(record)['error']['message']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return ExitCode.ERROR if failed else ExitCode.OK


def _one_line(payload: dict[str, Any]) -> str:
    verdict = payload["safety"].get("verdict", "")
    return (
        f"{payload['format']:14} {payload['tensor_count']:>7,} tensors "
        f"{payload['parameters']:>15,} parameters {human_bytes(payload['size_bytes']):>9}  "
        f"{verdict:10} {payload['path']}"
        + (f"  (fetched {payload['bytes_fetched']:,} bytes)" if "bytes_fetched" in payload else "")
    )


def show_summary(console: Console, report: InspectReport, *, depth: int = 0) -> None:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", report.path)
    table.add_row("format", report.format)
    table.add_row("size", human_bytes(report.size_bytes))
    if report.bytes_fetched is not None:
        table.add_row(
            "fetched", f"{report.bytes_fetched:,} bytes ({human_bytes(report.bytes_fetched)})"
        )
    table.add_row("tensors", f"{len(report.tensors):,}")
    table.add_row("parameters", f"{report.parameters:,}")
    if report.quantization:
        table.add_row("quantization", quantization.describe(report.quantization))
    if report.weights_only is not None:
        table.add_row("weights_only=True", _weights_only_text(report.weights_only))
    dtype_text = ", ".join(f"{d} {human_bytes(n)}" for d, n in report.bytes_by_dtype.items())
    table.add_row("bytes by dtype", dtype_text or "-")
    if report.weights_note:
        table.add_row("weights", report.weights_note)
    if report.aliases:
        table.add_row("shared storage", "; ".join(" = ".join(g) for g in report.aliases[:5]))
    for key, value in report.details.items():
        if key != "modules":
            table.add_row(key.replace("_", " "), _detail(value))
    console.print(table)
    if report.metadata:
        meta = Table("key", "value", title="metadata", title_justify="left")
        for key, value in report.metadata.items():
            meta.add_row(str(key), _short(value))
        console.print(meta)
    if report.extras:
        extras = Table.grid(padding=(0, 2))
        extras.add_column(style="bold")
        extras.add_column()
        items = report.extras.items() if isinstance(report.extras, dict) else [("", report.extras)]
        for key, value in items:
            extras.add_row(str(key), _short(value, 100))
        console.print("[bold]checkpoint extras[/bold]")
        console.print(extras)
    if report.modules:
        console.print(_module_tree(report.modules, depth or DEFAULT_DEPTH))
    if report.code_files:
        console.print(f"[bold]code[/bold]: {len(report.code_files)} files (show with --code)")
    verdict = report.safety.get("verdict", "")
    style = {"safe": "green", "suspicious": "yellow", "unsafe": "bold red"}.get(verdict, "magenta")
    console.print(f"[bold]safety[/bold]: [{style}]{verdict}[/{style}]")
    for finding in report.safety.get("findings", [])[:10]:
        console.print(f"  {finding['severity']}: {finding['message']}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def show_tensors(console: Console, report: InspectReport) -> None:
    from rich.table import Table

    table = Table("name", "dtype", "shape", "bytes", title="tensors", title_justify="left")
    for tensor in report.tensors:
        shape = str(list(tensor.shape))
        dtype = f"{tensor.dtype} ({tensor.note})" if tensor.note else tensor.dtype
        table.add_row(tensor.name, dtype, shape, human_bytes(tensor.nbytes))
    console.print(table)


def _module_tree(modules: dict[str, Any], depth: int) -> Tree:
    """The pickled modules ``depth`` levels down; what lies deeper is counted, so a detection
    model's hundreds of layers take a line (``--depth`` shows more)."""
    from rich.tree import Tree

    if "class" in modules:
        root = Tree(f"[bold]modules[/bold]: {modules['class']}")
        _add_children(root, modules.get("children", {}), depth)
        return root
    root = Tree("[bold]modules[/bold]")
    for key, node in modules.items():
        branch = root.add(f"{key}: {node['class']}")
        _add_children(branch, node.get("children", {}), depth - 1)
    return root


def _add_children(branch: Tree, children: dict[str, Any], depth: int) -> None:
    if depth <= 0:
        hidden = _count(children)
        if hidden:
            branch.add(f"[dim]… {hidden:,} modules below (--depth for more)[/dim]")
        return
    for name, child in children.items():
        sub = branch.add(f"{name}: {child['class']}")
        _add_children(sub, child.get("children", {}), depth - 1)


def _count(children: dict[str, Any]) -> int:
    return sum(1 + _count(child.get("children", {})) for child in children.values())


def _detail(value: Any) -> str:
    """A format detail; a list of named entries (ONNX inputs and outputs) one entry a line,
    whole, as people look for these names."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "name" in v for v in value)
    ):
        return "\n".join(
            "  ".join([str(entry["name"]), *(_short(v) for k, v in entry.items() if k != "name")])
            for entry in value
        )
    return _short(value)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=json_default)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _weights_only_text(answer: dict[str, Any]) -> str:
    """What ``torch.load(weights_only=True)`` would do with the file, in one line."""
    if answer["accepted"]:
        return "torch.load loads it"
    refused = ", ".join(r["global"] for r in answer["refused"])
    if answer["add_safe_globals"] is None:
        return f"torch.load refuses {refused}, and no add_safe_globals can admit it"
    return f"torch.load refuses {refused}; torch.serialization.add_safe_globals admits them"
