"""How much a finding matters, from ``info`` to ``critical``.

A core type because every layer that judges a file (the pickle rules, the scanner's content
checks, reports, the fleet) ranks findings by it, and a scan of a file that holds no pickle
should not import the pickle machine to do so.
"""

from __future__ import annotations

from enum import Enum


class Severity(str, Enum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    INFO = "info"

    @property
    def rank(self) -> int:
        return ("info", "medium", "high", "critical").index(self.value)
