"""Configs that loaders instantiate, beyond ``.yaml`` files: JSON configs (Hydra's
``OmegaConf.load`` and jsonargparse read JSON as YAML), YAML configs under other names
(``.cfg``, ``.hparams``, no suffix), judged by their content; and the framework classes
real LightningCLI and NeMo configs name, which are information unless a name reaches a
gadget. Every attack is checked against its real loader with a marker file; every twin
against the loader that builds it."""

from __future__ import annotations

import inspect
import json
import logging
import multiprocessing
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from jsonargparse import ArgumentParser
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import modelport
from modelport.scanning import config_classes, content_checks, yaml_configs


def _scan(path: Path) -> tuple[str, list[tuple[str, str]]]:
    (report,) = modelport.scan(path).files
    return report.verdict, [(f.severity.value, f.rule) for f in report.findings]


def _messages(path: Path) -> list[str]:
    (report,) = modelport.scan(path).files
    return [f.message for f in report.findings]


def _hydra(path: Path) -> Any:
    """What Hydra (and NeMo's restore_from, through it) does with a config file."""
    return instantiate(OmegaConf.load(path))


def _jsonargparse(path: Path, kind: object) -> Any:
    """What jsonargparse (LightningCLI's parser) does with a config file: a parameter of type
    ``kind`` given by class_path and init_args, instantiated. jsonargparse 4 warns that
    paths on its denylist (``logging``, ``subprocess``) will be refused from 5.0, and imports
    them all the same."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--thing", type=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return parser.instantiate(parser.parse_args(["--config", str(path)])).thing


def _touch(marker: Path) -> dict[str, Any]:
    """pathlib.Path(marker).touch(), which Hydra's blocklist lets through."""
    path = {"_target_": "pathlib.Path", "_args_": [str(marker)]}
    return {
        "model": {"hidden_size": 256, "init": {"_target_": "pathlib.Path.touch", "_args_": [path]}}
    }


# -- JSON configs -------------------------------------------------------------------------------

JSON_SPELLINGS: dict[str, Callable[[Path], str]] = {
    "pretty": lambda m: json.dumps(_touch(m), indent=2),
    "minified": lambda m: json.dumps(_touch(m), separators=(",", ":")),
    "escaped-key": lambda m: json.dumps(_touch(m)).replace('"_target_"', '"_targ\\u0065t_"'),
    "in-a-list": lambda m: json.dumps({"hooks": [{"x": 1}, _touch(m)["model"]["init"]]}),
    "yaml-in-a-json-name": lambda m: yaml.safe_dump(_touch(m)),
}


@pytest.mark.parametrize("spelling", sorted(JSON_SPELLINGS))
def test_json_targets_that_write_files_are_unsafe(
    tmp_path: Path, marker: Path, spelling: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(JSON_SPELLINGS[spelling](marker))
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("high", "config-target") in found
    assert not marker.exists()
    _hydra(path)  # the oracle: OmegaConf reads the JSON, Hydra calls Path.touch
    assert marker.exists()


def test_a_json_class_path_is_judged_as_jsonargparse_instantiates_it(
    tmp_path: Path, marker: Path
) -> None:
    path = tmp_path / "config.json"
    thing = {"class_path": "logging.FileHandler", "init_args": {"filename": str(marker)}}
    path.write_text(json.dumps({"thing": thing}))
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("critical", "config-target") in found
    assert not marker.exists()
    _jsonargparse(path, logging.Handler).close()  # the oracle: the handler opens the file
    assert marker.exists()


def test_a_json_config_of_torch_modules_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    linear = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2}
    model = {"_target_": "torch.nn.Sequential", "_args_": [linear, {"_target_": "torch.nn.ReLU"}]}
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}
    path.write_text(json.dumps({"model": model, "optimizer": optimizer}))
    assert _scan(path) == ("safe", [("info", "config-target")] * 4)
    built = _hydra(path)  # the oracle: these are the modules the config builds
    assert isinstance(built["model"][0], torch.nn.Linear)
    assert built["optimizer"].func is torch.optim.Adam


def test_a_json_class_path_of_a_torch_module_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    thing = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 4, "out_features": 2}}
    path.write_text(json.dumps({"thing": thing}))
    assert _scan(path) == ("safe", [("info", "config-target")])
    assert isinstance(_jsonargparse(path, torch.nn.Module), torch.nn.Linear)


def test_a_target_that_is_not_a_string_names_nothing(tmp_path: Path) -> None:
    """A tokenizer's vocabulary may hold ``_target_`` as a token with its id: loaders refuse
    a target that is not a string, so it names no code."""
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"_target_": 5, "class_path": 7, "cls": 8, "target": 9}))
    with pytest.raises(InstantiationException):
        _hydra(path)
    assert _scan(path) == ("safe", [])


def _tokenizer(path: Path, size: int) -> Path:
    """A tokenizer.json written by Hugging Face's tokenizers, its vocabulary holding every
    target key as a token and BERT's post-processor its ``cls`` key."""
    vocab = {f"t{i}": i for i in range(size)}
    for token in ("[CLS]", "[SEP]", "_target_", "class_path", "cls", "target", "a.b"):
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[CLS]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"])
    )
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_json_is_safe_and_never_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its target keys are tokens and ids, and BERT's ``cls`` is a pair: no finding, and
    neither the document nor its text is walked in Python (a vocabulary is megabytes)."""
    path = _tokenizer(tmp_path / "tokenizer.json", 20_000)
    assert Tokenizer.from_file(str(path)).encode("t1 t2").ids == [20_000, 1, 2, 20_001]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("walked")

    monkeypatch.setattr(yaml_configs, "_places", refuse)
    monkeypatch.setattr(yaml, "compose_all", refuse)
    assert _scan(path) == ("safe", [])


# -- YAML configs under other names --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["config.cfg", "model.conf", "config.txt", "model.hparams", "config"]
)
def test_configs_under_other_names_are_judged(tmp_path: Path, marker: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(_touch(marker)))
    verdict, found = _scan(path)
    assert verdict == "unsafe"
    assert ("high", "config-target") in found
    assert not marker.exists()
    _hydra(path)  # the oracle: OmegaConf.load reads any file name
    assert marker.exists()


def test_a_key_spelled_by_an_alias_under_another_name_is_judged(
    tmp_path: Path, marker: Path
) -> None:
    """The key's word is written once, as a value, and reused by an alias: no
    ``_target_:`` appears in the text."""
    path = tmp_path / "run.conf"
    at = f"{{*k : pathlib.Path, _args_: ['{marker}']}}"
    path.write_text(f"name: &k _target_\nhook: {{*k : pathlib.Path.touch, _args_: [{at}]}}\n")
    assert "_target_:" not in path.read_text()
    verdict, found = _scan(path)
    assert (verdict, ("high", "config-target") in found) == ("unsafe", True)
    _hydra(path)["hook"]  # the oracle
    assert marker.exists()


def test_a_python_tag_under_another_name_is_unsafe(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "model.hparams"
    path.write_text(f'lr: 0.1\nhook: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert _scan(path) == ("unsafe", [("critical", "yaml-python-tag")])
    yaml.unsafe_load(path.read_text())  # the oracle
    assert marker.exists()


def test_a_config_under_another_name_whose_bytes_read_as_a_pickle_is_judged(
    tmp_path: Path, marker: Path
) -> None:
    """``c`` opens pickle's GLOBAL: two lines read as a (broken) pickle too, and OmegaConf
    still reads them as YAML."""
    path = tmp_path / "train.cfg"
    at = f"{{_target_: pathlib.Path, _args_: ['{marker}']}}"
    touch = f"{{_target_: pathlib.Path.touch, _args_: [{at}]}}"
    path.write_text(f"callbacks:\n  init: {touch}\n")
    (report,) = modelport.scan(path).files
    assert (report.format, report.verdict) == ("pickle", "unsafe")
    assert any(f.rule == "config-target" and f.severity.value == "high" for f in report.findings)
    _hydra(path)
    assert marker.exists()


def test_a_benign_config_under_another_name_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.cfg"
    path.write_text("model:\n  _target_: torch.nn.Linear\n  in_features: 4\n  out_features: 2\n")
    assert _scan(path) == ("safe", [("info", "config-target")])
    assert isinstance(_hydra(path)["model"], torch.nn.Linear)


def test_plain_text_beside_a_model_stays_safe(tmp_path: Path) -> None:
    """A README with tag-like marks, prose targets and backslashes, a vocabulary, a merges
    file past the size a text is composed at: no loader reads them as configs."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(
        "# Model!!\n\nIts target: audiences.\nPaths like C:\\data\\x.\ncls: see below\n" * 50
    )
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "!", "!!", "\\", "cls", "target:"]))
    merges = ["#version: 0.2"] + [f"t{i} _target_:" for i in range(30_000)]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    assert (folder / "merges.txt").stat().st_size > content_checks.MAX_CONTENT_CONFIG_BYTES
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    reports = {Path(r.path).name: (r.verdict, r.findings) for r in modelport.scan(folder).files}
    names = ("README.md", "merges.txt", "pytorch_model.bin", "vocab.txt")
    assert reports == dict.fromkeys(names, ("safe", ()))


# -- framework classes ---------------------------------------------------------------------------

# Written by LightningCLI 2.6.6 (cli.parser.dump of `LightningCLI(Tiny, run=False)` with a
# CSVLogger, ModelCheckpoint, EarlyStopping and LearningRateMonitor, Adam and StepLR): the
# shape SaveConfigCallback saves as config.yaml. Lightning is not a test dependency (its
# import takes seconds), so its output is kept here.
LIGHTNING_CLI_CONFIG = """# lightning.pytorch==2.6.6
seed_everything: 0
trainer:
  accelerator: auto
  strategy: auto
  devices: auto
  num_nodes: 1
  precision: null
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: logs
      name: lightning_logs
      version: null
      prefix: ''
      flush_logs_every_n_steps: 100
  callbacks:
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args:
      dirpath: null
      filename: null
      monitor: val_loss
      verbose: false
      save_last: null
      save_top_k: 1
      save_on_exception: false
      save_weights_only: false
      mode: min
      auto_insert_metric_name: true
      every_n_train_steps: null
      train_time_interval: null
      every_n_epochs: null
      save_on_train_epoch_end: null
      enable_version_counter: true
  - class_path: lightning.pytorch.callbacks.EarlyStopping
    init_args:
      monitor: val_loss
      min_delta: 0.0
      patience: 3
      verbose: false
      mode: min
      strict: true
      check_finite: true
      stopping_threshold: null
      divergence_threshold: null
      check_on_train_epoch_end: null
      log_rank_zero_only: false
  - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    init_args:
      logging_interval: null
      log_momentum: false
      log_weight_decay: false
  fast_dev_run: false
  max_epochs: null
  max_steps: -1
  check_val_every_n_epoch: 1
  accumulate_grad_batches: 1
  inference_mode: true
  use_distributed_sampler: true
  profiler: null
  plugins: null
  default_root_dir: null
model:
  width: 4
data: null
optimizer:
  class_path: torch.optim.Adam
  init_args:
    lr: 0.001
    betas:
    - 0.9
    - 0.999
    eps: 1.0e-08
    weight_decay: 0.0
    amsgrad: false
    foreach: null
    maximize: false
    capturable: false
    differentiable: false
    fused: null
    decoupled_weight_decay: false
lr_scheduler:
  class_path: torch.optim.lr_scheduler.StepLR
  init_args:
    step_size: 1
    gamma: 0.1
    last_epoch: -1
"""


def test_a_lightning_cli_config_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(LIGHTNING_CLI_CONFIG)
    assert _scan(path) == ("safe", [("info", "config-target")] * 6)
    node = yaml.safe_load(LIGHTNING_CLI_CONFIG)["lr_scheduler"]  # the oracle: torch's own
    scheduler = _locate(node["class_path"])
    assert scheduler is torch.optim.lr_scheduler.StepLR
    inspect.signature(scheduler).bind(optimizer=None, **node["init_args"])


def test_a_lightning_cli_json_config_is_safe(tmp_path: Path) -> None:
    """jsonargparse reads a JSON config as it reads YAML."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(yaml.safe_load(LIGHTNING_CLI_CONFIG)))
    assert _scan(path) == ("safe", [("info", "config-target")] * 6)


def test_the_users_own_model_class_stays_worth_a_look(tmp_path: Path) -> None:
    """LightningCLI's subclass mode names the model class: a package modelport knows
    nothing of."""
    path = tmp_path / "config.yaml"
    config = yaml.safe_load(LIGHTNING_CLI_CONFIG)
    config["model"] = {"class_path": "my_project.models.Tiny", "init_args": {"width": 4}}
    path.write_text(yaml.safe_dump(config))
    verdict, found = _scan(path)
    assert verdict == "suspicious"
    assert found == [("medium", "config-target")] + [("info", "config-target")] * 6


def test_loggers_that_send_the_run_elsewhere_stay_worth_a_look(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    logger = {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {}}
    path.write_text(yaml.safe_dump({"trainer": {"logger": logger}}))
    assert _scan(path) == ("suspicious", [("medium", "config-target")])
    assert "sends the run's metrics" in _messages(path)[0]


# How NeMo's published ASR models write model_config.yaml (Conformer-CTC): the model class at
# the top, Hydra targets for its modules; NeMo is not installed here.
NEMO_CONFIG = """sample_rate: 16000
log_prediction: true
tokenizer: {dir: tokenizer_dir, type: bpe}
preprocessor:
  _target_: nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor
  sample_rate: 16000
  normalize: per_feature
  window_size: 0.025
  features: 80
spec_augment:
  _target_: nemo.collections.asr.modules.SpectrogramAugmentation
  freq_masks: 2
  time_masks: 5
encoder:
  _target_: nemo.collections.asr.modules.ConformerEncoder
  feat_in: 80
  n_layers: 16
  d_model: 176
decoder:
  _target_: nemo.collections.asr.modules.ConvASRDecoder
  feat_in: 176
  num_classes: 128
optim:
  name: adamw
  lr: 2.0
  sched: {name: NoamAnnealing, d_model: 176, warmup_steps: 10000}
target: nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE
nemo_version: 1.23.0
"""


def test_a_nemo_config_is_worth_a_look_only_for_its_model_class(tmp_path: Path) -> None:
    path = tmp_path / "model_config.yaml"
    path.write_text(NEMO_CONFIG)
    verdict, found = _scan(path)
    assert verdict == "suspicious"
    assert found == [("medium", "config-target")] + [("info", "config-target")] * 4
    assert "EncDecCTCModelBPE" in _messages(path)[0]


def test_the_schedulers_named_are_torchs() -> None:
    """The oracle: each scheduler the table takes is a scheduler class of the torch
    installed."""
    for name in config_classes.SCHEDULERS:
        scheduler = getattr(torch.optim.lr_scheduler, name)
        assert issubclass(
            scheduler,
            (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
        )


# A name that reaches a gadget through an attribute chain or a package that re-exports it.
GADGET_CHAINS = (
    "torch.serialization.os.system",
    "torch.utils.collect_env.subprocess.Popen",
    "torch.multiprocessing.Process",
    "lightning.pytorch.callbacks.os.system",
    "lightning.pytorch.callbacks.model_checkpoint.subprocess.Popen",
    "nemo.collections.asr.modules.builtins.open",
    "torch.optim.lr_scheduler.shutil.rmtree",
)


@pytest.mark.parametrize("name", GADGET_CHAINS)
@pytest.mark.parametrize("key", ["_target_", "class_path"])
def test_names_that_reach_a_gadget_are_unsafe(tmp_path: Path, name: str, key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [{key: name}]}}))
    assert _scan(path) == ("unsafe", [("critical", "config-target")])


def test_hydra_reaches_gadgets_through_attribute_chains() -> None:
    """The oracle for the chains above that need only torch: Hydra's own lookup."""
    assert _locate("torch.serialization.os.system") is os.system
    assert _locate("torch.utils.collect_env.subprocess.Popen") is subprocess.Popen
    assert _locate("torch.multiprocessing.Process") is multiprocessing.Process


def test_a_chain_to_popen_runs_it(tmp_path: Path, marker: Path) -> None:
    """jsonargparse imports what it can and looks the last part up on it (Hydra 1.3.8's own
    target policy resolves the chain and refuses Popen; older Hydras do not)."""
    path = tmp_path / "config.json"
    popen = {"args": f"touch {marker}", "shell": True}
    thing = {"class_path": "torch.utils.collect_env.subprocess.Popen", "init_args": popen}
    path.write_text(json.dumps({"thing": thing}))
    assert _scan(path) == ("unsafe", [("critical", "config-target")])
    assert not marker.exists()
    _jsonargparse(path, subprocess.Popen).wait()  # the oracle
    assert marker.exists()


NEAR_MISSES = (
    "nemo.collections..asr.modules.ConformerEncoder",
    " lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.ModelCheckpoint.format_checkpoint_name",
    "lightning.pytorch.callbacks.ModelCheckpoint.__init__",
    "Lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.mine.ModelCheckpoint",
    "torch.optim.lr_scheduler.StepLR.step",
)


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_spellings_near_a_framework_class_are_not_information(tmp_path: Path, name: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"callbacks": [{"class_path": name}]}))
    verdict, found = _scan(path)
    assert verdict in ("suspicious", "unsafe")
    assert found and all(severity != "info" for severity, _ in found)


def test_hydra_refuses_an_empty_part() -> None:
    with pytest.raises(ValueError, match="invalid dotstring"):
        _locate(NEAR_MISSES[0])


def test_every_framework_class_is_judged_as_its_table_says(tmp_path: Path) -> None:
    """No spelling in the tables reaches a gadget through its parts or splits elsewhere (each
    was looked up in Lightning 2.6.6 and torch as a class; NeMo's in its modules'
    ``__init__``)."""
    names = dict.fromkeys(config_classes.INERT, "info")
    names.update(dict.fromkeys(config_classes.WORTH_A_LOOK, "medium"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"items": [{"class_path": name} for name in names]}))
    (report,) = modelport.scan(path).files
    judged = {f.global_name: f.severity.value for f in report.findings}
    assert judged == names
