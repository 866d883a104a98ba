"""Where outputs go: the checks before writing, hidden names beside the target, and
installing a finished output in one rename, so that an error, Ctrl-C or a full disk never
leaves a partial output and an input is never overwritten. ``convert``, ``export`` and
``rebuild`` all place their outputs through here.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from modelport.errors import ConversionError


def check_target(source: Path | None, target: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target that is the input (``source``, if any), that exists
    without ``overwrite``, or whose directory does not exist."""
    if source is not None and target.exists() and source.exists() and source.samefile(target):
        raise ConversionError(
            f"{target}: the output would overwrite the input; choose another name"
        )
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} exists; pass --overwrite (overwrite=True) to replace it")
    if not target.parent.is_dir():
        raise ConversionError(f"{target.parent} is not a directory")


_REFUSED_WRITES: Final = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


@contextmanager
def refused_writes(target: Path) -> Iterator[None]:
    """A full disk, a read-only file system or a missing permission becomes a refusal that
    says so (the caller removes what was written)."""
    try:
        yield
    except OSError as exc:
        reason = _REFUSED_WRITES.get(exc.errno or 0)
        if reason is not None:
            raise ConversionError(f"{target}: {reason}; nothing was written") from None
        raise


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; on a file system that refused to create it
    (read-only, gone) there is nothing to remove and nothing to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sibling(target: Path, kind: str) -> Path:
    """A free hidden name beside ``target``, naming this host and process, so that a later
    run can tell its own stale files (``remove_stale_siblings``) from another's live ones."""
    remove_stale_siblings(target)
    while True:
        name = f".{target.name}.modelport-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}.{kind}"
        candidate = target.with_name(name)
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


def staging_folder(target: Path) -> Path:
    """A new hidden folder beside ``target`` to build an output in; a file system that
    refuses it is a ``ConversionError`` that says why."""
    building = sibling(target, "tmp")
    with refused_writes(target):
        building.mkdir()
    return building


# the host name as os.uname gives it: importing socket (and secrets) slows every start
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", os.uname().nodename) or "host"


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the temporary files and folders an earlier run on this host left beside
    ``target`` when it was killed (SIGKILL, a power cut): those whose process is gone. A
    folder moved aside (``.old``) is never removed here: it may be the only copy."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.modelport-{re.escape(_HOST)}-(\d+)-[0-9a-f]{{8}}\.tmp"
    )
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.modelport-*.tmp"):
        found = pattern.fullmatch(path.name)
        if found is None or _alive(int(found.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def install_file(built: Path, target: Path, *, overwrite: bool) -> None:
    """Put a finished file in ``target``'s place in one step. Without ``overwrite`` a file that
    appeared there since the checks (another run, another program) is never replaced: the
    file is linked into place, which fails when the name exists."""
    if overwrite:
        built.replace(target)
        return
    try:
        os.link(built, target)
    except FileExistsError:
        raise ConversionError(
            f"{target} appeared while the output was being written; nothing was replaced "
            "(pass --overwrite to replace it)"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if target.exists() or target.is_symlink():  # no links here: check, then rename
            raise ConversionError(f"{target} exists; pass --overwrite to replace it") from None
        built.replace(target)
        return
    built.unlink()


_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP})


def merge_directory(
    built: Path, target: Path, stale: Callable[[str], bool], *, overwrite: bool, fsync: bool
) -> list[str]:
    """Move every file of ``built`` into the existing directory ``target``. With
    ``overwrite`` they replace files of the same name, and the files of ``target`` that
    ``stale`` names and that were not just written (an older shard set the new index
    supersedes) are removed; without it, a name that exists there refuses the whole move
    before anything is moved. Nothing else in ``target`` is touched. Returns the names
    removed."""
    written = {path.name for path in built.iterdir()}
    taken = sorted(name for name in written if (target / name).exists())
    if taken and not overwrite:
        raise ConversionError(
            f"{target} already holds {', '.join(taken)}; pass --overwrite to replace them"
        )
    for name in sorted(written):
        install_file(built / name, target / name, overwrite=overwrite)
    removed = []
    for path in sorted(target.iterdir()) if overwrite else []:
        if path.name not in written and path.is_file() and stale(path.name):
            path.unlink()
            removed.append(path.name)
    if fsync:
        fsync_directory(target)
    return removed


def install_directory(built: Path, target: Path, fsync: bool) -> None:
    """Put a finished directory in ``target``'s place; an existing one is moved aside
    first, restored if the rename fails, and removed last."""
    old = None
    if target.exists() or target.is_symlink():
        old = sibling(target, "old")
        target.rename(old)
    try:
        built.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    if fsync:
        fsync_directory(target)
        fsync_directory(target.parent)


def check_side_output(path: Path, outputs: tuple[Path, ...], overwrite: bool) -> None:
    """A file written beside the main output (``--report``): never one of ``outputs``, and
    an existing one replaced only with ``overwrite``; checked before the long work."""
    if any(path.resolve() == output.resolve() for output in outputs):
        raise ConversionError(f"{path}: the report would replace the output; choose another name")
    check_target(None, path, overwrite)


def write_text(path: Path, text: str) -> None:
    """A small text file (a report) written beside ``path`` and renamed over it."""
    install_bytes(path, text.encode("utf-8", "replace"), overwrite=True)


def install_bytes(target: Path, data: bytes, *, overwrite: bool) -> None:
    """A small output written whole beside ``target``, then put in its place as
    ``install_file`` does: a reader never sees half of it, and without ``overwrite`` a file
    that appeared meanwhile is kept."""
    temporary = sibling(target, "tmp")
    try:
        with refused_writes(target):
            temporary.write_bytes(data)
            install_file(temporary, target, overwrite=overwrite)
    finally:
        discard(temporary)
