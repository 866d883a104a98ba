"""The public surface: small, sorted, complete."""

from __future__ import annotations

import modelport


def test_all_is_sorted_and_complete() -> None:
    assert modelport.__all__ == sorted(modelport.__all__)
    for name in modelport.__all__:
        assert hasattr(modelport, name), name
