"""editors/lib/swap.py (a wrapper in place of a submodule, the very same original back) and
editors/lib/memory.py (the retrieval editors' query rows and counters)."""
from __future__ import annotations

import torch
from torch import nn

from editors.lib.memory import RetrievalCounters, prompt_token_rows
from editors.lib.swap import ModuleSwap, swap_module


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1


def _model():
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))


def test_module_swap_installs_once_and_restores_the_same_original():
    model = _model()
    original = model.get_submodule("1.1")
    names = [n for n, _ in model.named_modules()]
    built = []
    swap = ModuleSwap(model, "1.1", lambda inner: built.append(inner) or Wrapper(inner))
    assert swap.wrapper is None and not swap.installed
    wrapper = swap.install()
    assert built == [original] and wrapper.inner is original
    assert model.get_submodule("1.1") is wrapper and swap.installed and swap.original is original
    assert swap.install() is wrapper and len(built) == 1          # installed already: nothing changes
    swap.restore()
    assert model.get_submodule("1.1") is original and not swap.installed
    assert [n for n, _ in model.named_modules()] == names
    swap.restore()                                                # restoring twice is harmless
    assert model.get_submodule("1.1") is original
    assert swap.install() is wrapper and len(built) == 1          # the kept wrapper goes back in
    swap.discard()
    assert model.get_submodule("1.1") is original and swap.wrapper is None
    assert swap.install() is not wrapper and len(built) == 2      # a new wrapper after discard
    swap.discard()
    assert model.get_submodule("1.1") is original


def test_module_swap_taken_out_holds_a_wrapper_put_there_by_someone_else():
    model = _model()
    original = model.get_submodule("0")
    wrapper = Wrapper(original)
    assert swap_module(model, "0", wrapper) is original           # e.g. peft's adapter injection
    swap = ModuleSwap.taken_out(model, "0", original)
    assert model.get_submodule("0") is original and swap.wrapper is wrapper
    assert swap.install() is wrapper and model.get_submodule("0") is wrapper
    swap.restore()
    assert model.get_submodule("0") is original


def test_prompt_token_rows_left_and_right_padding():
    ids = torch.tensor([[5, 6, 7, 0], [0, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert prompt_token_rows(ids, mask) == [[5, 6, 7], [8, 9, 10]]
    assert prompt_token_rows(ids, mask, torch.tensor([2, 1])) == [[5, 6], [8]]


def test_retrieval_counters_stats():
    c = RetrievalCounters()
    assert c.stats(0) == {"memory_size": 0.0}
    c.count(4, 1)
    c.count(2, 2)
    assert c.stats(3) == {"memory_size": 3.0, "retrieval_rate": 3 / 6}
    c.count_exact(True)
    c.count_exact(False)
    assert c.stats(3) == {"memory_size": 3.0, "retrieval_rate": 0.5, "retrieval_hit_rate": 0.5}
