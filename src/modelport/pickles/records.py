"""Inert stand-ins for what a pickle names but modelport never imports or calls.

A pickle is a program: GLOBAL names a Python object and REDUCE calls it. The machine in
``machine.py`` hands both to a resolver; for anything outside the allowlist the resolver
returns these records instead, so the structure of the file (class paths, constructor
arguments, attribute state) survives and nothing from the file ever runs.
"""

from __future__ import annotations

from typing import Any

from modelport.pickles.interface import Value, fill
from modelport.tensors import Storage


class GlobalRef:
    """A ``module.name`` the pickle refers to, left unresolved. Records are equal only to
    themselves: two calls of one function are two objects."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.path}>"


def is_attribute_state(state: Any) -> bool:
    """An attribute dict, or the ``(dict | None, dict | None)`` pair of a class with slots:
    what the default ``__setstate__`` reads (and so plain state, setting attributes only)."""
    if isinstance(state, dict):
        return True
    return (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    )


def _attributes(state: Any) -> dict[str, Any]:
    """An instance ``__dict__`` as BUILD gave it (a ``(dict, slots)`` pair is merged)."""
    if not is_attribute_state(state):
        return {}
    parts = state if isinstance(state, tuple) else (state,)
    merged: dict[str, Any] = {}
    for part in parts:
        if part is not None:
            merged.update({k: v for k, v in part.items() if isinstance(k, str)})
    return merged


def _custom_state(state: Any) -> Any:
    return None if state is None or is_attribute_state(state) else state


class CallRecord:
    """The result of calling something modelport did not call: ``func(*args)`` never ran.
    What the pickle then does to the result is kept as it came: items it appends or sets
    (``defaultdict(list)`` filled with SETITEMS), and the state BUILD gives it (a
    ``__reduce__`` that returns a factory function and the object's ``__dict__``)."""

    def __init__(
        self,
        func: Any,
        args: tuple[Any, ...],
        list_items: list[Any] | None = None,
        dict_items: dict[Any, Any] | None = None,
        state: Any = None,
    ) -> None:
        self.func = func
        self.args = args
        self.list_items: list[Any] = [] if list_items is None else list_items
        self.dict_items: dict[Any, Any] = {} if dict_items is None else dict_items
        self.state = state

    def attributes(self) -> dict[str, Any]:
        return _attributes(self.state)

    def custom_state(self) -> Any:
        """BUILD's state when it is not attributes: what the object's own ``__setstate__``
        reads (numpy's legacy RandomState takes a tuple), or None."""
        return _custom_state(self.state)

    def __repr__(self) -> str:
        return f"<call {self.func!r}(…{len(self.args)} args)>"


class ObjectRecord:
    """An instance of a class modelport does not import, with the state the pickle gave it."""

    def __init__(
        self,
        cls: GlobalRef,
        args: tuple[Any, ...] = (),
        kwargs: dict[Any, Any] | None = None,
        state: Any = None,
        list_items: list[Any] | None = None,
        dict_items: dict[Any, Any] | None = None,
    ) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.state = state
        self.list_items: list[Any] = [] if list_items is None else list_items
        self.dict_items: dict[Any, Any] = {} if dict_items is None else dict_items

    @property
    def class_path(self) -> str:
        return self.cls.path

    def attributes(self) -> dict[str, Any]:
        return _attributes(self.state)

    def custom_state(self) -> Any:
        """BUILD's state when it is not attributes (see ``CallRecord.custom_state``)."""
        return _custom_state(self.state)

    def __repr__(self) -> str:
        return f"<object {self.class_path}>"


class ByteSpan(Value):
    """A large byte payload left in place: ``length`` bytes at ``offset`` of the pickle input."""

    FIELDS = ("offset", "length")
    __slots__ = FIELDS
    offset: int
    length: int

    def __init__(self, offset: int, length: int) -> None:
        fill(self, offset=offset, length=length)


class FileBytes(ByteSpan):
    """A ``ByteSpan`` that knows where its bytes lie, so that they can be read when a value
    is wanted (``convert --all``) and never before. Compared and shown as its span."""

    __slots__ = ("storage",)
    storage: Storage

    def __init__(self, offset: int, length: int, storage: Storage) -> None:
        fill(self, offset=offset, length=length, storage=storage)

    def read(self) -> bytes:
        return self.storage.bytes_view().tobytes()
