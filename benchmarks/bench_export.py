"""modelport ``export(..., to="onnx")`` vs ``torch.onnx.export(dynamo=True, verify=True)``.

Two small models, in one process, same inputs: a ResNet-style CNN (``tests.models.TinyResNet``,
input 1x3x64x64) and a BERT (transformers ``BertConfig``: hidden 128, 2 layers, vocab 1000,
sequence 32). Each side writes the ONNX file and verifies it with onnxruntime against eager:
modelport on the example input and two random ones, torch's ``verify=True`` on the example.
Wall time is the median of ``--repeat`` runs (default 3) after one warm-up per side. For
modelport's file it also prints the files written (one while the weights fit in a
protobuf) and the graph's output names (BERT: its ``ModelOutput`` keys), and whether
anything reached stdout or stderr.

Then the edge targets: ``export(..., to="executorch")`` (verified in ExecuTorch's runtime)
and ``to="tflite"`` (LiteRT's interpreter), one run each per model (lowering dominates):
export + verify seconds, verified, max abs error. A target whose package is missing is
listed as such (litert-torch installs apart from the test extra, see pyproject).

Usage: python benchmarks/bench_export.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.models


def cnn() -> tuple[Any, dict[str, Any]]:
    import torch
    from tests.models import TinyResNet

    torch.manual_seed(0)
    return TinyResNet().eval(), {"x": torch.randn(1, 3, 64, 64)}


def bert() -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()  # a ModelOutput: last_hidden_state, pooler_output
    return model, {"input_ids": torch.randint(0, 1000, (1, 32))}


def modelport_side(model: Any, inputs: dict[str, Any], path: Path) -> None:
    from modelport.torch_models.exporting import export

    report = export(model, path, inputs, to="onnx", overwrite=True)  # timed repeatedly
    if report.verified is not True:
        raise SystemExit(f"modelport did not verify {path}")


def described(model: Any, inputs: dict[str, Any], path: Path) -> tuple[int, list[str], str]:
    """One untimed export: the files it wrote, the graph's output names, and what it
    printed on stdout and stderr (nothing, when torch is kept quiet)."""
    import onnx

    from modelport.torch_models.exporting import export

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        report = export(model, path, inputs, to="onnx", overwrite=True)
    outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    printed = stdout.getvalue() + stderr.getvalue()
    return len(report.files), outputs, f"{len(printed.splitlines())} lines"


def torch_side(model: Any, inputs: dict[str, Any], path: Path) -> None:
    import torch

    torch.onnx.export(
        model,
        tuple(inputs.values()),
        str(path),
        dynamo=True,
        verify=True,
        input_names=list(inputs),
    )


def timed(run: Callable[[], None], repeat: int) -> float:
    run()  # warm-up: imports, first-trace caches
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def quiet() -> Any:
    """Silence the exporters' progress lines and logs (stdout and fd 2) while timing."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    rows = []
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("ResNet-style CNN 1x3x64x64", cnn), ("BERT h128 L2 seq32", bert)):
            model, inputs = build()
            ours = Path(tmp) / f"{name[:4]}-modelport.onnx"
            theirs = Path(tmp) / f"{name[:4]}-torch.onnx"
            details.append((name, *described(model, inputs, Path(tmp) / "described.onnx")))
            with quiet():
                mp = timed(lambda m=model, i=inputs, p=ours: modelport_side(m, i, p), args.repeat)
                tv = timed(lambda m=model, i=inputs, p=theirs: torch_side(m, i, p), args.repeat)
            rows.append((name, mp, tv))
    print(f"export to ONNX + verify, median of {args.repeat} (seconds)")
    print(f"{'model':<28} {'modelport':>10} {'torch verify':>13} {'mp/torch':>9}")
    for name, mp, tv in rows:
        print(f"{name:<28} {mp:>10.2f} {tv:>13.2f} {mp / tv:>8.2f}x")
    print("modelport checks 3 inputs (example + 2 random); torch verify=True checks 1")
    print(f"\n{'model':<28} {'files':>5}  {'printed':<9} ONNX outputs")
    for name, files, outputs, printed in details:
        print(f"{name:<28} {files:>5}  {printed:<9} {', '.join(outputs)}")
    edge_targets()


def edge_targets() -> None:
    """Export + verify time per model and edge target, one run each."""
    import importlib.util

    from modelport.torch_models.exporting import export

    print(f"\n{'model':<28} {'target':<11} {'export+verify s':>15}  verified  max abs error")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("ResNet-style CNN 1x3x64x64", cnn), ("BERT h128 L2 seq32", bert)):
            model, inputs = build()
            for target, package in (("executorch", "executorch"), ("tflite", "litert_torch")):
                if importlib.util.find_spec(package) is None:
                    print(f"{name:<28} {target:<11} {package} is not installed")
                    continue
                with quiet():
                    report = export(
                        model, Path(tmp) / f"m.{target}", inputs, to=target, overwrite=True
                    )
                print(
                    f"{name:<28} {target:<11} {report.seconds:>15.2f}  {report.verified!s:<8}  "
                    f"{report.max_abs_error:.3g}"
                )


if __name__ == "__main__":
    main()
