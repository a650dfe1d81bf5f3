"""The upper-layer runner (editors/lib/forward.py): running from layer L equals the full forward pass."""
from __future__ import annotations

import pytest
import torch

from editbench.scoring import encode, model_logits, pad_batch
from editors.lib.forward import StreamBatch, StreamDelta, UpperStack


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_upper_stack_equals_full_forward(tiny, layer):
    tok = tiny.tokenizer
    seqs = [encode(tok, "The capital of France is", "Paris").ids, encode(tok, "x", "a longer target text").ids]
    for side in ("right", "left"):
        ids, mask = pad_batch(seqs, tok.pad_token_id, side)
        stack = UpperStack.capture(tiny.model, tiny.arch, layer, ids, mask)
        with torch.no_grad():
            full = model_logits(tiny.model, ids, mask)
            upper = stack.logits()
        real = mask.bool()
        assert torch.allclose(full[real], upper[real], atol=1e-5)


def test_upper_stack_follows_weight_changes_and_gradients(tiny_llama):
    tok, model, arch = tiny_llama.tokenizer, tiny_llama.model, tiny_llama.arch
    ids = torch.tensor([encode(tok, "The capital of France is", "Paris").ids])
    mask = torch.ones_like(ids)
    stack = UpperStack.capture(model, arch, 2, ids, mask)
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


def test_from_hidden_equals_capture(tiny):
    """A stack built from given hidden states runs exactly as one captured at that layer."""
    tok = tiny.tokenizer
    seqs = [encode(tok, "The capital of France is", "Paris").ids, encode(tok, "x", "a longer target text").ids]
    ids, mask = pad_batch(seqs, tok.pad_token_id, "right")
    captured = UpperStack.capture(tiny.model, tiny.arch, 2, ids, mask)
    rows = [captured.hidden[r, :len(s)] for r, s in enumerate(seqs)]
    given = UpperStack.from_hidden(tiny.model, tiny.arch, 2, ids, mask, rows)
    assert given.start == captured.start and len(given.layers) == len(captured.layers)
    with torch.no_grad():
        real = mask.bool()
        assert torch.equal(captured.logits()[real], given.logits()[real])


def test_stream_delta_fast_path_equals_a_hooked_full_forward(tiny):
    """ROME/MEMIT's value search: the cached upper-layer path gives the logits of a full
    forward pass with the vector added after the layer, for a nonzero vector too."""
    tok = tiny.tokenizer
    seqs = [encode(tok, "a b c The capital of France is", "Paris").ids,
            encode(tok, "d e f The capital of Spain is", "Madrid").ids]
    width = max(map(len, seqs))
    ids, mask = pad_batch(seqs, tok.pad_token_id, "right")
    batch = StreamBatch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), column=3)
    runner = StreamDelta(tiny.model, tiny.arch)
    layer = 1
    with torch.no_grad():
        h0 = tiny.model(input_ids=ids, attention_mask=mask, position_ids=batch.position_ids,
                        output_hidden_states=True).hidden_states[layer + 1]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny.model.modules()]
    delta = torch.randn(2, h0.shape[-1], generator=torch.Generator().manual_seed(0))
    pos_rows, pos_cols = torch.tensor([0, 0, 1]), torch.tensor([width - 2, 4, 5])
    with torch.no_grad():
        fast = runner.logits(layer, h0, delta, batch, pos_rows, pos_cols)
        full = runner._full(layer, delta, batch, pos_rows, pos_cols)
    assert runner.verified[layer] is True
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-4)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny.model.modules()] == hooks
