"""The folder walk of ``scan DIR`` against the same rules spelled with ``os.walk`` and
``os.path.realpath``: every file once under the first path that reaches it, links followed,
links out of the folder noted, links to nowhere (or in a loop) listed apart."""

from __future__ import annotations

import os
from pathlib import Path

from modelport.scanning import walking


def by_os_walk(root: Path) -> tuple[list[Path], dict[Path, Path], list[Path]]:
    base = Path(os.path.realpath(root))
    files: list[Path] = []
    outside: dict[Path, Path] = {}
    dangling: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        here = Path(folder)
        for name in [*sorted(names), *(d for d in dirs if (here / d).is_symlink())]:
            path = here / name
            try:
                real = os.path.realpath(path, strict=True)
            except OSError:
                dangling.append(path)
                continue
            if real in seen or not Path(real).is_file():
                continue
            seen.add(real)
            files.append(path)
            if path.is_symlink() and not Path(real).is_relative_to(base):
                outside[path] = Path(real)
    return sorted(files), outside, dangling


def tree(root: Path, elsewhere: Path) -> Path:
    for name in ("a/b/c/deep.pkl", "a/b/y.pt", "a/x.bin", "top.pt", "z/q"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (elsewhere / "far.pt").write_bytes(b"x")
    (root / "a/again.pt").symlink_to("../top.pt")  # a second path to a file met later
    (root / "a/first_q").symlink_to("../z/q")  # a second path to a file met earlier
    (root / "a/dangling").symlink_to("nowhere")
    (root / "a/folder_link").symlink_to("b")
    (root / "z/out.pt").symlink_to(elsewhere / "far.pt")
    (root / "z/loop2").symlink_to("loop1")
    (root / "z/loop1").symlink_to("loop2")
    os.mkfifo(root / "z/fifo")
    return root


def test_the_walk_follows_the_rules_os_walk_spells(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    root = tree(tmp_path / "root", tmp_path / "elsewhere")
    (tmp_path / "link_to_a").symlink_to(root / "a")
    for start in (root, root / "a", tmp_path / "link_to_a", root / "z"):
        walk = walking.walk(start)
        files, outside, dangling = by_os_walk(start)
        assert (list(walk.files), walk.outside, list(walk.dangling)) == (files, outside, dangling)
    whole = walking.walk(root)
    assert root / "z/out.pt" in whole.outside
    assert len(whole.files) == 6 and not whole.truncated


def test_the_walk_orders_paths_part_by_part_as_paths_sort(tmp_path: Path) -> None:
    """``a/b`` comes before ``a-c`` (``/`` sorts after ``-`` in a string, not in a path)."""
    for name in ("a/b/z", "a-c", "a.d/e", "a0", "a/b-x/y", "a/b.z", "b"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for start in (tmp_path, Path(os.path.relpath(tmp_path))):
        walk = walking.walk(start)
        assert list(walk.files) == by_os_walk(start)[0]
        assert list(walk.files) == sorted(walk.files)
