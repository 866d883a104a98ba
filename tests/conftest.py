"""Shared fixtures. Models are built here, tiny and random, and saved by their own libraries."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# -- pytest-xdist workers under coverage ------------------------------------------------------


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: list[object]) -> None:
    """xdist's workers are new interpreters, which ``coverage run`` does not measure: the
    start-up hook coverage installs (its .pth file) measures a process that finds this
    variable naming the configuration, from before the worker imports anything."""
    running = sys.modules.get("coverage")
    current = running.Coverage.current() if running is not None else None
    if current is not None and current.config.config_file:
        os.environ["COVERAGE_PROCESS_START"] = current.config.config_file


def pytest_configure(config: pytest.Config) -> None:
    """In a worker: the commands tests start go unmeasured, as they do without xdist (under
    coverage each would start several times slower, past some tests' timeouts)."""
    if hasattr(config, "workerinput"):
        os.environ.pop("COVERAGE_PROCESS_START", None)


def installed(package: str) -> pytest.MarkDecorator:
    """Skips a module's tests where ``package`` is missing, as a module-level
    ``pytest.importorskip`` does, without importing it: every xdist worker imports every test
    module, and peft or diffusers alone take seconds to import."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"{package} is not installed")


def digest(array: np.ndarray) -> str:
    """sha256 of a tensor's bytes in C order: the bit-for-bit comparison tests use."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def torch_digest(tensor: object) -> str:
    import torch

    assert isinstance(tensor, torch.Tensor)
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point and flat.element_size() == 2:
        flat = flat.view(torch.int16)
    elif flat.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bool):
        flat = flat.view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a malicious payload would write if it ever ran; tests assert it never appears."""
    return tmp_path / "PWNED"


# -- the command line, run in this process ----------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """What one ``modelport ...`` run gave: its exit code and what it printed."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        """stdout parsed, for a run given ``--json``."""
        assert "--json" in self.argv, f"no --json in {self.argv}"
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"not JSON (exit {self.code}): {self.out!r}\n{self.err}") from None


Cli = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``cli("scan", path, "--json")`` runs ``modelport.cli.main.main`` here, as the
    ``modelport`` command would, and returns a ``CliResult``; argparse's exits (bad usage,
    ``--help``) become the code they exit with."""
    from modelport.cli.main import main

    monkeypatch.delenv("MODELPORT_DEBUG", raising=False)  # set, errors would raise instead
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after

    def run(*argv: str | os.PathLike[str]) -> CliResult:
        args = tuple(os.fspath(a) for a in argv)
        capsys.readouterr()  # only what this run prints
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        printed = capsys.readouterr()
        return CliResult(args, code, printed.out, printed.err)

    return run


# -- attack pickles: each would create ``marker`` if it were ever loaded -----------------------


def short(text: bytes) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text  # SHORT_BINUNICODE


class Reduces:
    """Pickles as the call ``function(*args)``: how real attack files are made."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (self.function, self.args)


def os_system_stand_in(command: str) -> None:
    """Stands in for os.system in saved payloads that name a module of their own."""
    raise AssertionError(f"payload ran: {command}")


def attack_pickles(marker: Path) -> dict[str, bytes]:
    """Each would create ``marker`` when loaded by pickle / torch.load(weights_only=False)."""
    cmd = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').write('x')".encode()
    return {
        "global-reduce": b"cposix\nsystem\n(V" + cmd + b"\ntR.",
        "string-arg": b"cos\nsystem\n(S" + repr(cmd.decode()).encode() + b"\ntR.",
        "stack-global": b"\x80\x04"
        + short(b"os")
        + short(b"system")
        + b"\x93"
        + short(cmd)
        + b"\x85R.",
        "inst": b"(V" + cmd + b"\nios\nsystem\n.",
        "obj": b"(cos\nsystem\nV" + cmd + b"\no.",
        "exec": b"cbuiltins\nexec\n(V" + code + b"\ntR.",
        "unlisted-callable": b"cshutil_alike\nrun_anything\n(V" + cmd + b"\ntR.",
        "getattr-chain": b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\n"
        + short(b"os")
        + b"\x85R"
        + short(b"system")
        + b"\x86R"
        + short(cmd)
        + b"\x85R.",
        "dynamic-stack-global": b"\x80\x04cbuiltins\nstr\n"
        + short(b"os")
        + b"\x85R"
        + short(b"system")
        + b"\x93"
        + short(cmd)
        + b"\x85R.",
        "ext-code": b"\x80\x02\x82\x01" + short(cmd) + b"\x85R.",
        "setstate-smuggling": b"\x80\x02cbuiltins\nobject\n)\x81}"
        + short(b"__setstate__")
        + b"cbuiltins\nexec\nsb"
        + short(code)
        + b"b.",
        "nested-loader": b"\x80\x02cpickle\nloads\nC\x05hello\x85R.",
        "newobj-ex": b"\x80\x04cbuiltins\nexec\n" + short(code) + b"\x85}\x92.",
        "dotted-name": b"\x80\x04"
        + short(b"numpy")
        + short(b"__builtins__.exec")
        + b"\x93"
        + short(code)
        + b"\x85R.",
        "weights-and-call": pickle.dumps(
            {"w": np.ones(3, np.float32), "x": Reduces(os.system, cmd.decode())}
        ),
    }


ATTACKS = tuple(attack_pickles(Path("PWNED")))


def benign_twins() -> dict[str, bytes]:
    """For the attacks that have one, the same file without its payload."""
    return {"weights-and-call": pickle.dumps({"w": np.ones(3, np.float32)})}


@pytest.fixture
def attacks(marker: Path) -> dict[str, bytes]:
    """``attack_pickles`` aimed at this test's ``marker``."""
    return attack_pickles(marker)


def mutated(data: object, raw: bytes, *, flips: int = 4, keep: int = 0) -> bytes:
    """``raw`` with 1..``flips`` random bytes changed (never the first ``keep``), then cut at
    a random length: the input of every "bad bytes only raise ModelportError" property."""
    from hypothesis import strategies as st

    draw = data.draw  # type: ignore[attr-defined]
    changed = bytearray(raw)
    for _ in range(draw(st.integers(1, flips))):
        changed[draw(st.integers(keep, len(changed) - 1))] = draw(st.integers(0, 255))
    return bytes(changed[: draw(st.integers(0, len(changed)))])


def assert_same_tensors(expected: dict[str, object], path: Path, fmt: str | None = None) -> None:
    """modelport.open must list exactly these torch tensors: names, dtypes, shapes, bytes."""
    import torch

    import modelport

    with modelport.open(path) as model:
        if fmt is not None:
            assert model.format.value == fmt
        assert list(model.tensors) == list(expected)
        for name, tensor in expected.items():
            assert isinstance(tensor, torch.Tensor)
            ref = model.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch."), name
            assert ref.shape == tuple(tensor.shape), name
            assert ref.nbytes == tensor.numel() * tensor.element_size(), name
            assert torch_digest(ref.torch()) == torch_digest(tensor), name
            if tensor.dtype not in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                assert digest(ref.numpy()) == digest(tensor.contiguous().numpy()), name
