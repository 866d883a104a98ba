"""Keep the libraries an export drives from talking over modelport's own output.

torch, torchao, onnxscript, onnx_ir and transformers log through ``logging`` (torch with a
handler of its own on stderr: ``W1204 ... _pytree.py:630] ...``) and raise warnings about
their own deprecations while they trace and save. None of that is about the user's model,
and modelport's report already says what went wrong. ``quiet_libraries`` raises those
loggers to CRITICAL and ignores those libraries' warnings for the span of an export, then
restores every level it changed; modelport's own warnings (``ModelportWarning``) still pass.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIBRARIES = ("torch", "torchao", "torchvision", "onnx", "onnxscript", "onnx_ir", "transformers")
_WARNING_MODULES = r"(torch|torchao|torchvision|onnx|onnxscript|onnx_ir|transformers)(\.|$)"


@contextlib.contextmanager
def quiet_libraries(*, every_warning: bool = False, whole_process: bool = False) -> Iterator[None]:
    """Silence the libraries' loggers and warnings inside the block. ``every_warning``:
    every warning, for code that reports its findings otherwise, as ``export`` does.
    ``whole_process``: every logger (``logging.disable``), for the command line, which
    owns the process: a library imported inside the block (torch, by ``--model``) sets its
    loggers' levels as it loads, over any level set before."""
    saved = {name: logger.level for name, logger in _library_loggers().items()}
    for name in saved:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    disabled = logging.root.manager.disable
    if whole_process:
        logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if every_warning:
                warnings.simplefilter("ignore")
            else:
                warnings.filterwarnings("ignore", module=_WARNING_MODULES)
            yield
    finally:
        logging.disable(disabled)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _library_loggers() -> dict[str, logging.Logger]:
    """Each library's top logger, and every logger under it that has a level of its own
    (torch sets some: they would not follow their parent)."""
    found = {name: logging.getLogger(name) for name in LIBRARIES}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or logger.level == logging.NOTSET:
            continue
        if name.split(".", 1)[0] in LIBRARIES:
            found[name] = logger
    return found
