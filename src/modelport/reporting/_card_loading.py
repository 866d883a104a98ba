"""The code a model card shows to load its file: the reference library's own call for the
format, run from the folder the card names the file from, ending by binding one variable.

Only what the file's content supports is offered: ``torch.load(..., weights_only=True)``
when torch's weights-only unpickler would accept the file (``loading.weights_only``), numpy's
loaders when no array is pickled, ``from_pretrained`` when a config names the class.
Otherwise the card says what the reference loader would refuse and shows ``modelport.load``,
which reads the tensors without running anything. Names from the file reach the code only
as JSON string literals (valid Python) or as plain identifiers.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from modelport import dtypes
from modelport.formats import _hf_folder
from modelport.formats.protocol import Format
from modelport.loading import weights_only
from modelport.loading.model_file import ModelFile
from modelport.pickles.numpy_types import NumpyArray
from modelport.reporting._card_hub import MODEL_INDEX, HubConfig
from modelport.tensors import TensorRef

# ONNX element types numpy can make example inputs of.
_SENTENCE: Final = "sentence-transformers"  # the library, as the hub names it
_NUMPY_INPUTS: Final = frozenset(
    {"float16", "float32", "float64", "bool"}
    | {f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)}
)


@dataclass(frozen=True)
class LoadingCode:
    """The card's main code (``result`` is the variable it binds last), the sentences shown
    before it, and further ways to load the file: ``(sentence, code)``."""

    code: str
    result: str
    notes: tuple[str, ...] = ()
    more: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Subject:
    model: ModelFile
    name: str  # the path the code names, relative to where it runs
    config: HubConfig | None
    verdict: str

    @property
    def literal(self) -> str:
        return json.dumps(self.name)


def loading_code(
    model: ModelFile, name: str, config: HubConfig | None, verdict: str
) -> LoadingCode:
    """How to load ``model``, named ``name`` in the code (see the module docstring)."""
    subject = _Subject(model, name, config, verdict)
    found = _BY_FORMAT.get(model.format, _modelport)(subject)
    pretrained = _from_pretrained(subject)
    if pretrained is None or model.format is Format.HF_DIR:
        return found
    return LoadingCode(found.code, found.result, found.notes, (*found.more, pretrained))


def _modelport(subject: _Subject, notes: tuple[str, ...] = ()) -> LoadingCode:
    """The tensors through modelport: every format it reads, nothing in the file run."""
    unsafe = subject.verdict == "unsafe"
    call = f"modelport.load({subject.literal}{', allow_unsafe=True' if unsafe else ''})"
    if unsafe:
        notes = (
            *notes,
            "The scan judged the file unsafe: load it with nothing that unpickles it. "
            "`allow_unsafe=True` lets modelport read its tensors, which runs nothing.",
        )
    code = f"import modelport\n\nstate_dict = {call}  # torch tensors; nothing in the file runs\n"
    return LoadingCode(code, "state_dict", notes)


def _torch(subject: _Subject) -> LoadingCode:
    model = subject.model
    refusals = weights_only.refusals(
        model.tree, model.path, torch_zip_file=model.format is Format.TORCH_ZIP
    )
    if refusals:
        return _modelport(subject, (_refusal_sentence(subject.name, refusals),))
    call = f'torch.load({subject.literal}, weights_only=True, map_location="cpu")'
    tree = model.tree
    if weights_only.all_tensors(tree):
        return LoadingCode(f"import torch\n\nstate_dict = {call}\n", "state_dict")
    source = model.weights().source
    if isinstance(tree, dict) and source and source in tree:
        code = (
            f"import torch\n\ncheckpoint = {call}\nstate_dict = checkpoint[{json.dumps(source)}]\n"
        )
        return LoadingCode(code, "state_dict")
    return LoadingCode(f"import torch\n\ncheckpoint = {call}\n", "checkpoint")


def _refusal_sentence(name: str, refusals: list[weights_only.Refusal]) -> str:
    named = ", ".join(f"`{r.name}`" + (f" (at `{r.where}`)" if r.where else "") for r in refusals)
    return (
        f"`torch.load({json.dumps(name)}, weights_only=True)` would refuse this file: it "
        f"names {named}, which torch's weights-only unpickler does not allow. "
        "`weights_only=False` would run the pickle; `modelport.load` reads the weights "
        "without running anything."
    )


def _safetensors(subject: _Subject) -> LoadingCode:
    lazy = (
        "from safetensors import safe_open\n\n"
        f'with safe_open({subject.literal}, framework="pt") as file:\n'
        "    names = list(file.keys())\n"
        "    first = file.get_tensor(names[0])  # one tensor at a time, memory-mapped\n"
    )
    code = f"from safetensors.torch import load_file\n\nstate_dict = load_file({subject.literal})\n"
    return LoadingCode(code, "state_dict", more=(("One tensor at a time:", lazy),))


def _torchscript(subject: _Subject) -> LoadingCode:
    code = f'import torch\n\nmodel = torch.jit.load({subject.literal}, map_location="cpu")\n'
    note = "`torch.jit.load` runs the TorchScript code the file holds; the scan covers it."
    return LoadingCode(code, "model", (note,))


def _torch_export(subject: _Subject) -> LoadingCode:
    code = (
        f"import torch\n\nprogram = torch.export.load({subject.literal})\n"
        "model = program.module()\n"
    )
    return LoadingCode(code, "model")


def _onnx(subject: _Subject) -> LoadingCode:
    code = (
        "import numpy\nimport onnxruntime\n\n"
        f"session = onnxruntime.InferenceSession({subject.literal}, "
        'providers=["CPUExecutionProvider"])\n'
    )
    feeds = _onnx_feeds(subject.model.details.get("inputs"))
    if feeds is None:
        return LoadingCode(code.replace("import numpy\n", ""), "session")
    code += (
        f"feeds = {feeds}  # zeros; symbolic dimensions as 1\noutputs = session.run(None, feeds)\n"
    )
    return LoadingCode(code, "outputs")


def _onnx_feeds(inputs: Any) -> str | None:
    """Example inputs as a Python dict literal, when every input is a tensor numpy can make."""
    if not isinstance(inputs, list) or not inputs:
        return None
    parts = []
    for item in inputs:
        if not isinstance(item, dict) or item.get("type") != "tensor":
            return None
        dtype, shape = item.get("dtype"), item.get("shape")
        if dtype not in _NUMPY_INPUTS or not isinstance(shape, list):
            return None
        dims = tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
        parts.append(f'{json.dumps(str(item.get("name")))}: numpy.zeros({dims}, dtype="{dtype}")')
    return "{" + ", ".join(parts) + "}"


def _numpy(subject: _Subject) -> LoadingCode:
    if _pickled_arrays(subject.model.tree):
        note = (
            f"`numpy.load({subject.literal})` would refuse this file: it holds pickled object "
            "arrays, which numpy loads only with `allow_pickle=True` (that runs the pickle)."
        )
        return _modelport(subject, (note,))
    if subject.model.format is Format.NPY:
        return LoadingCode(f"import numpy\n\narray = numpy.load({subject.literal})\n", "array")
    code = (
        f"import numpy\n\nwith numpy.load({subject.literal}) as archive:\n"
        "    arrays = {name: archive[name] for name in archive.files}\n"
    )
    return LoadingCode(code, "arrays")


def _pickled_arrays(tree: Any) -> bool:
    values = tree.values() if isinstance(tree, dict) else [tree]
    return any(not isinstance(v, (TensorRef, NumpyArray)) or _objects(v) for v in values)


def _objects(value: Any) -> bool:
    return isinstance(value, NumpyArray) and value.objects is not None


def _gguf(subject: _Subject) -> LoadingCode:
    code = (
        f"from gguf import GGUFReader\n\nreader = GGUFReader({subject.literal})\n"
        "tensors = {tensor.name: tensor.data for tensor in reader.tensors}\n"
    )
    blocks = sorted(
        {r.dtype for r in subject.model.tensors.values() if dtypes.dtype(r.dtype).block}
    )
    if not blocks:
        return LoadingCode(code, "tensors")
    note = (
        f"The file holds block-quantized tensors ({', '.join(f'`{b}`' for b in blocks)}): "
        "`tensor.data` gives their raw blocks as bytes, and gguf-py's `dequantize` their "
        "values."
    )
    values = (
        "from gguf import GGUFReader\nfrom gguf.quants import dequantize\n\n"
        f"reader = GGUFReader({subject.literal})\n"
        "values = {\n    tensor.name: dequantize(tensor.data, tensor.tensor_type)  # float32\n"
        "    for tensor in reader.tensors\n}\n"
    )
    return LoadingCode(code, "tensors", (note,), (("Every tensor as float32 values:", values),))


def _hdf5(subject: _Subject) -> LoadingCode:
    code = (
        "import h5py\n\narrays = {}\n\n\ndef take(name, item):\n"
        "    if isinstance(item, h5py.Dataset):\n        arrays[name] = item[()]\n\n\n"
        f'with h5py.File({subject.literal}, "r") as file:\n    file.visititems(take)\n'
    )
    return LoadingCode(code, "arrays")


def _keras(subject: _Subject) -> LoadingCode:
    code = f"import keras\n\nmodel = keras.saving.load_model({subject.literal}, safe_mode=True)\n"
    return LoadingCode(code, "model")


def _tflite(subject: _Subject) -> LoadingCode:
    code = (
        "import tensorflow as tf\n\n"
        f"interpreter = tf.lite.Interpreter(model_path={subject.literal})\n"
        "interpreter.allocate_tensors()\n"
    )
    return LoadingCode(code, "interpreter")


def _tf_checkpoint(subject: _Subject) -> LoadingCode:
    prefix = subject.name.removesuffix(".index")
    code = (
        f"import tensorflow as tf\n\nreader = tf.train.load_checkpoint({json.dumps(prefix)})\n"
        "shapes = reader.get_variable_to_shape_map()\n"
    )
    return LoadingCode(code, "reader")


def _tf_savedmodel(subject: _Subject) -> LoadingCode:
    code = f"import tensorflow as tf\n\nmodel = tf.saved_model.load({subject.literal})\n"
    return LoadingCode(code, "model")


def _hf_dir(subject: _Subject) -> LoadingCode:
    pretrained = _from_pretrained(subject)
    if pretrained is None:
        return _modelport(subject)
    result = "pipeline" if subject.config and subject.config.config_file == MODEL_INDEX else "model"
    return LoadingCode(pretrained[1], result)


def _from_pretrained(subject: _Subject) -> tuple[str, str] | None:
    """``(sentence, code)`` loading the folder with the class its config names, when the file
    is (or is one that) ``from_pretrained`` reads."""
    config = subject.config
    if config is None or config.library not in ("transformers", "diffusers", _SENTENCE):
        return None
    path = subject.model.path
    if not path.is_dir() and path.name not in _hf_folder.weight_files(path.parent):
        return None
    folder = subject.name if path.is_dir() else (posixpath.dirname(subject.name) or ".")
    literal = json.dumps(folder)
    if config.library == _SENTENCE:
        code = (
            "from sentence_transformers import SentenceTransformer\n\n"
            f"model = SentenceTransformer({literal})\n"
        )
        return _with(_SENTENCE, config), code
    if config.library == "diffusers":
        if not config.class_name:
            return None
        variable = "pipeline" if config.config_file == MODEL_INDEX else "model"
        code = (
            f"from diffusers import {config.class_name}\n\n"
            f"{variable} = {config.class_name}.from_pretrained({literal})\n"
        )
        return _with("diffusers", config), code
    if config.custom_code or not config.class_name:
        comment = (
            "# config.json names code that ships with the model (auto_map): read it before\n"
            "# passing trust_remote_code=True\n"
            if config.custom_code
            else ""
        )
        code = (
            f"from transformers import AutoModel\n\n{comment}"
            f"model = AutoModel.from_pretrained({literal})\n"
        )
        return _with("transformers", config), code
    code = (
        f"from transformers import {config.class_name}\n\n"
        f"model = {config.class_name}.from_pretrained({literal})\n"
    )
    return _with("transformers", config), code


def _with(library: str, config: HubConfig) -> str:
    return f"With {library}, from the folder and its {config.config_file}:"


_BY_FORMAT: Final[dict[Format, Callable[[_Subject], LoadingCode]]] = {
    Format.SAFETENSORS: _safetensors,
    Format.TORCH_ZIP: _torch,
    Format.TORCH_LEGACY: _torch,
    Format.TORCHSCRIPT: _torchscript,
    Format.TORCH_EXPORT: _torch_export,
    Format.ONNX: _onnx,
    Format.NPY: _numpy,
    Format.NPZ: _numpy,
    Format.GGUF: _gguf,
    Format.HDF5: _hdf5,
    Format.KERAS: _keras,
    Format.TFLITE: _tflite,
    Format.TF_CHECKPOINT: _tf_checkpoint,
    Format.TF_SAVEDMODEL: _tf_savedmodel,
    Format.HF_DIR: _hf_dir,
}
