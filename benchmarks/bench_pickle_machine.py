"""The pickle machine before and after its fast rewrite, side by side in one run.

The old machine lives on in ``tests/reference_machine`` (with the scanning and reading
resolvers as they were), where the differential test holds the new one to it. Each pickle
below is what ``modelport scan`` and ``modelport inspect`` interpret in a real file: the
``data.pkl`` of torch zips (a small vision net's state_dict, a training checkpoint with Adam
state, a whole pickled ``nn.Module``), a numpy pickle, a joblib file, and the attack
catalogue of the test suite. For each: microseconds per scan (``scan_pickle``, as the
scanner calls it) and per read (``read_pickle`` with a torch storage loader), old and new,
timed in turns within each round (process CPU time, best of the rounds), so that a busy
machine slows each alike.
The scan's "machine" column is the new machine alone, without the C unpickler's fast path
(``pickles.fast_scan``) that "new" tries first.

Usage: python benchmarks/bench_pickle_machine.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import io
import pickle
import sys
import time
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the reference machine lives in the test package

import joblib  # noqa: E402
import torch  # noqa: E402
from tests.conftest import attack_pickles  # noqa: E402
from tests.reference_machine import judging as old_judging  # noqa: E402
from tests.reference_machine import reading as old_reading  # noqa: E402
from tests.test_pickle_machine_differential import _storages  # noqa: E402

from modelport.pickles import fast_scan, judging, reading  # noqa: E402


def vision_net() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The small vision net of ``bench_fleet.py`` after one Adam step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 2 * 2, 10),
    )
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def data_pkl(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def pickles() -> dict[str, bytes]:
    model, optimizer = vision_net()
    state = model.state_dict()
    arrays = {name: tensor.numpy() for name, tensor in state.items()}
    joblib_file = io.BytesIO()
    joblib.dump({"coef": arrays["9.weight"], "n": 3}, joblib_file)
    found = {
        "torch state_dict": data_pkl(state),
        "checkpoint + Adam": data_pkl(
            {"epoch": 3, "model": state, "optimizer": optimizer.state_dict()}
        ),
        "whole nn.Module": data_pkl(model),
        "numpy arrays (p4)": pickle.dumps(arrays, protocol=4),
        "joblib dump": joblib_file.getvalue(),
    }
    attacks = attack_pickles(Path("PWNED"))
    found[f"attacks (all {len(attacks)})"] = b"".join(attacks.values())
    return found


def best_of(actions: list[Callable[[], Any]], rounds: int, repeat: int) -> list[float]:
    """Microseconds of CPU per call of each action, best of ``rounds``; the actions take
    turns within each round, so that a machine busy for a while slows each of them alike.
    Each turn starts with no garbage left by the one before: an action pays for collecting
    its own, not another's."""
    best = [float("inf")] * len(actions)
    for _ in range(rounds):
        for index, action in enumerate(actions):
            gc.collect()
            start = time.process_time()
            for _ in range(repeat):
                action()
            best[index] = min(best[index], time.process_time() - start)
    return [seconds / repeat * 1e6 for seconds in best]


def scan_all(scan: Callable[..., Any], data: bytes) -> None:
    """Every pickle in ``data`` (the attack catalogue is one pickle after another)."""
    start = 0
    while start < len(data):
        start = scan(data, start=start, expect_persistent_ids=True).end


def machine_only(data: bytes, **options: Any) -> judging.PickleScan:
    """``scan_pickle`` with the fast path declining every pickle."""
    clean_run = fast_scan.clean_run
    fast_scan.clean_run = lambda *args: None  # type: ignore[assignment]
    try:
        return judging.scan_pickle(data, **options)
    finally:
        fast_scan.clean_run = clean_run


def read_all(read: Callable[..., Any], data: bytes) -> None:
    start = 0
    while start < len(data):
        try:
            start = read(data, start=start, storage_loader=_storages()).end
        except Exception:  # attack pickles the reader refuses: the scan is what they test
            return


def row(times: list[float]) -> str:
    scan = f"{times[0]:9.1f} {times[1]:8.1f} {times[2]:8.1f} {times[0] / times[2]:5.2f}"
    scan += f" {times[1] / times[2]:5.2f}"
    read = f"{times[3]:9.1f} {times[4]:8.1f} {times[3] / times[4]:5.2f}"
    return f"{scan} | {read}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"{'pickle':20s} {'bytes':>7s} | {'scan old':>9s} {'machine':>8s} {'new':>8s}", end="")
    print(f" {'x old':>5s} {'x mch':>5s} | {'read old':>9s} {'new':>8s} {'x':>5s}", end="")
    print("   (microseconds of CPU per pickle)")
    totals = [0.0] * 5
    for name, data in pickles().items():
        repeat = max(3, 20_000 // max(len(data), 1))
        scans = [
            partial(scan_all, scan, data)
            for scan in (old_judging.scan_pickle, machine_only, judging.scan_pickle)
        ]
        reads = [
            partial(read_all, reader, data)
            for reader in (old_reading.read_pickle, reading.read_pickle)
        ]
        times = best_of([*scans, *reads], args.rounds, repeat)
        totals = [t + x for t, x in zip(totals, times, strict=True)]
        print(f"{name:20s} {len(data):7d} | {row(times)}")
    print(f"{'all of them':20s} {'':7s} | {row(totals)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
