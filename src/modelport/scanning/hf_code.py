"""The keys and files of a model folder that make Hugging Face loaders import Python code.

``from_pretrained`` reads only weights and configuration until a configuration names code:
a module beside the weights (``modeling_x.XModel`` -> ``modeling_x.py``), a module in another
repository (``org/repo--modeling_x.XModel``), or an installed module. ``LOADERS`` lists, loader
by loader, what each reads and what it then imports, with the function in the loader's own
source that does it, so a reader can check each row against the library. Every hit is
``remote-code`` (medium, ``suspicious``): the code may be honest, but loading the model runs it.
A ``.py`` file is such a hit only where these rows lead a loader to it; any other (a training
tool's script, such as the ``zero_to_fp32.py`` DeepSpeed copies into its checkpoints) is
``python-source``, information that names it.

Not listed, because no file in the folder sets them: ``custom_pipeline=`` and
``trust_remote_code=`` are arguments of the caller. ``generation_config.json`` has no
``auto_map`` reader (transformers/generation/configuration_utils.py); an ``auto_map`` there
is reported all the same, like one in any JSON file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from modelport import limits
from modelport.scanning.findings import Finding
from modelport.severity import Severity

RULE = "remote-code"


class CodeLoader(NamedTuple):
    """One way a loader turns a model folder's files into imported code (a named tuple: a
    constant row, which as a dataclass would cost every scan's start-up its generated
    methods)."""

    key: str  # the key or file, as messages name it
    reads: str  # the file and key it reads
    runs: str  # what it imports, and under which setting
    source: str  # where: package, file, function


LOADERS: dict[str, CodeLoader] = {
    "auto_map": CodeLoader(
        "auto_map",
        "auto_map in config.json, tokenizer_config.json, processor_config.json, "
        "preprocessor_config.json, video_preprocessor_config.json (transformers); "
        "config.json, modular_config.json (diffusers)",
        "transformers' Auto classes and pipeline() import the named module from the folder "
        "(or the repository before '--') when trust_remote_code=True; diffusers' AutoModel "
        "and ModularPipelineBlocks do the same",
        "transformers: models/auto/auto_factory.py _BaseAutoModelClass.from_pretrained, "
        "configuration_auto.py AutoConfig.from_pretrained, tokenization_auto.py "
        "AutoTokenizer.from_pretrained, processing_auto.py AutoProcessor.from_pretrained, "
        "image_processing_auto.py, feature_extraction_auto.py, video_processing_auto.py "
        "from_pretrained, dynamic_module_utils.py get_class_from_dynamic_module; diffusers: "
        "models/auto_model.py AutoModel.from_pretrained, modular_pipelines/modular_pipeline.py "
        "ModularPipelineBlocks.from_pretrained",
    ),
    "custom_pipelines": CodeLoader(
        "custom_pipelines",
        "custom_pipelines in config.json ({task: {impl: 'module.Class'}})",
        "transformers' pipeline() imports impl when trust_remote_code=True, and picks the task "
        "from it when none is given",
        "transformers: pipelines/__init__.py pipeline",
    ),
    "attn_implementation": CodeLoader(
        "attn_implementation",
        "attn_implementation in config.json naming a Hub repository ('org/repo[:name]')",
        "transformers downloads and loads that repository's compiled kernel through the "
        "'kernels' package when the model is built; repositories outside kernels-community "
        "need trust_remote_code=True",
        "transformers: configuration_utils.py PreTrainedConfig.__init__, modeling_utils.py "
        "_check_and_adjust_attn_implementation, integrations/hub_kernels.py "
        "load_and_register_attn_kernel",
    ),
    "custom_pipeline_class": CodeLoader(
        "_class_name",
        "_class_name in model_index.json given as ['module', 'Class']",
        "DiffusionPipeline.from_pretrained imports module.py from the folder when it is there "
        "(trust_remote_code=True), else fetches a community pipeline of that name",
        "diffusers: pipelines/pipeline_loading_utils.py _resolve_custom_pipeline_and_cls, "
        "_get_custom_pipeline_class; pipelines/pipeline_utils.py DiffusionPipeline.download",
    ),
    "custom_component": CodeLoader(
        "a component's library",
        "a component of model_index.json (or modular_model_index.json, with its type_hint) "
        "naming a library other than diffusers, transformers, onnxruntime.training or a "
        "diffusers pipeline module",
        "DiffusionPipeline.from_pretrained imports <component>/<library>.py when present "
        "(trust_remote_code=True), and otherwise imports the installed module of that name "
        "whatever trust_remote_code says; the file is imported whatever the library, "
        "diffusers and transformers included, so such a .py is reported for every component",
        "diffusers: pipelines/pipeline_loading_utils.py get_class_obj_and_candidates, "
        "load_sub_model, simple_get_class_obj",
    ),
    "sentence_transformers_module": CodeLoader(
        "a module type",
        "a module of modules.json, or a folder a Router's router_config.json routes to, "
        "whose type is not sentence_transformers.*",
        "SentenceTransformer imports the module file from the folder: from a local folder "
        "even without trust_remote_code; else it imports the installed module of that name",
        "sentence-transformers: SentenceTransformer.py "
        "SentenceTransformer._load_module_class_from_ref; base/modules/router.py Router.load",
    ),
    "cross_encoder_activation": CodeLoader(
        "activation_fn",
        "sentence_transformers.activation_fn (or sbert_ce_default_activation_function) in "
        "config.json, other than a torch activation class (TORCH_ACTIVATIONS)",
        "CrossEncoder imports it and calls it with no arguments when trust_remote_code=True, "
        "and a torch.* path even without it",
        "sentence-transformers: cross_encoder/model.py CrossEncoder._resolve_activation_fn, "
        "util/misc.py import_from_string",
    ),
    "dense_activation": CodeLoader(
        "activation_function",
        "activation_function in a Dense module's config.json (beside in_features and "
        "out_features), other than a torch activation class (TORCH_ACTIVATIONS)",
        "sentence-transformers' Dense imports it and instantiates it when "
        "trust_remote_code=True, and a torch.* path even without it (importing a module "
        "runs its code; recent releases then want an nn.Module class)",
        "sentence-transformers: base/modules/dense.py Dense.load",
    ),
    "peft_auto_mapping": CodeLoader(
        "auto_mapping.parent_library",
        "auto_mapping.parent_library in adapter_config.json, outside PEFT's allowlist",
        "AutoPeftModel imports that library (recent PEFT only when import_allowlist names "
        "it; older releases always)",
        "peft: auto.py _BaseAutoPeftModel.from_pretrained, check_import_allowlist",
    ),
    "peft_megatron_core": CodeLoader(
        "megatron_core",
        "megatron_core in adapter_config.json with megatron_config set, outside megatron.*",
        "LoRA imports that module to build parallel layers (recent PEFT refuses it)",
        "peft: tuners/lora/tp_layer.py dispatch_megatron",
    ),
    "python_file": CodeLoader(
        "a .py file",
        "a .py file in the model folder",
        "transformers, diffusers and sentence-transformers import such files once a "
        "configuration names them, with trust_remote_code=True (sentence-transformers from a "
        "local folder without it); custom_generate/generate.py replaces model.generate when "
        "the model is loaded with trust_remote_code=True",
        "transformers: dynamic_module_utils.py get_cached_module_file, generation/utils.py "
        "GenerationMixin.load_custom_generate; diffusers: utils/dynamic_modules_utils.py "
        "get_cached_module_file",
    ),
}

# Libraries model_index.json components may name without custom code: LOADABLE_CLASSES in
# diffusers/pipelines/pipeline_loading_utils.py, and the modules of diffusers/pipelines (and
# pipelines/deprecated), which hold pipeline-specific models (diffusers 58eb52c, 2026-08).
_PIPELINE_MODULES = """
    ace_step allegro alt_diffusion amused animatediff anyflow audio_diffusion audioldm
    audioldm2 aura_flow blip_diffusion bria bria_fibo chroma chronoedit cogvideo cogview3
    cogview4 consisid consistency_models controlnet controlnet_hunyuandit controlnet_sd3
    controlnet_xs cosmos dance_diffusion ddim ddpm deepfloyd_if diffusion_gemma dit dreamlite
    easyanimate ernie_image flux flux2 glm_image helios hidream_image hunyuan_image
    hunyuan_video hunyuan_video1_5 hunyuandit i2vgen_xl ideogram4 joyimage kandinsky
    kandinsky2_2 kandinsky3 kandinsky5 kolors krea2 latent_consistency_models latent_diffusion
    latent_diffusion_uncond latte ledits_pp llada2 longcat_audio_dit longcat_image ltx ltx2
    lucy lumina lumina2 marigold mochi motif_video musicldm nucleusmoe_image omnigen ovis_image
    pag paint_by_example pia pixart_alpha pndm prx qwenimage repaint sana sana_video
    score_sde_ve semantic_stable_diffusion shap_e skyreels_v2 spectrogram_diffusion
    stable_audio stable_audio_3 stable_cascade stable_diffusion stable_diffusion_3
    stable_diffusion_attend_and_excite stable_diffusion_diffedit stable_diffusion_gligen
    stable_diffusion_ldm3d stable_diffusion_panorama stable_diffusion_safe
    stable_diffusion_sag stable_diffusion_variants stable_diffusion_xl stable_video_diffusion
    stochastic_karras_ve t2i_adapter text_to_video_synthesis unclip unidiffuser
    versatile_diffusion visualcloze vq_diffusion wan wuerstchen z_image"""
DIFFUSERS_LIBRARIES = frozenset(
    ["diffusers", "transformers", "onnxruntime.training", *_PIPELINE_MODULES.split()]
)
# What DiffusionPipeline and ModularPipeline read their components from, by these names
# (pipelines/pipeline_utils.py config_name; a model's own config.json lists block types, not
# components, so the rule is kept to these files).
PIPELINE_INDEXES = frozenset({"model_index.json", "modular_model_index.json"})
# The torch paths a CrossEncoder's activation_fn or a Dense module's activation_function may
# name and stay code-free: activation classes, spelled as sentence-transformers saves them
# (util.fullname: torch.nn.modules.activation.Tanh, torch.nn.modules.linear.Identity) or as
# torch.nn exports them. The loaders take any other torch.* path without trust_remote_code,
# import its module and call what it names: every torch submodule's import-time code and
# every zero-argument function of torch (one writes a debug folder, one runs shell commands).
_ACTIVATION_CLASSES = """
    CELU ELU GELU GLU Hardshrink Hardsigmoid Hardswish Hardtanh LeakyReLU LogSigmoid
    LogSoftmax Mish PReLU RReLU ReLU ReLU6 SELU SiLU Sigmoid Softmax Softmax2d Softmin
    Softplus Softshrink Softsign Tanh Tanhshrink Threshold"""
TORCH_ACTIVATIONS = frozenset(
    [
        *(f"torch.nn.modules.activation.{name}" for name in _ACTIVATION_CLASSES.split()),
        *(f"torch.nn.{name}" for name in [*_ACTIVATION_CLASSES.split(), "Identity"]),
        "torch.nn.modules.linear.Identity",
    ]
)
_ACTIVATION_ROWS = frozenset(("cross_encoder_activation", "dense_activation"))
# peft/auto.py get_default_import_allowlist
PEFT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")
# transformers/integrations/hub_kernels.py is_kernel: 'org/repo[@rev][:name]', maybe 'paged|'
# transformers/dynamic_module_utils.py get_relative_imports: ``import .x`` and
# ``from .x import``; ``from . import x`` as well, to err on the side of an import.
_RELATIVE_IMPORT = re.compile(
    r"^\s*(?:import\s+\.(\S+)\s*$|from\s+\.(\S+)\s+import|from\s+\.\s+import\s+(\w+))",
    re.MULTILINE,
)
_MAX_CONFIGS = 256
_MAX_MODULES = 4096
_HUB_KERNEL = re.compile(r"^(?:[^|]*\|)?[^/:|]+/[^/:|]+(?:@[^/:]+)?(?::[^/:]+)?$")


def findings(name: str, document: Any) -> list[Finding]:
    """What a JSON file of a model folder makes its loaders import; ``name`` is the file."""
    found = []
    for loader_key, targets in _named_code(name, document):
        if loader_key in _ACTIVATION_ROWS:
            found += _torch_calls(name, loader_key, [t for t in targets if _is_torch(t)])
            targets = [t for t in targets if not _is_torch(t)]
        found += _report(name, loader_key, targets)
    return found


def _named_code(name: str, document: Any) -> list[tuple[str, list[str]]]:
    """Each loader row with the code references a JSON document gives it."""
    if isinstance(document, list):
        return [("sentence_transformers_module", _modules(document))]
    if not isinstance(document, dict):
        return []
    if isinstance(document.get("types"), dict) and isinstance(document.get("structure"), dict):
        return [("sentence_transformers_module", _router_types(document["types"]))]
    pipelines = document.get("custom_pipelines")
    impls = [task.get("impl") for task in _dict(pipelines).values() if isinstance(task, dict)]
    named = [
        ("auto_map", _auto_map(document.get("auto_map"))),
        ("custom_pipelines", _strings(impls)),
        ("attn_implementation", _kernels(document)),
    ]
    if name in PIPELINE_INDEXES:
        class_name = document.get("_class_name")
        pipeline = [class_name[0]] if isinstance(class_name, list) and class_name else []
        named.append(("custom_pipeline_class", [f"{p}.py" for p in _strings(pipeline)]))
        custom = [(c, lib) for c, lib in _components(document) if lib not in DIFFUSERS_LIBRARIES]
        named.append(("custom_component", [f"{c}: {lib}" for c, lib in custom]))
    activation = _dict(document.get("sentence_transformers")).get("activation_fn")
    legacy = document.get("sbert_ce_default_activation_function")
    functions = [f for f in _strings([activation, legacy]) if f not in TORCH_ACTIVATIONS]
    named.append(("cross_encoder_activation", functions))
    # a Dense module's: Dense.load imports and calls it before the layer's sizes are read, so a
    # dotted path counts with or without them (transformers' own values, GPT-2's "gelu_new",
    # are names without a dot)
    sized = "in_features" in document and "out_features" in document
    dense = [f for f in _strings([document.get("activation_function")]) if sized or "." in f]
    named.append(("dense_activation", [f for f in dense if f not in TORCH_ACTIVATIONS]))
    named.append(("peft_auto_mapping", _peft_library(document)))
    megatron = document.get("megatron_core") if document.get("megatron_config") else None
    if isinstance(megatron, str) and not megatron.startswith("megatron."):
        named.append(("peft_megatron_core", [megatron]))
    return named


def python_file(path: Path) -> Finding:
    """A ``.py`` file in a model folder is ``suspicious`` where a loader imports it: a
    configuration beside it (or one folder up) names its module, a module so named imports
    it relatively, or it is ``custom_generate/generate.py``. Otherwise it is a script that
    travels with the weights (DeepSpeed copies ``zero_to_fp32.py`` into every checkpoint),
    named as information: no loader runs it."""
    where = "/".join(path.parts[-2:]) if path.parent.name == "custom_generate" else path.name
    if not imported(path):
        return Finding(
            Severity.INFO,
            "python-source",
            where,
            f"Python source {where} beside the model: no configuration of the folder names "
            "it and no model loader imports it unasked; read as text, never run",
        )
    loader = LOADERS["python_file"]
    return Finding(
        Severity.MEDIUM,
        RULE,
        where,
        f"Python source {where} in the model folder: {loader.runs}; read it before trusting "
        "the model",
    )


def imported(path: Path) -> bool:
    """Whether a loader of the folder (or of the one above it: a diffusers component's
    module, ``custom_generate/``) imports this ``.py`` file. A folder whose configurations
    cannot all be read counts every module as imported."""
    for folder in (path.parent, path.parent.parent):
        modules = _imported_modules(folder)
        relative = path.relative_to(folder).with_suffix("").as_posix()
        if modules is None or relative in modules or relative.removesuffix("/__init__") in modules:
            return True
    return False


def _imported_modules(folder: Path) -> set[str] | None:
    """Module paths (``a/b`` for ``a/b.py``) that the folder's configurations name, with
    every dotted prefix (a package and its modules), and what those import relatively, as
    transformers' ``get_relative_import_files`` follows them; None when the folder holds
    more configurations than are read."""
    configs = sorted(folder.glob("*.json"))
    if len(configs) > _MAX_CONFIGS:
        return None
    modules = {"custom_generate/generate"}
    for config in configs:
        try:
            if config.stat().st_size > limits.MAX_TEMPLATE_TEXT_BYTES:
                return None
            document = json.loads(config.read_bytes().decode("utf-8", "replace"))
        except (OSError, ValueError, RecursionError):
            continue  # not JSON: no loader reads code names from it
        for _, targets in _named_code(config.name, document):
            modules.update(_module_paths(targets))
        if config.name in PIPELINE_INDEXES and isinstance(document, dict):
            # get_class_obj_and_candidates: <component>/<library>.py, whatever the library
            modules.update(f"{c}/{library}" for c, library in _components(document))
    pending = list(modules)
    while pending:
        if len(modules) > _MAX_MODULES:
            return None
        source = folder / f"{pending.pop()}.py"
        if not source.is_file() or source.stat().st_size > limits.MAX_TEMPLATE_TEXT_BYTES:
            continue
        base = source.parent.relative_to(folder).as_posix()
        for match in _RELATIVE_IMPORT.finditer(source.read_text("utf-8", "replace")):
            name = next(group for group in match.groups() if group)
            module = "/".join(p for p in (base, *name.split(".")) if p and p != ".")
            if module not in modules:
                modules.add(module)
                pending.append(module)
    return modules


def _module_paths(targets: list[str]) -> set[str]:
    paths: set[str] = set()
    for target in targets:
        code = target.partition("--")[2] or target
        if ": " in code:  # a diffusers component: its file comes from ``_components``
            continue
        parts = code.removesuffix(".py").split(".")
        paths.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return paths


def _report(name: str, loader_key: str, targets: list[str]) -> list[Finding]:
    if not targets:
        return []
    loader = LOADERS[loader_key]
    shown = ", ".join(_target(t) for t in targets[:4])
    more = f" and {len(targets) - 4} more" if len(targets) > 4 else ""
    return [
        Finding(
            Severity.MEDIUM,
            RULE,
            name,
            f"{loader.key} names code to run ({shown}{more}): {loader.runs}; read that code before "
            "trusting the model",
        )
    ]


def _is_torch(path: str) -> bool:
    return path.startswith("torch.")


def _torch_calls(name: str, loader_key: str, paths: list[str]) -> list[Finding]:
    """torch.* paths outside ``TORCH_ACTIVATIONS``: the loader calls them with no
    trust_remote_code asked, so nothing stands between the config and the call."""
    if not paths:
        return []
    loader = LOADERS[loader_key]
    return [
        Finding(
            Severity.HIGH,
            "config-torch-call",
            name,
            f"{loader.key} names {', '.join(paths[:4])}, a torch path that is no activation "
            f"class: {loader.runs}, so loading the model runs it without trust_remote_code",
        )
    ]


def _target(reference: str) -> str:
    """``repo--module.Class`` as the code and the repository it comes from."""
    repo, dashes, code = reference.partition("--")
    return f"{code} from the repository {repo}" if dashes else reference


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(values: Any) -> list[str]:
    return sorted({v for v in values if isinstance(v, str) and v})


def _auto_map(auto_map: Any) -> list[str]:
    """Every class reference of an ``auto_map``: a string, a [slow, fast] pair, a dict by
    backend (image processors), or the legacy list of a tokenizer."""
    values = list(auto_map.values()) if isinstance(auto_map, dict) else [auto_map]
    flat: list[Any] = []
    for value in values:
        if isinstance(value, dict):
            flat.extend(value.values())
        else:
            flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return _strings(flat)


def _kernels(document: dict[str, Any]) -> list[str]:
    configs = [document, *(v for v in document.values() if isinstance(v, dict))]
    values: list[Any] = []
    for config in configs:
        setting = config.get("attn_implementation")
        values.extend(setting.values() if isinstance(setting, dict) else [setting])
    return [v for v in _strings(values) if _HUB_KERNEL.match(v)]


def _components(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Each component of a pipeline index with each library it names;
    ``modular_model_index.json`` keeps the class to load in each spec's ``type_hint``."""
    named = []
    for component, value in document.items():
        if component.startswith("_") or not isinstance(value, list) or len(value) < 2:
            continue
        libraries = [value[0]]
        if len(value) > 2 and isinstance(value[2], dict):
            hint = value[2].get("type_hint")
            libraries += hint[:1] if isinstance(hint, list) else []
        named += [(component, library) for library in _strings(libraries)]
    return named


def _modules(document: list[Any]) -> list[str]:
    types = [m.get("type") for m in document if isinstance(m, dict) and "path" in m]
    return [t for t in _strings(types) if not t.startswith("sentence_transformers.")]


def _router_types(types: dict[str, Any]) -> list[str]:
    """The classes a Router's configuration (``types``: folder to class) makes it import."""
    return [t for t in _strings(list(types.values())) if not t.startswith("sentence_transformers.")]


def _peft_library(document: dict[str, Any]) -> list[str]:
    library = _dict(document.get("auto_mapping")).get("parent_library")
    if not isinstance(library, str) or "peft_type" not in document:
        return []
    allowed = library in PEFT_IMPORT_ALLOWLIST or library.startswith(
        tuple(f"{name}." for name in PEFT_IMPORT_ALLOWLIST)
    )
    return [] if allowed else [library]
