"""Five bypasses from a red-team audit of the scanner, each built small with its benign twin:
a configuration padded past the text limit (3), links that give a file another name (4),
TorchScript operators named through ``getattr`` (5), a diffusers component's
``<component>/<library>.py`` (9), and a ``torch.*`` path a sentence-transformers config
makes its loader call (10). Where it is cheap the reference reads the same bytes: json,
torch.jit.load, torch's own class names; the heavy corpus runs the loaders themselves
(tests/attacks/corpus_redteam3.py)."""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from modelport import limits
from modelport.fleet.inputs import expand
from modelport.fleet.tasks import perform
from modelport.scanning import hf_code, script_code, walking
from tests.test_scan_script_code import SavesWhileLoading

SMALL_LIMIT = 4096


@pytest.fixture
def small_text_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """The text limit made small, so that a file past it costs nothing to write."""
    monkeypatch.setattr(limits, "MAX_TEMPLATE_TEXT_BYTES", SMALL_LIMIT)
    return SMALL_LIMIT


def _padded(path: Path, document: Any, size: int) -> Path:
    """``document`` as JSON, then spaces up to ``size`` bytes: json.loads reads it whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document)
    path.write_text(text + " " * (size - len(text)))
    return path


def _rules(report: modelport.ScanReport) -> list[tuple[str, str, str]]:
    return sorted(
        (Path(file.path).name, finding.rule, finding.member)
        for file in report.files
        for finding in file.findings
    )


# -- 3: configuration text past the limit ----------------------------------------------------------

AUTO_MAP = {"model_type": "x", "auto_map": {"AutoConfig": "org/repo--configuration_x.XConfig"}}


def test_a_config_padded_past_the_text_limit_is_not_safe(
    tmp_path: Path, small_text_limit: int
) -> None:
    config = _padded(tmp_path / "config.json", AUTO_MAP, small_text_limit + 16)
    assert json.loads(config.read_text())["auto_map"]  # what transformers reads
    report = modelport.scan(tmp_path)
    assert report.verdict == "error", report.to_json()
    assert _rules(report) == [("config.json", "not-analysed", "config.json")]


def test_a_chat_template_padded_past_the_text_limit_is_not_safe(
    tmp_path: Path, small_text_limit: int
) -> None:
    template = tmp_path / "chat_template.jinja"
    template.write_text("{{ messages }}" + " " * small_text_limit)
    assert modelport.scan(tmp_path).verdict == "error"


def test_large_text_no_loader_reads_for_code_stays_safe(
    tmp_path: Path, small_text_limit: int
) -> None:
    """Past the limit, only what a loader reads for code or templates is an error: a long
    README or vocabulary beside a model is not; a config within the limit is read."""
    (tmp_path / "README.md").write_text("# model\n" * small_text_limit)
    (tmp_path / "vocab.txt").write_text("token\n" * small_text_limit)
    _padded(tmp_path / "config.json", {"model_type": "bert"}, small_text_limit)
    assert modelport.scan(tmp_path).verdict == "safe"
    _padded(tmp_path / "config.json", AUTO_MAP, small_text_limit)
    assert modelport.scan(tmp_path).verdict == "suspicious"


# -- 4: a file reached under several names ---------------------------------------------------------

LINKS = (("a_index.json", "model_index.json"), ("b_notes.txt", "pipeline_evil.py"))


def _custom_pipeline(folder: Path, *, links: bool) -> Path:
    """model_index.json names pipeline_evil.py (DiffusionPipeline imports it with
    trust_remote_code=True); the links sort first and lead to both files."""
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": ["pipeline_evil", "EvilPipeline"], "_diffusers_version": "0"})
    )
    (folder / "pipeline_evil.py").write_text(
        "from diffusers import DiffusionPipeline\n\nclass EvilPipeline(DiffusionPipeline):\n"
        "    pass\n"
    )
    for link, target in LINKS if links else ():
        (folder / link).symlink_to(target)
    return folder


def _findings_by_member(report: modelport.ScanReport) -> set[tuple[str, str]]:
    return {(f.rule, f.member) for file in report.files for f in file.findings}


def test_links_that_sort_first_keep_the_names_a_loader_reads(tmp_path: Path) -> None:
    plain = modelport.scan(_custom_pipeline(tmp_path / "plain", links=False))
    linked = modelport.scan(_custom_pipeline(tmp_path / "linked", links=True))
    assert plain.verdict == "suspicious", plain.to_json()
    assert linked.verdict == plain.verdict, linked.to_json()
    assert _findings_by_member(linked) >= _findings_by_member(plain)
    assert [Path(file.path).name for file in linked.files] == ["a_index.json", "b_notes.txt"]


def test_the_walk_lists_every_other_path_to_a_file(tmp_path: Path) -> None:
    root = _custom_pipeline(tmp_path / "p", links=True)
    found = walking.find(root)
    assert found.files == (f"{root}/a_index.json", f"{root}/b_notes.txt")
    assert found.aliases == {
        f"{root}/a_index.json": (f"{root}/model_index.json",),
        f"{root}/b_notes.txt": (f"{root}/pipeline_evil.py",),
    }
    assert all(Path(k).samefile(v) for k, (v,) in found.aliases.items())
    assert walking.walk(root).aliases[root / "a_index.json"] == (root / "model_index.json",)


def test_fleet_workers_judge_the_other_names_too(tmp_path: Path) -> None:
    root = _custom_pipeline(tmp_path / "p", links=True)
    records = {}
    for item in expand("scan", [str(root)]):
        outcome = perform("scan", item.path, item.context)
        records[Path(item.path).name] = outcome.result["verdict"]
    assert records == {"a_index.json": "suspicious", "b_notes.txt": "suspicious"}


def test_a_chat_template_behind_a_link_is_judged_as_one(tmp_path: Path) -> None:
    escape = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    (tmp_path / "chat_template.jinja").write_text(escape)
    (tmp_path / "a.txt").symlink_to("chat_template.jinja")
    report = modelport.scan(tmp_path)
    assert report.verdict == "unsafe", report.to_json()
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert modelport.scan(tmp_path).verdict == "safe"


# -- 5: TorchScript operators named through getattr ------------------------------------------------


def _saving_with(tmp_path: Path, target: Path, spelling: str) -> Path:
    """The scripted module, its ``torch.save`` spelled ``spelling`` in the archive's code."""
    source, path = tmp_path / "plain.pt", tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(SavesWhileLoading(str(target))), source)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename.endswith(".py"):
                assert b"    torch.save(w, target)\n" in data
                data = data.replace(b"torch.save(", f"{spelling}(".encode())
            out.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "spelling",
    [
        'getattr(torch, "save")',
        "getattr(ops.aten, 'save')",
        'getattr(getattr(ops, "aten"), "save")',
        'getattr(torch, "sa" "ve")',
    ],
)
def test_getattr_with_a_literal_name_is_read_as_the_dotted_name(
    tmp_path: Path, spelling: str
) -> None:
    target = tmp_path / "written-on-load.pt"
    path = _saving_with(tmp_path, target, spelling)
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert [f.rule for f in report.serious] == ["torchscript-file-access"]
    torch.jit.load(path)
    assert target.exists()  # the oracle: loading wrote the file


def test_getattr_on_the_models_own_attributes_stays_safe(tmp_path: Path) -> None:
    """Scripted containers name their children ``getattr(self.layers, "0")`` in archive
    code; a real one scans safe, and so does the module above."""
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    path = tmp_path / "seq.pt"
    torch.jit.save(torch.jit.script(torch.nn.ModuleDict({"layers": layers})), path)
    with zipfile.ZipFile(path) as archive:
        code = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".py"))
    assert b"getattr(" in code
    assert modelport.scan(path).verdict == "safe"
    saving = _saving_with(tmp_path, tmp_path / "x.pt", "getattr(self, 'save_state')")
    assert modelport.scan(saving).verdict == "safe"


@pytest.mark.parametrize(
    "line",
    [
        "getattr(torch, name)(x, path)",
        'getattr(ops.aten, "sa" + "ve")(x, path)',
        'getattr(torch, f"save")(x, path)',
        "getattr((torch), name)(x, path)",
    ],
)
def test_getattr_on_torch_with_a_computed_name_is_unsafe(line: str) -> None:
    code = f"def __setstate__(self, state: Tuple[Tensor, str]) -> None:\n  {line}\n"
    (finding,) = script_code.findings(code.encode(), "code/__torch__.py")
    assert (finding.rule, finding.severity.name) == ("computed-call", "HIGH")
    assert "while the model loads" in finding.message
    assert script_code.findings(b"def f(self):\n  getattr(self, name)(x)\n", "m.py") == []


# -- 9: a diffusers component's <component>/<library>.py -------------------------------------------


def _ddpm(folder: Path, module: str | None) -> Path:
    """A pipeline of library components only; ``module``: a file under it."""
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    _padded(folder / "model_index.json", index, 0)
    _padded(folder / "unet" / "config.json", {"_class_name": "UNet2DModel"}, 0)
    if module is not None:
        (folder / module).parent.mkdir(parents=True, exist_ok=True)
        (folder / module).write_text(
            "from diffusers import UNet2DModel as Base\n\nclass UNet2DModel(Base):\n    pass\n"
        )
    return folder


@pytest.mark.parametrize("module", ["unet/diffusers.py", "text_encoder/transformers.py"])
def test_a_components_library_file_is_imported_code(tmp_path: Path, module: str) -> None:
    """diffusers' get_class_obj_and_candidates imports <component>/<library>.py when it is
    there, whatever the library; the same pipeline without it, or with a file of another
    name or under another component, is safe."""
    report = modelport.scan(_ddpm(tmp_path / "p", module))
    assert report.verdict == "suspicious", report.to_json()
    assert ("remote-code", Path(module).name) in _findings_by_member(report)
    assert modelport.scan(_ddpm(tmp_path / "twin", None)).verdict == "safe"
    for other in ("unet/helpers.py", "unet/transformers.py"):
        assert modelport.scan(_ddpm(tmp_path / other, other)).verdict == "safe"


# -- 10: torch.* paths a sentence-transformers config makes its loader call ------------------------

# What sentence-transformers saves (util.fullname: the class's module and name) for the
# activations it writes by default: CrossEncoder's Sigmoid and Identity, Dense's Tanh.
SAVED_DEFAULTS = [
    f"{cls.__module__}.{cls.__name__}"
    for cls in (torch.nn.Sigmoid, torch.nn.Identity, torch.nn.Tanh, torch.nn.GELU)
]
NOT_ACTIVATIONS = [
    "torch._dynamo.debug_utils.minifier_dir",
    "torch.utils.collect_env.main",
    "torch.nn.functional.gelu",
    "torch.nn.modules.activation.Tanh.__init__",
]


def _cross_encoder(folder: Path, path: str, *, legacy: bool = False) -> Path:
    config: dict[str, Any] = {"model_type": "bert", "architectures": ["BertModel"]}
    if legacy:
        config["sbert_ce_default_activation_function"] = path
    else:
        config["sentence_transformers"] = {"activation_fn": path, "version": "6.3.0"}
    _padded(folder / "config.json", config, 0)
    return folder


def _dense(folder: Path, path: str) -> Path:
    config = {"in_features": 8, "out_features": 4, "bias": True, "activation_function": path}
    _padded(folder / "2_Dense" / "config.json", config, 0)
    return folder


@pytest.mark.parametrize("path", NOT_ACTIVATIONS)
def test_a_torch_path_outside_the_activation_classes_is_unsafe(tmp_path: Path, path: str) -> None:
    """CrossEncoder imports and calls any torch.* path with no trust_remote_code, and
    Dense imports any and instantiates it: only activation classes are harmless."""
    for build in (_cross_encoder, _dense):
        report = modelport.scan(build(tmp_path / build.__name__, path))
        assert report.verdict == "unsafe", report.to_json()
        (finding,) = report.serious
        assert path in finding.message and "without trust_remote_code" in finding.message
    legacy = modelport.scan(_cross_encoder(tmp_path / "legacy", path, legacy=True))
    assert legacy.verdict == "unsafe"


@pytest.mark.parametrize("path", [*SAVED_DEFAULTS, "torch.nn.ReLU", "torch.nn.Identity"])
def test_the_activations_sentence_transformers_saves_stay_safe(tmp_path: Path, path: str) -> None:
    for build in (_cross_encoder, _dense):
        assert modelport.scan(build(tmp_path / build.__name__, path)).verdict == "safe"


def test_every_exempt_path_is_a_torch_activation_class() -> None:
    """The oracle is torch: each exempt path imports, as import_from_string does, to a
    torch.nn.Module class of torch.nn's own modules."""
    assert set(SAVED_DEFAULTS) <= hf_code.TORCH_ACTIVATIONS
    for path in hf_code.TORCH_ACTIVATIONS:
        module, _, name = path.rpartition(".")
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, torch.nn.Module), path
        assert found.__module__ in ("torch.nn.modules.activation", "torch.nn.modules.linear")
