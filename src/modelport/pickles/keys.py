"""The bound on what hashing a key may cost: a dict key or set item a pickle builds of
tuples is hashed by CPython recursively and without a cache, every tuple of its unfolded
tree in turn. Tuples shared through the memo fold 2**60 tuples into 60 BINGETs (a hang no
clock can stop, inside one SETITEM), and 200,000 nested TUPLE1s overflow the C stack."""

from __future__ import annotations

from typing import Any, Final

from modelport.errors import LimitExceededError
from modelport.limits import MAX_DEPTH

# Tuples in one key's unfolded tree: a real key (a name, a shape, an index pair) has a few.
MAX_KEY_TUPLES: Final = 1 << 16


def bounded_key(key: Any) -> Any:
    """``key``, once the tuples it unfolds to are few enough and nest shallowly enough to
    hash; each distinct tuple is measured once, so the measure costs what the pickle did."""
    if type(key) is not tuple:
        return key
    measured: dict[int, tuple[int, int]] = {}  # id -> (tuples unfolded, depth)
    pending: list[tuple[tuple[Any, ...], bool]] = [(key, False)]
    while pending:
        node, children_done = pending.pop()
        if children_done:
            tuples, depth = 1, 1
            for item in node:
                if type(item) is tuple:
                    inner, below = measured[id(item)]
                    tuples += inner
                    depth = max(depth, below + 1)
            if tuples > MAX_KEY_TUPLES:
                raise LimitExceededError("tuples in one pickled key", MAX_KEY_TUPLES, tuples)
            if depth > MAX_DEPTH:
                raise LimitExceededError("nesting of one pickled key", MAX_DEPTH, depth)
            measured[id(node)] = (tuples, depth)
        elif id(node) not in measured:
            pending.append((node, True))
            pending.extend((item, False) for item in node if type(item) is tuple)
    return key
