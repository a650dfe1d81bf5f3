"""Running parts of a decoder: the one upper-layer runner and the tracing tools.

Editors that optimise something at or above decoder layer L (FT, T-Patcher, GRACE's value,
ROME/MEMIT's value search, MEND/MALMEN's training) recompute the same layers below L at
every step although nothing there changes. :class:`UpperStack` is the one way the project
runs "only the layers from L up":

* :meth:`UpperStack.capture` runs one forward pass without gradients, records the exact
  arguments the model passes to decoder layer L (hidden states, the prepared attention
  mask, position ids / embeddings, the key/value cache...) and stops there
  (:class:`StopForward`);
* :meth:`UpperStack.from_hidden` builds the same from given hidden states (one tensor per
  row, e.g. kept from an earlier pass): the keyword arguments a model passes to its layers
  do not depend on the hidden states and are the same for every layer, so they are captured
  at layer 0 (the cost of the embedding lookup only);
* :meth:`UpperStack.hidden_states` / :meth:`UpperStack.logits` then run only layers L..N-1,
  the final norm and the head, under the current weights (gradients flow into them); a
  caller may hand in other input hidden states (a vector added into the stream) and apply
  the head only at the positions it reads.

It relies only on what every transformers decoder does: call each layer with the same
keyword arguments and feed its output to the next; a layer may return a tensor (LLaMA) or
a tuple whose first item is the hidden state (GPT-J, GPT-2, GPT-NeoX). The result equals
the full forward pass (tested) at (N - L) / N of its cost.

:class:`StreamDelta` is ROME/MEMIT's use of it: logits when a vector is added to the
residual stream after a layer at one column. Columns before that column never depend on the
vector, so their keys and values are computed once per edit (a key/value cache); each step
runs only the columns from there on through the layers above. This fast path is checked
once per layer against a plain forward pass with a hook (same inputs, zero vector) and used
only when both agree; otherwise the plain forward pass is used.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from editbench.models import ArchSpec
from editbench.scoring import model_logits

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed is captured."""


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's (or module's) output: a tensor, or a tuple's first item."""
    return output[0] if isinstance(output, tuple) else output


def _layer_call(model: nn.Module, arch: ArchSpec, layer: int, forward) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) with which ``forward()`` (a call of ``model``) calls decoder layer
    ``layer``; the forward pass is stopped there and runs without gradients."""
    captured: dict[str, Any] = {}

    def capture(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise StopForward

    handle = arch.module(model, "layer", layer).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            forward()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError(f"decoder layer {layer} was not called by the model's forward pass")
    return captured["args"], dict(captured["kwargs"])


class UpperStack:
    """Decoder layers ``start``..N-1, the final norm and the head, with the inputs of layer
    ``start`` fixed (see the module docstring). Build it with :meth:`capture` or
    :meth:`from_hidden`."""

    def __init__(self, model: nn.Module, arch: ArchSpec, start: int, hidden: torch.Tensor, args: tuple,
                 kwargs: dict[str, Any]):
        self.start = arch.layer_index(start)
        self.layers = [arch.module(model, "layer", i) for i in range(self.start, arch.n_layers)]
        self.ln_f = arch.module(model, "ln_f")
        self.head = arch.module(model, "lm_head")
        #: (B, S, d) input of layer ``start``
        self.hidden = hidden
        self.args = args
        self.kwargs = kwargs

    @classmethod
    def capture(cls, model: nn.Module, arch: ArchSpec, layer: int, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, **forward_kw) -> "UpperStack":
        """Run the model on the batch up to layer ``layer`` (no gradients) and keep that layer's inputs.

        Without ``forward_kw`` the model is called as scoring calls it (position ids from the
        mask, :func:`~editbench.scoring.model_logits`); with it, exactly as
        ``model(input_ids=..., attention_mask=..., **forward_kw)``."""
        start = arch.layer_index(layer)
        if forward_kw:
            forward = lambda: model(input_ids=input_ids, attention_mask=attention_mask, **forward_kw)  # noqa: E731
        else:
            forward = lambda: model_logits(model, input_ids, attention_mask)  # noqa: E731
        args, kwargs = _layer_call(model, arch, start, forward)
        hidden = (args[0] if args else kwargs.pop("hidden_states")).detach()
        return cls(model, arch, start, hidden, tuple(args[1:]), kwargs)

    @classmethod
    def from_hidden(cls, model: nn.Module, arch: ArchSpec, layer: int, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, hidden_rows: Sequence[torch.Tensor]) -> "UpperStack":
        """The stack from layer ``layer`` whose input hidden states are given, one (len, d)
        tensor per row (right-padded with zeros), instead of computed."""
        first = cls.capture(model, arch, 0, input_ids, attention_mask)
        h = first.hidden.new_zeros(input_ids.shape + (hidden_rows[0].shape[-1],))
        for r, x in enumerate(hidden_rows):
            h[r, :x.shape[0]] = x.to(h.device, h.dtype)
        return cls(model, arch, layer, h, first.args, first.kwargs)

    def hidden_states(self, hidden: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Final hidden states (after the last norm) under the current weights, from the
        captured input of layer ``start`` or from ``hidden``; ``kwargs`` replace captured
        keyword arguments (e.g. a fresh key/value cache)."""
        h = self.hidden if hidden is None else hidden
        kw = {**self.kwargs, **kwargs} if kwargs else self.kwargs
        for layer in self.layers:
            h = layer_output(layer(h, *self.args, **kw))
        return self.ln_f(h)

    def logits(self) -> torch.Tensor:
        """Logits under the current weights (gradients flow into layers >= ``start``)."""
        return self.head(self.hidden_states())


# --------------------------------------------------------------------------- a vector added into the stream
@dataclass
class StreamBatch:
    """The rows a :class:`StreamDelta` runs: every row's edited column is ``column``."""

    input_ids: torch.Tensor        # (B, S)
    attention_mask: torch.Tensor   # (B, S)
    position_ids: torch.Tensor     # (B, S)
    column: int                    # the column the vector is added at (the same in every row)
    #: key/value cache of the columns before ``column`` (computed on first use)
    prefix_cache: Any = None
    #: layer -> the stack above it over the columns from ``column`` and the name of the keyword
    #: argument in which the layers receive the key/value cache (captured on first use)
    stacks: dict[int, tuple[UpperStack, str | None]] | None = None


class StreamDelta:
    """Logits at chosen positions when ``delta_rows[r]`` is added to row r's residual stream
    after a decoder layer at ``batch.column`` (see the module docstring)."""

    def __init__(self, model: nn.Module, arch: ArchSpec):
        self.model = model
        self.arch = arch
        self.head = model.get_output_embeddings()
        self.verified: dict[int, bool] = {}

    @torch.no_grad()
    def _prefix_cache(self, batch: StreamBatch):
        P = batch.column
        if batch.prefix_cache is None and P > 0:
            base = getattr(self.model, "base_model", self.model)   # the decoder without the LM head
            out = base(input_ids=batch.input_ids[:, :P], attention_mask=batch.attention_mask[:, :P],
                       position_ids=batch.position_ids[:, :P], use_cache=True)
            batch.prefix_cache = out.past_key_values
        return batch.prefix_cache

    def _stack(self, layer: int, batch: StreamBatch) -> tuple[UpperStack, str | None]:
        """The stack of layers above ``layer`` over the columns from ``batch.column``, whose
        keyword arguments (mask, positions, a copy of the prefix cache) are captured once, and
        the keyword that carries the cache (each step gets a fresh copy of the prefix cache)."""
        if batch.stacks is None:
            batch.stacks = {}
        if layer not in batch.stacks:
            P = batch.column
            cache = self._prefix_cache(batch)
            passed = copy.deepcopy(cache) if cache is not None else None
            # the layers' keyword arguments are the same for every layer: capture them at layer 0
            # (only the embedding lookup runs), as UpperStack.from_hidden does
            first = UpperStack.capture(self.model, self.arch, 0, batch.input_ids[:, P:], batch.attention_mask,
                                       position_ids=batch.position_ids[:, P:], past_key_values=passed,
                                       use_cache=cache is not None)
            stack = UpperStack(self.model, self.arch, layer + 1, first.hidden, first.args, first.kwargs)
            key = next((k for k, v in stack.kwargs.items() if v is passed), None) if passed is not None else None
            if passed is not None and key is None:
                raise RuntimeError("the decoder layers do not receive the key/value cache as a keyword argument")
            batch.stacks[layer] = (stack, key)
        return batch.stacks[layer]

    def _fast(self, layer, h0, delta_rows, batch: StreamBatch, pos_rows, pos_cols) -> torch.Tensor:
        P = batch.column
        h = h0[:, P:]
        b = torch.arange(h.shape[0], device=h.device)
        h = h.index_put((b, torch.zeros_like(b)), delta_rows.to(h.dtype), accumulate=True)
        stack, cache_key = self._stack(layer, batch)
        fresh = {cache_key: copy.deepcopy(batch.prefix_cache)} if cache_key is not None else {}
        hidden = stack.hidden_states(h, **fresh)
        return self.head(hidden[pos_rows, pos_cols - P])

    def _full(self, layer, delta_rows, batch: StreamBatch, pos_rows, pos_cols) -> torch.Tensor:
        def hook(module, args, output):
            hs = layer_output(output)
            b = torch.arange(hs.shape[0], device=hs.device)
            cols = torch.full_like(b, batch.column)
            hs = hs.index_put((b, cols), delta_rows.to(hs.device, hs.dtype), accumulate=True)
            return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs

        handle = self.arch.module(self.model, "layer", layer).register_forward_hook(hook)
        try:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False).logits
        finally:
            handle.remove()
        return logits[pos_rows, pos_cols]

    def _check(self, layer, h0, delta_rows, batch, pos_rows, pos_cols) -> bool:
        with torch.no_grad():
            zero = torch.zeros_like(delta_rows)
            try:
                fast = self._fast(layer, h0, zero, batch, pos_rows, pos_cols).float()
            except Exception as e:  # an architecture or version the shortcut does not fit
                log.warning("upper-layer shortcut failed at layer %d (%s); using full forward passes", layer, e)
                return False
            full = self._full(layer, zero, batch, pos_rows, pos_cols).float()
            scale = full.abs().max().clamp(min=1.0)
            # half precision (the model's, or a caller's autocast) rounds more
            low = h0.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(h0.device.type)
            tol = 3e-2 if low else 1e-3
            ok = bool(((fast - full).abs().max() <= tol * scale).item())
        if not ok:
            log.warning("upper-layer shortcut disagrees with the full forward at layer %d; using full passes", layer)
        return ok

    def logits(self, layer: int, h0: torch.Tensor, delta_rows: torch.Tensor, batch: StreamBatch,
               pos_rows: torch.Tensor, pos_cols: torch.Tensor) -> torch.Tensor:
        """(P, V) logits at (pos_rows, pos_cols) when ``delta_rows[r]`` is added to row r's
        residual stream after ``layer`` at ``batch.column``; ``h0`` (B, S, d) is that stream
        without the vector."""
        if layer not in self.verified:
            self.verified[layer] = self._check(layer, h0, delta_rows, batch, pos_rows, pos_cols)
        if self.verified[layer]:
            return self._fast(layer, h0, delta_rows, batch, pos_rows, pos_cols)
        return self._full(layer, delta_rows, batch, pos_rows, pos_cols)
