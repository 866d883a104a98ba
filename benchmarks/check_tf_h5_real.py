"""modelport's ``tf_model.h5`` -> PyTorch mapping, checked on files TensorFlow itself wrote.

The tests (tests/test_tf_h5_names.py, tests/test_tf_shards.py) write ``tf_model.h5`` with h5py
the way transformers 4.x did; this script holds them and modelport to the real thing. In a
side virtual environment with transformers 4.x, tensorflow-cpu and tf-keras (transformers 5
has no TF models, and the main environment has no TensorFlow), tiny TFBertModel, TFGPT2Model,
TFBertForSequenceClassification, TFBertForPreTraining and TFGPT2LMHeadModel are built with
fixed seeds from the tests' configs, saved with ``save_pretrained`` (whole, and sharded at
the tests' 8 KB), and run on fixed inputs.
Then, in this environment:

1. ``modelport convert DIR out.safetensors`` and ``--to hf`` on every folder (modelport's
   command-line entry point, run in this process); the output is loaded into transformers 5's
   PyTorch class strictly (``load_state_dict(strict=True)``; ``from_pretrained`` with no
   missing, unexpected or mismatched keys) and run on the same inputs. The table gives the
   largest absolute difference from TensorFlow's outputs.
2. every real file's HDF5 structure (groups, datasets with shape, dtype and storage, every
   attribute with its HDF5 type and values) is compared with what the tests' h5py writers
   produce for the same configs, and the sharded folders' index files are compared as text.

The side environment is built when missing (``python3 -m venv`` and one ``pip install`` of
``SIDE_PINS``, 2.3 GB installed: 3 to 4 minutes on a 2-core VM); a run after that takes about
50 s (the TF models about 20 s of it). Exit status 1 if a row fails or a structure differs.

Usage: python benchmarks/check_tf_h5_real.py [--venv /tmp/tf4-venv] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' h5py writers and configs

from tests import test_tf_h5_names as whole_writer  # noqa: E402
from tests import test_tf_shards as shard_writer  # noqa: E402

SIDE_PINS = ("transformers==4.51.3", "tensorflow-cpu==2.21.0", "tf-keras==2.21.0")
SHARD_SIZE = "8KB"  # transformers reads it as 8000 bytes: test_tf_shards' max_bytes
TOLERANCE = 1e-4  # float32 TF vs PyTorch kernels, same weights
SEED = 0


@dataclass(frozen=True)
class Case:
    """One architecture: its TF class (transformers 4.x), PyTorch class (transformers 5),
    config and the outputs compared."""

    name: str
    tf_class: str
    torch_class: str
    config_class: str
    config: dict[str, Any]
    outputs: tuple[str, ...]
    layout: dict[str, Any] | None = None  # the tests' writer layout, where a writer exists


CASES = (
    Case(
        "bert",
        "TFBertModel",
        "BertModel",
        "BertConfig",
        whole_writer.TINY_BERT,
        ("last_hidden_state", "pooler_output"),
        whole_writer.BERT_LAYOUT,
    ),
    Case(
        "gpt2",
        "TFGPT2Model",
        "GPT2Model",
        "GPT2Config",
        whole_writer.TINY_GPT2,
        ("last_hidden_state",),
        whole_writer.GPT2_LAYOUT,
    ),
    Case(
        "bert-cls",
        "TFBertForSequenceClassification",
        "BertForSequenceClassification",
        "BertConfig",
        {**whole_writer.TINY_BERT, "num_labels": 3},
        ("logits",),
    ),
    Case(  # Keras saves BERT's embeddings again under mlm___cls; the decoder is tied
        "bert-pretrain",
        "TFBertForPreTraining",
        "BertForPreTraining",
        "BertConfig",
        whole_writer.TINY_BERT,
        ("prediction_logits", "seq_relationship_logits"),
    ),
    Case(
        "gpt2-lm",
        "TFGPT2LMHeadModel",
        "GPT2LMHeadModel",
        "GPT2Config",
        whole_writer.TINY_GPT2,
        ("logits",),
    ),
)

SIDE_SCRIPT = """
import json, sys
import numpy as np
import tf_keras
import transformers

out, cases, shard_size, seed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ids = np.random.default_rng(seed).integers(1, 50, size=(2, 8)).astype(np.int32)
mask = np.ones_like(ids)
mask[1, 6:] = 0
saved = {"input_ids": ids, "attention_mask": mask}
for case in cases:
    tf_keras.utils.set_random_seed(seed)
    config = getattr(transformers, case["config_class"])(**case["config"])
    model = getattr(transformers, case["tf_class"])(config)
    result = model(input_ids=ids, attention_mask=mask, training=False)
    for name in case["outputs"]:
        saved[case["name"] + "/" + name] = result[name].numpy()
    model.save_pretrained(f"{out}/{case['name']}")
    model.save_pretrained(f"{out}/{case['name']}-sharded", max_shard_size=shard_size)
np.savez(f"{out}/outputs.npz", **saved)
print(transformers.__version__, tf_keras.__version__)
"""


@dataclass
class Row:
    model: str
    sharded: bool
    target: str
    keys_ok: bool = False
    max_error: float | None = None
    problem: str = ""

    @property
    def verdict(self) -> str:
        good = self.keys_ok and self.max_error is not None and self.max_error <= TOLERANCE
        return "ok" if good else "FAIL"


@dataclass
class Structure:
    """What one file or folder holds, as comparable lines: path -> description."""

    entries: dict[str, str] = field(default_factory=dict)


def ensure_side_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"building {venv} ({', '.join(SIDE_PINS)}): a few minutes", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PINS], check=True)
    return python


def write_tf_models(python: Path, out: Path) -> str:
    cases = [
        {k: getattr(c, k) for k in ("name", "tf_class", "config_class", "config", "outputs")}
        for c in CASES
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    argv = [str(python), "-c", SIDE_SCRIPT, str(out), json.dumps(cases), SHARD_SIZE, str(SEED)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the side environment failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_modelport(*argv: str) -> tuple[int, str]:
    from modelport.cli.main import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(list(argv))
    return code, printed.getvalue()


def check_conversion(case: Case, folder: Path, target: str, saved: Any, work: Path) -> Row:
    import torch

    row = Row(case.name, folder.name.endswith("-sharded"), target)
    out = work / f"{folder.name}-{target}"
    extra = ("--to", "hf") if target == "hf" else ()
    path = out if target == "hf" else out.with_suffix(".safetensors")
    code, printed = run_modelport("convert", str(folder), str(path), *extra)
    if code != 0:
        row.problem = printed.strip().splitlines()[-1]
        return row
    model = load_strictly(case, folder, path, row)
    model.eval()
    inputs = {
        k: torch.from_numpy(saved[k].astype(np.int64)) for k in ("input_ids", "attention_mask")
    }
    with torch.no_grad():
        result = model(**inputs)
    errors = [
        float(np.abs(result[name].numpy() - saved[f"{case.name}/{name}"]).max())
        for name in case.outputs
    ]
    row.max_error = max(errors)
    return row


def load_strictly(case: Case, folder: Path, path: Path, row: Row) -> Any:
    """The converted weights in transformers 5's class: ``from_pretrained`` for a folder,
    else ``load_state_dict`` where only the tied names (``from_pretrained`` ties them) may
    be missing. ``row`` gets whether the keys were right."""
    import transformers
    from safetensors.torch import load_file

    torch_class = getattr(transformers, case.torch_class)
    if path.is_dir():
        model, info = torch_class.from_pretrained(path, output_loading_info=True)
        wrong = {k: v for k, v in info.items() if v}
        row.keys_ok, row.problem = not wrong, str(wrong) if wrong else ""
        return model
    model = torch_class(transformers.AutoConfig.from_pretrained(folder))
    tied = (
        getattr(model, "all_tied_weights_keys", None)
        or getattr(model, "_tied_weights_keys", None)
        or ()
    )
    missing, unexpected = model.load_state_dict(load_file(path), strict=not tied)
    untied = sorted(set(missing) - set(tied))
    row.keys_ok = not untied and not unexpected
    row.problem = f"missing {untied} unexpected {unexpected}" if not row.keys_ok else ""
    model.tie_weights()
    return model


def attribute_text(owner: Any, name: str) -> str:
    """An attribute's HDF5 type (string storage and character set included) and value."""
    attribute = h5py.h5a.open(owner.id, name.encode())
    kind = attribute.get_type()
    shape = attribute.get_space().shape
    if isinstance(kind, h5py.h5t.TypeStringID):
        length = "vlen" if kind.is_variable_str() else f"fixed{kind.get_size()}"
        cset = "utf8" if kind.get_cset() == h5py.h5t.CSET_UTF8 else "ascii"
        type_text = f"string-{length}-{cset}"
    else:
        type_text = str(attribute.dtype)
    value = owner.attrs[name]
    if name == "keras_version":
        value = "<version>"  # the Keras release that wrote it, not the layout
    elif isinstance(value, np.ndarray):
        value = [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    elif isinstance(value, bytes):
        value = value.decode()
    return f"{type_text} shape={shape} {value!r}"


def h5_structure(path: Path) -> Structure:
    found = Structure()

    def describe(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            storage = "chunked" if obj.chunks else "contiguous"
            text = f"dataset {obj.shape} {obj.dtype} {storage} compression={obj.compression}"
        else:
            text = "group"
        found.entries[name] = text
        for attr in obj.attrs:
            found.entries[f"{name} @{attr}"] = attribute_text(obj, attr)

    with h5py.File(path, "r") as handle:
        describe("/", handle)
        handle.visititems(describe)
    return found


def folder_structure(folder: Path) -> Structure:
    found = Structure()
    for path in sorted(folder.glob("*.h5")):
        for name, text in h5_structure(path).entries.items():
            found.entries[f"{path.name}:{name}"] = text
    index = folder / "tf_model.h5.index.json"
    if index.is_file():
        for number, line in enumerate(index.read_text(encoding="utf-8").split("\n")):
            found.entries[f"{index.name}:line {number:03d}"] = line
    return found


def writer_folder(case: Case, sharded: bool, work: Path) -> Path:
    """The folder the tests' h5py writer makes for ``case``'s PyTorch twin."""
    assert case.layout is not None
    build = whole_writer.bert if case.name == "bert" else whole_writer.gpt2
    place = work / f"writer-{case.name}{'-sharded' if sharded else ''}"
    place.mkdir(parents=True, exist_ok=True)
    if sharded:
        folder, _ = shard_writer.sharded_folder(place, build(), case.layout)
        return folder
    return whole_writer.tf_folder(place, build(), **case.layout)


def structure_differences(real: Structure, written: Structure) -> list[str]:
    lines = []
    for key in sorted(real.entries.keys() | written.entries.keys()):
        mine, theirs = real.entries.get(key), written.entries.get(key)
        if mine == theirs:
            continue
        if theirs is None:
            lines.append(f"  only in the real file: {key}: {mine}")
        elif mine is None:
            lines.append(f"  only in the test writer's: {key}: {theirs}")
        else:
            lines.append(f"  {key}:\n    real:   {mine}\n    writer: {theirs}")
    return lines


def compare_structures(tf_out: Path, work: Path) -> int:
    differing = 0
    for case in CASES:
        if case.layout is None:
            continue
        for sharded in (False, True):
            real = tf_out / f"{case.name}{'-sharded' if sharded else ''}"
            written = writer_folder(case, sharded, work)
            lines = structure_differences(folder_structure(real), folder_structure(written))
            entries = len(folder_structure(real).entries)
            verdict = "identical" if not lines else f"{len(lines)} differences"
            print(f"{real.name:<16} {entries:>4} entries: {verdict}")
            for line in lines[:60]:
                print(line)
            differing += bool(lines)
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/tf4-venv"))
    parser.add_argument("--out", type=Path, default=None, help="kept; a temporary folder if not")
    args = parser.parse_args()
    python = ensure_side_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="tf-h5-real-") as scratch:
        work = args.out or Path(scratch)
        tf_out = work / "tf"
        tf_out.mkdir(parents=True, exist_ok=True)
        versions = write_tf_models(python, tf_out)
        print(f"side environment: transformers, tf-keras {versions}")
        saved = np.load(tf_out / "outputs.npz")
        rows = [
            check_conversion(case, tf_out / f"{case.name}{suffix}", target, saved, work)
            for case in CASES
            for suffix in ("", "-sharded")
            for target in ("safetensors", "hf")
        ]
        print(
            f"\n{'model':<14} {'sharded':<8} {'to':<12} {'keys ok':<8} {'max abs err':<12} verdict"
        )
        for row in rows:
            error = "-" if row.max_error is None else f"{row.max_error:.2e}"
            print(
                f"{row.model:<14} {'yes' if row.sharded else 'no':<8} {row.target:<12} "
                f"{'yes' if row.keys_ok else 'NO':<8} {error:<12} {row.verdict} {row.problem}"
            )
        print("\nHDF5 structure: real files vs the tests' h5py writers")
        differing = compare_structures(tf_out, work)
    failed = sum(row.verdict != "ok" for row in rows)
    return 1 if failed or differing else 0


if __name__ == "__main__":
    sys.exit(main())
