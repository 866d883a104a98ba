"""Red-team round 5, cases 4-6: YAML configurations whose loaders build or call what they
name (PyYAML's unsafe loaders and their ``!!python`` tags in every spelling, Hydra's
``instantiate`` and its ``_target_``, a NeMo ``.nemo`` whose ``model_config.yaml`` it
instantiates), each checked against its real loader with a marker file; and the twins that
real libraries write (Hydra configs of torch modules, NeMo-like configs, Lightning's
hparams.yaml, LightningCLI's config.yaml), which must not be called unsafe."""

from __future__ import annotations

import importlib
import io
import json
import pathlib
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import modelport


def _scan(path: Path) -> tuple[str, list[tuple[str, str]]]:
    (report,) = modelport.scan(path).files
    return report.verdict, [(f.severity.value, f.rule) for f in report.findings]


def _instantiate(path: Path) -> Any:
    """What Hydra (and NeMo's restore_from, through it) does with a config file."""
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    return hydra_utils.instantiate(omegaconf.OmegaConf.load(path))


def _hydra_touch(marker: Path | str) -> str:
    """Case 4 as the red team wrote it: pathlib.Path(marker).touch(), which Hydra's
    blocklist lets through."""
    return f"""model:
  hidden_size: 256
  init:
    _target_: pathlib.Path.touch
    _args_:
      - _target_: pathlib.Path
        _args_: ["{marker}"]
"""


# -- case 5: PyYAML tags, every spelling -------------------------------------------------------

OPEN = 'builtins.open ["{m}", "w"]\n'
TAG_SPELLINGS = {
    "shorthand": "open: !!python/object/apply:" + OPEN,
    "tag-directive": "%TAG !py! tag:yaml.org,2002:python/\n---\nopen: !py!object/apply:" + OPEN,
    "primary-handle": "%TAG ! tag:yaml.org,2002:python/\n---\nopen: !object/apply:" + OPEN,
    "verbatim": 'open: !<tag:yaml.org,2002:python/object/apply:builtins.open> ["{m}", "w"]\n',
    "mapping-form": "open: !!python/object/apply:builtins.open {{args: ['{m}', 'w']}}\n",
    "aliased": "base: &o !!python/object/apply:" + OPEN + "open: *o\n",
}


@pytest.mark.parametrize("spelling", sorted(TAG_SPELLINGS))
def test_python_tags_in_every_spelling_are_unsafe(
    tmp_path: Path, marker: Path, spelling: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TAG_SPELLINGS[spelling].format(m=marker))
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("critical", "yaml-python-tag") in found
    assert not marker.exists()
    loaded = yaml.unsafe_load(path.read_text())  # the oracle: the loader opens the file
    loaded["open"].close()
    assert marker.exists()


def test_the_red_teams_os_system_tag_is_unsafe(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "pyyaml_apply.yaml"
    path.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\nsize: 256\n')
    assert _scan(path) == ("unsafe", [("critical", "yaml-python-tag")])
    assert not marker.exists()
    yaml.load(path.read_text(), Loader=yaml.Loader)  # the oracle
    assert marker.exists()


def test_a_config_whose_bytes_read_as_a_pickle_is_judged_as_yaml(
    tmp_path: Path, marker: Path
) -> None:
    """``c`` opens pickle's GLOBAL: a config beginning ``callbacks:`` reads as a (broken)
    pickle too, and its loader still reads it as YAML, tags and all."""
    path = tmp_path / "config.yaml"
    path.write_text(f'callbacks:\n  x: !!python/object/apply:os.system ["touch {marker}"]\n')
    verdict, found = _scan(path)
    assert (verdict, ("critical", "yaml-python-tag") in found) == ("unsafe", True), found
    yaml.load(path.read_text(), Loader=yaml.Loader)  # the oracle
    assert marker.exists()


# -- case 4: Hydra's _target_ -----------------------------------------------------------------

TOUCH = "pathlib.Path.touch"
MARKER_PATH = "_args_: [{{_target_: pathlib.Path, _args_: ['{m}']}}]\n"
HYDRA_SPELLINGS = {
    "red-team": _hydra_touch("{m}"),
    "escaped-key": f'init:\n  "_targ\\x65t_": {TOUCH}\n  ' + MARKER_PATH,
    "in-a-list": f"model:\n  hooks:\n    - _target_: {TOUCH}\n      " + MARKER_PATH,
    "merged": f"base: &b {{{{_target_: {TOUCH}, _partial_: true}}}}\n"
    + "init:\n  <<: *b\n  _partial_: false\n  "
    + MARKER_PATH,
    "interpolated": f"name: {TOUCH}\ninit:\n  _target_: ${{{{name}}}}\n  " + MARKER_PATH,
}


@pytest.mark.parametrize("spelling", sorted(HYDRA_SPELLINGS))
def test_hydra_targets_that_write_files_are_unsafe(
    tmp_path: Path, marker: Path, spelling: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(HYDRA_SPELLINGS[spelling].format(m=marker))
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("high", "config-target") in found
    assert not marker.exists()
    _instantiate(path)
    assert marker.exists()


def test_a_class_path_is_judged_as_jsonargparse_imports_it(tmp_path: Path, marker: Path) -> None:
    """LightningCLI's class_path + init_args (jsonargparse is not installed here: the oracle
    is the import and call jsonargparse's import_object makes, module and name split at the
    last dot)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"trainer:\n  class_path: builtins.open\n  init_args: {{file: '{marker}'}}\n")
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("critical", "config-target") in found
    node = yaml.safe_load(path.read_text())["trainer"]
    module, _, name = node["class_path"].rpartition(".")
    with getattr(importlib.import_module(module), name)(**node["init_args"], mode="w"):
        pass
    assert marker.exists()


# -- case 6: a .nemo tar ----------------------------------------------------------------------


def _nemo(path: Path, config: str) -> Path:
    weights = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, weights)
    with tarfile.open(path, "w:") as archive:
        for name, data in (
            ("model_config.yaml", config.encode()),
            ("model_weights.ckpt", weights.getvalue()),
        ):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_a_nemo_archive_whose_config_writes_a_file_is_unsafe(tmp_path: Path, marker: Path) -> None:
    nemo = _nemo(tmp_path / "model.nemo", _hydra_touch(marker))
    (report,) = modelport.scan(nemo).files
    assert report.verdict == "unsafe"
    assert any(
        (f.severity.value, f.rule, f.member)
        == ("high", "config-target", "model.nemo!./model_config.yaml")
        for f in report.findings
    )
    with tarfile.open(nemo) as archive:  # restore_from: extract, then instantiate the config
        archive.extractall(tmp_path / "restored", filter="data")
    assert not marker.exists()
    _instantiate(tmp_path / "restored" / "model_config.yaml")
    assert marker.exists()


# -- twins: what real libraries write ---------------------------------------------------------

TORCH_CONFIG = """model:
  _target_: torch.nn.Sequential
  _args_:
    - _target_: torch.nn.Linear
      in_features: 4
      out_features: 2
    - _target_: torch.nn.ReLU
optimizer:
  _target_: torch.optim.Adam
  _partial_: true
  lr: 0.001
"""


def test_a_hydra_config_of_torch_modules_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TORCH_CONFIG)
    verdict, found = _scan(path)
    assert verdict == "safe"
    assert found == [("info", "config-target")] * 4
    built = _instantiate(path)  # the oracle: these are the modules the config builds
    assert isinstance(built["model"][0], torch.nn.Linear)
    assert built["optimizer"].func is torch.optim.Adam


# How NeMo names its classes: the model class at the top, Hydra targets below.
NEMO_CONFIG = """target: nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE
nemo_version: 1.23.0
sample_rate: 16000
preprocessor:
  _target_: nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor
  window_size: 0.025
encoder:
  _target_: nemo.collections.asr.modules.ConformerEncoder
  feat_in: 80
  n_layers: 17
decoder:
  _target_: nemo.collections.asr.modules.ConvASRDecoder
  num_classes: 128
optim:
  name: adamw
  lr: 2.0
  sched: {name: NoamAnnealing, warmup_steps: 10000}
"""


def test_a_nemo_config_is_suspicious_not_unsafe(tmp_path: Path) -> None:
    """The model class a config instantiates is named for a look (as a pickle that
    constructs it is: it builds the whole model from the config); NeMo's neural modules are
    information (``scanning.config_classes``)."""
    path = tmp_path / "model_config.yaml"
    path.write_text(NEMO_CONFIG)
    assert yaml.safe_load(NEMO_CONFIG)["target"].endswith("EncDecCTCModelBPE")
    verdict, found = _scan(path)
    assert verdict == "suspicious"
    assert found == [("medium", "config-target")] + [("info", "config-target")] * 3
    nemo = _nemo(tmp_path / "model.nemo", NEMO_CONFIG)
    assert _scan(nemo)[0] == "suspicious"


def test_lightning_hparams_written_by_pyyaml_are_safe(tmp_path: Path) -> None:
    """Lightning saves hparams.yaml with yaml.dump, which tags tuples and paths."""
    hparams = {"lr": 1e-3, "betas": (0.9, 0.999), "root": pathlib.Path("/data"), "hidden": 128}
    path = tmp_path / "hparams.yaml"
    path.write_text(yaml.dump(hparams))
    assert "!!python/tuple" in path.read_text()
    assert yaml.unsafe_load(path.read_text()) == hparams
    verdict, found = _scan(path)
    assert verdict == "safe"
    assert all(severity == "info" for severity, _ in found)


def test_a_lightning_cli_config_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "model:\n  class_path: torch.nn.Linear\n  init_args: {in_features: 4, out_features: 2}\n"
        "optimizer:\n  class_path: torch.optim.AdamW\n  init_args: {lr: 0.01}\n"
    )
    assert _scan(path) == ("safe", [("info", "config-target")] * 2)


def test_plain_yaml_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "data.yaml"
    path.write_text("name: model\ntarget: 0.5\ncls: none\nsizes: [1, 2]\nnote: 'hi!'\n")
    assert yaml.safe_load(path.read_text())["target"] == 0.5
    assert _scan(path) == ("safe", [])


def test_reexported_torch_names_are_the_allowlisted_classes() -> None:
    """``torch.nn.Linear`` is judged as ``torch.nn.modules.linear.Linear``: every alias the
    YAML judge takes is the very object torch gives under both names."""
    from modelport.scanning import yaml_configs

    assert yaml_configs.ALIASES
    for (package, name), (module, defined) in yaml_configs.ALIASES.items():
        public = getattr(importlib.import_module(package), name, None)
        assert public is None or public is getattr(importlib.import_module(module), defined)


# -- what cannot be judged is not safe -------------------------------------------------------


def test_yaml_that_does_not_parse_is_not_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("_target_: [a, b\n")
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(path.read_text())
    assert _scan(path) == ("suspicious", [("medium", "yaml-unparsed")])


def test_a_self_containing_yaml_ends(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: &x [*x, {_target_: os.system}]\nb: &y {self: *y, cls: os.system}\n")
    assert yaml.compose(path.read_text()) is not None
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert found == [("critical", "config-target")]


def test_deep_nesting_is_judged(tmp_path: Path) -> None:
    """Deeper than the pure-Python composer's stack here, within libyaml's limit of 1000: the
    target at the bottom is still found."""
    depth = 600
    path = tmp_path / "config.yaml"
    path.write_text("[" * depth + "{_target_: os.system}" + "]" * depth + "\n")
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("critical", "config-target") in found


def test_an_archives_json_and_python_members_are_judged_as_in_a_folder(tmp_path: Path) -> None:
    """A packed model folder: its config.json's auto_map is named as in the folder; its
    ``.py`` member is named as text (no loader imports it from a tar)."""
    config = b'{"model_type": "x", "auto_map": {"AutoModel": "modeling_x.XModel"}}'
    path = tmp_path / "packed.tar"
    with tarfile.open(path, "w:") as archive:
        for name, data in (("m/config.json", config), ("m/modeling_x.py", b"import os\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert "auto_map" in json.loads(config)
    verdict, found = _scan(path)
    assert verdict == "suspicious"
    assert sorted(found) == [("info", "python-source"), ("medium", "remote-code")]
