"""modelport's pickle handling: a machine that interprets opcodes and never imports or calls
anything from the file, and the resolvers that give those opcodes meaning."""

from __future__ import annotations

from modelport.pickles.machine import Limits, PickleResult, Resolver, Step, run
from modelport.pickles.reading import ReadingResolver, read_pickle
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord

__all__ = [
    "ByteSpan",
    "CallRecord",
    "GlobalRef",
    "Limits",
    "ObjectRecord",
    "PickleResult",
    "ReadingResolver",
    "Resolver",
    "Step",
    "read_pickle",
    "run",
]
