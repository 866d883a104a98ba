"""Sparse TFLite constants as TensorFlow's converter writes them (``EXPERIMENTAL_SPARSITY``,
as in MediaPipe's ``*_sparse.tflite`` models): modelport lists them dense, and the oracle is
TFLite's own DENSIFY op, run by the interpreter on the same file.

The buffer of a sparse constant holds only its non-zero values, so comparing it with the
dense tensor byte for byte cannot work: the DENSIFY op's output is the reference. It runs
without the default XNNPACK delegate, which densifies inside itself and leaves the op's
output tensor empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelport

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
]
DENSIFY = 124  # BuiltinOperator.DENSIFY


def _convert(tf: Any, module: Any, fp16: bool) -> bytes:
    function = module.__call__.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if fp16:
        converter.optimizations.append(tf.lite.Optimize.DEFAULT)
        converter.target_spec.supported_types = [tf.float16]
    data: bytes = converter.convert()
    return data


def _sparse_model(tf: Any, kind: str) -> tuple[bytes, np.ndarray]:
    """A model whose weight is 80% zeros, and that weight as TFLite lays it out."""
    rng = np.random.default_rng(0)
    if kind == "dense-f32":
        weight = rng.standard_normal((16, 32)).astype(np.float32)
        weight[rng.random(weight.shape) < 0.8] = 0

        class Dense(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32)])
            def __call__(self, x: Any) -> Any:
                return tf.matmul(x, tf.constant(weight))

        return _convert(tf, Dense(), fp16=False), weight.T
    weight = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.8] = 0

    class Conv(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 8], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return tf.nn.conv2d(x, tf.constant(weight), 1, "SAME")

    return _convert(tf, Conv(), fp16=True), weight.transpose(3, 0, 1, 2).astype(np.float16)


def _densified_by_tflite(tf: Any, path: Path) -> dict[str, np.ndarray]:
    """Each sparse constant's name -> the output of the DENSIFY op that reads it."""
    import tflite

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    outputs = {}
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        code = model.OperatorCodes(operator.OpcodeIndex())
        if max(code.DeprecatedBuiltinCode(), code.BuiltinCode()) == DENSIFY:
            source = graph.Tensors(operator.Inputs(0))
            assert source.Sparsity() is not None
            outputs[source.Name().decode()] = operator.Outputs(0)
    interpreter = tf.lite.Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    return {name: interpreter.get_tensor(index) for name, index in outputs.items()}


@pytest.mark.parametrize("kind", ["dense-f32", "conv-f16"])
def test_sparse_constants_equal_what_densify_makes(tmp_path: Path, kind: str) -> None:
    tf = pytest.importorskip("tensorflow")
    data, weight = _sparse_model(tf, kind)
    path = tmp_path / "sparse.tflite"
    path.write_bytes(data)
    expected = _densified_by_tflite(tf, path)
    assert len(expected) == 1
    ((name, dense),) = expected.items()
    assert np.array_equal(dense, weight)  # the converter kept every value
    with modelport.open(path) as model:
        found = model.tensors[name].numpy()
        assert "densified" in model.tensors[name].note
    assert found.dtype == dense.dtype and found.shape == dense.shape
    assert found.tobytes() == dense.tobytes()
    report = modelport.convert(path, tmp_path / "out.npz")
    assert report.verified
    with np.load(tmp_path / "out.npz") as written:
        assert written[name].tobytes() == dense.tobytes()
