"""Replace a submodule by a wrapper, and put the original back.

Editors that add a module to a frozen model (GRACE's codebook around an MLP projection,
T-Patcher's patch neurons around an FFN) install a wrapper that holds the original
module as its child. ``reset`` must put the very same original object back, so that the
model has its original module names, types and hooks again (the runner's WeightGuard
checks them): :func:`swap_module` returns what it replaced for exactly that.
"""
from __future__ import annotations

from torch import nn


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model``; return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
