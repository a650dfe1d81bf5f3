"""Run a model from decoder layer L upwards, reusing the frozen input of layer L.

Editors that optimise weights at or above layer L (FT, T-Patcher, GRACE's value, ROME and
MEMIT's value search) recompute the same layers below L at every optimisation step,
although nothing there changes. :class:`UpperStack` runs one forward pass without
gradients, captures the exact arguments the model passes to decoder layer L (hidden
states, the prepared attention mask, position ids/embeddings...), and afterwards runs
only layers L..N-1, the final norm and the head. The result equals the full forward pass
(tested) at (N - L) / N of its cost.

It relies only on what every transformers decoder does: call each layer with the same
keyword arguments and feed its output to the next; a layer may return a tensor (LLaMA)
or a tuple whose first item is the hidden state (GPT-J, GPT-2, GPT-NeoX).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from editbench.models import ArchSpec
from editbench.scoring import model_logits


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once layer L's input is known."""


class UpperStack:
    def __init__(self, model: nn.Module, arch: ArchSpec, layer: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor):
        self.start = arch.layer_index(layer)
        self.layers = [arch.module(model, "layer", i) for i in range(self.start, arch.n_layers)]
        self.ln_f = arch.module(model, "ln_f")
        self.head = arch.module(model, "lm_head")
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                model_logits(model, input_ids, attention_mask)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError(f"decoder layer {self.start} was not called by the model's forward pass")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        self.hidden = (args[0] if args else kwargs.pop("hidden_states")).detach()
        self.args = tuple(args[1:])
        self.kwargs = kwargs

    def hidden_states(self) -> torch.Tensor:
        """Final hidden states (after the last norm) under the current weights."""
        h = self.hidden
        for layer in self.layers:
            out = layer(h, *self.args, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.ln_f(h)

    def logits(self) -> torch.Tensor:
        """Logits under the current weights (gradients flow into layers >= L)."""
        return self.head(self.hidden_states())
