"""The per-tensor fast paths of ``inspect``: what they lay out and build must be what the
plain ways (``json.dumps``, a frozen dataclass) give, for every type a field may hold."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from modelport.cli import cmd_inspect
from modelport.cli._output import json_default
from modelport.loading.inspect_report import TensorSummary
from modelport.tensors import Storage, TensorRef
from modelport.tree.weights import parameter_tensors


class _Name(str):
    """A str subclass: json lays it out as a str, the memos must not be fooled either way."""


def _written(tensors: tuple[TensorSummary, ...]) -> str:
    payload = {"format": "x", "tensors": [], "after": 1}
    out = io.StringIO()
    cmd_inspect.write_json(out, payload, tensors)
    return out.getvalue()


def _dumped(tensors: tuple[TensorSummary, ...]) -> str:
    payload = {"format": "x", "tensors": [t.to_json() for t in tensors], "after": 1}
    return json.dumps(payload, indent=2, default=json_default) + "\n"


@pytest.mark.parametrize(
    "odd",
    [
        TensorSummary("odd", "int8", (True, 2), 2),  # equal to (1, 2), laid out as true
        TensorSummary("odd", "int8", (np.int64(1), 2), 2),  # type: ignore[arg-type]
        TensorSummary("odd", "int8", [1, 2], 2),  # type: ignore[arg-type]
        TensorSummary(_Name("odd"), _Name("int8"), (1, 2), 2, _Name("n")),
        TensorSummary("odd", "int8", (1, 2), True),
        TensorSummary("odd", "int8", (1.0, 2), 2),  # type: ignore[arg-type]
    ],
)
def test_a_tensor_of_odd_field_types_is_laid_out_as_json_dumps_would(
    odd: TensorSummary,
) -> None:
    plain = TensorSummary("plain", "int8", (1, 2), 2, "a note")
    many = tuple(TensorSummary(f"t{i}", "int8", (1, 2), 2) for i in range(5000))
    for tensors in ((plain, odd, plain), (*many, odd, plain), (odd,)):
        assert _written(tensors) == _dumped(tensors)


def test_tensor_refs_keep_their_dataclass_face() -> None:
    storage = Storage(Path("w.bin"), 8, 24, "k")
    ref = TensorRef("float32", (2, 3), storage, note="n")
    assert ref.nbytes == 24
    assert repr(ref) == (
        "TensorRef(dtype='float32', shape=(2, 3), storage=Storage(path=PosixPath('w.bin'), "
        "offset=8, nbytes=24, key='k', reader=None, location=''), element_offset=0, "
        "strides=None, note='n', nbytes=24)"
    )
    assert [f.name for f in dataclasses.fields(ref)][-1] == "nbytes"
    moved = dataclasses.replace(ref, element_offset=1)
    assert (moved.element_offset, moved.storage, moved.nbytes) == (1, storage, 24)
    twin = TensorRef("float32", (2, 3), storage, note="n")
    assert ref != twin and ref == ref and len({ref, twin}) == 2  # equal only to itself
    assert Storage(None, 0, 0) != Storage(None, 0, 0)
    assert TensorRef("Q8_0", (2, 64), None).nbytes == 2 * 2 * 34


def test_tensor_summaries_compare_and_hash_by_value() -> None:
    one, two = TensorSummary("a", "float32", (1,), 4), TensorSummary("a", "float32", (1,), 4)
    assert one == two and hash(one) == hash(two) and len({one, two}) == 1


def test_parameters_count_a_tied_tensor_once_and_leave_buffers_out() -> None:
    shared = Storage(None, 0, 16)
    tensors = {
        "a.weight": TensorRef("float32", (4,), shared),
        "b.weight": TensorRef("float32", (4,), shared),  # tied to a.weight
        "a.half": TensorRef("float32", (2,), shared, element_offset=2),  # a view
        "bn.running_mean": TensorRef("float32", (4,), Storage(None, 0, 16)),
        "running_var": TensorRef("float32", (4,), Storage(None, 0, 16)),
        "m1": TensorRef("float32", (3,), None),
        "m2": TensorRef("float32", (3,), None),
    }
    assert list(parameter_tensors(tensors)) == ["a.weight", "a.half", "m1", "m2"]
    distinct = {name: TensorRef("float32", (1,), Storage(None, 0, 4)) for name in "xyz"}
    assert parameter_tensors(distinct) == distinct
