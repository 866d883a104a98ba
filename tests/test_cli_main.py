"""The entry point itself: argv is parsed before any command's module is imported, and the
process's warning display is left as the caller had it."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from modelport.cli.commands import COMMANDS, ExitCode
from modelport.cli.main import main


def test_main_leaves_the_warning_format_as_it_found_it(tmp_path: Path) -> None:
    before = warnings.formatwarning
    code = main(["inspect", str(tmp_path / "missing.pt")])
    assert code == ExitCode.ERROR
    assert warnings.formatwarning is before


@pytest.mark.parametrize(
    ("argv", "imported"),
    [
        (["--version"], set()),
        (["--help"], set()),
        (["hash", "--help"], {"modelport.cli.cmd_hash"}),
    ],
)
def test_only_the_named_command_is_imported(argv: list[str], imported: set[str]) -> None:
    """A separate process: this one has imported every command already."""
    code = (
        "import sys\nfrom modelport.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('modelport.cli.cmd_') "
        "or m in ('numpy', 'rich', 'torch')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == repr(sorted(imported))


def test_every_command_module_registers_the_name_it_is_listed_under() -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0


def test_sigterm_unwinds_like_ctrl_c_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    import numpy as np
    from safetensors.numpy import save_file

    from modelport.transfer import streaming

    source = tmp_path / "s.safetensors"
    save_file({f"w{i}": np.full((64, 64), i, np.float32) for i in range(6)}, str(source))
    real = streaming.write_tensor
    calls = {"n": 0}

    def terminated_midway(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # the process is sent SIGTERM while the third tensor is written
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("modelport.formats.safetensors_writer.write_tensor", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["convert", str(source), str(tmp_path / "out.safetensors")])
    assert code == ExitCode.TERMINATED == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handling is back
