"""What a chat template's expressions can be worth, from its constants alone.

Judging a template (``templates``) needs to know which name a lookup asks for. An escape
spells it so no substring shows it: ``'__cla' ~ 'ss__'``, ``['__cla', 'ss__']|join``,
``'__ssalc__'[::-1]``, ``'%c%cclass%c%c'|format(95, 95, 95, 95)``, a ``{% set %}`` variable,
a loop over a list of constants, a macro's argument. ``TemplateValues`` follows each name to
everything the template binds it to and folds expressions the way Jinja computes them, and
says "unknown" (None) for anything that depends on the data the template is rendered with,
or that it cannot compute the same way: unknown is never read as harmless.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import nodes

NUMERIC_FILTERS = frozenset(["length", "count", "int", "float", "abs", "round", "sum", "wordcount"])
LOOP_NUMBERS = frozenset(["index", "index0", "revindex", "revindex0", "length", "depth", "depth0"])
MAX_CANDIDATES = 32  # values one expression may fold to before it counts as unknown
MAX_FOLDED = 4096  # longest string or list folded
_PERCENT = re.compile(r"%(?:%|[sdicxXor])")  # %-conversions folded: no width, no precision
_PLAIN = (str, int, float, bool, type(None))
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "-": operator.sub,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "and": lambda a, b: a and b,
    "or": lambda a, b: a or b,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "Neg": operator.neg,
    "Pos": operator.pos,
    "Not": operator.not_,
}


class Items:
    """A loop variable: an item of what the loop walks (``unpacked``: part of one). Plain
    records, never compared: a dataclass would cost every scan's start-up its generated
    methods."""

    __slots__ = ("iterable", "unpacked")

    def __init__(self, iterable: nodes.Node, unpacked: bool = False) -> None:
        self.iterable = iterable
        self.unpacked = unpacked


class Body:
    """The text a ``{% set %}`` block or a macro renders."""

    __slots__ = ("body", "filtered")

    def __init__(self, body: list[nodes.Node], filtered: bool = False) -> None:
        self.body = body
        self.filtered = filtered


class TemplateValues:
    """One parsed template: every node in order, what each name is bound to, and what each
    expression folds to."""

    def __init__(self, tree: nodes.Template) -> None:
        self.order: list[nodes.Node] = []  # every node, parents before children
        self.parents: dict[int, nodes.Node] = {}
        # name (or "ns.attr") -> what it is bound to: an expression, Items, Body or None
        # (a value the template cannot know)
        self.bound: dict[str, list[Any]] = {}
        self.macros: dict[str, nodes.Macro] = {}
        self.folded: dict[int, tuple[Any, ...] | None] = {}
        self.busy: set[str] = set()  # names being resolved: a cycle resolves to unknown
        self.numbers: dict[str, bool] | None = None  # names that only ever hold numbers
        stack: list[nodes.Node] = [tree]
        while stack:
            node = stack.pop()
            self.order.append(node)
            children = list(node.iter_child_nodes())
            self.parents.update((id(child), node) for child in children)
            stack.extend(reversed(children))
        self._bind()

    # -- bindings ---------------------------------------------------------------------------
    def _bind(self) -> None:
        from jinja2 import nodes

        for node in self.order:
            if isinstance(node, nodes.Assign):
                self._bind_target(node.target, node.node)
            elif isinstance(node, nodes.AssignBlock):
                self._bind_target(node.target, Body(node.body, node.filter is not None))
            elif isinstance(node, nodes.For):
                self._bind_target(node.target, Items(node.iter))
            elif isinstance(node, nodes.With):
                for target, value in zip(node.targets, node.values, strict=False):
                    self._bind_target(target, value)
            elif isinstance(node, nodes.Macro):
                self.macros[node.name] = node
                self.bound.setdefault(node.name, []).append(None)
                defaulted = node.args[len(node.args) - len(node.defaults) :]
                for param, default in zip(defaulted, node.defaults, strict=True):
                    self._bind_target(param, default)
            elif isinstance(node, nodes.CallBlock):
                for param in node.args:
                    self._bind_target(param, None)
            elif isinstance(node, (nodes.Import, nodes.FromImport)):
                names = [node.target] if isinstance(node, nodes.Import) else node.names
                for name in names:
                    self.bound.setdefault(name if isinstance(name, str) else name[-1], []).append(
                        None
                    )
        for node in self.order:  # macro parameters take every argument a call passes
            if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
                macro = self.macros.get(node.node.name)
                if macro is not None:
                    self._bind_call(macro, node)

    def _bind_target(self, target: nodes.Node, value: Any) -> None:
        from jinja2 import nodes

        if isinstance(target, nodes.Name):
            self.bound.setdefault(target.name, []).append(value)
            if isinstance(value, nodes.Call) and getattr(value.node, "name", "") == "namespace":
                for keyword in value.kwargs:  # namespace(a=...) binds "ns.a"
                    self._bind_key(f"{target.name}.{keyword.key}", keyword.value)
        elif isinstance(target, nodes.NSRef):
            self._bind_key(f"{target.name}.{target.attr}", value)
        elif isinstance(target, nodes.Tuple):
            pairs = isinstance(value, (nodes.Tuple, nodes.List)) and len(value.items) == len(
                target.items
            )
            for index, item in enumerate(target.items):
                if pairs:
                    self._bind_target(item, value.items[index])
                elif isinstance(value, Items):
                    self._bind_target(item, Items(value.iterable, unpacked=True))
                else:
                    self._bind_target(item, None)

    def _bind_key(self, key: str, value: Any) -> None:
        self.bound.setdefault(key, []).append(value)

    def _bind_call(self, macro: nodes.Macro, call: nodes.Call) -> None:
        params = [param.name for param in macro.args]
        for name, value in zip(params, call.args, strict=False):
            self._bind_key(name, value)
        for keyword in call.kwargs:
            if keyword.key in params:
                self._bind_key(keyword.key, keyword.value)
        if call.dyn_args is not None or call.dyn_kwargs is not None or len(call.args) > len(params):
            for name in params:
                self._bind_key(name, None)

    # -- folding ----------------------------------------------------------------------------
    def fold(self, node: nodes.Node) -> tuple[Any, ...] | None:
        """Every value the expression can take when all of them follow from constants;
        None when one depends on data the template is given."""
        key = id(node)
        if key not in self.folded:
            self.folded[key] = None  # an expression defined through itself: unknown
            self.folded[key] = _bounded(self._fold(node))
        return self.folded[key]

    def _fold(self, node: nodes.Node) -> tuple[Any, ...] | None:
        from jinja2 import nodes

        if isinstance(node, nodes.Const):
            return (node.value,) if isinstance(node.value, _PLAIN) else None
        if isinstance(node, nodes.TemplateData):
            return (node.data,)
        if isinstance(node, (nodes.Tuple, nodes.List)):
            return self._combine(node.items, lambda *items: items)
        if isinstance(node, nodes.Dict):
            parts = [part for pair in node.items for part in (pair.key, pair.value)]
            return self._combine(parts, lambda *kv: dict(zip(kv[::2], kv[1::2], strict=True)))
        if isinstance(node, nodes.Concat):
            return self._combine(node.nodes, lambda *parts: "".join(map(_text, parts)))
        if isinstance(node, nodes.BinExpr):
            return self._combine([node.left, node.right], functools.partial(_binary, node.operator))
        if isinstance(node, (nodes.Neg, nodes.Pos, nodes.Not)):
            return self._combine([node.node], _UNARY[type(node).__name__])
        if isinstance(node, nodes.CondExpr):
            branches = [
                self.fold(node.expr1),
                ("",) if node.expr2 is None else self.fold(node.expr2),
            ]
            return None if None in branches else _unique(v for b in branches for v in b or ())
        if isinstance(node, nodes.Slice):
            return self._combine([node.start, node.stop, node.step], slice)
        if isinstance(node, nodes.Getitem):
            return self._combine([node.node, node.arg], _index)
        if isinstance(node, nodes.Name):
            return self._fold_name(node.name)
        if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
            return self._fold_name(f"{node.node.name}.{node.attr}")
        if isinstance(node, nodes.Filter) and node.node is not None:
            return self._fold_filter(node, node.node)
        if isinstance(node, nodes.Call):
            return self._fold_call(node)
        return None

    def _combine(
        self, parts: Sequence[nodes.Node | None], build: Callable[..., Any]
    ) -> tuple[Any, ...] | None:
        options: list[tuple[Any, ...]] = []
        for part in parts:
            values = (None,) if part is None else self.fold(part)
            if values is None:
                return None
            options.append(values)
        results = []
        for combination in itertools.islice(itertools.product(*options), MAX_CANDIDATES + 1):
            try:
                results.append(build(*combination))
            except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError):
                return None  # the renderer may do what this fold cannot: unknown
        return _unique(results)

    def _fold_name(self, name: str) -> tuple[Any, ...] | None:
        bindings = self.bound.get(name)
        if not bindings or name in self.busy:
            return None
        self.busy.add(name)
        try:
            values: list[Any] = []
            for binding in bindings:
                folded = self._fold_binding(binding)
                if folded is None:
                    return None
                values.extend(folded)
            return _unique(values)
        finally:
            self.busy.discard(name)

    def _fold_binding(self, binding: Any) -> tuple[Any, ...] | None:
        if isinstance(binding, Items):
            iterables = None if binding.unpacked else self.fold(binding.iterable)
            if iterables is None or not all(isinstance(i, (str, tuple, dict)) for i in iterables):
                return None  # (a dict is walked by its keys)
            return _unique(item for iterable in iterables for item in iterable)
        if isinstance(binding, Body):
            return None if binding.filtered else self._fold_body(binding.body)
        return None if binding is None else self.fold(binding)

    def _fold_body(self, body: list[nodes.Node]) -> tuple[Any, ...] | None:
        from jinja2 import nodes

        if not all(isinstance(statement, nodes.Output) for statement in body):
            return None
        parts = [part for statement in body for part in statement.iter_child_nodes()]
        return self._combine(parts, lambda *pieces: "".join(map(_text, pieces)))

    def _fold_filter(self, node: nodes.Filter, base: nodes.Node) -> tuple[Any, ...] | None:
        function = _FOLDING_FILTERS.get(node.name)
        if function is None or node.kwargs or node.dyn_args or node.dyn_kwargs:
            return None
        return self._combine([base, *node.args], function)

    def _fold_call(self, node: nodes.Call) -> tuple[Any, ...] | None:
        from jinja2 import nodes

        callee = node.node
        if isinstance(callee, nodes.Name) and callee.name in self.macros:
            return self._fold_body(self.macros[callee.name].body)  # its text, as a string
        if isinstance(callee, nodes.Getattr) and callee.attr == "format" and not node.kwargs:
            return self._combine([callee.node, *node.args], _str_format)
        return None

    def numeric(self, node: nodes.Node) -> bool:
        """Whether a key is a number: list indexes never fall back to attribute lookup."""
        if self.numbers is None:
            self.numbers = self._numeric_names()
        return self._numeric(node, self.numbers)

    def _numeric_names(self) -> dict[str, bool]:
        """Which names only ever hold numbers: every name starts as a number and loses it
        when one of its values is not (``ns.i = ns.i + 1`` stays a number)."""
        numbers = dict.fromkeys(self.bound, True)
        changed = True
        while changed:
            changed = False
            for key, bindings in self.bound.items():
                if numbers[key] and not all(self._numeric_binding(b, numbers) for b in bindings):
                    numbers[key], changed = False, True
        return numbers

    def _numeric(self, node: nodes.Node, numbers: dict[str, bool]) -> bool:
        from jinja2 import nodes

        if isinstance(node, (nodes.Sub, nodes.Div, nodes.FloorDiv, nodes.Pow, nodes.Neg)):
            return True
        if isinstance(node, (nodes.Add, nodes.Mul)):
            return self._numeric(node.left, numbers) and self._numeric(node.right, numbers)
        if isinstance(node, nodes.Mod):
            return self._numeric(node.left, numbers)
        if isinstance(node, nodes.Const):
            return isinstance(node.value, (int, float))
        if isinstance(node, nodes.Filter):
            return node.name in NUMERIC_FILTERS
        if isinstance(node, nodes.CondExpr):
            other = node.expr2 is not None and self._numeric(node.expr2, numbers)
            return self._numeric(node.expr1, numbers) and other
        if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
            if node.node.name == "loop" and node.attr in LOOP_NUMBERS:
                return True
            return numbers.get(f"{node.node.name}.{node.attr}", False)
        return isinstance(node, nodes.Name) and numbers.get(node.name, False)

    def _numeric_binding(self, binding: Any, numbers: dict[str, bool]) -> bool:
        from jinja2 import nodes

        if isinstance(binding, Items):
            iterable = binding.iterable
            return (
                isinstance(iterable, nodes.Call) and getattr(iterable.node, "name", "") == "range"
            )
        return isinstance(binding, nodes.Node) and self._numeric(binding, numbers)


def _unique(values: Any) -> tuple[Any, ...]:
    kept: list[Any] = []
    for value in values:
        if value not in kept:
            kept.append(value)
    return tuple(kept)


def _bounded(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    if values is None or len(values) > MAX_CANDIDATES:
        return None
    if any(isinstance(v, (str, tuple, dict)) and len(v) > MAX_FOLDED for v in values):
        return None
    return values


def _text(value: Any) -> str:
    """A value as Jinja prints it (its lists print as Python lists)."""
    if isinstance(value, tuple):
        return repr(_runtime(value))
    return value if isinstance(value, str) else str(_runtime(value))


def _runtime(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_runtime(v) for v in value]
    if isinstance(value, dict):
        return {k: _runtime(v) for k, v in value.items()}
    return value


def _binary(op: str, left: Any, right: Any) -> Any:
    if op == "+":
        if isinstance(left, str) != isinstance(right, str):
            raise TypeError(op)
        return left + right
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if (
                isinstance(seq, (str, tuple))
                and isinstance(times, int)
                and len(seq) * times > MAX_FOLDED
            ):
                raise ValueError(op)
        return left * right
    if op == "**" and not (isinstance(right, int) and abs(right) <= 256 and abs(left) <= 1 << 64):
        raise ValueError(op)
    if op == "**":
        return left**right
    if op == "%" and isinstance(left, str):
        return _percent(left, right if isinstance(right, (tuple, dict)) else (right,))
    return _OPERATORS[op](left, right)


def _percent(text: str, args: Any) -> str:
    """``%``-formatting (the ``format`` filter) of conversions with no width to blow up."""
    if "%" in _PERCENT.sub("", text):
        raise ValueError(text)
    return text % (args if not isinstance(args, tuple) else tuple(_runtime(a) for a in args))


def _str_format(text: Any, *args: Any) -> str:
    """``str.format`` with plain positional fields only: no attribute, index or spec."""
    if not isinstance(text, str):
        raise TypeError(text)
    import string  # only for a template that formats a string

    for _, field, spec, conversion in string.Formatter().parse(text):
        if spec or conversion or (field and not field.isdigit()):
            raise ValueError(text)
    return text.format(*map(_text, args))


def _index(base: Any, key: Any) -> Any:
    if isinstance(base, dict) or (isinstance(base, (str, tuple)) and isinstance(key, (int, slice))):
        return base[key]
    raise TypeError(key)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _join(value: Any, separator: str = "", attribute: Any = None) -> str:
    if attribute is not None or not isinstance(value, (str, tuple, dict)):
        raise TypeError(value)
    return separator.join(_text(item) for item in value)


def _sequence(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (str, tuple, dict)):
        raise TypeError(value)
    return tuple(value)


def _replace(value: Any, old: str, new: str, count: int | None = None) -> str:
    return _string(value).replace(old, new, -1 if count is None else count)


def _reverse(value: Any) -> Any:
    if not isinstance(value, (str, tuple)):
        raise TypeError(value)
    return value[::-1]


# Filters folded over constants, as jinja2/filters.py computes them on strings and lists
# (not ``title``: Jinja capitalises words its own way, and a fold must never differ).
_FOLDING_FILTERS: dict[str, Callable[..., Any]] = {
    "join": _join,
    "lower": lambda v: _string(v).lower(),
    "upper": lambda v: _string(v).upper(),
    "capitalize": lambda v: _string(v).capitalize(),
    "trim": lambda v, chars=None: _string(v).strip(chars),
    "replace": _replace,
    "reverse": _reverse,
    "first": lambda v: _sequence(v)[0],
    "last": lambda v: _sequence(v)[-1],
    "list": _sequence,
    "string": _text,
    "format": lambda v, *args: _percent(_string(v), args),
    "default": lambda v, *args: v,
    "d": lambda v, *args: v,
    "length": lambda v: len(_sequence(v)),
    "count": lambda v: len(_sequence(v)),
}
