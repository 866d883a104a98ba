"""ExecuTorch ``.pte`` programs, exported by ExecuTorch itself (``torch.export`` ->
``to_edge`` -> ``to_executorch``); the oracle is ExecuTorch's own reader
(``deserialize_pte_binary``, which moves segment data back into ``constant_buffer``) and
the module's parameters. Importing ExecuTorch takes seconds: those tests are heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import TruncatedFileError
from modelport.formats import executorch_pte
from modelport.formats.protocol import Format, Probe
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _export(path: Path, **config: Any) -> Any:
    """A Linear layer, a float16 buffer and a bias written to ``path``; returns the module."""
    torch = pytest.importorskip("torch")
    exir = pytest.importorskip("executorch.exir")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("table", torch.arange(4, dtype=torch.float16))

        def forward(self, x: Any) -> Any:
            return self.lin(x) + self.table[:2].float().sum()

    torch.manual_seed(0)
    module = Tiny().eval()
    exported = torch.export.export(module, (torch.randn(1, 3),))
    program = exir.to_edge(exported).to_executorch(exir.ExecutorchBackendConfig(**config))
    path.write_bytes(program.buffer)
    return module


def _oracle(raw: bytes) -> list[tuple[str, list[int], bytes]]:
    """(scalar type, sizes, bytes) of every constant, as ExecuTorch's reader gives them."""
    program_module = pytest.importorskip("executorch.exir._serialize._program")
    program = program_module.deserialize_pte_binary(raw).program
    found = []
    for plan in program.execution_plan:
        for value in plan.values:
            tensor = value.val
            if type(tensor).__name__ != "Tensor" or tensor.data_buffer_idx == 0:
                continue
            if tensor.allocation_info is not None:
                continue
            storage = bytes(program.constant_buffer[tensor.data_buffer_idx].storage)
            itemsize = {"FLOAT": 4, "HALF": 2}[tensor.scalar_type.name]
            nbytes = int(np.prod(tensor.sizes)) * itemsize
            found.append((tensor.scalar_type.name, list(tensor.sizes), storage[:nbytes]))
    return found


@pytest.mark.heavy
def test_constants_match_executorch_and_the_module(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pte"
    module = _export(path)
    raw = path.read_bytes()
    assert raw[4:8] == b"ET12" and raw[8:12] == b"eh00"  # constants in a segment
    expected = _oracle(raw)
    with modelport.open(path) as model:
        assert model.format is Format.EXECUTORCH_PTE
        refs = list(model.tensors.values())
        got = [(ref.dtype, list(ref.shape), ref.numpy().tobytes()) for ref in refs]
        names = {"FLOAT": "float32", "HALF": "float16"}
        assert got == [(names[kind], sizes, data) for kind, sizes, data in expected]
        assert all(name.startswith("forward.values.") for name in model.tensors)
        assert model.details["methods"][0]["name"] == "forward"
        for ref in refs:
            offset, length = ref.byte_range() or (0, -1)
            assert raw[offset : offset + length] == ref.numpy().tobytes()
    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert sorted(digest(a) for a in params.values()) == sorted(digest(r.numpy()) for r in refs)
    assert modelport.scan(path).verdict == "safe"


@pytest.mark.heavy
def test_constants_inline_in_the_flatbuffer(tmp_path: Path) -> None:
    """The layout without segments: ExecuTorch's own flatbuffer writer over the program its
    reader restored (constants back in ``constant_buffer``)."""
    segmented = tmp_path / "segmented.pte"
    _export(segmented)
    program_module = pytest.importorskip("executorch.exir._serialize._program")
    flatbuffer = pytest.importorskip("executorch.exir._serialize._flatbuffer_program")
    program = program_module.deserialize_pte_binary(segmented.read_bytes()).program
    path = tmp_path / "inline.pte"
    path.write_bytes(bytes(flatbuffer._program_to_flatbuffer(program).data))
    raw = path.read_bytes()
    assert raw[8:12] != b"eh00"
    with modelport.open(path) as model, modelport.open(segmented) as reference:
        assert list(model.tensors) == list(reference.tensors)
        for name, ref in model.tensors.items():
            assert digest(ref.numpy()) == digest(reference.tensors[name].numpy()), name
        assert {(kind, tuple(s)) for kind, s, _ in _oracle(raw)} == {
            ({"float32": "FLOAT", "float16": "HALF"}[r.dtype], r.shape)
            for r in model.tensors.values()
        }


def test_sniffing_and_a_root_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "x.pte"
    cases = {b"\x20\0\0\0ET12" + bytes(8): True, b"\x20\0\0\0TFL3" + bytes(8): False}
    cases[b"\x04\0\0\0ET12" + bytes(8)] = False  # the root inside the header
    for raw, expected in cases.items():
        path.write_bytes(raw)
        assert executorch_pte.sniff(Probe.of(path)) is expected, raw
    path.write_bytes(b"\x20\0\0\0ET12" + bytes(8))
    with pytest.raises(TruncatedFileError):
        modelport.open(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    _export(path)
    return path.read_bytes()


@pytest.mark.heavy
def test_cut_programs(tmp_path: Path, exported: bytes) -> None:
    path = tmp_path / "tiny.pte"
    for length in (16, 64, len(exported) // 2, len(exported) - 8):
        path.write_bytes(exported[:length])
        assert executorch_pte.sniff(Probe.of(path))
        with pytest.raises(TruncatedFileError):
            modelport.open(path)


@pytest.mark.heavy
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mutated_programs_only_raise_modelport_errors(
    tmp_path_factory: pytest.TempPathFactory, exported: bytes, data: st.DataObject
) -> None:
    path = tmp_path_factory.mktemp("mutated") / "m.pte"
    path.write_bytes(damage(data, exported, keep=8))
    assert_typed_error_or_whole(path, inspect=True, intact=exported)
