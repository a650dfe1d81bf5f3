"""GRACE: a discrete key-value codebook around one layer of a frozen model.

Follows Hartvigsen et al. (NeurIPS 2023), "Aging with GRACE: Lifelong Model Editing with
Discrete Key-Value Adaptors", official code Thartvigsen/GRACE (``grace/editors/grace.py``)
and its LLM port in zjunlp/EasyEdit (``easyeditor/models/grace/GRACE.py``,
``hparams/GRACE/{llama-7b,gpt-j-6b}.yaml``):

* An adaptor wraps one module (``module`` at ``layer``; official: an MLP output
  projection of a late layer: LLaMA-2-7B ``model.layers.27.mlp.down_proj``, GPT-J
  ``transformer.h.25.mlp.fc_out``). Its codebook holds keys (the module's *input* at
  the last prompt token of an edit), values (vectors that *replace* the module's
  output), a deferral radius per key and the label (target tokens) of each key.
* Edit (codebook rules of the official code): the query is the module input at the
  last prompt token. Empty codebook or nearest key farther than ``eps`` + its radius:
  add a key with radius ``eps``. Nearest key within reach but with another label:
  add the key and *split*: both radii become half the distance (the old one minus
  1e-5). Same label: *expand* the nearest key's radius to the distance (``coverage``;
  ``moving_average`` also moves the key halfway) and train its value further.
* The value being trained (``cold``: uniform random init; ``warm``: the module's output
  at the key) is optimised with Adam (``edit_lr`` 1.0, ``n_iter`` steps, official: no
  early stop) on the cross entropy of the target tokens, teacher forced.

Where the replacement applies (the decision that makes GRACE scorable under the
harness's teacher-forced protocol; docs/editors-memory.md). ``editor.logits`` receives
prompt + target tokens and no prompt boundary, so the adaptor does not look for one:
*every position is its own query*. At each real (unpadded) position the module input is
compared with every key; positions whose nearest key is within that key's radius get the
key's value (``replace_last``). Because the model is causal, the module input at a
position depends only on the tokens up to it, so the decision at the last prompt token
is exactly the decision of the edit (no target token leaks into it), target positions
are replaced only if their own inputs fall within a radius, and a query gives the same
decisions alone or in any padded batch. ``replace_all`` additionally gives every later
position of the row the value of the most recent hit (the causal reading of the
official ``replace_all``, which replaced the whole sequence once the query matched:
replacing positions before a hit would let later tokens decide about earlier ones). The
value is trained under the very same rule, so training and scoring see the same model.
In the official code the query is one token index (``key_id``) passed from outside,
stale between an edit and the next evaluation; EasyEdit therefore scores GRACE by
generation only.

Deviations (all for the protocol or for speed; none changes the algorithm):
* labels are compared as target token sequences (official: the mean of the label tensor);
* only the trained key's value receives gradients (official: Adam over every value, of
  which only the chosen one gets a gradient for a single edit: the same thing);
* a value is trained by re-running only the layers from ``layer`` up: the layers below
  are run once per edit without gradients (:class:`editors.lib.forward.UpperStack`), and
  the LM head is applied only at the target positions. Same loss, same gradients, fewer FLOPs;
* ``early_stop_loss`` (default null: off, as officially) may stop training early;
* the adversarial value training (``val_train: adv``) of the paper's code is not offered
  (off in every official config).

Defaults: conf/editor/grace.yaml (SmolLM2-135M and tiny models, tuned here) and
conf/editor_model/grace/{llama2,gptj}.yaml (EasyEdit's official values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editbench.registry import register
from editbench.scoring import encode, model_logits
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.forward import UpperStack
from editors.lib.precision import check_autocast, mixed_precision
from editors.lib.swap import ModuleSwap


@dataclass
class GraceParams:
    layer: int = 27
    module: str = "mlp_out"
    eps: float = 1.0
    edit_lr: float = 1.0
    n_iter: int = 50
    replacement: str = "replace_last"
    val_init: str = "cold"
    eps_expand: str = "coverage"
    dist_fn: str = "euc"
    early_stop_loss: float | None = None
    #: null (float32) | bfloat16: the value training's forward passes in half precision
    #: (editors.lib.precision.mixed_precision); the value and Adam stay float32
    autocast: str | None = None

    def __post_init__(self):
        check_autocast("grace", self.autocast)
        self.eps, self.edit_lr = float(self.eps), float(self.edit_lr)  # `editor.eps=1` is an int
        checks = {"replacement": ("replace_last", "replace_all"), "val_init": ("cold", "warm"),
                  "eps_expand": ("coverage", "moving_average"), "dist_fn": ("euc",)}
        for name, valid in checks.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"editor 'grace': {name} must be one of {', '.join(valid)}, "
                                 f"got '{getattr(self, name)}'")
        if self.eps <= 0 or self.n_iter < 1:
            raise ValueError(f"editor 'grace': eps must be > 0 and n_iter >= 1 (got {self.eps}, {self.n_iter})")


class GraceCodebook(nn.Module):
    """The adaptor: the wrapped module plus a codebook of (key, value, radius, label).

    Keys, values and radii are plain tensors (not parameters): the model's parameters
    are untouched, and the codebook leaves with the adaptor on reset.
    """

    def __init__(self, inner: nn.Module, replacement: str):
        super().__init__()
        self.inner = inner
        self.replacement = replacement
        self.keys = torch.empty(0, 0)
        self.values = torch.empty(0, 0)
        self.radii = torch.empty(0)
        self.labels: list[tuple[int, ...]] = []
        #: (batch, seq) bool of real tokens, set by the editor around a scoring call
        self.row_mask: torch.Tensor | None = None
        #: (slot, value) while a value is being trained
        self.trainable: tuple[int, torch.Tensor] | None = None
        #: when True, forward keeps its input and the inner output (for the edit's query)
        self.record = False
        self.last_input: torch.Tensor | None = None
        self.last_inner: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ lookup
    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit, slot) per position of ``x`` (batch, seq, key_dim): whether the position's
        output is replaced, and by which key's value."""
        b, s, d = x.shape
        dist = torch.cdist(x.reshape(-1, d).float(), self.keys)
        nearest, slot = dist.min(-1)
        hit = (nearest <= self.radii[slot]).view(b, s)
        slot = slot.view(b, s)
        if self.row_mask is not None:
            hit = hit & self.row_mask
        if self.replacement == "replace_all":
            pos = torch.arange(s, device=x.device).expand(b, s)
            last_hit = torch.where(hit, pos, torch.full_like(pos, -1)).cummax(-1).values
            slot = slot.gather(1, last_hit.clamp(min=0))
            hit = last_hit >= 0
            if self.row_mask is not None:
                hit = hit & self.row_mask
        return hit, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.record:
            self.last_input, self.last_inner = x.detach(), out.detach()
        if len(self) == 0:
            return out
        hit, slot = self.lookup(x)
        if self.trainable is None and not bool(hit.any()):
            return out
        values = self.values
        if self.trainable is not None:
            k, v = self.trainable
            values = values.index_put((torch.tensor([k], device=values.device),), v[None])
        return torch.where(hit[..., None], values[slot].to(out.dtype), out)

    # ------------------------------------------------------------------ codebook rules
    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...]) -> int:
        if len(self) == 0:
            self.keys, self.values = key[None].clone(), value[None].clone()
            self.radii = torch.tensor([radius], device=key.device)
        else:
            self.keys = torch.cat([self.keys, key[None]])
            self.values = torch.cat([self.values, value[None]])
            self.radii = torch.cat([self.radii, torch.tensor([radius], device=key.device)])
        self.labels.append(label)
        return len(self) - 1

    def update(self, query: torch.Tensor, label: tuple[int, ...], eps: float, new_value: torch.Tensor,
               eps_expand: str) -> tuple[int, str, float]:
        """Apply GRACE's codebook rule for an edit; return (slot to train, action, distance)."""
        if len(self) == 0:
            return self._append(query, new_value, eps, label), "add", float("inf")
        dist = (self.keys - query[None]).norm(dim=-1)
        d, j = dist.min(0)
        d, j = float(d), int(j)
        if d > eps + float(self.radii[j]):
            return self._append(query, new_value, eps, label), "add", d
        if self.labels[j] != label:
            slot = self._append(query, new_value, eps, label)
            self.radii[j] = d / 2 - 1e-5
            self.radii[slot] = d / 2
            return slot, "split", d
        if d > float(self.radii[j]):
            if eps_expand == "moving_average":
                self.keys[j] = 0.5 * self.keys[j] + 0.5 * query
            self.radii[j] = d
            return j, "expand", d
        return j, "covered", d


@register("grace")
class Grace(Editor):
    custom_logits = True   # the codebook reads each query's attention mask in logits()
    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(GraceParams, cfg, "grace")
        self.module_name = arch.name(self.hp.module, self.hp.layer)
        #: the codebook around the module, installed by the first edit and discarded by reset
        self._swap: ModuleSwap[GraceCodebook] = ModuleSwap(
            model, self.module_name, lambda inner: GraceCodebook(inner, self.hp.replacement))

    # ------------------------------------------------------------------ wrapper
    @property
    def book(self) -> GraceCodebook | None:
        return self._swap.wrapper

    def reset(self) -> None:
        self._swap.discard()
        super().reset()

    def stats(self):
        return {"codebook_size": float(len(self.book) if self.book is not None else 0)}

    def logits(self, input_ids, attention_mask, prompt_len=None):
        if self.book is None:
            return model_logits(self.model, input_ids, attention_mask)
        self.book.row_mask = attention_mask.bool()
        try:
            return model_logits(self.model, input_ids, attention_mask)
        finally:
            self.book.row_mask = None

    # ------------------------------------------------------------------ edit
    def edit(self, request):
        hp = self.hp
        book = self._swap.install()
        enc = encode(self.tok, request.prompt, request.target_new)
        ids = torch.tensor([enc.ids], device=self.device)
        targets = torch.tensor(enc.target_ids, device=self.device)
        key_pos = enc.start - 1

        # Layers below `layer` are frozen: run them once and keep what enters `layer`;
        # one pass through the layers above records the query (the module's input).
        stack = UpperStack.capture(self.model, self.arch, hp.layer, ids, torch.ones_like(ids))
        book.record = True
        try:
            with torch.no_grad():
                stack.hidden_states()
        finally:
            book.record = False
        query = book.last_input[0, key_pos].float()
        if hp.val_init == "cold":
            init = torch.rand(book.last_inner.shape[-1], device=query.device)
        else:
            init = book.last_inner[0, key_pos].float()
        book.last_input = book.last_inner = None
        slot, action, dist = book.update(query, tuple(enc.target_ids), hp.eps, init, hp.eps_expand)

        value = nn.Parameter(book.values[slot].clone())
        opt = torch.optim.Adam([value], lr=hp.edit_lr)
        cols = torch.arange(enc.start - 1, len(enc.ids) - 1, device=self.device)
        rows = torch.zeros_like(cols)
        book.trainable = (slot, value)
        steps, loss_value = 0, float("nan")
        try:
            # bfloat16 autocast (hp.autocast): the layers from the edited one and the head in half
            # precision for the whole loop; the trained value and Adam stay float32
            with mixed_precision(self.model, self.arch, hp.layer, hp.autocast):
                with torch.enable_grad():
                    for steps in range(1, hp.n_iter + 1):
                        logits = stack.head(stack.hidden_states()[rows, cols])
                        loss = F.cross_entropy(logits.float(), targets)
                        loss_value = loss.item()
                        if hp.early_stop_loss is not None and loss_value < hp.early_stop_loss:
                            break
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
        finally:
            book.trainable = None
            book.values[slot] = value.detach().to(book.values.dtype)
        return {"action": action, "distance": dist, "codebook_size": len(book), "steps": steps,
                "final_loss": loss_value}
