"""Which of a meta graph's checkpoint writers (``SaveV2``, ``MergeV2Checkpoints``) are its
saver's own, told by structure rather than by name: a name is the model's to choose.

The ``MetaGraphDef``'s ``saver_def`` (3: ``save_tensor_name`` 2, ``restore_op_name`` 3)
names the node a save runs. Its writers are the saver's when nothing the loader or a caller
runs reaches them: the restore op, every ``collection_def`` (4) node list (``main_op``,
``legacy_init_op``...) and every signature's tensors (5). A TF1 Saver keeps its writers in
the graph below that node; TF2's ``tf.saved_model.save`` has that node call one library
function (``__inference__traced_save_<n>``), which is the saver's only when nothing else
calls it and the object graph (7), whose functions ``tf.saved_model.load`` runs, names it
nowhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from modelport.formats._protobuf import Field, Message, WireType


def sub(message: Message, parent: Field) -> list[Field]:
    """A LEN field's own LEN fields (every sub-message walked here is one)."""
    return [f for f in message.fields(parent.start, parent.end) if f.wire == WireType.LEN]


def node_name(tensor: str) -> str:
    """``^n``, ``n:0`` and ``n`` all name node ``n``; names are compared by their first 256
    characters (the model's own strings are read whole, so ``^`` costs no character)."""
    return tensor.removeprefix("^").split(":", 1)[0][:256]


@dataclass
class Saver:
    """What a meta graph says of its saver and of what else runs."""

    save_node: str = ""
    roots: set[str] = field(default_factory=set)
    object_functions: set[str] = field(default_factory=set)


@dataclass
class Graph:
    """The graph's node inputs (names alike to 256 characters share theirs), how many call
    sites name each function (as an op or in an attribute), and what the save node calls."""

    inputs: dict[str, list[str]] = field(default_factory=dict)
    call_sites: Counter[str] = field(default_factory=Counter)
    save_calls: list[str] = field(default_factory=list)

    def add(self, node: str | None, inputs: list[str], called: list[str], saver: Saver) -> None:
        """One graph node (named) or function body node (``None``)."""
        self.call_sites.update(called)
        if node is not None:
            self.inputs.setdefault(node, []).extend(inputs)
            if node == saver.save_node:
                self.save_calls.extend(called)


def read_saver(message: Message, meta: Field) -> Saver:
    saver = Saver()
    for part in sub(message, meta):
        if part.number == 3:
            for entry in sub(message, part):
                if entry.number == 2:
                    saver.save_node = node_name(message.text(entry))
                elif entry.number == 3:
                    saver.roots.add(node_name(message.text(entry)))
        elif part.number in (4, 5):
            for entry in (f for f in sub(message, part) if f.number == 2):
                saver.roots.update(_tensors(message, entry, part.number == 4))
        elif part.number == 7:
            saver.object_functions.update(_object_functions(message, part))
    return saver


def _tensors(message: Message, value: Field, collection: bool) -> list[str]:
    """A ``CollectionDef``'s ``node_list`` (1) values (1), or a ``SignatureDef``'s inputs
    (1) and outputs (2), map entries whose ``TensorInfo`` (2) names its tensor as 1."""
    found: list[str] = []
    for kind in sub(message, value):
        if collection and kind.number == 1:
            found.extend(message.text(f) for f in sub(message, kind) if f.number == 1)
        elif not collection and kind.number in (1, 2):
            for info in (f for f in sub(message, kind) if f.number == 2):
                found.extend(message.text(f) for f in sub(message, info) if f.number == 1)
    return [node_name(name) for name in found]


def _object_functions(message: Message, object_graph: Field) -> set[str]:
    """Function names in a ``SavedObjectGraph``: its ``concrete_functions`` map keys (2),
    each object's ``function`` (6: ``concrete_functions`` 1) and ``bare_concrete_function``
    (8: name 1)."""
    found: set[str] = set()
    for part in sub(message, object_graph):
        if part.number == 2:
            found.update(message.text(f, 256) for f in sub(message, part) if f.number == 1)
        elif part.number == 1:
            for kind in (f for f in sub(message, part) if f.number in (6, 8)):
                found.update(message.text(f, 256) for f in sub(message, kind) if f.number == 1)
    return found


def _closure(inputs: dict[str, list[str]], starts: set[str]) -> set[str]:
    seen: set[str] = set()
    stack = [name for name in starts if name]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(node_name(i) for i in inputs.get(name, ()))
    return seen


def trusted(saver: Saver, graph: Graph) -> tuple[set[str], set[str]]:
    """The graph nodes and the library functions whose writers are the saver's own."""
    if not saver.save_node or saver.save_node not in graph.inputs:
        return set(), set()
    nodes = _closure(graph.inputs, {saver.save_node}) - _closure(graph.inputs, saver.roots)
    if saver.save_node not in nodes:
        return nodes, set()
    own_functions = {
        function
        for function in graph.save_calls
        if graph.call_sites[function] == 1 and function not in saver.object_functions
    }
    return nodes, own_functions
