"""Inert stand-ins for what a pickle names but modelport never imports or calls.

A pickle is a program: GLOBAL names a Python object and REDUCE calls it. The machine in
``machine.py`` hands both to a resolver; for anything outside the allowlist the resolver
returns these records instead, so the structure of the file (class paths, constructor
arguments, attribute state) survives and nothing from the file ever runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class GlobalRef:
    """A ``module.name`` the pickle refers to, left unresolved."""

    module: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.path}>"


@dataclass(eq=False)
class CallRecord:
    """The result of calling something modelport did not call: ``func(*args)`` never ran.
    Items the pickle then appends or sets on the result (``defaultdict(list)`` filled with
    SETITEMS) are kept as they came."""

    func: Any
    args: tuple[Any, ...]
    list_items: list[Any] = field(default_factory=list)
    dict_items: dict[Any, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<call {self.func!r}(…{len(self.args)} args)>"


@dataclass(eq=False)
class ObjectRecord:
    """An instance of a class modelport does not import, with the state the pickle gave it."""

    cls: GlobalRef
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] | None = None
    state: Any = None
    list_items: list[Any] = field(default_factory=list)
    dict_items: dict[Any, Any] = field(default_factory=dict)

    @property
    def class_path(self) -> str:
        return self.cls.path

    def attributes(self) -> dict[str, Any]:
        """The instance ``__dict__`` as BUILD gave it (a ``(dict, slots)`` pair is merged)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update({k: v for k, v in part.items() if isinstance(k, str)})
            return merged
        if isinstance(state, dict):
            return {k: v for k, v in state.items() if isinstance(k, str)}
        return {}

    def __repr__(self) -> str:
        return f"<object {self.class_path}>"


@dataclass(frozen=True)
class ByteSpan:
    """A large byte payload left in place: ``length`` bytes at ``offset`` of the pickle input."""

    offset: int
    length: int
