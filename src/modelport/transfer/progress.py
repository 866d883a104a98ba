"""Progress of long byte work, reported without the byte movers knowing about progress bars.

``reporting(callback)`` installs a callback for the current thread; the writers, the
verifier and the comparers call ``advance(nbytes)`` for every byte they move or check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_CALLBACK = threading.local()  # the callback ``reporting`` installs, per thread


@contextmanager
def reporting(callback: Callable[[int], None] | None) -> Iterator[None]:
    """Within the block, every byte written or verified on this thread is reported to
    ``callback``."""
    previous = getattr(_CALLBACK, "callback", None)
    _CALLBACK.callback = callback
    try:
        yield
    finally:
        _CALLBACK.callback = previous


def advance(nbytes: int) -> None:
    callback = getattr(_CALLBACK, "callback", None)
    if callback is not None:
        callback(nbytes)
