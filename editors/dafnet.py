"""DAFNet: Dynamic Auxiliary Fusion Network for sequential editing.

Follows Zhang et al., 2024, "Dynamic Auxiliary Fusion for Sequential Editing in Large Language
Models" (Findings of ACL), official code qizhou000/DAFNet (``editors/dafnet/dafnet.py``: DAFNet,
its gradient-signal hooks, ``__update_delta_weight__``, the training step and curriculum;
``editors/dafnet/aux_model.py``: GradientTransformer; ``editors/dafnet/aux_model_modules.py``:
ExactBatchNorm1d, EditInnerAttention, EditOuterAttention, DAFNetBaseLayer;
``configs/dafnet/llama-7b.yaml``, ``configs/dafnet/gpt-j-6b.yaml``; ``train_dafnet.py``).
Shared hypernetwork plumbing (edited modules, gradient factors, running normalisation, shifts
through hooks, row batches, checkpoints) is editors/lib/hypernet.py; docs/editors-hypernet.md
("DAFNet") is the user-facing description.

The method. Like MEND, an edit starts from the rank-one factors of the fine-tuning gradient of
each edited linear module: for every real position t of ``prompt + target_new`` with a non-zero
input u_t and output gradient delta_t (the official ``g_mask``), the row ``[u_t, delta_t]``,
standardised by exact running statistics (official ``norm_layer: EBN``). One network per module
shape (shared by the modules of that shape, told apart by a learned per-module scale and shift,
the official "mode") transforms the rows of a sequence of edits. Each of its ``n_layers`` layers:

1. intra-editing attention, over the tokens of ONE edit: ``v = MLP1(x)``, a score
   ``s = MLP2(v)`` softmaxed over the edit's tokens; each token gets ``x + s*v`` (LayerNorm) and
   the edit's representation is ``sum_t s_t v_t``;
2. inter-editing attention, over the SEQUENCE of edits: each edit's representation queries the
   representations of all earlier edits (stored from previous edits: lifelong) and itself
   (causal within a batch of edits); the result is added to every token of the edit (LayerNorm);
3. the update scale: a second attention gives edit i's weight on itself, a_i; the new edit
   enters with ``a_i * prod_{j>i} (1 - a_j)`` and everything before the batch is multiplied by
   ``prod_j (1 - a_j)`` (both averaged over the layers);
4. a feed-forward block (residual, LayerNorm) and the per-module mode transform
   ``x + relu(x * scale_m + shift_m)``.

The transformed rows split into (u~, delta~); delta~ is multiplied by the edit's update scale
divided by its token count, and the module's accumulated shift becomes
``D <- past_scale * D - lr_m * sum_t delta~_t u~_t^T`` (lr_m: a learned per-module edit rate).

Edit (``edit`` / ``edit_batch``; lifelong): the weights are ``W0 + D``. The gradient factors are
taken on the UNEDITED model, as the official code does with its second model copy: here the
edited weights are set back to ``W0`` for the one forward/backward pass (exact copies kept by
``Editor.remember``), so no second copy of the model exists. Then ``W = W0 + past_scale * D + dW``
is written in place; the edit representations of every layer and module are stored for the next
edits' inter-editing attention. ``reset`` restores the weights bit for bit and clears them.

Training (``training = "pipeline"``; the loop, data order, optimiser and cache are editbench/train/):
one step edits the first n cases of the pipeline's batch as ONE sequence (the official
``edit_batch`` of n requests, inter-editing attention causal over them), with n drawn uniformly
from ``1..seq_n`` (official ParallelDataset with ``batch_size = range(1, now_seq_modeling+1)``).
The curriculum (official ``increase_seq_modeling_*``): an EMA of the loss (``ema_loss_lambda``);
when it has not reached a new minimum for ``increase_seq_modeling_i / max(1, log10(seq_n))`` steps,
``seq_n`` grows by ``max(seq_n * increase_seq_modeling_pace, 10)`` up to ``max_seq_modeling``
(which must not exceed ``train.batch_size``). The loss, on at most ``loss_sample_max_count`` of
the n cases (official sampling), with the n edits applied through forward hooks:
``relia_lambda * NLL(requests) + gen_lambda * NLL(rephrases) + loc_lambda * KL(unedited || edited)``
on the locality probes, each a token mean. The curriculum state (seq_n, EMA, its minimum, the step)
lives in buffers of the trained module, so a resumed training continues it exactly.

Official defaults followed: the network sizes (``layer_n: 2``, ``inner_att_dim: 1024``,
``ffn_dim: 1536``, ``outer_att_dim: 1024`` x 2 heads, ``outer_score_att_dim: 256`` x 2 heads, EBN),
``init_edit_lr: 1e-4``, ``edit_lr_lr: 1e-4``, ``relia/gen/loc_lambda: 0.1/0.1/0.2``, the curriculum
(``max_seq_modeling: 1000``, ``increase_seq_modeling_i: 3000``, pace 0.25, ``ema_loss_lambda: 0.01``),
``loss_sample_max_count`` (48 LLaMA, 64 GPT-J), ``aux_model_lr: 1e-6``, ``grad_clip`` 100, Adam,
and the edited modules (LLaMA-2: gate/up/down_proj of layers 29-31; GPT-J: fc_in/fc_out of
layers 25-27): conf/editor_model/dafnet/{llama2,gptj}.yaml. SmolLM2: a CPU budget
(conf/editor/dafnet.yaml).

Deviations, and why:

* No second model copy (above): same signals, half the memory, one device.
* Sign: the shift is ``-lr_m * sum delta~ u~^T`` (descent direction, as MEND's paper and
  editors/mend.py); the official code adds ``+lr * ...`` and relies on training to flip it.
* The update scales: the official code detaches them (``DAFNetModel.forward``), so the
  score attention never receives a gradient and keeps its initialisation. Followed by default
  (``scale_grad: false``); ``scale_grad: true`` lets the gradient through.
* One optimiser: the pipeline's AdamW (weight decay 0 = Adam) at ``train.lr``; the edit rates
  are stored divided by ``edit_lr_lr / train.lr`` (as MEND here) so that they move at
  ``edit_lr_lr`` per step, as with the official second optimiser. The official clips only the
  auxiliary networks' gradient at 100; the pipeline clips all trained parameters.
* The curriculum's draw of n uses the pipeline's per-step seeded RNG and n <= ``train.batch_size``
  (the pipeline hands a batch of ``batch_size`` cases; the first n are edited): resumable exactly.
* Locality KL at the locality probes' answer positions (what the harness scores), not at every
  position of the locality text; the loss samples are the same cases for reliability, generality
  and locality (the official samples each family independently).
* Running normalisation: editors/lib/hypernet.py's RunningNorm (exact, Chan's update; identity
  before two rows were seen; eps 1e-8 as the official EBN), updated with each training batch's
  factor rows before they are transformed, never at edit time.
* Training data: DAFSet's wikitext locality texts (``wiki_base``) are not used; the locality
  probes of the cases are.
* SmolLM2 budget (conf/editor/dafnet.yaml): smaller attention/FFN widths, seq_n at most 8,
  4 loss samples, a faster curriculum, ``train.lr`` 1e-4 (official 1e-6 over ~100 epochs on
  GPUs), ``loc_lambda`` 10 (official 0.2) and ``edit_lr_lr`` 2e-5 (official 1e-4): with the
  official pair, and with loc_lambda 1 or 10 at edit_lr_lr 1e-4, the learned edit rates grew
  40-66x within 300 steps and the validation locality ended at 0.34-0.71 while reliability
  reached 0.84-0.94 (docs/editors-hypernet.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from editbench.records import EditCase, EditFailed, EditRequest
from editbench.registry import register
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.hypernet import (GENERALITY, LOCALITY, REQUEST, Factors, HypernetEditor, RunningNorm, Shift,
                                  modes_per_shape, resolve_modules, shifted, stack_groups)


@dataclass
class DAFNetParams:
    modules: list[str] = field(default_factory=lambda: ["model.layers.{}.mlp.gate_proj", "mlp_in", "mlp_out"])
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    n_layers: int = 2                 # official layer_n
    inner_att_dim: int = 1024
    ffn_dim: int = 1536
    outer_att_dim: int = 1024
    outer_att_heads: int = 2
    score_att_dim: int = 256
    score_att_heads: int = 2
    scale_grad: bool = False          # official: the update scales are detached
    update_scale: str = "attention"   # attention (official: convex update scales) | none (every edit at scale 1)
    edit_lr: float = 1e-4             # official init_edit_lr
    edit_lr_lr: float = 1e-4
    relia_lambda: float = 0.1
    gen_lambda: float = 0.1
    loc_lambda: float = 0.2
    max_seq_modeling: int = 1000
    increase_seq_modeling_i: int = 3000
    increase_seq_modeling_pace: float = 0.25
    max_steps_per_seq_n: int | None = None   # budget: grow after this many steps at one seq_n even without a
                                             # plateau (null: the official plateau trigger only)
    ema_loss_lambda: float = 0.01
    loss_sample_max_count: int = 48
    chunk_size: int = 32              # rows per forward pass (memory only)
    val_seq_lens: list[int] = field(default_factory=lambda: [32])   # validation: sequences of these lengths
    cache_hidden: bool = False        # training: keep each row's input to the lowest edited layer (speed)
    init_seed: int = 0
    train: dict = field(default_factory=dict)

    def check(self, editor: str) -> None:
        problems = []
        for name in ("n_layers", "inner_att_dim", "ffn_dim", "outer_att_dim", "outer_att_heads", "score_att_dim",
                     "score_att_heads", "max_seq_modeling", "increase_seq_modeling_i", "loss_sample_max_count",
                     "chunk_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.edit_lr_lr > 0:
            problems.append(f"edit_lr_lr must be > 0, got {self.edit_lr_lr}")
        if min(self.relia_lambda, self.gen_lambda, self.loc_lambda) < 0:
            problems.append("relia_lambda, gen_lambda and loc_lambda must be >= 0")
        if not 0 < self.ema_loss_lambda <= 1:
            problems.append(f"ema_loss_lambda must be in (0, 1], got {self.ema_loss_lambda}")
        if self.update_scale not in ("attention", "none"):
            problems.append(f"update_scale must be attention or none, got '{self.update_scale}'")
        if not self.val_seq_lens or min(int(n) for n in self.val_seq_lens) < 1:
            problems.append(f"val_seq_lens must list lengths >= 1, got {list(self.val_seq_lens)}")
        if self.max_steps_per_seq_n is not None and int(self.max_steps_per_seq_n) < 1:
            problems.append(f"max_steps_per_seq_n must be >= 1 or null, got {self.max_steps_per_seq_n}")
        if self.increase_seq_modeling_pace < 0:
            problems.append(f"increase_seq_modeling_pace must be >= 0, got {self.increase_seq_modeling_pace}")
        from editbench.train import TRAIN_DEFAULTS

        batch = int((self.train or {}).get("batch_size", TRAIN_DEFAULTS["batch_size"]))
        if self.max_seq_modeling > batch:
            problems.append(f"max_seq_modeling ({self.max_seq_modeling}) must not exceed train.batch_size ({batch}): "
                            "a training step edits at most the batch's cases")
        if problems:
            raise ValueError(f"editor '{editor}': " + "; ".join(problems))


# --------------------------------------------------------------------------- the network
class EditAttention(nn.Module):
    """Multi-head attention of edit representations (queries) over a sequence of edit
    representations (keys/values). ``values=False``: only the head-averaged probabilities (the
    update-scale attention)."""

    def __init__(self, d: int, heads: int, dim: int, values: bool):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.q = nn.Linear(d, heads * dim)
        self.k = nn.Linear(d, heads * dim)
        if values:
            self.v = nn.Linear(d, heads * dim)
            self.o = nn.Linear(heads * dim, d)

    def probs(self, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(heads, n, m) attention of the n queries ``x`` over the m keys ``y``."""
        q = self.q(x).view(x.shape[0], self.heads, self.dim).transpose(0, 1)
        k = self.k(y).view(y.shape[0], self.heads, self.dim).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.dim)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        p = self.probs(x, y, allowed)
        v = self.v(y).view(y.shape[0], self.heads, self.dim).transpose(0, 1)
        return self.o((p @ v).transpose(0, 1).reshape(x.shape[0], -1))


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of ``scores`` (L,) within each segment ``seg`` (L,) of ``n`` segments."""
    top = scores.new_full((n,), float("-inf")).scatter_reduce(0, seg, scores.detach(), "amax", include_self=True)
    e = torch.exp(scores - top[seg])
    total = torch.zeros(n, dtype=e.dtype, device=e.device).index_add(0, seg, e)
    return e / total[seg]


def update_scales(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each new edit's self-attention a_i (n,): the scale of edit i, ``a_i prod_{j>i}(1-a_j)``,
    and the scale of everything before the batch, ``prod_j (1-a_j)``."""
    keep = torch.flip(torch.cumprod(torch.flip(1 - a, [0]), 0), [0])   # keep[i] = prod_{j>=i} (1 - a_j)
    later = torch.cat([keep[1:], keep.new_ones(1)])
    return a * later, keep[0]


class DAFNetLayer(nn.Module):
    """One layer: intra-editing attention, inter-editing attention, update scale, FFN, mode."""

    def __init__(self, d: int, hp: DAFNetParams, n_modes: int):
        super().__init__()
        self.inner_value = nn.Sequential(nn.Linear(d, hp.inner_att_dim), nn.ReLU(), nn.Linear(hp.inner_att_dim, d))
        self.inner_score = nn.Sequential(nn.Linear(d, hp.inner_att_dim), nn.ReLU(), nn.Linear(hp.inner_att_dim, 1))
        self.outer = EditAttention(d, hp.outer_att_heads, hp.outer_att_dim, values=True)
        self.outer_score = EditAttention(d, hp.score_att_heads, hp.score_att_dim, values=False)
        self.ffn = nn.Sequential(nn.Linear(d, hp.ffn_dim), nn.ReLU(), nn.Linear(hp.ffn_dim, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.mode_scale = nn.Parameter(torch.ones(n_modes, d))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, d))

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n: int, past: torch.Tensor, mode: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (L, d) token rows of n edits (``seg``: edit of each row); past (P, d) earlier edits'
        representations. Returns (x', this layer's edit representations (n, d), a (n,))."""
        v = self.inner_value(x)
        w = segment_softmax(self.inner_score(v)[:, 0], seg, n)
        wv = v * w[:, None]
        rep = torch.zeros(n, x.shape[1], dtype=wv.dtype, device=wv.device).index_add(0, seg, wv)
        x = self.norm1(x + wv)
        keys = torch.cat([past.to(rep.dtype), rep])
        p_n = past.shape[0]
        allowed = torch.arange(p_n + n, device=x.device)[None, :] <= (p_n + torch.arange(n, device=x.device))[:, None]
        x = self.norm2(x + self.outer(rep, keys, allowed)[seg])
        a = self.outer_score.probs(rep, keys, allowed).mean(0)[torch.arange(n, device=x.device),
                                                               p_n + torch.arange(n, device=x.device)]
        x = self.norm3(x + self.ffn(x))
        x = x + (x * self.mode_scale[mode] + self.mode_shift[mode]).clamp(min=0)
        return x, rep, a


class DAFNetwork(nn.Module):
    """The auxiliary network of one module shape: (u, delta) rows of a sequence of edits ->
    (u~, scaled delta~), the scale of the past shift and the new edit representations."""

    def __init__(self, d_in: int, d_out: int, hp: DAFNetParams, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.scale_grad = bool(hp.scale_grad)
        self.update_scale = str(hp.update_scale)
        self.norm = RunningNorm(d_in + d_out, eps=1e-8)
        self.layers = nn.ModuleList([DAFNetLayer(d_in + d_out, hp, n_modes) for _ in range(hp.n_layers)])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, lens: torch.Tensor, mode: int,
                past: Sequence[torch.Tensor] | None = None):
        """u (L, d_in), delta (L, d_out): the rows of n = len(lens) edits in order; ``past``: per
        layer (P, d) representations of earlier edits (None: none). Returns (u~ (L, d_in),
        delta~ (L, d_out) times each edit's update scale / its row count, past scale (scalar),
        per layer the (P + n, d) representations to keep, the update scales (n,)).

        ``update_scale: none`` (the variant ``dafnet[additive]``): every edit enters at scale 1
        and the past is kept at scale 1 (the shifts add up); the network is otherwise the same."""
        n = int(lens.shape[0])
        d = self.d_in + self.d_out
        seg = torch.repeat_interleave(torch.arange(n, device=u.device), lens.to(u.device))
        x = self.norm(torch.cat([u, delta], -1))
        if past is None:
            past = [x.new_zeros(0, d) for _ in self.layers]
        scales, pasts, reps = [], [], []
        for layer, pr in zip(self.layers, past):
            x, rep, a = layer(x, seg, n, pr, mode)
            s, p = update_scales(a)
            scales.append(s)
            pasts.append(p)
            reps.append(torch.cat([pr.to(rep.dtype), rep]).detach())
        scale = torch.stack(scales).mean(0)
        past_scale = torch.stack(pasts).mean(0)
        if self.update_scale == "none":
            scale, past_scale = torch.ones_like(scale), torch.ones_like(past_scale)
        if not self.scale_grad:
            scale, past_scale = scale.detach(), past_scale.detach()
        per_row = (scale / lens.to(scale.device).clamp(min=1).to(scale.dtype))[seg]
        u_t, d_t = x.split([self.d_in, self.d_out], -1)
        return u_t, d_t * per_row[:, None], past_scale, reps, scale


# --------------------------------------------------------------------------- the editor
#: index of each curriculum value in the ``curriculum`` buffer (GROWN_STEP: the step of the last growth)
SEQ_N, EMA, MIN_EMA, MIN_EMA_STEP, STEP, GROWN_STEP = range(6)


@register("dafnet")
class DAFNet(HypernetEditor):
    params_cls: ClassVar[type] = DAFNetParams
    supports_batch: ClassVar[bool] = True
    inference_only: ClassVar[tuple[str, ...]] = ("chunk_size", "cache_hidden", "val_seq_lens")
    positions: ClassVar[str] = "all"   # official g_mask: every position with non-zero u and delta

    def __init__(self, model, tokenizer, arch, cfg):
        Editor.__init__(self, model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(DAFNetParams, cfg, self.name)
        self.hp.check(self.name)
        self.modules = resolve_modules(model, arch, list(self.hp.modules), list(self.hp.layers), self.name)
        self.lowest = min(m.layer for m in self.modules)
        self._hidden_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        #: module name -> per network layer, the representations of the edits so far
        self._reps: dict[str, list[torch.Tensor]] = {}
        self.hyper = nn.Module()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.hp.init_seed))
            self.hyper.nets = nn.ModuleDict({shape: DAFNetwork(d_in, d_out, self.hp, n)
                                             for shape, (d_in, d_out, n) in modes_per_shape(self.modules).items()})
        self.hyper.edit_lrs = nn.Parameter(torch.full((len(self.modules),),
                                                      self.hp.edit_lr / self.lr_scale(self.hp.edit_lr_lr)))
        self.hyper.register_buffer("curriculum", torch.tensor([1.0, 1.0, 10.0, 0.0, 0.0, 0.0],
                                                                    dtype=torch.float64))
        self.hyper.to(self._net_device()).eval()

    # ------------------------------------------------------------------ the shift
    def edit_lrs(self) -> torch.Tensor:
        return self.hyper.edit_lrs * self.lr_scale(self.hp.edit_lr_lr)

    def transform(self, factors: Sequence[Factors], index: int, past: Sequence[torch.Tensor] | None = None):
        """Module ``self.modules[index]``, the edits ``factors`` in order: (left (T, d_in),
        right (T, d_out)) with ``dW = right^T left``, the past scale, the representations and
        the edits' update scales (n,)."""
        m = self.modules[index]
        dev = self.hyper.edit_lrs.device
        us = [f[m.name][0].to(dev) for f in factors]
        ds = [f[m.name][1].to(dev) for f in factors]
        lens = torch.tensor([u.shape[0] for u in us], device=dev)
        u_t, d_t, past_scale, reps, scale = self.hyper.nets[m.shape](torch.cat(us), torch.cat(ds), lens, m.mode, past)
        return u_t, -self.edit_lrs()[index] * d_t, past_scale, reps, scale

    def make_shifts(self, factors: Sequence[Factors], groups: Sequence[Sequence[int]]) -> dict[str, Shift]:
        """Group g = the requests ``groups[g]`` edited as one sequence (no earlier edits)."""
        out = {}
        for i, m in enumerate(self.modules):
            parts = [self.transform([factors[j] for j in g], i)[:2] for g in groups]
            out[m.name] = stack_groups([p[0] for p in parts], [p[1] for p in parts])
        return out

    def loss_weights(self) -> tuple[float, float]:   # HypernetEditor's interface; DAFNet has three
        return self.hp.relia_lambda, self.hp.loc_lambda

    # ------------------------------------------------------------------ editing
    @torch.no_grad()
    def edit(self, request: EditRequest) -> dict[str, Any]:
        return self.edit_batch([request])

    @torch.no_grad()
    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        params = self.remember([m.weight for m in self.modules])
        current = [p.detach().clone() for p in params]
        new: list[torch.Tensor] = []
        reps: dict[str, list[torch.Tensor]] = {}
        past_scales, edit_scales = [], []
        try:
            for m, p in zip(self.modules, params):     # the gradient signal comes from the unedited model
                p.copy_(self._originals[m.weight])
            factors = self.request_factors(requests)
            for i, (m, cur) in enumerate(zip(self.modules, current)):
                left, right, past_scale, reps[m.name], scale = self.transform(factors, i, self._reps.get(m.name))
                edit_scales.append(scale.float().cpu())
                w0 = self.arch.weight_out_in(self._originals[m.weight]).float()
                now = self.arch.weight_out_in(cur).float()
                w = w0 + float(past_scale) * (now - w0) + (right.T @ left).to(w0.device, torch.float32)
                if not bool(torch.isfinite(w).all()):
                    raise EditFailed(f"editor '{self.name}': the weight shift of {m.name} is not finite")
                new.append(w)
                past_scales.append(float(past_scale))
        except BaseException:
            for p, cur in zip(params, current):
                p.copy_(cur)
            raise
        change = []
        for m, p, cur, w in zip(self.modules, params, current, new):
            self.arch.weight_out_in(p).copy_(w.to(p.dtype))
            change.append((p.float() - cur.float()).norm())
        self._reps.update(reps)
        # the update scales (means over the edited modules): what the past shift was multiplied by, and
        # the scale of the last edit of the call (for one edit: its own share, a)
        return {"shift_norm": float(torch.stack(change).norm()), "past_scale": sum(past_scales) / len(past_scales),
                "edit_scale": float(torch.stack(edit_scales).mean(0)[-1]),
                "factor_rows": int(sum(f[self.modules[0].name][0].shape[0] for f in factors))}

    def reset(self) -> None:
        self._reps.clear()
        super().reset()

    def stats(self) -> dict[str, float]:
        return {"edits_remembered": float(self._reps[self.modules[0].name][0].shape[0]) if self._reps else 0.0}

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Sequence[EditCase]) -> tuple[torch.Tensor, dict[str, float]]:
        """The first n cases of the batch edited as one sequence (n ~ U{1..seq_n}, the curriculum),
        then the weighted reliability / generality NLL and locality KL on at most
        ``loss_sample_max_count`` of them, with the edits applied through forward hooks."""
        cur = self.hyper.curriculum
        seq_n = max(1, min(int(cur[SEQ_N]), len(batch)))
        n = int(torch.randint(1, seq_n + 1, ()).item())
        cases = list(batch[:n])
        k = min(n, self.hp.loss_sample_max_count)
        pick = sorted(torch.randperm(n)[:k].tolist())
        factors, _ = self._factors(self._batches(cases, [REQUEST], cached=True), n)
        if self.hyper.training:
            self.update_norms(factors)
        shifts = self.make_shifts(factors, [list(range(n))])
        head = self.arch.module(self.model, "lm_head")
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for b in self._batches([cases[i] for i in pick], [REQUEST, GENERALITY, LOCALITY], cached=True):
            kind = b.kind[0]
            if kind == LOCALITY:
                with torch.no_grad():
                    ref = torch.log_softmax(b.logits_at(head), -1)
            with shifted(self.model, shifts, torch.zeros_like(b.case)):
                logp = torch.log_softmax(b.logits_at(head), -1)
            if kind == LOCALITY:
                part = (ref.exp() * (ref - logp)).sum()
            else:
                part = -logp.gather(-1, b.rows.target[:, None]).sum()
            sums[kind] = sums.get(kind, 0) + part
            counts[kind] = counts.get(kind, 0) + int(b.rows.target.numel())
        weights = {REQUEST: self.hp.relia_lambda, GENERALITY: self.hp.gen_lambda, LOCALITY: self.hp.loc_lambda}
        means = {kind: sums[kind] / counts[kind] for kind in sums}
        loss = sum((weights[kind] * means[kind] for kind in means), torch.zeros((), device=self._net_device()))
        if self.hyper.training:
            self.advance_curriculum(float(loss.detach()))
        part = {kind: float(v.detach()) for kind, v in means.items()}
        logs = {"rel": part.get(REQUEST, 0.0), "gen": part.get(GENERALITY, 0.0), "loc": part.get(LOCALITY, 0.0),
                "n_edits": float(n),
                "seq_n": float(self.hyper.curriculum[SEQ_N]), "edit_lr_mean": float(self.edit_lrs().detach().mean())}
        return loss, logs

    @torch.no_grad()
    def advance_curriculum(self, loss: float) -> None:
        """The official schedule of the number of sequential edits modelled in a step (grow when the
        loss EMA has made no new minimum for a while), plus, when ``max_steps_per_seq_n`` is set, a
        growth after that many steps at one ``seq_n`` (a budget: the plateau may not come in time)."""
        c = self.hyper.curriculum
        c[STEP] += 1
        c[EMA] += (loss - c[EMA]) * self.hp.ema_loss_lambda
        if c[EMA] < c[MIN_EMA]:
            c[MIN_EMA] = c[EMA]
            c[MIN_EMA_STEP] = c[STEP]
        seq_n = float(c[SEQ_N])
        plateau = c[STEP] - c[MIN_EMA_STEP] > self.hp.increase_seq_modeling_i / max(1.0, math.log10(seq_n))
        cap = self.hp.max_steps_per_seq_n
        if plateau or (cap is not None and c[STEP] - c[GROWN_STEP] >= int(cap)):
            if seq_n < self.hp.max_seq_modeling:
                grown = seq_n + int(max(seq_n * self.hp.increase_seq_modeling_pace, 10))
                c[SEQ_N] = min(self.hp.max_seq_modeling, grown)
                c[EMA] += 0.3
                c[MIN_EMA] = 10.0
                c[MIN_EMA_STEP] = c[STEP]
                c[GROWN_STEP] = c[STEP]

    @torch.no_grad()
    def validation_metrics(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """T=1 figures of :class:`HypernetEditor` (each case edited alone), plus, for each length L of
        ``val_seq_lens``, the held-out cases cut into chunks of L edited as ONE sequence (the lifelong
        form: the same shifts as L one-by-one edits): ``seq{L}_reliability`` (token accuracy on the
        chunk's requests) and ``seq{L}_locality`` (argmax agreement with the unedited model on its
        locality probes). ``seq_reliability`` / ``seq_locality``: those of the longest L that fits."""
        out = super().validation_metrics(cases)
        head = self.arch.module(self.model, "lm_head")
        lens = sorted({min(int(n), len(cases)) for n in self.hp.val_seq_lens if len(cases) > 0})
        for length in lens:
            hits: dict[str, list[torch.Tensor]] = {REQUEST: [], LOCALITY: []}
            for start in range(0, len(cases) - length + 1, length):
                chunk = list(cases[start:start + length])
                batches = self._batches(chunk, [REQUEST, LOCALITY], cached=True)
                factors, refs = self._factors(batches, len(chunk))
                shifts = self.make_shifts(factors, [list(range(len(chunk)))])
                for b, ref in zip(batches, refs):
                    with shifted(self.model, shifts, torch.zeros_like(b.case)):
                        arg = b.logits_at(head).argmax(-1)
                    want = ref.argmax(-1) if ref is not None else b.rows.target
                    hits[b.kind[0]].append((arg == want).float())
            for kind, name in ((REQUEST, "reliability"), (LOCALITY, "locality")):
                if hits[kind]:
                    out[f"seq{length}_{name}"] = float(torch.cat(hits[kind]).mean())
        if lens:
            for name in ("reliability", "locality"):
                if f"seq{lens[-1]}_{name}" in out:
                    out[f"seq_{name}"] = out[f"seq{lens[-1]}_{name}"]
        return out
