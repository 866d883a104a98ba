"""The scanner on containers other than pickles: Keras code, GGUF templates, ONNX external
data, numpy object arrays, and whole model directories."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import modelport
from tests.attacks.harness import reaches_payload
from tests.attacks.writers import shell2
from tests.conftest import Cli
from tests.formats.test_hdf5 import keras2_model_config
from tests.formats.test_keras import model_config, write_keras


def rules(path: Path) -> set[str]:
    return {f.rule for file in modelport.scan(path).files for f in file.findings}


def test_keras_lambda_layer_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    write_keras(path, config=model_config(with_lambda=True))
    assert "keras-lambda" in rules(path)
    assert modelport.scan(path).verdict == "unsafe"
    plain = tmp_path / "plain.keras"
    write_keras(plain)
    assert modelport.scan(plain).verdict == "safe"


def test_keras_config_naming_a_gadget_is_unsafe(tmp_path: Path) -> None:
    """Keras imports the module a config names and calls what it names: a layer class
    ``os.system``, or a serialized function ``builtins.exec`` as an activation."""
    config = model_config()
    layers = config["config"]["layers"]
    layers[1]["config"]["activation"] = {
        "module": "builtins",
        "class_name": "function",
        "config": "exec",
        "registered_name": "function",
    }
    write_keras(tmp_path / "function.keras", config=config)
    report = modelport.scan(tmp_path / "function.keras")
    assert report.verdict == "unsafe"
    assert [f.rule for f in report.files[0].findings] == ["keras-gadget"]
    config = model_config()
    config["config"]["layers"].append(
        {"module": "os", "class_name": "system", "config": {"command": "id"}}
    )
    write_keras(tmp_path / "layer.keras", config=config)
    assert "keras-gadget" in rules(tmp_path / "layer.keras")
    relu = model_config()
    relu["config"]["layers"][1]["config"]["activation"] = {
        "module": "keras.activations",
        "class_name": "function",
        "config": "relu",
        "registered_name": "function",
    }
    write_keras(tmp_path / "relu.keras", config=relu)
    assert modelport.scan(tmp_path / "relu.keras").verdict == "safe"


def test_gguf_chat_template_reaching_for_dunders(tmp_path: Path) -> None:
    import gguf

    def write(path: Path, template: str) -> None:
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_chat_template(template)
        writer.add_tensor("w", np.ones(4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    evil = tmp_path / "evil.gguf"
    write(evil, "{{ self.__init__.__globals__.__builtins__['__import__']('os').popen('id') }}")
    assert "template-injection" in rules(evil)
    assert modelport.scan(evil).verdict == "unsafe"
    good = tmp_path / "good.gguf"
    write(good, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert modelport.scan(good).verdict == "safe"


def test_onnx_external_data_outside_the_folder(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [tensor],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    report = modelport.scan(path)
    assert report.verdict == "unsafe"
    assert (
        "escapes" in report.files[0].findings[0].message
        or "outside" in report.files[0].findings[0].message
    )


def test_object_arrays_in_npz_and_npy(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, names=np.array(["a", None, 3], dtype=object), w=np.ones(3))
    # the pickle behind the object array is judged: plain data in it loads safely
    assert modelport.scan(path).verdict == "safe"
    assert "object-array" in rules(path)
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    evil = tmp_path / "evil.npy"
    evil.write_bytes(header.getvalue() + attacks["exec"])
    assert modelport.scan(evil).verdict == "unsafe"
    assert not marker.exists()


def test_model_directory_with_one_bad_shard(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    model = torch.nn.Linear(4, 4)
    directory = tmp_path / "hf-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "demo"}))
    torch.save({"weight": model.weight}, directory / "pytorch_model-00001-of-00002.bin")
    (directory / "pytorch_model-00002-of-00002.bin").write_bytes(attacks["exec"])
    index = {
        "metadata": {"total_size": 80},
        "weight_map": {
            "weight": "pytorch_model-00001-of-00002.bin",
            "bias": "pytorch_model-00002-of-00002.bin",
        },
    }
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    report = modelport.scan(directory)
    assert report.verdict == "unsafe"
    verdicts = {Path(f.path).name: f.verdict for f in report.files}
    assert verdicts["pytorch_model-00001-of-00002.bin"] == "safe"
    assert verdicts["pytorch_model-00002-of-00002.bin"] == "unsafe"
    assert verdicts["config.json"] == "safe"
    with pytest.raises(modelport.errors.UnsafeModelError):
        modelport.load(directory)
    assert not marker.exists()


def test_plain_pickle_of_numpy_arrays_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones((300, 300))}, protocol=5))
    assert modelport.scan(path).verdict == "safe"


def test_torch_0x_tar_layout_every_pickle_is_scanned(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    import io
    import tarfile

    from tests.formats.test_torch_legacy import write_legacy_tar

    path = tmp_path / "old.tar"
    write_legacy_tar(path, {"m": (1, 0, (3, 4), (4, 1))})
    assert modelport.scan(path).verdict == "safe", modelport.scan(path).to_json()
    # The same archive with an attack where torch reads storage records.
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    members["storages"] = attacks["exec"] + members["storages"]
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = modelport.scan(evil)
    assert report.verdict == "unsafe"
    assert any(f.member.endswith("!storages") for f in report.files[0].findings)
    assert not marker.exists()


def test_zip_tricks(tmp_path: Path) -> None:
    import zipfile

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/extra.bin", b"\0" * (64 << 20))
    assert "zip-bomb" in rules(bomb)
    renamed = tmp_path / "renamed.pt"
    torch.save({"w": torch.ones(2)}, renamed)
    raw = bytearray(renamed.read_bytes())
    first = raw.index(b"data.pkl")  # the local header's copy of the name comes first
    raw[first : first + 8] = b"data.pkx"
    renamed.write_bytes(bytes(raw))
    assert "zip-name-mismatch" in rules(renamed)


def test_deeply_nested_pickle_is_analysed_without_recursion(tmp_path: Path) -> None:
    path = tmp_path / "deep.pkl"
    depth = 200_000
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    assert modelport.scan(path).verdict == "safe"


def test_transformers_whole_model_is_suspicious_not_unsafe(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    path = tmp_path / "bert.pt"
    torch.save(model, path)
    report = modelport.scan(path)
    assert report.verdict == "suspicious", report.to_json()
    state = torch.load(path, weights_only=False).state_dict()
    with pytest.warns(modelport.errors.SuspiciousModelWarning):
        loaded = modelport.load(path)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_npz_with_string_and_record_arrays(tmp_path: Path) -> None:
    plain = tmp_path / "plain.npz"
    np.savez(
        plain,
        names=np.array(["a", "bb"]),
        w=np.ones(3),
        rec=np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    )
    assert modelport.scan(plain).verdict == "safe"
    with modelport.open(plain) as model:  # text reads as text, a record as its fields
        assert list(model.tensors) == ["w", "rec.a", "rec.b"]
        assert model.tree["names"] == ["a", "bb"]
    objects = tmp_path / "objects.npz"
    np.savez(objects, rec=np.zeros(2, dtype=[("a", "<i4"), ("b", "O")]))
    assert modelport.scan(objects).verdict == "safe"
    assert "object-array" in rules(objects)


class _ReadsAFile(torch.nn.Module):
    """Legal TorchScript that copies a file of the machine into its output when run."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = torch.from_file(self.path, shared=False, size=4, dtype=torch.uint8)
        return x + leak.float().sum()


def test_torchscript_reading_files_is_unsafe_and_plain_torchscript_is_safe(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("1234")
    leaking = torch.jit.script(_ReadsAFile(str(secret)))
    assert leaking(torch.zeros(1)).item() == sum(b"1234")  # it really reads the file
    torch.jit.save(leaking, str(tmp_path / "leaks.pt"))
    report = modelport.scan(tmp_path / "leaks.pt")
    assert report.verdict == "unsafe"
    assert [f.rule for f in report.files[0].findings if f.severity == "high"] == [
        "torchscript-file-access"
    ]
    plain = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
    torch.jit.save(plain, str(tmp_path / "plain.pt"))
    assert modelport.scan(tmp_path / "plain.pt").verdict == "safe"


def test_hdf5_naming_other_files(tmp_path: Path) -> None:
    """External storage, external links and virtual datasets make h5py read other files:
    outside the model's folder that is a way to carry a key or password file into weights."""
    import h5py

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRETSECR")
    with h5py.File(tmp_path / "storage.h5", "w") as f:
        f.create_dataset("w", shape=(4,), dtype="f4", external=[(str(secret), 0, 16)])
    with h5py.File(tmp_path / "storage.h5") as f:  # h5py really reads the other file
        assert f["w"][:].tobytes() == secret.read_bytes()
    report = modelport.scan(tmp_path / "storage.h5")
    assert report.verdict == "unsafe"
    assert {f.rule for f in report.files[0].findings} == {"hdf5-external-file"}
    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f.create_dataset("ok", data=np.ones(3, "f4"))
        f["near"] = h5py.ExternalLink("part2.h5", "/x")
    assert modelport.scan(tmp_path / "linked.h5").verdict == "suspicious"


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ESCAPE = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"


def test_chat_templates_beside_the_weights(tmp_path: Path) -> None:
    """transformers renders ``tokenizer_config.json``'s templates (a string or a list of
    named ones) and ``chat_template.jinja``: each is checked, an ordinary one stays safe."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert modelport.scan(tmp_path).verdict == "safe"
    templates = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": ESCAPE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    report = modelport.scan(tmp_path)
    assert report.verdict == "unsafe"
    flagged = [(f.rule, f.member) for r in report.files for f in r.findings]
    assert flagged == [("template-injection", "chat_template.tool_use")]
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text(ESCAPE)
    assert modelport.scan(tmp_path / "chat_template.jinja").verdict == "unsafe"


def _tar(path: Path, members: dict[str, bytes], *, mode: str = "w", link: str = "") -> None:
    import io
    import tarfile

    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("linked")
            info.type = tarfile.SYMTYPE
            info.linkname = link
            archive.addfile(info)


def test_tar_archives_are_scanned_member_by_member(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    """A tar that is not a torch 0.x save (NeMo's ``.nemo``, a packed folder): each member
    is scanned by content, a torch zip member in place; a compressed tar is not looked
    into, and says so rather than passing as safe."""
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, state)
    evil = tmp_path / "evil.pt"
    payload = attacks["stack-global"]
    with zipfile.ZipFile(evil, "w") as archive:  # a torch zip whose data.pkl is the attack
        archive.writestr("evil/data.pkl", payload)
    config = b"name: model\n"
    _tar(
        tmp_path / "ok.nemo",
        {"model_config.yaml": config, "model_weights.ckpt": state.read_bytes()},
    )
    assert modelport.scan(tmp_path / "ok.nemo").verdict == "safe"
    members = {"model_config.yaml": config, "model_weights.ckpt": evil.read_bytes()}
    _tar(tmp_path / "evil.nemo", members)
    assert modelport.scan(tmp_path / "evil.nemo").verdict == "unsafe"
    _tar(tmp_path / "pickled.tar", {"inner/model.pkl": payload})
    assert modelport.scan(tmp_path / "pickled.tar").verdict == "unsafe"
    _tar(tmp_path / "evil.tar.gz", members, mode="w:gz")
    assert modelport.scan(tmp_path / "evil.tar.gz").verdict == "error"
    _tar(tmp_path / "escape.tar", {"../../outside.yaml": config})
    assert "tar-path-traversal" in rules(tmp_path / "escape.tar")
    _tar(tmp_path / "link.tar", {"a.yaml": config}, link="/etc/passwd")
    assert modelport.scan(tmp_path / "link.tar").verdict == "suspicious"
    assert not marker.exists()


def test_remote_code_named_by_auto_map(tmp_path: Path) -> None:
    """``trust_remote_code=True`` runs the modules ``auto_map`` names: said, not hidden."""
    auto_map = {
        "AutoModel": "modeling_x.XModel",
        "AutoTokenizer": ["tokenization_x.XTokenizer", None],
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": auto_map}))
    report = modelport.scan(tmp_path / "config.json")
    assert report.verdict == "suspicious"
    (finding,) = report.files[0].findings
    assert finding.rule == "remote-code" and "tokenization_x.XTokenizer" in finding.message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert modelport.scan(tmp_path / "config.json").verdict == "safe"


def test_an_onnx_model_with_its_external_data_is_safe_as_a_folder(tmp_path: Path, cli: Cli) -> None:
    """The data file is raw tensor bytes its model names; alone it is no model at all. The
    command (workers, records) judges the folder as the API does, its table and summary too."""
    import onnx
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weights]
    )
    model = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(model),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    report = modelport.scan(tmp_path)
    assert report.verdict == "safe", report.to_json()
    assert {Path(f.path).name: f.format for f in report.files} == {
        "model.onnx": "onnx",
        "model.onnx.data": "tensor-data",
    }
    assert modelport.scan(tmp_path / "model.onnx.data").verdict == "error"
    records = tmp_path.parent / f"{tmp_path.name}.jsonl"
    for run in (
        cli("scan", tmp_path, "--json"),
        cli("scan", tmp_path, "--json", "--jsonl", records),
        cli("scan", "--from-jsonl", records, "--json"),
    ):
        assert run.code == 0, run.out
        found = {Path(f["path"]).name: f["format"] for f in run.json["files"]}
        assert found == {"model.onnx": "onnx", "model.onnx.data": "tensor-data"}
    table = cli("scan", tmp_path)
    assert (table.code, table.out.count("SAFE")) == (0, 2), table.out


def _keras2_h5(path: Path, config: dict[str, object]) -> Path:
    """Keras 2's ``model.save('m.h5')`` attributes (tests/formats/test_hdf5 writes the rest)."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        f.create_group("model_weights").attrs["layer_names"] = np.array([b"wrapper"])
    return path


@pytest.mark.parametrize(
    ("wrapper", "key"), [("TimeDistributed", "layer"), ("Bidirectional", "backward_layer")]
)
def test_keras2_lambda_inside_a_wrapper_is_unsafe(tmp_path: Path, wrapper: str, key: str) -> None:
    """Keras 2 (tf_keras) keeps a wrapper's layer under ``layer`` (Bidirectional's second
    one under ``backward_layer``), outside any ``layers`` list; ``load_model``
    deserializes it and runs the Lambda's marshalled code while building the model."""
    config = keras2_model_config()
    layers = config["config"]["layers"]
    lambda_layer, dense = layers[2], layers[1]
    layers[2] = {"class_name": wrapper, "config": {"name": "wrapper", key: lambda_layer}}
    path = _keras2_h5(tmp_path / "wrapped.h5", config)
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert "keras-lambda" in rules(path)
    layers[2] = {"class_name": wrapper, "config": {"name": "wrapper", key: dense}}
    twin = _keras2_h5(tmp_path / "twin.h5", config)
    assert modelport.scan(twin).verdict == "safe", modelport.scan(twin).to_json()


@pytest.mark.parametrize("protocol", range(6))
def test_a_legacy_torch_stream_is_told_by_its_magic_number_in_every_protocol(
    tmp_path: Path, protocol: int
) -> None:
    path = tmp_path / "old.pt"
    weights = {"w": torch.ones(2)}
    torch.save(weights, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    report = modelport.scan(path).to_json()
    assert (report["format"], report["verdict"]) == ("torch-legacy", "safe")


def _old_joblib(folder: Path, side_file: str) -> Path:
    """A pickle as joblib < 0.10 wrote it: its array lives in a side file it names, which
    joblib.load reads with np.load(allow_pickle=True) (joblib's own class, pickled)."""
    from joblib.numpy_pickle_compat import NDArrayWrapper

    path = folder / "model.pkl"
    path.write_bytes(pickle.dumps(NDArrayWrapper(side_file, np.ndarray), protocol=2))
    return path


@pytest.mark.parametrize("side_file", ["../elsewhere/model.pkl_01.npy", "/tmp/x.npy"])
def test_an_old_joblib_side_file_outside_the_folder_is_unsafe(
    tmp_path: Path, side_file: str
) -> None:
    report = modelport.scan(_old_joblib(tmp_path, side_file)).to_json()
    assert report["verdict"] == "unsafe"
    assert [f["rule"] for f in report["findings"]] == ["reaches-outside"]


def test_an_old_joblib_side_file_beside_it_is_judged_there(tmp_path: Path) -> None:
    pickled = _old_joblib(tmp_path, "model.pkl_01.npy")
    np.save(tmp_path / "model.pkl_01.npy", np.arange(4.0))
    assert modelport.scan(pickled).verdict == "safe"
    assert modelport.scan(tmp_path).verdict == "safe"
    (tmp_path / "model.pkl_01.npy").write_bytes(shell2(tmp_path / "PWNED"))
    assert modelport.scan(tmp_path).verdict == "unsafe"


@pytest.mark.heavy
def test_joblib_reaches_a_pickle_in_an_old_side_file_outside_the_folder(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.npy").write_bytes(shell2(marker))
    pickled = _old_joblib(model, "../elsewhere/x.npy")
    reach = reaches_payload("import joblib; joblib.load(PATH)", pickled, marker)
    assert reach.reached, reach.stderr_tail
    assert modelport.scan(model).verdict == "unsafe"
