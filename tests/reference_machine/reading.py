"""The old reading resolver and read_pickle (reference only); the allowlist tables and the
records it returns are shared with ``modelport.pickles.reading``."""

from __future__ import annotations

import _compat_pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelport.errors import CorruptFileError, ModelportError
from modelport.pickles import numpy_types
from modelport.pickles.interface import Limits, PickleResult, Step
from modelport.pickles.reading import CALLABLES, CONSTANTS, PersistentRef, PickledDict, Trusted
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.tensors import Storage, byte_array
from tests.reference_machine.machine import run

StorageLoader = Callable[[Any], Any]


class ReadingResolver:
    """Gives opcodes the meaning of a careful reader: reconstruct data, record everything else."""

    def __init__(
        self,
        *,
        storage_loader: StorageLoader | None = None,
        path: Path | None = None,
        base_offset: int = 0,
        data: bytes | memoryview | None = None,
    ) -> None:
        self.storage_loader = storage_loader
        self.path = path
        self.base_offset = base_offset
        self.data = data

    # names ---------------------------------------------------------------------------------
    def find_global(self, module: Any, name: Any, at: Step | None) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            return GlobalRef(str(module), str(name))
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in CONSTANTS:
            return CONSTANTS[module, name][0]
        if (module, name) in CALLABLES:
            return Trusted(module, name, CALLABLES[module, name][0])
        return GlobalRef(module, name)

    # calls -----------------------------------------------------------------------------------
    def call(self, func: Any, args: tuple[Any, ...], at: Step | None) -> Any:
        if isinstance(func, Trusted):
            try:
                return func.reconstruct(self, args)
            except ModelportError:
                raise
            except (TypeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
                raise CorruptFileError(
                    f"pickle: {func.module}.{func.name} called with unexpected arguments ({exc})"
                ) from None
        return CallRecord(func, args)

    def new(
        self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step | None
    ) -> Any:
        if isinstance(cls, Trusted):
            return self.call(cls, args, at)
        if isinstance(cls, GlobalRef):
            return ObjectRecord(cls, args, kwargs)
        return CallRecord(cls, args)

    def build(self, obj: Any, state: Any, at: Step | None) -> Any:
        if isinstance(obj, ObjectRecord):
            if isinstance(obj.state, dict) and isinstance(state, dict):
                obj.state.update(state)
            else:
                obj.state = state
        elif isinstance(obj, numpy_types.NumpyArray):
            numpy_types.build_array(obj, state, self.storage_of)
        elif isinstance(obj, numpy_types.NumpyDType):
            obj.setstate(state)
        elif isinstance(obj, PickledDict):
            obj.pickle_state = state
        return obj

    def append(self, target: Any, items: list[Any], at: Step | None) -> None:
        if isinstance(target, (ObjectRecord, CallRecord)):
            target.list_items.extend(items)
        elif isinstance(target, set):
            target.update(items)
        else:
            raise CorruptFileError(f"pickle: APPEND to a {type(target).__name__}")

    def set_items(self, target: Any, pairs: list[tuple[Any, Any]], at: Step | None) -> None:
        if isinstance(target, (ObjectRecord, CallRecord)):
            target.dict_items.update(pairs)
        elif isinstance(target, dict):
            for key, value in pairs:
                try:
                    target[key] = value
                except TypeError:
                    raise CorruptFileError("pickle: unhashable dictionary key") from None
        else:
            raise CorruptFileError(f"pickle: SETITEM on a {type(target).__name__}")

    def persistent_load(self, pid: Any, at: Step | None) -> Any:
        if self.storage_loader is not None:
            return self.storage_loader(pid)
        return PersistentRef(pid)

    def extension(self, code: int, at: Step | None) -> Any:
        return GlobalRef("copyreg", f"<extension code {code}>")

    def next_buffer(self, at: Step | None) -> Any:
        raise CorruptFileError("pickle refers to out-of-band buffers, which a file cannot carry")

    # raw bytes --------------------------------------------------------------------------------
    def storage_of(self, raw: ByteSpan | bytes | bytearray) -> Storage:
        """A storage for array bytes found in the pickle: in place in the file when possible."""
        if isinstance(raw, ByteSpan):
            if self.path is not None:
                start = self.base_offset + raw.offset
                return Storage(self.path, start, raw.length, key=f"@{start}")
            if self.data is None:
                raise CorruptFileError("pickle: byte span without a source")
            chunk = memoryview(self.data)[raw.offset : raw.offset + raw.length]
            return Storage(None, 0, raw.length, reader=lambda: byte_array(chunk))
        frozen = bytes(raw)
        return Storage(None, 0, len(frozen), reader=lambda: byte_array(frozen))


def read_pickle(
    data: bytes | memoryview,
    *,
    start: int = 0,
    path: Path | None = None,
    base_offset: int = 0,
    storage_loader: StorageLoader | None = None,
    limits: Limits | None = None,
) -> PickleResult:
    """Interpret one pickle without executing it; ``path``/``base_offset`` locate ``data`` in a
    file so that large byte payloads (numpy arrays) become lazy storages there."""
    resolver = ReadingResolver(
        storage_loader=storage_loader, path=path, base_offset=base_offset, data=data
    )
    return run(data, resolver, start=start, limits=limits or Limits())
