"""A third red-team audit's archive and graph cases, each with a benign twin: zips that look
like torch archives to one rule and are read by other loaders (numpy, Keras), a ``.pt2``
member named twice in different case, a SavedModel whose resource writes a checkpoint with
the V1 Save op, and joblib's side files when the pickle alone is scanned.

The attacks that a loader is proven to reach (numpy, joblib, torch.export) are in
``tests/attacks/corpus_bypasses.py``; these are the variants around them."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import pytest

import modelport
from modelport.errors import UnsafeModelError
from tests.attacks.corpus_bypasses import joblib_side_file, pt2_case_twin
from tests.attacks.writers import (
    _members,
    float_npy,
    npy,
    object_npy,
    plain,
    shell2,
    torch_zip,
    write,
    zip_archive,
)
from tests.formats.test_keras import model_config, write_keras


def _rules(report: modelport.ScanReport) -> set[str]:
    return {f.rule for file in report.files for f in file.findings}


# -- zips that are torch archives to one rule only -------------------------------------------------


@pytest.mark.parametrize("padding", [0, 2 << 20], ids=["read-whole", "mapped"])
@pytest.mark.parametrize("evil", [True, False], ids=["attack", "twin"])
def test_an_npy_under_torch_storage_names_is_read_as_numpy_reads_it(
    tmp_path: Path, marker: Path, evil: bool, padding: int
) -> None:
    """A real torch.save archive with one more member ``<prefix>/data/w.npy``: torch never
    names it, numpy.load of the same file unpickles it. A storage-shaped name under torch's
    own prefix is skipped only when its bytes open as nothing another loader reads (a
    storage's first bytes are read from the file when the scan maps it, never faulted in)."""
    members = _members(torch_zip())
    prefix = members[0][0].split("/")[0]
    inner = object_npy(shell2(marker)) if evil else float_npy()
    big = [(f"{prefix}/data/99", bytes(padding))] if padding else []
    archive = zip_archive([*members, *big, (f"{prefix}/data/w.npy", inner)])
    path = write(tmp_path / "model.pt", archive)
    report = modelport.scan(path)
    assert report.verdict == ("unsafe" if evil else "safe"), report.to_json()


def test_storage_bytes_that_open_like_a_protocol_byte_are_still_data(tmp_path: Path) -> None:
    """Float bytes can open with 0x80 0x02 (a pickle's PROTO); only bytes that parse as a
    whole pickle are judged as one, so real storages never raise a false alarm."""
    members = _members(torch_zip())
    storages = [name for name, _ in members if name.split("/")[1:2] == ["data"]]
    assert storages
    raw = b"\x80\x02\x00\x00" + struct.pack("<3f", 1.0, 2.0, 3.0)
    replaced = [(n, raw if n in storages else d) for n, d in members]
    report = modelport.scan(write(tmp_path / "model.pt", zip_archive(replaced)))
    assert report.verdict == "safe", report.to_json()


@pytest.mark.parametrize("decoy", ["data.pkl", "torch-archive"])
@pytest.mark.parametrize("evil", [True, False], ids=["lambda", "twin"])
def test_a_keras_file_holding_a_torch_pickle_is_still_read_as_keras(
    tmp_path: Path, decoy: str, evil: bool
) -> None:
    """Keras loads a ``.keras`` whatever other members it holds; a ``data.pkl`` (or a whole
    torch archive beside the Keras members) must not stop its config being judged."""
    extra = {"data.pkl": plain(2)} if decoy == "data.pkl" else dict(_members(torch_zip()))
    path = tmp_path / "model.keras"
    write_keras(path, config=model_config(with_lambda=evil), extra=extra)
    report = modelport.scan(path)
    assert report.verdict == ("unsafe" if evil else "safe"), report.to_json()
    assert ("keras-lambda" in _rules(report)) is evil


# -- torch.export: payload names equal when case is folded -----------------------------------------


def test_a_pt2_member_named_twice_in_different_case_is_judged(tmp_path: Path, marker: Path) -> None:
    """torch's lookup ignores case: the pickled payload WEIGHT_0 may be read from the raw
    member weight_0, so that member is scanned, and the two names are a duplicate."""
    report = modelport.scan(write(tmp_path / "model.pt2", pt2_case_twin(marker, twin_member=True)))
    assert report.verdict == "unsafe", report.to_json()
    assert "duplicate-member" in _rules(report)
    alone = modelport.scan(write(tmp_path / "alone.pt2", pt2_case_twin(marker, twin_member=False)))
    assert alone.verdict == "unsafe", alone.to_json()


def test_member_names_differing_in_case_are_no_finding_outside_torch(tmp_path: Path) -> None:
    """np.savez(A=..., a=...) is two arrays: Python's zipfile tells the names apart."""
    path = write(
        tmp_path / "two.npz", zip_archive([("A.npy", float_npy()), ("a.npy", float_npy())])
    )
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()
    assert "duplicate-member" not in _rules(report)


# -- TensorFlow: the savers' ops outside the saver ---------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _node_def(name: str, op: str, inputs: tuple[str, ...] = ()) -> bytes:
    """A NodeDef (name 1, op 2, input 3); ``"Call>f"`` is a StatefulPartitionedCall whose
    attr ``f`` (map entry 5: key 1, AttrValue 2 whose func 10 is a NameAttrList named by 1)
    names f."""
    op, _, callee = op.partition(">")
    node = _field(1, name.encode()) + _field(2, op.encode())
    node += b"".join(_field(3, source.encode()) for source in inputs)
    if callee:
        value = _field(10, _field(1, callee.encode()))
        node += _field(5, _field(1, b"f") + _field(2, value))
    return node


Node = tuple[str, str, tuple[str, ...]]  # graph node: name, op (or "Call>f"), inputs
_TF2_SAVER_NODES: tuple[Node, ...] = (
    ("saver_filename", "Placeholder", ()),
    ("StatefulPartitionedCall_2", "Call>__inference__traced_save_46", ("saver_filename",)),
    ("StatefulPartitionedCall_3", "Call>__inference__traced_restore_58", ("saver_filename",)),
)


def _saved_model(
    functions: dict[str, list[str]],
    nodes: tuple[Node, ...] = _TF2_SAVER_NODES,
    *,
    save: str = "StatefulPartitionedCall_2:0",
    restore: str = "StatefulPartitionedCall_3",
    main_op: str = "",
    object_functions: tuple[str, ...] = ("__inference_f_12",),
) -> bytes:
    """A SavedModel as tf.saved_model.save writes one: library functions with their ops
    (FunctionDef: signature 1 = OpDef whose name is 1, node_def 3), graph nodes, a
    ``saver_def`` (3: save_tensor_name 2, restore_op_name 3), a main_op collection (4:
    entry key 1, CollectionDef 2 whose node_list 1 holds value 1) and an object graph (7)
    whose concrete_functions map (2) names the functions it runs."""
    library = b""
    for name, ops in functions.items():
        body = b"".join(_field(3, _node_def(f"n{i}", op)) for i, op in enumerate(ops))
        library += _field(1, _field(1, _field(1, name.encode())) + body)
    graph = b"".join(_field(1, _node_def(*node)) for node in nodes) + _field(2, library)
    meta = _field(1, _field(4, b"serve")) + _field(2, graph)
    meta += _field(3, _field(2, save.encode()) + _field(3, restore.encode()))
    if main_op:
        main = _field(2, _field(1, _field(1, main_op.encode())))
        meta += _field(4, _field(1, b"saved_model_main_op") + main)
    meta += _field(5, _field(1, b"serving"))
    objects = (_field(2, _field(1, name.encode()) + _field(2, b"")) for name in object_functions)
    meta += _field(7, b"".join(objects))
    return b"\x08\x01" + _field(2, meta)


_SAVER = {
    "__inference__traced_save_46": ["ShardedFilename", "SaveV2", "MergeV2Checkpoints"],
    "__inference__traced_restore_58": ["RestoreV2"],
    "__inference_f_12": ["AddV2"],
}
_RUNS_SAVE = ("NoOp", "NoOp", ("^StatefulPartitionedCall_2",))


@pytest.mark.parametrize(
    ("functions", "verdict"),
    [
        pytest.param(_SAVER, "safe", id="plain-saved-model"),
        pytest.param({**_SAVER, "__inference__initializer_23": ["Save"]}, "unsafe", id="save"),
        pytest.param({**_SAVER, "__inference_f_9": ["SaveSlices"]}, "unsafe", id="save-slices"),
        pytest.param({**_SAVER, "__inference__initializer_23": ["SaveV2"]}, "unsafe", id="v2"),
        pytest.param(
            {**_SAVER, "__inference_call_7": ["MergeV2Checkpoints"]}, "unsafe", id="merge"
        ),
        pytest.param(
            {**_SAVER, "__inference__initializer_23": ["Call>__inference__traced_save_46"]},
            "unsafe",
            id="calls-the-saver",
        ),
        pytest.param(
            {**_SAVER, "__inference__initializer_23": ["__inference__traced_save_46"]},
            "unsafe",
            id="saver-as-op",
        ),
        pytest.param(
            {**_SAVER, "__inference_f_12": ["Call>__inference_g_3"], "__inference_g_3": []},
            "safe",
            id="other-call",
        ),
        pytest.param(
            {**_SAVER, "__inference__traced_save_909": ["SaveV2"]}, "unsafe", id="saver-named"
        ),
    ],
)
def test_checkpoint_writers_outside_the_saver_are_unsafe(
    tmp_path: Path, functions: dict[str, list[str]], verdict: str
) -> None:
    """tf.saved_model.load runs a resource's _initialize: a Save op there writes a tensor
    bundle to the path it names (the red team's marker). Every SavedModel's saver function,
    called by the node its ``saver_def`` names, holds SaveV2 and MergeV2Checkpoints, which
    load never runs (real TensorFlow 2.21's tf.saved_model.save, checked); a function only
    named like it (``__inference__traced_save_909``) is not it."""
    folder = tmp_path / "sm"
    write(folder / "saved_model.pb", _saved_model(functions))
    report = modelport.scan(folder)
    assert report.verdict == verdict, report.to_json()
    assert ("tf-file-access" in _rules(report)) is (verdict == "unsafe")


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        pytest.param({}, "safe", id="plain"),
        pytest.param(
            {"object_functions": ("__inference__traced_save_46",)}, "unsafe", id="object-runs-it"
        ),
        pytest.param(
            {"nodes": (*_TF2_SAVER_NODES, _RUNS_SAVE), "main_op": "NoOp"},
            "unsafe",
            id="main-op-runs-the-save-node",
        ),
        pytest.param(
            {"nodes": (*_TF2_SAVER_NODES, ("s", "Call>__inference__traced_save_46", ()))},
            "unsafe",
            id="another-node-calls-it",
        ),
        pytest.param({"save": "saver_filename:0"}, "unsafe", id="saver-def-names-another-node"),
        pytest.param({"save": ""}, "unsafe", id="no-saver-def"),
    ],
)
def test_the_saver_function_is_known_by_structure(
    tmp_path: Path, changes: dict[str, Any], verdict: str
) -> None:
    """The saver's function is the one only the ``saver_def``'s save node calls, which no
    loaded object names and nothing the loader runs reaches; a red team's resource
    initializer that called SaveV2, renamed ``__inference__traced_save_<n>``, wrote its
    marker as tf.saved_model.load ran (TensorFlow 2.21)."""
    folder = tmp_path / "sm"
    write(folder / "saved_model.pb", _saved_model(_SAVER, **changes))
    report = modelport.scan(folder)
    assert report.verdict == verdict, report.to_json()


_TF1_SAVER: tuple[Node, ...] = (
    ("v", "VarHandleOp", ()),
    ("save/Const", "PlaceholderWithDefault", ()),
    ("save/SaveV2", "SaveV2", ("save/Const", "v")),
    ("save/control_dependency", "Identity", ("save/Const", "^save/SaveV2")),
    ("save/MergeV2Checkpoints", "MergeV2Checkpoints", ("^save/control_dependency",)),
    ("save/Identity", "Identity", ("save/Const", "^save/MergeV2Checkpoints")),
    ("save/RestoreV2", "RestoreV2", ("save/Const",)),
    ("save/restore_all", "NoOp", ("^save/RestoreV2",)),
    ("init", "NoOp", ("v",)),
)

_LONG = "save/" + "q" * 300  # node names are compared by their first 256 bytes


@pytest.mark.parametrize(
    ("extra", "verdict"),
    [
        pytest.param((), "safe", id="saver"),
        pytest.param(
            (("save/SaveV2_9", "SaveV2", ("save/Const",)), ("init", "NoOp", ("^save/SaveV2_9",))),
            "unsafe",
            id="main-op-runs-a-save-scope-writer",
        ),
        pytest.param(
            (("init", "NoOp", ("^save/control_dependency",)),),
            "unsafe",
            id="main-op-runs-the-savers-writer",
        ),
        pytest.param(
            (("save/SaveV2_9", "SaveV2", ("save/Const",)),), "unsafe", id="not-the-savers"
        ),
        pytest.param(
            (
                ("save/SaveV2_9", "SaveV2", ("save/Const",)),
                (
                    "save/Identity",
                    "Identity",
                    ("save/Const", "^save/MergeV2Checkpoints", "^save/SaveV2_9"),
                ),
                (_LONG + "x", "NoOp", ("^save/SaveV2_9",)),
                (_LONG + "y", "NoOp", ()),
                ("init", "NoOp", ("^" + _LONG + "x",)),
            ),
            "unsafe",
            id="names-alike-to-256-bytes",
        ),
    ],
)
def test_a_tf1_savers_graph_nodes_are_no_finding(
    tmp_path: Path, extra: tuple[Node, ...], verdict: str
) -> None:
    """A TF1 SavedModel keeps its Saver's ops in the graph below the ``saver_def``'s save
    tensor, run only when a session asks for a save; a SaveV2 in the ``save/`` scope that
    main_op reaches wrote the red team's marker as the TF1 loader ran main_op."""
    nodes = {name: (name, op, inputs) for name, op, inputs in (*_TF1_SAVER, *extra)}
    graph = _saved_model(
        {},
        tuple(nodes.values()),
        save="save/Identity:0",
        restore="save/restore_all",
        main_op="init",
        object_functions=(),
    )
    write(tmp_path / "sm" / "saved_model.pb", graph)
    report = modelport.scan(tmp_path / "sm")
    assert report.verdict == verdict, report.to_json()


# -- joblib's side files, when the pickle alone is scanned -----------------------------------------


@pytest.mark.parametrize("evil", [True, False], ids=["attack", "twin"])
def test_a_joblib_side_file_is_judged_with_its_pickle(
    tmp_path: Path, marker: Path, evil: bool
) -> None:
    """``modelport scan model.pkl`` (the file joblib.load is given) judges the side files
    joblib opens with np.load(allow_pickle=True); so does modelport.load's gate."""
    path = joblib_side_file(tmp_path, marker if evil else None)
    report = modelport.scan(path)
    assert report.verdict == ("unsafe" if evil else "safe"), report.to_json()
    assert [Path(f.path).name for f in report.files] == ["model.pkl"]
    if evil:
        with pytest.raises(UnsafeModelError):
            modelport.load(path)


def test_a_side_file_object_array_twin_is_safe(tmp_path: Path) -> None:
    """An object array of plain values in the side file is what joblib wrote for lists."""
    path = joblib_side_file(tmp_path, None)
    write(tmp_path / "model.pkl_01.npy", npy("'|O'", (1,), pickle.dumps(["a"], protocol=2)))
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()
