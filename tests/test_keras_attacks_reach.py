"""Keras ``Lambda`` attacks written by Keras 3 itself reach their payload under Keras' own
loader, and the scanner calls each one unsafe.

A ``Lambda`` layer stores its Python ``lambda`` as marshalled bytecode; Keras rebuilds the
function and runs it while it rebuilds the model (shape inference calls the layer). Each
attack here is a real ``model.save`` file whose lambda would open ``marker`` for writing:
in a ``.keras`` zip at the top level, inside a nested Sequential model, inside a
``TimeDistributed`` wrapper, and in the legacy ``.h5`` that Keras 3 still writes. The
lambda keeps its target in a closure cell: it writes a probe file while the model is built
here, and is aimed at the marker just before saving, so nothing in this process touches the
marker. (A default argument would not do: Keras 3.15 stores defaults as a JSON list and its
loader then fails in ``FunctionType`` before the lambda runs.)

Each file is loaded in a child process under the blocking audit hook of
``tests/attacks/harness.py``: with ``safe_mode=False`` the marker ``open`` is recorded and
blocked; with the default ``safe_mode=True`` Keras refuses the lambda before building
anything. A twin with a ``Rescaling`` layer in the Lambda's place scans safe and loads
cleanly under the same opt-out loader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import modelport
from tests.attacks.harness import Reach, Run, reaches_payloads
from tests.test_redteam7_keras_h5 import BUILDERS as PLACEMENTS

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # TensorFlow's own, on numpy 2
]

UNSAFE_LOADER = "import keras; keras.saving.load_model(PATH, safe_mode=False)"
DEFAULT_LOADER = "import keras; keras.saving.load_model(PATH)"
SAFE_MODE_REFUSAL = "Requested the deserialization of a `Lambda` layer"


def _top_level(keras: Any, middle: Any) -> Any:
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2)(middle(inputs)))


def _nested_sequential(keras: Any, middle: Any) -> Any:
    inner = keras.Sequential([keras.Input((4,)), middle, keras.layers.Dense(2)], name="inner")
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))


def _time_distributed(keras: Any, middle: Any) -> Any:
    inputs = keras.Input((3, 4))
    steps = keras.layers.TimeDistributed(middle)(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(steps))


@dataclass(frozen=True)
class Layout:
    """One way a Lambda ends up in a saved model: the file name and the model around it."""

    name: str
    filename: str
    build: Callable[[Any, Any], Any]  # (keras, the Lambda or its benign stand-in) -> model


LAYOUTS = (
    Layout("keras-top-level", "model.keras", _top_level),
    Layout("keras-nested-sequential", "model.keras", _nested_sequential),
    Layout("keras-time-distributed", "model.keras", _time_distributed),
    Layout("legacy-h5-top-level", "model.h5", _top_level),
)


@dataclass(frozen=True)
class Built:
    """A layout's attack and twin files, what building ran, and each loader run."""

    attack: Path
    twin: Path
    marker: Path
    probe_written: bool  # Keras called the lambda while building the model here
    unsafe: Reach  # the attack under safe_mode=False
    default: Reach  # the attack under the default safe_mode=True
    twin_reach: Reach  # the twin under safe_mode=False


def _payload_lambda(keras: Any, probe: Path) -> Any:
    target = str(probe)
    return keras.layers.Lambda(lambda x: (open(target, "w").close(), x)[1], name="payload")


def _write(keras: Any, layout: Layout, folder: Path) -> tuple[Path, Path, Path, bool]:
    """Save the attack and its twin with Keras; returns (attack, twin, marker, probe run)."""
    marker, probe = folder / "PWNED", folder / "probe"
    (folder / "attack").mkdir()
    (folder / "twin").mkdir()
    payload = _payload_lambda(keras, probe)
    attack_model = layout.build(keras, payload)
    probe_written = probe.exists()
    payload.function.__closure__[0].cell_contents = str(marker)
    attack = folder / "attack" / layout.filename
    attack_model.save(attack)
    twin = folder / "twin" / layout.filename
    layout.build(keras, keras.layers.Rescaling(0.5, name="payload")).save(twin)
    return attack, twin, marker, probe_written


@dataclass(frozen=True)
class Loaded:
    """What every loader run found: the layouts Keras wrote, and the configs placed where
    modelport's readers once missed them (``tests/test_redteam7_keras_h5.py``'s builders)."""

    layouts: dict[str, Built]
    placed: dict[str, tuple[Run, Reach]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """Every file built once, then every loader run side by side in one call, each in a
    child process of its own forked from one that has imported Keras."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    written = {
        layout.name: _write(keras, layout, tmp_path_factory.mktemp(layout.name))
        for layout in LAYOUTS
    }
    jobs = [
        ((name, kind), Run(loader, path, marker))
        for name, (attack, twin, marker, _) in written.items()
        for kind, loader, path in (
            ("unsafe", UNSAFE_LOADER, attack),
            ("default", DEFAULT_LOADER, attack),
            ("twin", UNSAFE_LOADER, twin),
        )
    ]
    for name, build in PLACEMENTS.items():
        folder = tmp_path_factory.mktemp(name)
        marker = folder / "PWNED"
        jobs.append(((name, "placed"), Run(UNSAFE_LOADER, build(folder, marker), marker)))
    found = reaches_payloads([run for _, run in jobs])
    reaches = dict(zip((key for key, _ in jobs), found, strict=True))
    runs = dict(jobs)
    layouts = {
        name: Built(
            attack,
            twin,
            marker,
            probe_written,
            reaches[name, "unsafe"],
            reaches[name, "default"],
            reaches[name, "twin"],
        )
        for name, (attack, twin, marker, probe_written) in written.items()
    }
    placed = {name: (runs[name, "placed"], reaches[name, "placed"]) for name in PLACEMENTS}
    return Loaded(layouts, placed)


@pytest.fixture(scope="module")
def built(loaded: Loaded) -> dict[str, Built]:
    return loaded.layouts


def by_name(layouts: tuple[Layout, ...]) -> list[str]:
    return [layout.name for layout in layouts]


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_keras_runs_the_lambda_when_it_builds_the_model(
    built: dict[str, Built], layout: Layout
) -> None:
    """The payload is live code: Keras called it while building the model that was saved."""
    assert built[layout.name].probe_written


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_scanner_calls_the_attack_unsafe(built: dict[str, Built], layout: Layout) -> None:
    result = built[layout.name]
    report = modelport.scan(result.attack)
    assert report.verdict == "unsafe", report.to_json()
    rules = {finding.rule for file in report.files for finding in file.findings}
    assert "keras-lambda" in rules, report.to_json()
    assert not result.marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_scanner_calls_the_twin_safe(built: dict[str, Built], layout: Layout) -> None:
    report = modelport.scan(built[layout.name].twin)
    assert report.verdict == "safe", report.to_json()


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_unsafe_mode_loader_reaches_the_payload(built: dict[str, Built], layout: Layout) -> None:
    """Every recorded event is the lambda opening the marker; the hook blocked each one."""
    result = built[layout.name]
    reach = result.unsafe
    assert reach.reached, reach.stderr_tail
    assert all(event.startswith("open (") for event in reach.events), reach.events
    assert all(repr(str(result.marker)) in event for event in reach.events), reach.events
    assert not result.marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_default_loader_refuses_the_lambda(built: dict[str, Built], layout: Layout) -> None:
    """``safe_mode=True`` raises before the lambda is rebuilt, so nothing is reached."""
    reach = built[layout.name].default
    assert not reach.reached, reach.events
    assert reach.returncode == 1, reach.stderr_tail
    assert SAFE_MODE_REFUSAL in reach.stderr_tail, reach.stderr_tail
    assert "safe_mode=False" in reach.stderr_tail, reach.stderr_tail


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_keras_runs_a_config_placed_where_readers_missed_it(loaded: Loaded, name: str) -> None:
    """The oracle for red-team round 7's Keras cases: each file modelport now calls unsafe
    (or, for a config it cannot read, an error) holds a Lambda Keras' loader runs."""
    run, reach = loaded.placed[name]
    assert reach.reached, (name, reach.stderr_tail)
    assert all(repr(str(run.marker)) in event for event in reach.events), reach.events
    assert not run.marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS, ids=by_name(LAYOUTS))
def test_twin_loads_cleanly_and_reaches_nothing(built: dict[str, Built], layout: Layout) -> None:
    """The harness can say no: the same opt-out loader loads the twin and reaches nothing."""
    reach = built[layout.name].twin_reach
    assert not reach.reached, reach.events
    assert reach.returncode == 0, reach.stderr_tail
