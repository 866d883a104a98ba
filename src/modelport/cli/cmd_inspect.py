"""``modelport inspect``: what is in a model file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from itertools import chain
from json.encoder import encode_basestring_ascii as _quoted
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TextIO

import modelport
from modelport.cli import _inspect_stats, _many_files
from modelport.cli._output import WIDE_HELP, human_bytes, json_default, people_console
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.errors import UsageError
from modelport.loading.inspect_report import InspectReport, TensorSummary
from modelport.tensors import collector_paused
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
    parser.add_argument("--wide", action="store_true", help=WIDE_HELP)
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    parser.add_argument("--code", action="store_true", help="print TorchScript code")
    parser.add_argument(
        "--stats", action="store_true", help="per-tensor statistics (reads every value)"
    )
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
    if args.stats:
        _inspect_stats.refuse(args.paths, several=plan is not None)
    if plan is not None:
        return _run_fleet(args, plan)
    path = args.paths[0]
    if args.code and is_url(path):
        raise UsageError("--code reads a local file; inspect a URL without it")
    with collector_paused():
        return _run_one(args, path)


def _run_one(args: argparse.Namespace, path: str) -> int:
    report = modelport.inspect(path)
    measured = _inspect_stats.measure(path) if args.stats else None
    if args.json:
        payload = report.to_json(with_tensors=False)
        if measured is not None:
            payload["stats"] = _inspect_stats.to_json(measured)
        if args.code:
            with modelport.open(path) as model:
                payload["code"] = model.code
        write_json(sys.stdout, payload, report.tensors)
        return ExitCode.OK

    console = people_console(wide=args.wide)
    show_summary(console, report, depth=args.depth)
    if args.tensors:
        show_tensors(console, report)
    if measured is not None:
        _inspect_stats.show(console, measured)
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
    """Every tensor, up to ``MAX_TABLE_ROWS`` (a table of a million rows is for no one to
    read, and takes minutes to lay out): the rest are counted, and ``--json`` lists them."""
    from rich.table import Table

    table = Table("name", "dtype", "shape", "bytes", title="tensors", title_justify="left")
    for tensor in report.tensors[:MAX_TABLE_ROWS]:
        shape = str(list(tensor.shape))
        dtype = f"{tensor.dtype} ({tensor.note})" if tensor.note else tensor.dtype
        table.add_row(tensor.name, dtype, shape, human_bytes(tensor.nbytes))
    console.print(table)
    hidden = len(report.tensors) - MAX_TABLE_ROWS
    if hidden > 0:
        console.print(f"[dim]… {hidden:,} more tensors (--json lists every one)[/dim]")


MAX_TABLE_ROWS = 10_000


def write_json(out: TextIO, payload: dict[str, Any], tensors: Sequence[TensorSummary]) -> None:
    """``payload`` as ``json.dumps(payload, indent=2)`` prints it, with ``tensors`` in its
    empty ``"tensors"`` list: written a tensor at a time, as the json module would lay each
    out, so a million of them cost neither a million dicts nor one huge string."""
    text = json.dumps(payload, indent=2, default=json_default)
    head, found, tail = text.partition(_EMPTY_TENSORS)
    if not found or not tensors:
        print(text, file=out)
        return
    out.write(head + '\n  "tensors": [\n')
    lines = _TensorLines()
    for start in range(0, len(tensors), _JSON_BATCH):
        out.write(lines.batch(tensors[start : start + _JSON_BATCH]))
        out.write(",\n" if start + _JSON_BATCH < len(tensors) else "\n  ]")
    print(tail, file=out)


# At the top level (two spaces in), where no string's text can appear: json escapes newlines.
_EMPTY_TENSORS = '\n  "tensors": []'
_JSON_BATCH = 4096
_NAME, _DTYPE, _SHAPE, _NBYTES, _NOTE = map(
    attrgetter, ("name", "dtype", "shape", "nbytes", "note")
)


class _Memo(dict[Any, str]):
    """Each key's text, made once: a million tensors share a handful of dtypes and shapes."""

    def __init__(self, make: Callable[[Any], str]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> str:
        made = self[key] = self.make(key)
        return made


class _TensorLines:
    """Tensors laid out as ``json.dumps(..., indent=2)`` lays them out inside the tensors list,
    a batch at a time, each dtype, shape and note laid out once."""

    def __init__(self) -> None:
        self.dtypes = _Memo(_quoted)
        self.shapes = _Memo(_dims_json)
        self.notes = _Memo(_note_json)

    def batch(self, batch: Sequence[TensorSummary]) -> str:
        if not _plain(batch):
            return ",\n".join(map(_tensor_json, batch))
        dtypes, shapes, notes = self.dtypes, self.shapes, self.notes
        return ",\n".join(
            [
                f'    {{\n      "name": {_quoted(t.name)},\n      "dtype": {dtypes[t.dtype]},'
                f'\n      "shape": {shapes[t.shape]},\n      "nbytes": {t.nbytes}{notes[t.note]}'
                "\n    }"
                for t in batch
            ]
        )


def _plain(batch: Sequence[TensorSummary]) -> bool:
    """Whether every field has exactly the type the memos assume: json lays out a str
    subclass, a bool or a numpy integer its own way (and ``True == 1`` would share a memo)."""
    shapes = list(map(_SHAPE, batch))
    texts = {*map(type, map(_NAME, batch)), *map(type, map(_DTYPE, batch))}
    return (
        texts | {*map(type, map(_NOTE, batch))} == {str}
        and {*map(type, map(_NBYTES, batch))} == {int}
        and {*map(type, shapes)} == {tuple}
        and {*map(type, chain.from_iterable(shapes))} <= {int}
    )


def _dims_json(shape: tuple[int, ...]) -> str:
    return "[\n        " + ",\n        ".join(map(str, shape)) + "\n      ]" if shape else "[]"


def _note_json(note: str) -> str:
    return f',\n      "note": {_quoted(note)}' if note else ""


def _tensor_json(tensor: TensorSummary) -> str:
    """One tensor as ``json.dumps(..., indent=2)`` lays it out inside the tensors list."""
    shape = tensor.shape
    if (
        type(tensor.name) is not str
        or type(tensor.dtype) is not str
        or type(tensor.nbytes) is not int
        or not all(type(n) is int for n in shape)
    ):
        nested = json.dumps(tensor.to_json(), indent=2, default=json_default)
        return "    " + nested.replace("\n", "\n    ")
    return (
        f'    {{\n      "name": {_quoted(tensor.name)},\n      "dtype": {_quoted(tensor.dtype)},'
        f'\n      "shape": {_dims_json(shape)},\n      "nbytes": {tensor.nbytes}'
        f"{_note_json(tensor.note)}\n    }}"
    )


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
