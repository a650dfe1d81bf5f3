"""WISE: a side memory for the edits, an activation router, knowledge shards and their merge.

Follows Wang et al. (NeurIPS 2024), "WISE: Rethinking the Knowledge Memory for Lifelong Model
Editing of Large Language Models", official code zjunlp/EasyEdit (``easyeditor/models/wise/
{WISE.py,utils.py,merge/gta.py,merge/utils.py}``, defaults ``hparams/WISE/{llama-7b,gpt-j-6B}.yaml``).

* **Side memory.** One FFN output projection (``module: mlp_out`` at ``layer``: LLaMA-2
  ``model.layers.27.mlp.down_proj``, GPT-J ``transformer.h.21.mlp.fc_out``) is wrapped
  (:class:`WiseFFN`). The wrapped module is the *main memory* and is never changed; edits go
  to a copy of its weight, the *side memory* (``W'``).
* **Edit** (official ``WISE.edit``). The batch holds the edit under each context template
  (``'{}'`` plus, per length in ``context_lengths`` (official [5, 10]), one greedy continuation
  of each of "I", "You", "Because", "Yes", "Q: " generated once by the unedited model: 11 rows)
  and one unrelated training text (a locality prompt with its answer from the train split,
  the k-th for the k-th edit, as the official ``loc_prompt``; :meth:`Wise.fit`). While it is
  trained, the side memory answers every position of every row. Loss = cross entropy of the
  target tokens (``only_label``) + the margin losses on the *activation score*
  ``Δ(x) = ||act(W'x) - act(Wx)||`` (``act``: the model's hidden activation, as official)
  averaged over a row's tokens: ``mean⁺(Δ_out - Δ_in + γ) + mean⁺(Δ_out - α) + mean⁺(β - Δ_in)``
  (``act_margin: [α, β, γ]``; ``Δ_in`` per template row, ``Δ_out`` the unrelated row, ``mean⁺``
  the mean of the positive entries, 0 if none). SGD (``edit_lr`` 1.0, weight decay 1e-5),
  ``n_iter`` (70) steps with the official early stop (loss change <= 1e-4 and loss <= 0.02);
  each gradient is multiplied by the shard's random mask (each entry 1 with probability
  ``mask_ratio``, 0.2, drawn at the shard's first edit); after each step ``W'`` is clamped to
  ``W ± norm_constraint`` (1.0). The edit's activation is the router's score of the edit's
  own prompt (the row without template) where it decides the first target token, at the last
  forward pass (official: the mean template-row ``Δ_in`` over all positions); the shard keeps
  the minimum over its edits.
* **Router.** At inference the score of a side memory is ``Δ`` averaged over the query's
  tokens (the maximum for queries over 100 tokens, as official); a side memory answers if its
  score reaches ``act_ratio`` (0.88) x its shard's minimum edit activation. With several side
  memories (official order): the current shard if it passes, then each saved memory that
  passes its own threshold *and* beats the best score so far; else the main memory.
* **Shards and merge.** Every ``save_freq`` (500) edits the current side memory is saved and a
  fresh copy of ``W`` (with a fresh mask) takes the next edits; every ``merge_freq`` (1000)
  edits the last ``merge_freq / save_freq`` saved memories are Ties-merged into one
  (:func:`ties_merge`: task vectors ``W_i - W`` trimmed to the ``densities`` (0.53) largest
  magnitudes, weighted ``weights / n``, majority sign by the sum, disjoint mean of the agreeing
  entries), whose threshold is the minimum of theirs (``retrieve: true``, WISE-Retrieve, the
  official default). ``retrieve: false`` (WISE-Merge): every saved shard is merged into one
  merged side memory (with the earlier merge at weight 0.6 and the new shards sharing 0.4),
  the router compares the merged and the current side memory against one threshold (the
  minimum over all edits), and, as officially, the first forward pass after editing with at
  least ``save_freq`` edits merges the unsaved shard too.

Where the router decides (the harness's teacher-forced protocol; docs/editors-memory.md).
Officially one decision is taken per input sequence from the mean over *all* its tokens, and
EasyEdit feeds prompt + target, so the target tokens vote on the route of the prompt's
positions. Here the decision is causal: at each real position the score is the running mean
of ``Δ`` over the row's real tokens up to that position (``prefix mean``), so the prediction of
a token depends only on the tokens before it (the last prompt token decides from the prompt
alone, no target leaks into the route of the first target token), teacher forcing routes
exactly as step-by-step generation does, and a query gives the same decisions alone or in a
right- or left-padded batch: the wrapper reads the padding mask from the model's own forward
call (a pre-hook on ``model.base_model`` that only reads ``attention_mask``). The model's
normal forward pass does everything (no ``custom_logits``). Positions routed to the main
memory get the wrapped module's own output tensor values, so a query no side memory claims is
answered bit for bit by the unedited model.

Deviations (none changes the algorithm):
* the router's causal prefix mean over real tokens (above) instead of one decision per batch
  from the mean over every position of the batch (official; its batches hold one query), and,
  to match it, the edit's activation (the threshold's base) taken as that router score of the
  edit's own prompt instead of the mean over the template rows and all their positions;
* the margin losses and the edit activation average ``Δ`` over real tokens (official: over all
  positions of the padded batch, padding included); the cross entropy is the mean over each
  row's target tokens, then over rows (official divides by a span that also counts a few
  prompt and padding positions);
* the side memories are float32 (in half-precision models an SGD step at lr 1 would round, as
  docs/editors.md explains for the weight editors) and keep the projection's bias (official:
  ``F.linear`` without it, so GPT-J's unedited side memory differs from ``fc_out`` by the bias);
* the context templates are generated without padding, one starting word at a time;
* only the layers from ``layer`` up are re-run at each step (the layers below run once per
  edit without gradients, :class:`editors.lib.forward.UpperStack`), the LM head only at target
  positions: same loss and gradients;
* not offered: ``replay`` (off in every official config), merge algorithms other than ``ties``,
  the subject act-mask branch (official only when the unrelated text is a substring of the
  prompt), ``save_path``/``load_path``.

Defaults: conf/editor/wise.yaml (SmolLM2-135M: norm_constraint, act_margin and act_ratio chosen on
CounterFact validation cases only, the rest set by hand; docs/editors-memory.md, "WISE"),
conf/editor_model/wise/{llama2,gptj}.yaml (official EasyEdit values),
conf/editor_model/wise/tiny.yaml (the tiny random test models).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from editbench.editor import Editor, hparams_from_cfg
from editbench.registry import register
from editbench.scoring import PlainLogits, encode, greedy_generate, model_logits_at, pad_batch
from editors.lib.forward import UpperStack
from editors.lib.swap import ModuleSwap

#: official context-template starts (EasyEdit ``get_context_templates``)
TEMPLATE_STARTS = ("I", "You", "Because", "Yes", "Q: ")
#: official EarlyStopMeter: stop when the loss changed by at most this much and is at most STOP_LOSS
STOP_DELTA, STOP_LOSS = 1e-4, 0.02
#: official: queries longer than this are scored by their largest Δ instead of the mean
LONG_QUERY = 100


@dataclass
class WiseParams:
    layer: int = 27
    module: str = "mlp_out"
    mask_ratio: float = 0.2
    edit_lr: float = 1.0
    n_iter: int = 70
    norm_constraint: float | None = 1.0
    act_margin: list = field(default_factory=lambda: [5.0, 20.0, 10.0])
    act_ratio: float = 0.88
    save_freq: int = 500
    merge_freq: int = 1000
    merge_alg: str = "ties"
    densities: float = 0.53
    weights: float = 1.0
    retrieve: bool = True
    weight_decay: float = 1e-5
    context_lengths: list = field(default_factory=lambda: [5, 10])

    def __post_init__(self):
        for f in ("mask_ratio", "edit_lr", "act_ratio", "densities", "weights", "weight_decay"):
            setattr(self, f, float(getattr(self, f)))   # `editor.edit_lr=1` on the command line is an int
        if self.norm_constraint is not None:
            self.norm_constraint = float(self.norm_constraint)
        bad = lambda msg: ValueError(f"editor 'wise': {msg}")  # noqa: E731
        if len(list(self.act_margin)) != 3:
            raise bad(f"act_margin must be [alpha, beta, gamma] (3 numbers), got {list(self.act_margin)}")
        self.act_margin = [float(v) for v in self.act_margin]
        if not 0 < self.mask_ratio <= 1:
            raise bad(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 < self.densities <= 1:
            raise bad(f"densities must be in (0, 1], got {self.densities}")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise bad(f"merge_freq ({self.merge_freq}) must be a positive multiple of save_freq ({self.save_freq})")
        if self.merge_alg != "ties":
            raise bad(f"merge_alg must be ties (the official default; others are not offered), got '{self.merge_alg}'")
        if self.n_iter < 1 or self.edit_lr <= 0 or self.act_ratio <= 0:
            raise bad(f"n_iter must be >= 1, edit_lr and act_ratio > 0 (got {self.n_iter}, {self.edit_lr}, "
                      f"{self.act_ratio})")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise bad(f"norm_constraint must be > 0 or null, got {self.norm_constraint}")
        if not isinstance(self.retrieve, bool):
            raise bad(f"retrieve must be true or false, got {self.retrieve!r}")
        if any(int(n) < 1 for n in self.context_lengths):
            raise bad(f"context_lengths must be positive token counts, got {list(self.context_lengths)}")
        self.context_lengths = [int(n) for n in self.context_lengths]


# --------------------------------------------------------------------------- math
def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``x`` (0 if there are none): the official hinge reduction."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def margin_loss(d_in: torch.Tensor, d_out: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """WISE's activation margins: ``d_in`` (R,) the edit rows' mean scores, ``d_out`` (the
    unrelated row's) a scalar. Edit scores at least ``beta``, the unrelated one at most
    ``alpha``, and every edit row at least ``gamma`` above it."""
    return (positive_mean(d_out - d_in + gamma) + positive_mean(d_out - alpha)
            + positive_mean(beta - d_in))


def prefix_scores(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The router's score at each position: the mean of ``dist`` (B, S) over the row's real
    tokens up to that position (their maximum once more than LONG_QUERY tokens are counted)."""
    m = mask.to(dist.dtype)
    count = m.cumsum(-1)
    score = (dist * m).cumsum(-1) / count.clamp(min=1)
    long = count > LONG_QUERY
    if bool(long.any()):
        peak = torch.where(mask, dist, torch.full_like(dist, -math.inf)).cummax(-1).values
        score = torch.where(long, peak, score)
    return score


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float],
               density: float) -> torch.Tensor:
    """Ties-merge (official ``GTA('magnitude', 'sum', normalize=True)``) of ``tensors`` into ``base``.

    Each task vector ``t - base`` keeps its ``density`` fraction of largest magnitudes; the
    weighted vectors vote a sign per entry (the sign of their sum, ties positive); the entries
    that agree with it are averaged with their weights (a disjoint mean)."""
    deltas = []
    for t in tensors:
        d = (t - base).reshape(-1)
        k = int(density * d.numel())
        if k < 1:
            raise ValueError(f"editor 'wise': densities={density} keeps no entry of a {d.numel()}-entry weight")
        if k < d.numel():
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().topk(k).indices] = True
            d = d * keep
        deltas.append(d)
    w = torch.tensor(weights, dtype=base.dtype, device=base.device)[:, None]
    weighted = torch.stack(deltas) * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(base.dtype)
    agree = (weighted.sign() == majority).to(base.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + ((weighted * agree).sum(0) / divisor).view_as(base)


# --------------------------------------------------------------------------- the wrapper
class WiseFFN(nn.Module):
    """The main memory (the wrapped projection, untouched) and the side memories beside it.

    Side memories are plain float32 tensors (out, in), not parameters: the model's parameters
    stay untouched and everything leaves with the wrapper on reset.
    """

    def __init__(self, inner: nn.Module, act, conv1d: bool, hp: WiseParams):
        super().__init__()
        weight = getattr(inner, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"editor 'wise': the side memory copies a projection's 2-d weight; "
                             f"{type(inner).__name__} has none")
        self.inner = inner
        self.act = act
        self.hp = hp
        self.base = (weight.T if conv1d else weight).detach().float().clone()   # W, (out, in)
        bias = getattr(inner, "bias", None)
        self.bias = bias.detach().float().clone() if bias is not None else None
        self.current = self.base.clone()          # the shard being edited (W')
        self.current_edits = 0
        self.shard_min = math.inf                 # official editing_mean_act.min_act()
        self.memories: list[tuple[torch.Tensor, float]] = []   # retrieve: saved (weight, min act)
        self.pending: list[torch.Tensor] = []     # merge mode: saved shards awaiting the merge
        self.merged: torch.Tensor | None = None   # merge mode: the merged side memory
        self.total = 0                            # edits since the wrapper was built
        self.mask: torch.Tensor | None = None     # the shard's gradient mask
        #: (B, S) bool of real tokens of the current forward call (set by the editor's hooks)
        self.row_mask: torch.Tensor | None = None
        #: while an edit trains: the trainable side weight; forward then records both outputs
        self.training_weight: torch.Tensor | None = None
        self.edit_main: torch.Tensor | None = None
        self.edit_side: torch.Tensor | None = None
        #: (B, S) the route of the last inference forward pass: index into side_weights(), -1 main
        self.last_route: torch.Tensor | None = None

    # ------------------------------------------------------------------ pieces
    def side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), weight, self.bias)

    def distance(self, main: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Δ per position: ``||act(side) - act(main)||`` (official ``euc``)."""
        return (self.act(side.float()) - self.act(main.float())).norm(dim=-1)

    def n_side(self) -> int:
        """Side-memory weights held (saved or merged, plus the current shard if it holds edits)."""
        return len(self.memories) + len(self.pending) + (self.merged is not None) + (self.current_edits > 0)

    def threshold(self, min_act: float) -> float:
        return min_act * self.hp.act_ratio

    # ------------------------------------------------------------------ shards
    def start_edit(self) -> None:
        if self.total % self.hp.save_freq == 0:
            self.mask = (torch.rand(self.base.shape, device=self.base.device) < self.hp.mask_ratio).float()

    def finish_edit(self, weight: torch.Tensor, activation: float) -> None:
        """Keep the trained side weight; save and merge shards on the official schedule."""
        hp = self.hp
        self.current = weight
        self.current_edits += 1
        self.shard_min = min(self.shard_min, activation)
        self.total += 1
        if self.total % hp.save_freq == 0:
            self.save_shard()
        if self.total % hp.merge_freq == 0:
            self.merge()

    def save_shard(self) -> None:
        if self.hp.retrieve:
            self.memories.append((self.current, self.shard_min))
            self.shard_min = math.inf
        else:
            self.pending.append(self.current)      # merge mode keeps one threshold for all edits
        self.current, self.current_edits = self.base.clone(), 0

    def merge(self) -> None:
        hp = self.hp
        if hp.retrieve:
            n = hp.merge_freq // hp.save_freq
            group = self.memories[-n:]
            merged = ties_merge(self.base, [w for w, _ in group], [hp.weights / n] * n, hp.densities)
            del self.memories[-n:]
            self.memories.append((merged, min(a for _, a in group)))
            return
        if not self.pending:
            return
        n = len(self.pending)
        if self.merged is None:
            self.merged = ties_merge(self.base, self.pending, [hp.weights / n] * n, hp.densities)
        else:   # official: the earlier merge at weight 0.6, the new shards share 0.4
            self.merged = ties_merge(self.base, self.pending + [self.merged], [0.4 / n] * n + [0.6], hp.densities)
        self.pending = []
        self.current, self.current_edits = self.base.clone(), 0

    def flush_for_inference(self) -> None:
        """Merge mode, official: the first forward pass after editing with at least
        ``save_freq`` edits merges the unsaved shard and the saved ones."""
        if self.hp.retrieve or self.total < self.hp.save_freq:
            return
        if self.current_edits > 0:
            self.pending.append(self.current)
        if self.pending:
            self.merge()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.inner(x)
        if self.training_weight is not None:      # an edit is being trained: the side memory answers
            side = self.side(x, self.training_weight)
            self.edit_main, self.edit_side = main.detach(), side
            return side.to(main.dtype)
        if not self.hp.retrieve:
            self.flush_for_inference()
        if self.n_side() == 0:
            self.last_route = torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device)
            return main
        mask = self.row_mask
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2]:
            raise RuntimeError(f"editor 'wise': padding mask {tuple(mask.shape)} does not match the input "
                               f"{tuple(x.shape[:2])} of the side memory")
        sides = [self.side(x, w) for w, _ in self.side_weights()]
        scores = [prefix_scores(self.distance(main, s), mask) for s in sides]
        choice = self.route(scores)
        self.last_route = choice
        out = main
        for k, s in enumerate(sides):
            out = torch.where((choice == k)[..., None], s.to(main.dtype), out)
        return out

    def side_weights(self) -> list[tuple[torch.Tensor, float]]:
        """The side memories the router chooses from, in the official order, with their minimum
        edit activations: retrieve: the current shard (if it holds edits), then the saved ones;
        merge mode: the current shard (if it holds edits), then the merged memory."""
        current = [(self.current, self.shard_min)] if self.current_edits > 0 else []
        if self.hp.retrieve:
            return current + self.memories
        return current + ([(self.merged, self.shard_min)] if self.merged is not None else [])

    def route(self, scores: list[torch.Tensor]) -> torch.Tensor:
        """Per position the index into :meth:`side_weights` that answers, -1 for the main memory
        (official rules; ``scores`` are the side memories' router scores)."""
        weights = self.side_weights()
        choice = torch.full(scores[0].shape, -1, dtype=torch.long, device=scores[0].device)
        has_current = self.current_edits > 0
        if not self.hp.retrieve:
            # official: main if both scores are below the one threshold, else the larger
            zero = torch.zeros_like(scores[0])
            d2 = scores[0] if has_current else zero                  # current shard
            d1 = scores[-1] if self.merged is not None else zero     # merged memory
            passed = (d1 >= self.threshold(self.shard_min)) | (d2 >= self.threshold(self.shard_min))
            if has_current:
                choice = torch.where(passed, 0, choice)
            if self.merged is not None:
                choice = torch.where(passed & (d1 > d2), len(weights) - 1, choice)
            return choice
        best = torch.zeros_like(scores[0])
        for k, ((_, min_act), s) in enumerate(zip(weights, scores)):
            if k == 0 and has_current:
                # the current shard answers if it reaches its threshold; its score is the bar either way
                choice = torch.where(s >= self.threshold(min_act), 0, choice)
                best = s
                continue
            take = (s > best) & (s > self.threshold(min_act))
            choice = torch.where(take, k, choice)
            best = torch.where(take, s, best)
        return choice


# --------------------------------------------------------------------------- the editor
@register("wise")
class Wise(Editor):
    training = "fit"      # fit() takes the unrelated texts (official loc_prompt) from the train split

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(WiseParams, cfg, "wise")
        self.layer = arch.layer_index(self.hp.layer)
        self.module_name = arch.name(self.hp.module, self.hp.layer)
        act_name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation_function", None)
        if act_name not in ACT2FN:
            raise ValueError(f"editor 'wise': the model config names no known hidden activation "
                             f"(hidden_act / activation_function = {act_name!r})")
        act = ACT2FN[act_name]
        #: the wrapper around the module, installed by the first edit and discarded by reset
        self._swap: ModuleSwap[WiseFFN] = ModuleSwap(
            model, self.module_name, lambda inner: WiseFFN(inner, act, arch.conv1d, self.hp))
        self._hooks: list = []
        self.loc_texts: list[str] | None = None
        #: context-template prefixes, generated once by the unedited model at the first edit
        self.templates: list[str] | None = None

    # ------------------------------------------------------------------ data
    def fit(self, train_cases) -> None:
        texts = [f"{p.prompt.rstrip()} {p.target.strip()}" for c in train_cases
                 for _, p in c.probes("locality")[:1]]
        if not texts:
            raise ValueError("editor 'wise': fit() got no training case with a locality probe (the unrelated "
                             "texts of the activation margins come from data.train_path)")
        self.loc_texts = texts

    @torch.no_grad()
    def context_templates(self) -> list[str]:
        """Official context templates as prefixes: '' and, per length, the unedited model's greedy
        continuation of each start word followed by a space."""
        if self._swap.installed:
            raise RuntimeError("editor 'wise': context templates must come from the unedited model")
        tok = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        starts = [tok(s)["input_ids"] for s in TEMPLATE_STARTS]
        prefixes = [""]
        for n in self.hp.context_lengths:
            new = greedy_generate(PlainLogits(self.model), starts, [n] * len(starts), pad, device=self.device)
            prefixes += [tok.decode(list(s) + g, skip_special_tokens=True) + " " for s, g in zip(starts, new)]
        return prefixes

    # ------------------------------------------------------------------ scoring
    def logits_at(self, input_ids, attention_mask, rows, cols, prompt_len=None):
        """The base computation (the model's own forward, the head at the read positions only),
        declared here so that greedy generation never steps WISE against a KV cache
        (:func:`editbench.scoring.reads_model_forward` keeps the cache for the base
        ``logits_at`` only): the router's score at a position is the prefix mean over the row's
        whole input, which a cached step, fed the new token alone, cannot compute. WILD
        generation therefore reruns the full input at every step, as teacher forcing does."""
        return model_logits_at(self.model, input_ids, attention_mask, rows, cols)

    # ------------------------------------------------------------------ wrapper
    @property
    def ffn(self) -> WiseFFN | None:
        return self._swap.wrapper

    def _install(self) -> WiseFFN:
        ffn = self._swap.install()
        if not self._hooks:
            base = self.model.base_model

            def read_mask(module, args, kwargs):
                m = kwargs.get("attention_mask")
                ffn.row_mask = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

            def clear_mask(module, args, kwargs, output):
                ffn.row_mask = None

            self._hooks = [base.register_forward_pre_hook(read_mask, with_kwargs=True),
                           base.register_forward_hook(clear_mask, with_kwargs=True)]
        return ffn

    def reset(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._swap.discard()
        super().reset()

    def stats(self):
        return {"side_memories": float(self.ffn.n_side() if self.ffn is not None else 0)}

    # ------------------------------------------------------------------ edit
    def edit(self, request):
        hp = self.hp
        if self.loc_texts is None:
            raise RuntimeError("editor 'wise' has no unrelated texts: call fit(train_cases) first "
                               "(the runner does so from data.train_path)")
        if self.templates is None:
            self.templates = self.context_templates()
        ffn = self._install()
        tok = self.tok
        rows = [encode(tok, prefix + request.prompt, request.target_new) for prefix in self.templates]
        unrelated = tok(self.loc_texts[ffn.total % len(self.loc_texts)])["input_ids"]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, mask = pad_batch([e.ids for e in rows] + [unrelated], pad, "right", self.device)
        real = mask.bool()
        n_rows = len(rows)
        t_rows = torch.tensor([r for r, e in enumerate(rows) for _ in e.target_ids], device=self.device)
        t_cols = torch.tensor([e.start - 1 + k for e in rows for k in range(len(e.target_ids))], device=self.device)
        targets = torch.tensor([t for e in rows for t in e.target_ids], device=self.device)
        per_row = torch.bincount(t_rows, minlength=n_rows).float()
        alpha, beta, gamma = hp.act_margin

        stack = UpperStack.capture(self.model, self.arch, self.layer, ids, mask)
        ffn.row_mask = None            # the capture stopped the forward pass before the hook that clears it
        ffn.start_edit()
        weight = nn.Parameter(ffn.current.clone())
        opt = torch.optim.SGD([weight], lr=hp.edit_lr, weight_decay=hp.weight_decay)
        prev, last = 0.0, 1e9          # official EarlyStopMeter (pre, val)
        activation, steps, parts = math.nan, 0, {}
        ffn.training_weight = weight
        try:
            with torch.enable_grad():
                for i in range(hp.n_iter):
                    logits = stack.head(stack.hidden_states()[t_rows, t_cols]).float()
                    ce = F.cross_entropy(logits, targets, reduction="none")
                    ft_loss = (torch.zeros(n_rows, device=ce.device).index_add(0, t_rows, ce) / per_row).mean()
                    dist = ffn.distance(ffn.edit_main, ffn.edit_side)
                    row_mean = (dist * real).sum(-1) / real.sum(-1)
                    act_loss = margin_loss(row_mean[:n_rows], row_mean[n_rows], alpha, beta, gamma)
                    loss = ft_loss + act_loss
                    stop = abs(last - prev) <= STOP_DELTA and last <= STOP_LOSS
                    if stop or i == hp.n_iter - 1:
                        # the router's score of the edit's own query (row 0, no template) where it
                        # decides the first target token
                        activation = prefix_scores(dist.detach()[:1], real[:1])[0, rows[0].start - 1].item()
                        parts = {"ft_loss": ft_loss.item(), "act_loss": act_loss.item(),
                                 "template_activation": row_mean[:n_rows].mean().item(),
                                 "unrelated_activation": row_mean[n_rows].item()}
                    if stop:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    weight.grad.mul_(ffn.mask)
                    opt.step()
                    steps += 1
                    prev, last = last, loss.item()
                    if hp.norm_constraint is not None:
                        with torch.no_grad():
                            weight.copy_(torch.clamp(weight, ffn.base - hp.norm_constraint,
                                                     ffn.base + hp.norm_constraint))
        finally:
            ffn.training_weight = None
            ffn.edit_main = ffn.edit_side = None
        ffn.finish_edit(weight.detach(), activation)
        return {"steps": steps, "activation": activation, **parts, "side_memories": ffn.n_side()}
