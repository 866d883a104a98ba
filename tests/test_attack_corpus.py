"""The attack corpus (tests/attacks/corpus.py) against the scanner: every attack is called
unsafe (at least suspicious where its loader needs an opt-in to unsafe loading), every
benign twin safe, every malformed file never safe. The heavy tests prove each attack real:
its natural loader, in a child process whose audit hook blocks the payload, reaches it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import modelport
from tests.attacks.corpus import MALFORMED, TECHNIQUES, Malformed, Technique
from tests.attacks.harness import Reach, Run, reaches_payloads

LOADED = tuple(t for t in TECHNIQUES if t.loader is not None)


def by_name(items: tuple[Technique, ...] | tuple[Malformed, ...]) -> list[str]:
    return [item.name for item in items]


def test_corpus_is_complete() -> None:
    names = by_name(TECHNIQUES) + by_name(MALFORMED)
    assert len(set(names)) == len(names)
    assert len(TECHNIQUES) >= 32 and len(MALFORMED) >= 12
    kinds = {"container", "stream", "reading", "call", "code", "directory"}
    assert {t.kind for t in TECHNIQUES} == kinds
    assert all(t.note and "\n" not in t.note for t in TECHNIQUES)


def test_builders_write_only_inside_their_folder(tmp_path: Path) -> None:
    given = tmp_path / "given"
    for technique in TECHNIQUES:
        attack, twin = given / technique.name / "attack", given / technique.name / "twin"
        attack.mkdir(parents=True)
        twin.mkdir()
        assert technique.build(attack, attack / "PWNED").is_relative_to(attack), technique.name
        assert technique.benign(twin).is_relative_to(twin), technique.name
    for malformed in MALFORMED:
        folder = given / malformed.name
        folder.mkdir()
        assert malformed.build(folder).is_relative_to(folder), malformed.name
    assert list(tmp_path.iterdir()) == [given]


@pytest.mark.parametrize("technique", TECHNIQUES, ids=by_name(TECHNIQUES))
def test_attack_is_not_safe(tmp_path: Path, marker: Path, technique: Technique) -> None:
    report = modelport.scan(technique.build(tmp_path, marker))
    expected = ("unsafe",) if technique.default_settings else ("unsafe", "suspicious")
    assert report.verdict in expected, (technique.note, report.to_json())
    assert not marker.exists()


@pytest.mark.parametrize("technique", TECHNIQUES, ids=by_name(TECHNIQUES))
def test_benign_twin_is_safe(tmp_path: Path, technique: Technique) -> None:
    report = modelport.scan(technique.benign(tmp_path))
    assert report.verdict == "safe", report.to_json()


@pytest.mark.parametrize("malformed", MALFORMED, ids=by_name(MALFORMED))
def test_malformed_is_never_safe(tmp_path: Path, malformed: Malformed) -> None:
    report = modelport.scan(malformed.build(tmp_path))
    assert report.verdict in ("error", "unsafe"), (malformed.note, report.to_json())


@dataclass(frozen=True)
class Loaded:
    """One technique's attack and twin, each run under the technique's loader."""

    attack: Reach
    twin: Reach
    marker: Path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Loaded]:
    """Every loader run at once: each file in a child process of its own, forked from one
    server per loader that has imported the loader's library, so the heavy set pays for
    ``import torch`` once rather than once per file."""
    runs, markers = [], []
    for technique in LOADED:
        assert technique.loader is not None
        folder = tmp_path_factory.mktemp(technique.name)
        (folder / "attack").mkdir()
        (folder / "twin").mkdir()
        marker = folder / "PWNED"
        attack = technique.build(folder / "attack", marker)
        twin = technique.benign(folder / "twin")
        runs += [
            Run(technique.loader, attack, marker, technique.patches),
            Run(technique.loader, twin, marker, technique.patches),
        ]
        markers.append(marker)
    reaches = reaches_payloads(runs)
    return {
        technique.name: Loaded(reaches[2 * n], reaches[2 * n + 1], marker)
        for n, (technique, marker) in enumerate(zip(LOADED, markers, strict=True))
    }


@pytest.mark.heavy
@pytest.mark.parametrize("technique", LOADED, ids=by_name(LOADED))
def test_natural_loader_reaches_payload(loaded: dict[str, Loaded], technique: Technique) -> None:
    result = loaded[technique.name]
    assert result.attack.reached, result.attack.stderr_tail
    assert not result.marker.exists()


@pytest.mark.heavy
@pytest.mark.parametrize("technique", LOADED, ids=by_name(LOADED))
def test_harness_passes_the_benign_twin(loaded: dict[str, Loaded], technique: Technique) -> None:
    """The harness can say no: the twin loads cleanly under the same loader and reaches
    nothing."""
    result = loaded[technique.name]
    assert not result.twin.reached, result.twin.events
    assert result.twin.returncode == 0, result.twin.stderr_tail
