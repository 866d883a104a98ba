"""Fault campaign, part two: a large conversion as a whole process, hit at the worst moment.

* kill -9, SIGTERM and SIGINT at random moments (start-up included) of a conversion of a
  ~1 GB safetensors file to a torch zip, each run with ``--overwrite`` onto the output of
  the last: afterwards the target is either absent or whole (its sha256 is the clean run's),
  SIGTERM/SIGINT leave no temporary file, a Ctrl-C never prints a traceback, and the next
  run removes what kill -9 left. The input's sha256 is checked unchanged at the end.
* a full disk (a tmpfs smaller than the output) and a read-only target (a tmpfs mounted
  read-only): a typed error (exit 2), nothing left. Needs root for ``mount``; skipped without.
* two converts to one new target, started together, without ``--overwrite``: exactly one
  wins; the target is whole.
* the source renamed over, or rewritten in place, during the run: exit 2, nothing
  installed.

Run: ``python benchmarks/bench_process_faults.py [--size-mb 1024] [--kills 12] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TENSOR_MB = 64
STARTUP_S = 0.4  # interpreter, imports and the scan, before the first byte is copied


@dataclass
class Case:
    """One row of the printed table."""

    name: str
    runs: int = 0
    expected: int = 0  # runs whose outcome was the promised one
    files_left: int = 0
    silent_replacements: int = 0
    tracebacks: int = 0
    note: str = ""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_source(path: Path, size_mb: int, fill: float) -> None:
    """An fp32 safetensors file of ``size_mb``, written by safetensors itself."""
    from safetensors.numpy import save_file

    count = max(1, size_mb // TENSOR_MB)
    side = int((TENSOR_MB * (1 << 20) // 4) ** 0.5)
    tensors = {
        f"layers.{i}.weight": np.full((side, side), fill + i, np.float32) for i in range(count)
    }
    save_file(tensors, str(path))


def convert(src: Path, dst: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "modelport", "convert", str(src), str(dst), "--to", "torch"]
    return subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = process.communicate()
    return process.returncode, err.decode(errors="replace")


def leftovers(folder: Path) -> list[str]:
    """modelport's temporary files (hidden, ``.<target>.modelport-<host>-<pid>-...``)."""
    return sorted(p.name for p in folder.iterdir() if ".modelport-" in p.name)


def kill_campaign(
    src: Path, folder: Path, clean_sha: str, seconds: float, kills: int, rng: random.Random
) -> list[Case]:
    target = folder / "out.pt"
    cases = {
        sig: Case(f"{sig.name} at a random moment")
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    }
    order = list(cases) * (kills // 3 + 1)
    for sig in order[:kills]:
        case = cases[sig]
        before = set(leftovers(folder))  # what an earlier kill -9 left, for the next run
        process = convert(src, target, "--overwrite")
        time.sleep(rng.uniform(0.01, seconds))
        process.send_signal(sig)
        code, err = finish(process)
        case.runs += 1
        whole = not target.exists() or sha256(target) == clean_sha
        left = [name for name in leftovers(folder) if name not in before]
        case.tracebacks += "Traceback" in err
        if sig is not signal.SIGKILL and left:
            case.files_left += 1
        # -15: a SIGTERM before the interpreter reached modelport's handler, which is fine
        expected_codes = {signal.SIGKILL: (-9,), signal.SIGTERM: (143, -15), signal.SIGINT: (130,)}
        promised = (
            whole and code in (*expected_codes[sig], 0) and (sig is signal.SIGKILL or not left)
        )
        case.expected += promised
        if not promised:
            case.note = f"exit {code}, whole {whole}, left {left}: {err.strip()[-120:]}"
    code, _ = finish(convert(src, target, "--overwrite"))
    after = Case("the run after them all", runs=1)
    after.files_left = len(leftovers(folder))
    after.expected = int(code == 0 and sha256(target) == clean_sha and not after.files_left)
    after.note = "removes what kill -9 left" if after.expected else f"left {leftovers(folder)}"
    return [*cases.values(), after]


@contextmanager
def tmpfs(mountpoint: Path, size_mb: int, *, read_only: bool) -> Iterator[bool]:
    mountpoint.mkdir()
    options = f"size={size_mb}m" + (",ro" if read_only else "")
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)


def disk_cases(src: Path, work: Path, size_mb: int) -> list[Case]:
    cases = []
    for name, read_only in (
        ("full disk (tmpfs of a quarter the output)", False),
        ("read-only target", True),
    ):
        case = Case(name)
        with tmpfs(work / name.split()[0], max(8, size_mb // 4), read_only=read_only) as mounted:
            if not mounted:
                case.note = "skipped: mount needs root"
            else:
                mount = work / name.split()[0]
                code, err = finish(convert(src, mount / "out.pt"))
                case.runs = 1
                left = sorted(p.name for p in mount.iterdir())
                case.files_left = len(left)
                case.tracebacks = int("Traceback" in err)
                case.expected = int(code == 2 and not left)
                case.note = (
                    err.strip().splitlines()[-1].split(": ", 2)[-1][:90] if err.strip() else ""
                )
        cases.append(case)
    return cases


def concurrent_case(src: Path, folder: Path, clean_sha: str, rounds: int) -> Case:
    case = Case("two converts to one new target, no --overwrite")
    target = folder / "race.pt"
    for _ in range(rounds):
        target.unlink(missing_ok=True)
        codes = sorted(finish(p)[0] for p in [convert(src, target), convert(src, target)])
        case.runs += 1
        if codes == [0, 0]:
            case.silent_replacements += 1
        left = leftovers(folder)
        case.files_left += bool(left)
        case.expected += codes == [0, 2] and sha256(target) == clean_sha and not left
    target.unlink(missing_ok=True)
    return case


def changed_source_cases(src: Path, folder: Path, seconds: float, size_mb: int) -> list[Case]:
    """The change lands after start-up (``STARTUP_S``), while bytes are being copied."""
    other = folder / "other.safetensors"
    write_source(other, size_mb, fill=100.0)
    backup = folder / "source-backup.safetensors"
    shutil.copyfile(src, backup)
    renamed, rewritten = (
        Case("source renamed over mid-run"),
        Case("source rewritten in place mid-run"),
    )
    target = folder / "changed.pt"
    for case in (renamed, rewritten):
        for fraction in (0.3, 0.6):
            if case is renamed:
                shutil.copyfile(other, folder / "swap")
            process = convert(src, target)
            time.sleep(STARTUP_S + (seconds - STARTUP_S) * fraction)
            if case is renamed:
                (folder / "swap").replace(src)
            else:
                with open(src, "r+b") as handle:
                    handle.seek(src.stat().st_size // 2)
                    handle.write(b"\x01" * 4096)
            code, err = finish(process)
            case.runs += 1
            case.tracebacks += "Traceback" in err
            left = leftovers(folder)
            case.files_left += bool(left)
            case.expected += code == 2 and not target.exists()
            case.note = (
                err.strip().splitlines()[-1].split(": ", 2)[-1][:90]
                if err.strip()
                else f"exit {code}"
            )
            target.unlink(missing_ok=True)
            shutil.copyfile(backup, folder / "restore")
            (folder / "restore").replace(src)
    backup.unlink()
    other.unlink()
    return [renamed, rewritten]


def print_table(cases: list[Case]) -> None:
    print("| case | runs | as promised | files left | silent replacements | tracebacks | note |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c.name} | {c.runs} | {c.expected} | {c.files_left} | "
            f"{c.silent_replacements} | {c.tracebacks} | {c.note} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="modelport-process-faults-", dir=args.dir) as tmp:
        work = Path(tmp)
        folder = work / "out"
        folder.mkdir()
        src = work / "source.safetensors"
        write_source(src, args.size_mb, fill=0.0)
        source_sha = sha256(src)
        started = time.perf_counter()
        code, err = finish(convert(src, folder / "out.pt"))
        seconds = time.perf_counter() - started
        if code != 0:
            print(err, file=sys.stderr)
            return 1
        clean_sha = sha256(folder / "out.pt")
        print(
            f"source {src.stat().st_size / 1e9:.2f} GB; a clean conversion took {seconds:.1f} s\n"
        )
        cases = kill_campaign(src, folder, clean_sha, seconds, args.kills, rng)
        cases += disk_cases(src, work, args.size_mb)
        cases += [concurrent_case(src, folder, clean_sha, rounds=3)]
        unchanged = sha256(src) == source_sha
        cases += changed_source_cases(src, folder, seconds, args.size_mb)
        print_table(cases)
        print(f"\ninput unchanged by every run before the source-change cases: {unchanged}")
    bad = sum(
        c.runs - c.expected + c.files_left + c.silent_replacements + c.tracebacks for c in cases
    )
    return 0 if bad == 0 and unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
