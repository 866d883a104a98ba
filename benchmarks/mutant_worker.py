"""The worker of ``bench_reader_mutants.py``: runs the modelport CLI in its own process, one
JSON argv a line on stdin, one JSON answer a line on stdout, under a cap on address space.

It imports modelport and nothing heavier, so its peak RSS is what the commands cost; it runs
with ``MODELPORT_DEBUG=1`` so that an error reaches it as the exception itself, not as the
CLI's one-line message.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import traceback
from pathlib import Path

from modelport.cli.main import main
from modelport.errors import ModelportError

ADDRESS_SPACE_BYTES = 3 << 30


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "modelport" in f.filename] or frames
    place = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {place}: {exc}"[:300]


def answer(argv: list[str]) -> dict[str, object]:
    """``verdict`` is ``ok`` (finished, or a typed error), ``described`` (an error the CLI words
    but a reader should have bounded) or ``untyped``; ``detail`` says which."""
    sink = io.StringIO()
    verdict, detail = "ok", ""
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            code = main(argv)
        detail = f"exit {code}"
    except ModelportError as exc:
        detail = f"{type(exc).__name__}: {exc}"[:300]
    except (OSError, RecursionError, MemoryError) as exc:
        verdict, detail = "described", _where(exc)
    except Exception as exc:
        verdict, detail = "untyped", _where(exc)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return {"verdict": verdict, "detail": detail, "out": sink.getvalue()[-2000:], "rss": rss}


def serve() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))
    sys.setrecursionlimit(10000)
    for line in sys.stdin:
        print(json.dumps(answer(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
