"""Chat templates judged on the syntax tree Jinja2's own parser builds from them.

Loaders render a model's chat template as Jinja. transformers uses Jinja's
``ImmutableSandboxedEnvironment``, which refuses ``_``-prefixed attributes; llama.cpp-style
engines, older transformers and ad-hoc servers use a plain ``jinja2.Environment`` or their own
renderer, where ``cycler.__init__.__globals__.os.popen('id')`` runs a command. A substring
search misses other spellings (``x['__cla' ~ 'ss__']``, ``x|attr('\\x5f\\x5fclass\\x5f\\x5f')``)
and flags text that only mentions a name (``{{ 'see __init__.py' }}``), so each template is
parsed as the renderer would parse it and judged on what its expressions reach:

- ``template-injection`` (high): a dunder or interpreter-internal name (``__globals__``,
  ``mro``, ``gi_frame``) reached by attribute, item, the ``attr`` filter, an
  attribute-taking filter (``map(attribute=...)``) or a ``str.format`` field, however it is
  spelled, so long as it folds to a constant (concatenation, ``join``, ``replace``,
  ``reverse``, ``format``, slicing, ``set`` variables, loop variables, macro arguments); or a
  name computed while rendering in a template that also spells such a name as data;
- ``template-suspicious-access`` (medium): a value looked up by a name computed while
  rendering and then called, ``attr`` with a computed name, ``.format`` on a computed string,
  private attributes, web-framework globals (``config``, ``request``);
- ``template-include`` (medium): ``include``, ``import``, ``from`` and ``extends`` read other
  templates, which a renderer with a loader takes from its files;
- ``template-resource`` (medium): ``range`` past the sandbox's limit, huge repetitions;
- ``not-analysed``: a template Jinja cannot parse is reported, never passed as safe.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from modelport.errors import MissingDependencyError
from modelport.scanning.findings import Finding
from modelport.scanning.template_values import Items, TemplateValues
from modelport.severity import Severity

if TYPE_CHECKING:
    from jinja2 import Environment, nodes

INJECTION = "template-injection"
SUSPICIOUS = "template-suspicious-access"
INCLUDE = "template-include"
RESOURCE = "template-resource"
RULES: dict[str, tuple[Severity, str]] = {
    INJECTION: (
        Severity.HIGH,
        "a renderer without Jinja's sandbox (llama.cpp-style engines, a plain "
        "jinja2.Environment, older servers) runs Python through it",
    ),
    SUSPICIOUS: (
        Severity.MEDIUM,
        "without Jinja's sandbox, such lookups can reach Python internals or the host's data",
    ),
    INCLUDE: (Severity.MEDIUM, "a renderer with a template loader reads those files"),
    RESOURCE: (Severity.MEDIUM, "rendering it exhausts memory or time"),
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Names that lead from any object to interpreter internals without a leading "__":
# jinja2.sandbox's UNSAFE_*_ATTRIBUTES, the frame and code attributes they open, and the
# Python 2 spellings older sandboxes still list.
INTERNAL_NAMES = _words(
    "mro func_globals func_code func_closure func_defaults func_dict im_func im_self "
    "im_class gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await ag_frame ag_code "
    "ag_await f_globals f_locals f_builtins f_back f_code tb_frame tb_next co_code"
)
# The dunders escapes are built from: spelled as data in a template that also looks names up
# at render time, they count as reached.
ESCAPE_DUNDERS = _words(
    "__class__ __base__ __bases__ __mro__ __subclasses__ __init__ __globals__ __builtins__ "
    "__import__ __getattribute__ __getattr__ __dict__ __code__ __func__ __self__ __closure__ "
    "__reduce__ __reduce_ex__ __call__ __getitem__ __loader__ __spec__ __module__"
)
# Jinja's (and transformers') globals whose function attributes lead to module globals:
# ``lipsum.__globals__`` holds ``os``, ``self`` holds the render context.
ENTRY_POINTS = _words(
    "self cycler joiner namespace lipsum range dict loop caller varargs kwargs "
    "raise_exception strftime_now"
)
# Flask's render_template_string globals: reading them leaks the host's configuration.
HOST_GLOBALS = _words("config request session g url_for get_flashed_messages")
# Filters that look an attribute up by a name they are given: (position after the filtered
# value, keyword), from the signatures in jinja2/filters.py.
ATTRIBUTE_ARGUMENTS: dict[str, tuple[int | None, str | None]] = {
    "attr": (0, "name"),
    "map": (None, "attribute"),
    "selectattr": (0, None),
    "rejectattr": (0, None),
    "sort": (2, "attribute"),
    "groupby": (0, "attribute"),
    "sum": (0, "attribute"),
    "unique": (1, "attribute"),
    "min": (1, "attribute"),
    "max": (1, "attribute"),
    "join": (1, "attribute"),
}
# Methods of strings, lists and dicts that return data: calling one on a value found by a
# computed name is ordinary template code, not a step of an escape.
DATA_METHODS = _words(
    "strip lstrip rstrip split rsplit splitlines startswith endswith lower upper title "
    "capitalize casefold replace join find rfind index count partition rpartition isdigit "
    "isalpha isalnum isspace zfill center ljust rjust items keys values get append extend "
    "pop insert update copy setdefault"
)
MAX_RANGE = 100_000  # jinja2.sandbox.MAX_RANGE: the longest range the sandbox builds
MAX_REPEAT = 1 << 20  # characters a repetition may build before rendering stalls
# Real chat templates stay under 100 KB; Jinja's parser takes seconds per megabyte, so a
# larger one is reported as not analysed rather than parsed.
MAX_TEMPLATE_CHARS = 1 << 20
_SPELLED = ESCAPE_DUNDERS | INTERNAL_NAMES
_MANGLED = re.compile(r"_[A-Za-z]\w*__\w")  # self._TemplateReference__context


def judge(where: str, text: str) -> list[Finding]:
    """One finding per rule the template breaks, naming what each expression reaches; a
    template Jinja cannot parse gives ``not-analysed``, which the scanner reports as
    ``error``. Raises ``MissingDependencyError`` without jinja2."""
    environment = _environment()
    import jinja2

    if len(text) > MAX_TEMPLATE_CHARS:
        problem = f"{len(text):,} characters, more than the {MAX_TEMPLATE_CHARS:,} it parses"
    else:
        try:
            template = _Template(environment.parse(text))
            template.judge()
            return template.findings(where)
        except jinja2.TemplateSyntaxError as exc:
            problem = f"Jinja cannot parse it: line {exc.lineno}: {exc.message}"
        except RecursionError:
            problem = "its expressions nest too deeply to follow"
    return [
        Finding(
            Severity.HIGH,
            "not-analysed",
            where,
            f"chat template not analysed ({problem}): renderers may read it differently, so "
            "it is not judged safe",
        )
    ]


@functools.cache
def _environment() -> Environment:
    """Jinja as transformers configures it for chat templates (``loopcontrols`` and its
    ``{% generation %}`` tag), plus ``do``, which other renderers accept."""
    try:
        import jinja2
        from jinja2 import ext, nodes
    except ImportError:
        raise MissingDependencyError("jinja2", "all", "Judging chat templates") from None

    class Generation(ext.Extension):
        """transformers' AssistantTracker tag (utils/chat_template_utils.py), read as a
        plain block: it marks assistant turns and renders its body."""

        tags: ClassVar[set[str]] = {"generation"}  # type: ignore[misc]

        def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return jinja2.Environment(extensions=[ext.loopcontrols, ext.do, Generation])


class _Template(TemplateValues):
    """A template's values, and what its lookups, filters and calls reach."""

    def __init__(self, tree: nodes.Template) -> None:
        super().__init__(tree)
        self.reached: dict[int, tuple[nodes.Node, list[str], bool]] = {}
        self.reasons: dict[str, dict[str, None]] = {rule: {} for rule in RULES}
        self.dynamic: dict[int, nodes.Node] = {}  # lookups by a name that does not fold
        self.built: set[str] = set()  # escape dunders the template spells as data
        self.levels: dict[str, int] | None = None  # per name, computed lookups behind it

    def judge(self) -> None:
        from jinja2 import nodes

        for node in self.order:
            if isinstance(node, (nodes.Getattr, nodes.NSRef)):
                self._attribute(node, node.attr, private=True)
            elif isinstance(node, nodes.Getitem):
                self._item(node)
            elif isinstance(node, nodes.Filter):
                self._filter(node)
            elif isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
                self._hit(INCLUDE, node, "reads another template")
            elif isinstance(node, nodes.Mul):
                self._repeat(node)
            if isinstance(node, nodes.Name) and node.name in HOST_GLOBALS - self.bound.keys():
                self._hit(SUSPICIOUS, node, f"reads the web-framework global {node.name!r}")
            if isinstance(node, nodes.Expr) and not isinstance(node, nodes.TemplateData):
                for value in self.fold(node) or ():
                    for name in value if isinstance(value, tuple) else (value,):
                        if isinstance(name, str) and name in _SPELLED:
                            self.built.add(name)
        for node in self.order:  # calls last: they need every computed lookup found above
            if isinstance(node, nodes.Call):
                self._call(node)
        if self.dynamic and self.built:
            built = ", ".join(repr(name) for name in sorted(self.built)[:3])
            self._hit(
                INJECTION,
                next(iter(self.dynamic.values())),
                f"looks up a name computed while rendering, and the template spells {built}",
            )

    def _attribute(self, node: nodes.Node, name: str, *, private: bool = False) -> None:
        """``private``: looked up as an attribute first, where a ``_`` name is an object's
        internals rather than a key of the data."""
        if _escapes(name):
            self._reach(node, name)
        elif private and name.startswith("_"):
            self._hit(SUSPICIOUS, node, f"reads the private attribute {name!r}")

    def _item(self, node: nodes.Getitem) -> None:
        from jinja2 import nodes

        if isinstance(node.arg, nodes.Slice):
            return
        keys = self.fold(node.arg)
        if keys is None:
            if not self.numeric(node.arg):
                self.dynamic[id(node)] = node
            return
        for key in keys:
            if isinstance(key, str) and _escapes(key):
                self._reach(node, key)

    def _filter(self, node: nodes.Filter) -> None:
        spec = ATTRIBUTE_ARGUMENTS.get(node.name)
        if spec is None:
            return
        position, keyword = spec
        args = list(node.args)
        if node.name == "map":  # map('attr', name) applies the attr filter
            first = self.fold(args[0]) if args else ("",)
            if first is None:
                self._hit(SUSPICIOUS, node, "maps a filter named while rendering")
                self.dynamic[id(node)] = node
            position = 1 if first is None or "attr" in first else None
        named = [kw.value for kw in node.kwargs if kw.key == keyword]
        argument = args[position] if position is not None and len(args) > position else None
        argument = named[0] if named else argument
        if node.dyn_args is not None or node.dyn_kwargs is not None:
            self._hit(SUSPICIOUS, node, "passes an attribute name through *args or **kwargs")
            self.dynamic[id(node)] = node
        if argument is None:
            return
        names = self.fold(argument)
        if names is None:
            self._hit(SUSPICIOUS, node, "looks an attribute up by a name computed while rendering")
            self.dynamic[id(node)] = node
            return
        for name in names:
            parts = str(name).split(".")  # attribute paths are dotted (make_attrgetter)
            for part in parts:
                self._attribute(node, part, private=node.name == "attr")

    def _call(self, node: nodes.Call) -> None:
        from jinja2 import nodes

        callee = node.node
        if isinstance(callee, nodes.Getattr) and callee.attr in ("format", "format_map"):
            texts = self.fold(callee.node)
            if texts is None:
                self._hit(SUSPICIOUS, node, "formats a string computed while rendering")
            for text in texts or ():
                for name in _format_attributes(text) if isinstance(text, str) else ():
                    self._reach(callee, name)
        if isinstance(callee, nodes.Name) and callee.name == "range" and "range" not in self.bound:
            for arg in node.args:
                if any(isinstance(n, int) and n > MAX_RANGE for n in self.fold(arg) or ()):
                    self._hit(RESOURCE, node, f"builds a range past {MAX_RANGE:,} items")
        safe_method = isinstance(callee, nodes.Getattr) and callee.attr in DATA_METHODS
        computed = self._computed(callee)
        if computed > 1 or (computed and not safe_method):
            self._hit(SUSPICIOUS, node, "calls what a name computed while rendering looked up")

    def _computed(self, node: nodes.Node) -> int:
        """How many lookups by computed names (0, 1, or 2 for more) lead to this value,
        through ``set``, loop variables and macro arguments too."""
        if self.levels is None:
            self.levels = self._computed_names()
        return self._chain_level(node, self.levels)

    def _computed_names(self) -> dict[str, int]:
        """Per name, the most computed lookups any of its values comes through (0 to 2)."""
        levels = dict.fromkeys(self.bound, 0)
        changed = True
        while changed:
            changed = False
            for key, bindings in self.bound.items():
                values = [b.iterable if isinstance(b, Items) else b for b in bindings]
                level = max((self._chain_level(v, levels) for v in values), default=0)
                if level > levels[key]:
                    levels[key], changed = level, True
        return levels

    def _chain_level(self, node: object, levels: dict[str, int]) -> int:
        from jinja2 import nodes

        count = 0
        while isinstance(node, (nodes.Getattr, nodes.Getitem, nodes.Call, nodes.Filter)):
            count += id(node) in self.dynamic
            node = node.node
        if isinstance(node, nodes.Name):
            count += levels.get(node.name, 0)
        return min(count, 2)

    def _repeat(self, node: nodes.Mul) -> None:
        for left, right in ((node.left, node.right), (node.right, node.left)):
            sizes = [len(v) for v in self.fold(left) or () if isinstance(v, (str, tuple))]
            times = [n for n in self.fold(right) or () if isinstance(n, int)]
            if sizes and times and max(sizes) * max(times) > MAX_REPEAT:
                self._hit(RESOURCE, node, f"repeats a value {max(times):,} times")

    # -- reporting --------------------------------------------------------------------------
    def _chain_top(self, node: nodes.Node) -> tuple[nodes.Node, bool]:
        """The whole expression a lookup is part of, and whether that expression calls."""
        from jinja2 import nodes

        called = False
        while True:
            parent = self.parents.get(id(node))
            links = (nodes.Getattr, nodes.Getitem, nodes.Call, nodes.Filter)
            if not isinstance(parent, links) or parent.node is not node:
                return node, called
            called = called or isinstance(parent, nodes.Call)
            node = parent

    def _reach(self, node: nodes.Node, name: str) -> None:
        top, called = self._chain_top(node)
        names = self.reached.setdefault(id(top), (top, [], called))[1]
        if name not in names:
            names.insert(0, name)  # found parents first: the chain reads root to top

    def _hit(self, rule: str, node: nodes.Node, what: str) -> None:
        self.reasons[rule][f"`{_describe(node)}` (line {node.lineno}) {what}"] = None

    def findings(self, where: str) -> list[Finding]:
        from jinja2 import nodes

        reached = []
        for top, names, called in self.reached.values():
            root: nodes.Node | None = top
            while isinstance(root, (nodes.Getattr, nodes.Getitem, nodes.Call, nodes.Filter)):
                root = root.node
            what = f"reaches {', '.join(map(repr, names))}"
            if isinstance(root, nodes.Name) and root.name in ENTRY_POINTS - self.bound.keys():
                what += f" from the Jinja global {root.name!r}"
            what += " and calls what it finds" if called else ""
            reached.append(f"`{_describe(top)}` (line {top.lineno}) {what}")
        self.reasons[INJECTION] = dict.fromkeys([*reached, *self.reasons[INJECTION]])
        found = []
        for rule, reasons in self.reasons.items():
            if not reasons:
                continue
            severity, consequence = RULES[rule]
            listed = list(reasons)
            more = f" (and {len(listed) - 3} more)" if len(listed) > 3 else ""
            message = f"chat template: {'; '.join(listed[:3])}{more}: {consequence}"
            found.append(Finding(severity, rule, where, message))
        return found


def _escapes(name: str) -> bool:
    """Whether looking the name up leaves template data for interpreter internals."""
    return name.startswith("__") or name in INTERNAL_NAMES or _MANGLED.match(name) is not None


def _format_attributes(text: str) -> Iterator[str]:
    """Attribute names ``str.format`` follows in the fields of a format string."""
    import string  # only for a template that formats a string

    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return
    for field in (part for _, name, spec, _ in parsed for part in (name, spec) if part):
        for part in re.split(r"[.\[\]{}:!]", field)[1:]:
            if _escapes(part.strip()):
                yield part.strip()


def _describe(node: nodes.Node, depth: int = 0) -> str:
    from jinja2 import nodes

    if depth > 10:
        return "…"

    def sub(child: nodes.Node | None) -> str:
        return "" if child is None else _describe(child, depth + 1)

    text = "…"
    if isinstance(node, nodes.Name):
        text = node.name
    elif isinstance(node, nodes.Const):
        text = repr(node.value)
    elif isinstance(node, (nodes.Getattr, nodes.NSRef)):
        base = node.name if isinstance(node, nodes.NSRef) else sub(node.node)
        text = f"{base}.{node.attr}"
    elif isinstance(node, nodes.Getitem):
        text = f"{sub(node.node)}[{sub(node.arg)}]"
    elif isinstance(node, nodes.Slice):
        text = f"{sub(node.start)}:{sub(node.stop)}" + (f":{sub(node.step)}" if node.step else "")
    elif isinstance(node, (nodes.Call, nodes.Filter)):
        args = ", ".join(
            [sub(a) for a in node.args[:3]] + [f"{k.key}={sub(k.value)}" for k in node.kwargs[:2]]
        )
        if isinstance(node, nodes.Call):
            text = f"{sub(node.node)}({args})"
        else:
            text = f"{sub(node.node)}|{node.name}" + (f"({args})" if args else "")
    elif isinstance(node, nodes.Concat):
        text = " ~ ".join(sub(part) for part in node.nodes)
    elif isinstance(node, nodes.BinExpr):
        text = f"{sub(node.left)} {node.operator} {sub(node.right)}"
    elif isinstance(node, (nodes.List, nodes.Tuple)):
        items = ", ".join(sub(item) for item in node.items)
        text = f"[{items}]" if isinstance(node, nodes.List) else f"({items})"
    elif isinstance(node, (nodes.Neg, nodes.Pos, nodes.Not)):
        text = {"Neg": "-", "Pos": "+", "Not": "not "}[type(node).__name__] + sub(node.node)
    elif isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        text = f"{type(node).__name__.lower()} {sub(node.template)}"
    return text if len(text) <= 100 else text[:99] + "…"
