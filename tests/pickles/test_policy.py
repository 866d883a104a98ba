"""The scanner's tables: exact, immutable, and in step with the torch that is installed."""

from __future__ import annotations

import inspect

import pytest
import torch

from modelport.pickles import policy
from modelport.pickles.torch_nn_classes import TORCH_NN_CLASSES


def test_every_torch_nn_module_class_is_listed() -> None:
    current = {
        (cls.__module__, cls.__qualname__)
        for cls in vars(torch.nn).values()
        if inspect.isclass(cls) and issubclass(cls, torch.nn.Module)
    }
    assert current <= TORCH_NN_CLASSES, sorted(current - TORCH_NN_CLASSES)


def test_tables_are_immutable() -> None:
    for table in (policy.SAFE_CLASSES, policy.SAFE_STDLIB_CALLS, policy.DENYLIST):
        with pytest.raises(TypeError):
            table[("os", "system")] = "x"  # type: ignore[index]
    assert isinstance(policy.SAFE_CALLS, frozenset)


def test_no_overlap_between_allowed_and_denied() -> None:
    allowed = policy.SAFE_CALLS | policy.SAFE_VALUES | set(policy.SAFE_CLASSES)
    assert not [key for key in allowed if policy.gadget(*key)]


def test_no_prefix_matching() -> None:
    assert policy.gadget("numpy", "__builtins__.exec") is None  # unknown, decided by usage
    assert ("numpy", "__builtins__.exec") not in policy.SAFE_CALLS
    assert policy.gadget("os", "system") and policy.gadget("posix", "system")
