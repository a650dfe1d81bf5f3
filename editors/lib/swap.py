"""Install a wrapper module in place of a submodule, and put the original back.

Editors that add a module to a frozen model (GRACE's codebook around an MLP projection,
T-Patcher's patch neurons around an FFN, LTE's LoRA wrappers around attention
projections) put a wrapper that holds the original module as its child at the
original's dotted path. Taking it out must put the very same original object back, so
that the model has its original module names, types and hooks again (the runner's
WeightGuard checks them). :class:`ModuleSwap` keeps that pair for one path:
:meth:`~ModuleSwap.install` puts the wrapper in (building it around the original on
first use), :meth:`~ModuleSwap.restore` puts the original back, and
:meth:`~ModuleSwap.discard` also forgets the wrapper (an editor's ``reset``).
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from torch import nn

W = TypeVar("W", bound=nn.Module)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model``; return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class ModuleSwap(Generic[W]):
    """A wrapper that stands at the dotted path ``name`` of ``model`` in place of the original.

    ``make(original)`` builds the wrapper the first time it is installed. While it is
    installed, ``original`` is the module it replaced (None otherwise).
    """

    def __init__(self, model: nn.Module, name: str, make: Callable[[nn.Module], W] | None = None):
        self.model, self.name, self.make = model, name, make
        self.wrapper: W | None = None
        self.original: nn.Module | None = None

    @classmethod
    def taken_out(cls, model: nn.Module, name: str, original: nn.Module) -> "ModuleSwap[W]":
        """The wrapper that stands at ``name`` now (put there by someone else, e.g. peft's
        adapter injection), taken out at once: ``original`` goes back in its place."""
        swap = cls(model, name)
        swap.wrapper = swap_module(model, name, original)
        return swap

    @property
    def installed(self) -> bool:
        return self.original is not None

    def install(self) -> W:
        """Put the wrapper at ``name`` (built around the module there if there is none yet); return it."""
        if self.original is None:
            if self.wrapper is None:
                self.wrapper = self.make(self.model.get_submodule(self.name))
            self.original = swap_module(self.model, self.name, self.wrapper)
        return self.wrapper

    def restore(self) -> None:
        """Put the very same original module object back at ``name`` (the wrapper is kept)."""
        if self.original is not None:
            swap_module(self.model, self.name, self.original)
            self.original = None

    def discard(self) -> None:
        """:meth:`restore`, and forget the wrapper: the next :meth:`install` builds a new one."""
        self.restore()
        self.wrapper = None
