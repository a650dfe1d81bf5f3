"""UpperStack: running from layer L with the captured input equals the full forward pass."""
from __future__ import annotations

import pytest
import torch

from editbench.scoring import encode, model_logits, pad_batch
from editors.lib.upper import UpperStack


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_upper_stack_equals_full_forward(tiny, layer):
    tok = tiny.tokenizer
    seqs = [encode(tok, "The capital of France is", "Paris").ids, encode(tok, "x", "a longer target text").ids]
    for side in ("right", "left"):
        ids, mask = pad_batch(seqs, tok.pad_token_id, side)
        stack = UpperStack(tiny.model, tiny.arch, layer, ids, mask)
        with torch.no_grad():
            full = model_logits(tiny.model, ids, mask)
            upper = stack.logits()
        real = mask.bool()
        assert torch.allclose(full[real], upper[real], atol=1e-5)


def test_upper_stack_follows_weight_changes_and_gradients(tiny_llama):
    tok, model, arch = tiny_llama.tokenizer, tiny_llama.model, tiny_llama.arch
    ids = torch.tensor([encode(tok, "The capital of France is", "Paris").ids])
    mask = torch.ones_like(ids)
    stack = UpperStack(model, arch, 2, ids, mask)
    w = arch.module(model, "mlp_out", 2).weight
    w0 = w.detach().clone()
    try:
        w.requires_grad_(True)
        stack.logits().sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        with torch.no_grad():
            w.add_(0.5)
            assert torch.allclose(stack.logits(), model_logits(model, ids, mask), atol=1e-5)
    finally:
        with torch.no_grad():
            w.copy_(w0)
        w.requires_grad_(False)
        w.grad = None
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
