"""modelport on the wild corpus (``benchmarks/wild_corpus.py``): real files from packages.

For each manifest file, in a child process of its own (so one bad file cannot hang or crash
the run; ``--timeout`` seconds each), through modelport's API:

- ``inspect``: the format it finds by content and its tensor count, against the format the
  corpus classifier expects and the tensor count of the reference loader where a safe one
  is installed (``torch.load(weights_only=True)``, ``torch.jit.load``, ``numpy.load`` without
  pickles, safetensors, ``onnx.load``, ``gguf.GGUFReader``, h5py, the ``tflite`` package,
  ``flax.serialization.msgpack_restore``). Pickles, joblib files, legacy GGML and TF
  checkpoints have no safe reference here: nothing from them is executed;
- ``scan``: the verdict (the files are benign, so anything but ``safe`` is counted);
- ``convert --all`` to safetensors in a temporary folder: whole when every listed tensor
  (or every reference tensor) is written, ties counted;
- the round trip: each reference tensor's bytes found bit for bit in the output (by name,
  else by content), or, with no reference, modelport's own verification.

Prints one table (a row per expected format) and the failures (file, step, first line).

Usage: python benchmarks/bench_wild.py [--cache DIR] [--only TEXT ...] [--timeout S] [-j N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE = Path.home() / ".cache" / "modelport-wild"
SAME_FORMAT = {"hdf5": {"hdf5", "keras"}, "pickle": {"pickle", "torch-legacy"}}

Digests = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, sha1 of raw bytes)


def _digest(data: Any) -> str:
    """The bytes of an array in little-endian order (what safetensors stores)."""
    array = np.asarray(data)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8).tobytes()).hexdigest()


def _torch_digest(tensor: Any) -> str:
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return _digest(np.zeros(0, np.uint8))
    return _digest(flat.view(torch.uint8).numpy())


# -- reference loaders (nothing they read is executed) ---------------------------------------


def _walk_torch(value: Any, prefix: str, seen: set[int]) -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_torch(item, f"{prefix}.{key}" if prefix else str(key), seen)
    elif isinstance(value, list | tuple) and id(value) not in seen:
        seen.add(id(value))
        for index, item in enumerate(value):
            yield from _walk_torch(item, f"{prefix}.{index}" if prefix else str(index), seen)


def _ref_torch(path: Path, scripted: bool) -> Digests:
    import torch

    if scripted:
        tree: Any = torch.jit.load(str(path), map_location="cpu").state_dict()  # type: ignore[no-untyped-call]
    else:
        tree = torch.load(path, map_location="cpu", weights_only=True)
    return {n: (tuple(t.shape), _torch_digest(t)) for n, t in _walk_torch(tree, "", set())}


def _numpy_tensors(name: str, array: Any) -> Iterator[tuple[str, Any]]:
    """The tensors numpy users read out of an array: a record array's fields (``array[f]``),
    nested records' fields in turn; text (``U``, ``S``) is no tensor."""
    if array.dtype.names:
        for field in array.dtype.names:
            yield from _numpy_tensors(f"{name}.{field}" if name else field, array[field])
    elif array.dtype.kind not in "US":
        yield name, array


def _ref_numpy(path: Path, expected: str) -> Digests:
    if expected == "npy":
        arrays = {"": np.load(path, allow_pickle=False)}
    else:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    return {
        name: (array.shape, _digest(array))
        for key, whole in arrays.items()
        for name, array in _numpy_tensors(key, whole)
    }


def _ref_safetensors(path: Path) -> Digests:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {
            k: (tuple(handle.get_tensor(k).shape), _torch_digest(handle.get_tensor(k)))
            for k in handle.keys()  # noqa: SIM118 (safe_open is no mapping)
        }


def _ref_onnx(path: Path) -> Digests:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    found: Digests = {}
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            found[init.name] = (array.shape, _digest(array))
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)
                elif node.op_type == "Constant" and attribute.type == onnx.AttributeProto.TENSOR:
                    array = numpy_helper.to_array(attribute.t)
                    found[node.output[0]] = (array.shape, _digest(array))
    return found


def _ref_gguf(path: Path) -> Digests:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: (tuple(int(d) for d in t.shape), _digest(t.data)) for t in reader.tensors}


def _ref_hdf5(path: Path) -> Digests:
    import h5py

    found: Digests = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and item.dtype.kind in "biufc" and item.shape is not None:
            array = item[()]
            found[name] = (tuple(item.shape), _digest(np.asarray(array)))

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return found


def _ref_tflite(path: Path) -> Digests:
    import tflite

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    found: Digests = {}
    sparse: dict[int, str] = {}  # tensor index (first subgraph) -> name
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            buffer = model.Buffers(tensor.Buffer())
            if tensor.Buffer() == 0 or buffer.DataLength() == 0:
                continue
            name = tensor.Name().decode("utf-8", "replace")
            if tensor.Sparsity() is not None and g == 0:
                sparse[t] = name
                continue
            found[name] = (
                tuple(tensor.ShapeAsNumpy().tolist() or ()),
                _digest(buffer.DataAsNumpy()),
            )
    if sparse:
        found.update(_ref_tflite_dense(path, model, sparse))
    return found


def _ref_tflite_dense(path: Path, model: Any, sparse: dict[int, str]) -> Digests:
    """A sparse constant's buffer holds only its non-zero values: the reference for it is
    the dense tensor TFLite's own DENSIFY op makes of it (run without the default XNNPACK
    delegate, which densifies inside itself and leaves the op's output empty)."""
    import tensorflow as tf
    import tflite

    graph = model.Subgraphs(0)
    densified: dict[int, int] = {}  # sparse input -> DENSIFY output
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        code = model.OperatorCodes(op.OpcodeIndex())
        if max(code.DeprecatedBuiltinCode(), code.BuiltinCode()) == tflite.BuiltinOperator.DENSIFY:
            densified[op.Inputs(0)] = op.Outputs(0)
    resolver = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = tf.lite.Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=resolver,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    found: Digests = {}
    for index, name in sparse.items():
        if index in densified:
            dense = interpreter.get_tensor(densified[index])
            found[name] = (tuple(dense.shape), _digest(dense))
    return found


def _ref_flax(path: Path) -> Digests:
    from flax import serialization
    from flax.traverse_util import flatten_dict

    tree = serialization.msgpack_restore(path.read_bytes())
    flat = flatten_dict(tree, sep="/")  # type: ignore[no-untyped-call]
    return {k: (np.shape(v), _digest(np.asarray(v))) for k, v in flat.items()}


def reference(path: Path, expected: str) -> tuple[Digests | None, str]:
    """The tensors a safe reference loader finds, or None and why there is none."""
    loaders: dict[str, Any] = {
        "torch-zip": lambda: _ref_torch(path, False),
        "torch-legacy": lambda: _ref_torch(path, False),
        "torchscript": lambda: _ref_torch(path, True),
        "npy": lambda: _ref_numpy(path, "npy"),
        "npz": lambda: _ref_numpy(path, "npz"),
        "safetensors": lambda: _ref_safetensors(path),
        "onnx": lambda: _ref_onnx(path),
        "gguf": lambda: _ref_gguf(path),
        "hdf5": lambda: _ref_hdf5(path),
        "keras": lambda: _ref_hdf5(path),
        "tflite": lambda: _ref_tflite(path),
        "flax-msgpack": lambda: _ref_flax(path),
    }
    if expected not in loaders:
        return None, "no safe reference"
    try:
        return loaders[expected](), ""
    except Exception as error:
        return None, f"reference refused: {_first_line(error)}"


# -- one file, in a child process -------------------------------------------------------------


def _first_line(error: BaseException, path: Path | None = None) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    if path is not None:
        line = line.replace(f"{path}: ", "").replace(str(path), path.name)
    return line[:220]


def _converted(path: Path) -> Digests:
    from safetensors import safe_open

    if path.suffix == ".pt":
        return _converted_torch(path)
    if path.suffix == ".npz":
        with np.load(path) as arrays:  # no pickles: what modelport writes needs none
            return {k: (arrays[k].shape, _digest(arrays[k])) for k in arrays.files}
    with safe_open(str(path), framework="pt") as handle:
        return {
            k: (tuple(handle.get_tensor(k).shape), _torch_digest(handle.get_tensor(k)))
            for k in handle.keys()  # noqa: SIM118 (safe_open is no mapping)
        }


def _converted_torch(path: Path) -> Digests:
    """A torch zip ``convert --all`` wrote, read by ``torch.load(weights_only=True)``: its
    tensors by dotted path through the saved tree."""
    import torch

    found: Digests = {}
    pending: list[tuple[str, Any]] = [("", torch.load(path, weights_only=True))]
    while pending:
        prefix, value = pending.pop()
        if isinstance(value, torch.Tensor):
            found[prefix] = (tuple(value.shape), _torch_digest(value))
        elif isinstance(value, dict):
            pending.extend((f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            pending.extend((f"{prefix}.{i}" if prefix else str(i), v) for i, v in enumerate(value))
    return found


def _round_trip(ref: Digests, out: Digests, aliases: dict[str, str]) -> tuple[int, int]:
    """How many reference tensors the output holds bit for bit: by name (or alias), else by
    content (names differ between tools)."""
    contents = {digest for _, digest in out.values()}
    matched = 0
    for name, (_, digest) in ref.items():
        target = aliases.get(name, name)
        if (target in out and out[target][1] == digest) or digest in contents:
            matched += 1
    return matched, len(ref)


def _emit(result: dict[str, Any]) -> None:
    """One JSON line per step: if a later step kills the process, the parent still has the
    earlier ones."""
    print(json.dumps(result), flush=True)


def _retargeted(
    path: Path, target: Path, named: list[str], result: dict[str, Any]
) -> tuple[Any, Path]:
    """``convert --all`` to the first of the targets a refusal named that takes the file
    whole, as a user would follow the message."""
    import modelport
    from modelport import ConvertOptions
    from modelport.errors import ConversionError

    refused: ConversionError | None = None
    for to in named:
        other = target.with_suffix(".pt" if to == "torch" else ".npz")
        try:
            converted = modelport.convert(path, other, ConvertOptions(to=to, take_all=True))
        except ConversionError as error:
            refused = error
            continue
        result["retargeted"] = to
        return converted, other
    assert refused is not None
    raise refused


def _convert(
    path: Path, target: Path, result: dict[str, Any]
) -> tuple[Digests | None, dict[str, str]]:
    """``convert --all``; where it refuses values that are not plain data, once more with
    ``drop_unrepresentable`` (then the file does not count as converted whole); where
    safetensors cannot hold a dtype (complex128) and the refusal names ``--to torch``, to a
    torch zip, as its message tells a user to."""
    import modelport
    from modelport import ConvertOptions
    from modelport.errors import ConversionError

    options = ConvertOptions(to="safetensors", take_all=True, overwrite=True)
    try:
        try:
            converted = modelport.convert(path, target, options)
        except ConversionError as error:
            named = re.findall(r"--to (torch|npz)\b", str(error))
            if "cannot hold" in str(error) and named:
                converted, target = _retargeted(path, target, named, result)
            elif "drop-unrepresentable" in str(error):
                result["failures"].append(("convert --all", _first_line(error, path)))
                result["dropped"] = True
                options = ConvertOptions(
                    to="safetensors", take_all=True, overwrite=True, drop_unrepresentable=True
                )
                converted = modelport.convert(path, target, options)
            else:
                raise
    except Exception as error:
        if "selection holds no tensors" in str(error) and result.get("count") == 0:
            result["empty"] = True
        else:
            result["failures"].append(("convert", _first_line(error, path)))
        return None, {}
    try:
        out = _converted(target)
    except Exception as error:  # modelport wrote a file safetensors itself cannot read
        result["failures"].append(("convert output", _first_line(error, target)))
        return None, {}
    result["converted"] = len(out) + len(converted.aliases)
    result["left_out"] = len(converted.left_out)
    result["verified"] = converted.verified
    return out, converted.aliases


def run_one(path: Path, expected: str) -> None:
    import modelport

    warnings.simplefilter("ignore")
    result: dict[str, Any] = {"failures": [], "step": "inspect"}
    _emit(result)
    try:
        report = modelport.inspect(path)
        result["format"] = report.format
        result["count"] = len(report.tensors)
    except Exception as error:
        result["failures"].append(("inspect", _first_line(error, path)))
    result["step"] = "scan"
    _emit(result)
    try:
        result["scan"] = modelport.scan(path).verdict
    except Exception as error:
        result["scan"] = "crash"
        result["failures"].append(("scan", _first_line(error, path)))
    result["step"] = "convert"
    _emit(result)
    with tempfile.TemporaryDirectory(prefix="wild-") as folder:
        out, aliases = _convert(path, Path(folder) / "out.safetensors", result)
        result["step"] = "reference"
        _emit(result)
        ref, why = reference(path, expected)
        result["ref_count"] = None if ref is None else len(ref)
        result["ref_note"] = why
        if ref is not None and out is not None:
            result["round_trip"] = _round_trip(ref, out, aliases)
    result["step"] = "done"
    _emit(result)


# -- the run ----------------------------------------------------------------------------------


def _child(entry: dict[str, Any], cache: Path, timeout: float) -> dict[str, Any]:
    path = cache / entry["path"]
    command = [sys.executable, __file__, "--one", str(path), entry["expected_format"]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"failures": [("timeout", f"more than {timeout:g} s")], "scan": "timeout"}
    except OSError as error:
        return {"failures": [("start", _first_line(error))], "scan": "crash"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"failures": []}
    if done.returncode != 0 or result.get("step") != "done":
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        step = result.get("step", "start")
        result["failures"].append((f"crash in {step}", f"exit {done.returncode}: {tail[:200]}"))
        result.setdefault("scan", "crash")
    return result


def judge(entry: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Turn one result into the table's yes/no columns, adding failures for mismatches."""
    expected = entry["expected_format"]
    failures: list[tuple[str, str]] = [tuple(f) for f in result["failures"]]  # type: ignore[misc]
    found = result.get("format")
    format_ok = found is not None and found in SAME_FORMAT.get(expected, {expected})
    if found is not None and not format_ok:
        failures.append(("format", f"modelport says {found}, expected {expected}"))
    ref_count, count = result.get("ref_count"), result.get("count")
    count_ok = count is not None and (ref_count is None or ref_count == count)
    if count is not None and not count_ok:
        failures.append(("count", f"inspect lists {count} tensors, reference {ref_count}"))
    converted = result.get("converted")
    if result.get("empty") and not ref_count:
        converted = 0  # nothing to write: the refusal is right
    wanted = ref_count if ref_count is not None else count
    whole = converted is not None and wanted is not None and converted >= wanted
    whole = whole and not result.get("dropped")
    if converted is not None and not whole and not result.get("dropped"):
        failures.append(("convert", f"wrote {converted} of {wanted} tensors"))
    round_trip = result.get("round_trip")
    if round_trip is not None:
        trip_ok = round_trip[0] == round_trip[1]
        if not trip_ok:
            failures.append(("round-trip", f"{round_trip[0]} of {round_trip[1]} bit for bit"))
    else:
        trip_ok = converted is not None and (bool(result.get("verified")) or converted == 0)
    return {
        "format_ok": format_ok,
        "read_ok": format_ok and count_ok,
        "has_ref": ref_count is not None,
        "whole": whole,
        "trip_ok": trip_ok,
        "scan": result.get("scan", "crash"),
        "failures": failures,
        "ref_note": result.get("ref_note", ""),
    }


def print_table(entries: list[dict[str, Any]], judged: list[dict[str, Any]]) -> None:
    rows: dict[str, list[dict[str, Any]]] = {}
    for entry, verdict in zip(entries, judged, strict=True):
        rows.setdefault(entry["expected_format"], []).append(verdict)
    header = (
        f"{'format':15} {'files':>5} {'fmt ok':>6} {'ref':>4} {'read ok':>7} {'whole':>6} "
        f"{'trip ok':>7}  scan safe/susp/unsafe/error"
    )
    print(header)
    print("-" * len(header))
    everything = [v for group in rows.values() for v in group]
    for name, group in [*sorted(rows.items()), ("ALL", everything)]:
        scans = Counter(v["scan"] for v in group)
        other = sum(n for k, n in scans.items() if k not in ("safe", "suspicious", "unsafe"))
        print(
            f"{name:15} {len(group):5} {sum(v['format_ok'] for v in group):6} "
            f"{sum(v['has_ref'] for v in group):4} {sum(v['read_ok'] for v in group):7} "
            f"{sum(v['whole'] for v in group):6} {sum(v['trip_ok'] for v in group):7}  "
            f"{scans['safe']}/{scans['suspicious']}/{scans['unsafe']}/{other}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--only", action="append", default=[], help="only files whose path has this (repeatable)"
    )
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("PATH", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(Path(args.one[0]), args.one[1])
        return 0
    cache: Path = args.cache.expanduser()
    manifest = json.loads((cache / "manifest.json").read_text())
    entries = [
        e for e in manifest["files"] if not args.only or any(o in e["path"] for o in args.only)
    ]
    packages = len({e["package"] for e in entries})
    print(f"{len(entries)} files from {packages} packages (manifest {cache / 'manifest.json'})")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda e: _child(e, cache, args.timeout), entries))
    judged = [judge(e, r) for e, r in zip(entries, results, strict=True)]
    print_table(entries, judged)
    print("\nscan verdicts other than safe:")
    for entry, verdict in zip(entries, judged, strict=True):
        if verdict["scan"] != "safe":
            print(f"  {verdict['scan']:10} {entry['package']}: {entry['member']}")
    print("\nno reference:")
    notes = Counter(v["ref_note"] for v in judged if not v["has_ref"])
    for note, count in notes.most_common():
        print(f"  {count:4}  {note}")
    failures = [
        (e, step, text)
        for e, v in zip(entries, judged, strict=True)
        for step, text in v["failures"]
    ]
    print(f"\nfailures ({len(failures)}):")
    for entry, step, text in failures:
        print(f"  [{entry['expected_format']}] {entry['package']}: {entry['member']}")
        print(f"      {step}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
