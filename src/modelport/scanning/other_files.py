"""Files with no model reading, judged for what they are: raw tensor bytes a TensorFlow
``.index`` names, a file a loader reads for what it makes it do (a JSON or YAML config, by
its name or its content, a chat template: ``content_checks`` judges what each names or
renders),
a model's companion in a folder (tokenizer data), or else not a model at all, an error that
says what it is (a Git LFS pointer, a web page), never ``safe``. Imported by the scanner only
for such files."""

from __future__ import annotations

from modelport.formats import tf_bundle
from modelport.pickles.symbols import Severity
from modelport.scanning import content_checks
from modelport.scanning.scan_state import ScanState

_SNIFF = 1 << 16
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# Binary files a model folder carries beside its weights, which tokenizer libraries parse
# as data (sentencepiece protobufs, tiktoken ranks).
_TOKENIZER_DATA = frozenset((".model", ".spm", ".tiktoken", ".bpe"))
_TOKENIZER_NAMES = frozenset(("tokenizer.model", "spiece.model", "sentencepiece.bpe.model"))
# A text judged as a config by its content (``config.cfg``) is one a loader reads.
_CONFIG_RULES = frozenset(("config-target", "yaml-python-tag"))


def is_tensor_shard(scan: ScanState) -> bool:
    """A TensorFlow data shard its ``.index`` names: raw tensor bytes, noted as such (its
    first bytes may open like a cut pickle, which no loader of it reads)."""
    owner = tf_bundle.shard_owner(scan.path)
    if owner is not None and scan.format != "tensor-data":
        scan.format = "tensor-data"
        scan.add(Severity.INFO, "tensor-data", "", f"raw tensor data that {owner.name} reads")
    return owner is not None


def scan_unrecognised(scan: ScanState) -> None:
    """No model reading: a file a loader reads for what it makes it do (a config, a chat
    template), a model's companion in a folder, or else not a model at all (an error
    that says what it is, never ``safe``)."""
    head = bytes(scan.data[:_SNIFF])
    if head.startswith(_LFS_POINTER):
        scan.format = "git-lfs-pointer"
        scan.error("a Git LFS pointer, not the file it names: run `git lfs pull`", "")
        return
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        scan.format = "html"
        scan.error("an HTML page, not a model (a download that returned a web page?)", "")
        return
    if is_tensor_shard(scan):
        return
    suffix = scan.path.suffix.lower()
    if content_checks.is_text(scan.path):
        scan.format = "text"
        found = content_checks.text_findings(scan.path, scan.aliases)
        scan.findings.extend(found)
        serious = any(f.severity is not Severity.INFO for f in found)
        config = any(f.rule in _CONFIG_RULES for f in found)
        if serious or config or scan.in_folder or suffix in content_checks.LOADER_TEXT:
            return
        scan.error("a text file that is not a model and that no model loader reads", "")
        return
    if scan.in_folder and (suffix in _TOKENIZER_DATA or scan.path.name in _TOKENIZER_NAMES):
        scan.format = "tokenizer-data"
        scan.add(Severity.INFO, "tokenizer-data", "", "tokenizer data: read as data, no code")
        return
    scan.error("unrecognised binary content: could not be analysed", "")
