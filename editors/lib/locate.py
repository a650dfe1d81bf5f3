"""Locate-then-edit math shared by ROME, MEMIT, WilKE and R-ROME.

Follows kmeng01/rome (``rome/compute_u.py``, ``compute_v.py``, ``repr_tools.py``) and
kmeng01/memit (``memit/compute_ks.py``, ``compute_z.py``, ``memit_main.py``); the code
here is our own. The pieces, in the order an edit uses them:

* :func:`generate_context_templates`: short random prefixes sampled from the model
  (top-k 5) after the starters "The", "Therefore", "Because", "I", "You", as the official
  code does, but with a fixed seed so that runs are reproducible.
* :func:`build_edit_rows`: one row per (request, template) with the target appended
  (the "rewriting prompts") plus one ``"{subject} is a"`` row per request (the KL
  "essence" prompt), the subject's last token of every row (:func:`subject_last_token`,
  from tokenizer offsets), and the target positions. The (prompt, target) tokenisation
  is the harness's :func:`editbench.scoring.encode`, so the optimised target tokens are
  exactly the scored ones. Rows are padded so that every lookup token sits in the same
  column (left padding before it, right padding after).
* :func:`capture_layers`: ONE forward pass without gradients, stopped after the deepest
  layer needed, that records for each layer the residual stream after the layer and
  the input/output of ``mlp_out`` at every row's subject token. Because attention is
  causal, the key at the subject token of a rewriting row equals the key of the same
  template without the target, so this single pass yields the keys (ROME's ``compute_u``,
  MEMIT's ``compute_ks``), the current values and the starting point of the value
  optimisation.
* :func:`optimize_value`: the official value objective, for one or several requests at
  once (independent per request: per-request losses, per-request early stop and norm
  clamp): a vector ``delta`` added to the residual stream after the edit layer at the
  subject's last token of every row (identical to adding it to the MLP output, since
  every supported family adds the MLP output to the residual stream), minimising
  ``NLL(target | rewriting prompts) + kl_factor * KL(essence prompt) +
  v_weight_decay * |delta| / |init|^2`` with Adam, ``|delta| <= clamp_norm_factor * |init|``,
  stopping when a request's loss < ``early_stop_loss``. Nothing that does not depend on
  the delta is recomputed (:class:`editors.lib.forward.StreamDelta`): the layers below the edit layer run
  once (the cached residual stream is fed to the layers above it), the columns before
  the lookup column run once (a key/value cache), and the LM head is applied only at the
  positions the loss needs. On SmolLM2 this is ~3x faster than the plain loop.
* :func:`rome_rank_one` (ROME's ``u``/``v``), :func:`memit_weight_delta` (MEMIT's
  covariance-weighted least squares) and :func:`add_to_weight` (in place, Conv1D-aware; in
  half-precision models through the parameter's float32 master, editors/lib/precision.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from editbench.models import ArchSpec
from editbench.records import EditRequest
from editbench.scoring import encode
from editors.lib.forward import StopForward, StreamBatch, StreamDelta, layer_output
from editors.lib.precision import check_autocast, mixed_precision, write_rounded

log = logging.getLogger(__name__)

TEMPLATE_STARTERS = ("The", "Therefore", "Because", "I", "You")


# --------------------------------------------------------------------------- hyperparameters
@dataclass
class LocateParams:
    """Hyperparameters shared by every locate-then-edit editor (official names)."""

    fact_token: str = "subject_last"     # subject_last | last (the prompt's last token)
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    #: null (float32) | bfloat16: the value search's forward passes under autocast
    #: (editbench.models.autocast_context); the delta, Adam and every update stay float32
    autocast: str | None = None
    # context templates: [[length in tokens, count], ...]; count is split over 5 starters
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_template_seed: int = 0
    # covariance statistics (editors/lib/layer_stats.py)
    mom2_dataset: str = "../shared/data/corpus/wiki_paragraphs.txt"
    mom2_online_dataset: str | None = None
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    mom2_max_length: int = 256
    mom2_batch_size: int = 16
    mom2_progress: bool = True

    def __post_init__(self):
        if self.fact_token not in ("subject_last", "last"):
            raise ValueError(f"fact_token must be subject_last or last, got '{self.fact_token}'")
        if "{}" not in self.kl_prompt:
            raise ValueError(f"kl_prompt must contain '{{}}' for the subject, got '{self.kl_prompt}'")
        check_autocast(type(self).__name__, self.autocast)
        for pair in self.context_template_length_params:
            if len(pair) != 2 or int(pair[0]) < 1 or int(pair[1]) < 0:
                raise ValueError(f"context_template_length_params entries are [length, count], got {pair}")

    def stats_config(self):
        from editors.lib.layer_stats import StatsConfig

        return StatsConfig(dataset=self.mom2_dataset, n_samples=self.mom2_n_samples, dtype=self.mom2_dtype,
                           max_length=self.mom2_max_length, batch_size=self.mom2_batch_size,
                           online_dataset=self.mom2_online_dataset, progress=self.mom2_progress)


# --------------------------------------------------------------------------- context templates
@torch.no_grad()
def generate_context_templates(model: nn.Module, tok, length_params: Sequence[Sequence[int]], seed: int = 0,
                               separate_bare: bool = False) -> list[list[str]]:
    """Context prefixes as groups: ``[["", p1, p2, ...]]`` or, with ``separate_bare``,
    ``[[""], [p1, p2, ...]]`` (MEMIT's grouping: the bare prompt weighs as much as all
    generated prefixes together in the key average).

    Each prefix is ``<sampled text>. `` (braces blanked) and the prompt follows it. Texts
    are sampled with top-k 5 from the model after each starter word, ``count // 5`` per
    starter, ``length`` tokens in all; the RNG is seeded and the global RNG untouched.
    """
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prefixes: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in length_params:
            per_starter = int(count) // len(TEMPLATE_STARTERS)
            if per_starter == 0:
                continue
            for starter in TEMPLATE_STARTERS:
                ids = tok(starter, return_tensors="pt")["input_ids"].to(device)
                new = max(1, int(length) - ids.shape[1])
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     top_p=1.0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                                     num_return_sequences=per_starter, pad_token_id=pad)
                for seq in out:
                    text = tok.decode(seq, skip_special_tokens=True)
                    text = " ".join(text.replace("{", " ").replace("}", " ").split())
                    prefixes.append(f"{text}. ")
    if separate_bare:
        return [[""], prefixes] if prefixes else [[""]]
    return [[""] + prefixes]


# --------------------------------------------------------------------------- rows
def subject_last_token(tok, text: str, subject: str, start_char: int = 0) -> int | None:
    """Index of the last token of the first occurrence of ``subject`` in ``text`` at or
    after ``start_char`` (exact match first, then case-insensitive); None if absent."""
    if not subject.strip():
        return None
    subject = subject.strip()
    pos = text.find(subject, start_char)
    if pos < 0:
        pos = text.lower().find(subject.lower(), start_char)
    if pos < 0:
        return None
    end = pos + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > pos]
        if hits:
            return hits[-1]
    return len(tok(text[:end])["input_ids"]) - 1


@dataclass
class EditRows:
    """A padded batch of the rows an edit needs and where to look in them.

    Rows are padded on the left so that every row's lookup token is in the same column
    ``prefix_len`` (and on the right to a common width); position ids follow the mask.
    """

    input_ids: torch.Tensor          # (B, S)
    attention_mask: torch.Tensor     # (B, S)
    lookup: torch.Tensor             # (B,) column of each row's lookup token (all equal)
    request: torch.Tensor            # (B,) request index of each row
    groups: list[list[list[int]]]    # per request: template groups of rewriting-row indices
    bare_rows: torch.Tensor          # (n,) row of the un-prefixed prompt of each request
    kl_rows: torch.Tensor            # (n,) row of the essence prompt of each request
    target_rows: torch.Tensor        # (P,) row of each target token
    target_cols: torch.Tensor        # (P,) column whose logits predict it
    target_ids: torch.Tensor         # (P,) the token
    target_len: torch.Tensor         # (n,) target length of each request
    subject_found: list[bool]
    stream: StreamBatch | None = None   # the rows as StreamDelta runs them (its caches), made on first use

    @property
    def n_requests(self) -> int:
        return len(self.groups)

    @property
    def prefix_len(self) -> int:
        return int(self.lookup[0])

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def stream_batch(self) -> StreamBatch:
        """These rows as :class:`~editors.lib.forward.StreamDelta` runs them (made once, so its
        caches serve every layer and step of an edit)."""
        if self.stream is None:
            self.stream = StreamBatch(self.input_ids, self.attention_mask, self.position_ids, self.prefix_len)
        return self.stream

    def to(self, device) -> "EditRows":
        if self.input_ids.device != torch.device(device):
            self.stream = None   # its caches live on the old device
        for name in ("input_ids", "attention_mask", "lookup", "request", "bare_rows", "kl_rows", "target_rows",
                     "target_cols", "target_ids", "target_len"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def build_edit_rows(tok, requests: Sequence[EditRequest], templates: list[list[str]], fact_token: str = "subject_last",
                    kl_prompt: str = "{} is a") -> EditRows:
    """Rewriting rows (template prefix + prompt + target without its last token) for every
    request and template, then one essence row per request.

    The lookup token is the subject's last token inside the prompt part of each row; where
    the prompt does not contain the subject (or ``fact_token='last'``) it is the prompt's
    last token and ``subject_found`` is False for that request.
    """
    seqs: list[list[int]] = []
    lookup: list[int] = []
    req_of: list[int] = []
    groups: list[list[list[int]]] = []
    bare: list[int] = []
    t_rows: list[int] = []
    t_cols: list[int] = []
    t_ids: list[int] = []
    t_len: list[int] = []
    found_all: list[bool] = []
    for r, req in enumerate(requests):
        if not req.prompt.strip():
            raise ValueError("edit request has an empty prompt")
        if not req.target_new.strip():
            raise ValueError(f"edit request for prompt {req.prompt!r} has an empty target_new")
        found = True
        req_groups = []
        n_target = None
        for group in templates:
            rows = []
            for prefix in group:
                context = prefix + req.prompt.rstrip()
                enc = encode(tok, context, req.target_new)
                prompt_last = enc.start - 1
                idx = None
                if fact_token == "subject_last":
                    idx = subject_last_token(tok, f"{context} {req.target_new.strip()}", req.subject, len(prefix))
                    if idx is not None and idx > prompt_last:  # a subject found inside the target
                        idx = None
                if idx is None:
                    idx = prompt_last
                    if prefix == "":
                        found = False
                row = len(seqs)
                seqs.append(list(enc.ids[:-1]))
                lookup.append(idx)
                req_of.append(r)
                rows.append(row)
                if prefix == "":
                    bare.append(row)
                targets = enc.target_ids
                n_target = len(targets)
                for k, t in enumerate(targets):
                    t_rows.append(row)
                    t_cols.append(enc.start - 1 + k)
                    t_ids.append(t)
            req_groups.append(rows)
        if len(bare) != r + 1:
            raise ValueError("context templates must include the bare prompt ('')")
        groups.append(req_groups)
        t_len.append(n_target)
        found_all.append(found)
    kl_rows = []
    for r, req in enumerate(requests):
        subject = req.subject.strip() or req.prompt.rstrip()
        text = kl_prompt.replace("{}", subject)
        ids = tok(text)["input_ids"]
        idx = subject_last_token(tok, text, subject)
        kl_rows.append(len(seqs))
        seqs.append(list(ids))
        lookup.append(idx if idx is not None else len(ids) - 1)
        req_of.append(r)
    # Pad on the left so that every row's lookup token sits in the same column P, and on
    # the right to a common width: columns < P never depend on the optimised delta.
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    P = max(lookup)
    shift = [P - i for i in lookup]
    width = max(sh + len(s) for sh, s in zip(shift, seqs))
    ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (sh, s) in enumerate(zip(shift, seqs)):
        ids_t[i, sh:sh + len(s)] = torch.tensor(s)
        mask[i, sh:sh + len(s)] = 1
    t_cols = [c + shift[r] for r, c in zip(t_rows, t_cols)]
    L = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return EditRows(ids_t, mask, L([P] * len(seqs)), L(req_of), groups, L(bare), L(kl_rows), L(t_rows), L(t_cols),
                    L(t_ids), L(t_len), found_all)


# --------------------------------------------------------------------------- tracing
@dataclass
class LayerCapture:
    """What one layer looked like during a forward pass over EditRows."""

    hidden: torch.Tensor      # (B, S, d) residual stream after the layer
    keys: torch.Tensor        # (B, d_in) input of mlp_out at each row's lookup token
    values: torch.Tensor      # (B, d) output of mlp_out at each row's lookup token


@torch.no_grad()
def capture_layers(model: nn.Module, arch: ArchSpec, rows: EditRows, layers: Sequence[int]) -> dict[int, LayerCapture]:
    """One forward pass (no gradients) stopped after the deepest of ``layers``."""
    layers = sorted({arch.layer_index(i) for i in layers})
    got: dict[tuple[int, str], torch.Tensor] = {}
    b = torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device)
    last = max(layers)

    def mlp_hook(layer):
        def hook(module, args, output):
            x = args[0]
            got[(layer, "k")] = x[b.to(x.device), rows.lookup.to(x.device)].detach()
            got[(layer, "v")] = layer_output(output)[b.to(x.device), rows.lookup.to(x.device)].detach()
        return hook

    def layer_hook(layer):
        def hook(module, args, output):
            got[(layer, "h")] = layer_output(output).detach()
            if layer == last:
                raise StopForward
        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(arch.module(model, "mlp_out", layer).register_forward_hook(mlp_hook(layer)))
            handles.append(arch.module(model, "layer", layer).register_forward_hook(layer_hook(layer)))
        try:
            model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                  use_cache=False)
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return {layer: LayerCapture(got[(layer, "h")], got[(layer, "k")], got[(layer, "v")]) for layer in layers}


def grouped_key_means(rows: EditRows, keys: torch.Tensor) -> torch.Tensor:
    """(n, d_in): per request, the mean over template groups of the mean key in each group
    (ROME: one group, a plain mean; MEMIT: bare prompt and prefixed prompts weigh equally)."""
    out = []
    for groups in rows.groups:
        out.append(torch.stack([keys[g].float().mean(0) for g in groups]).mean(0))
    return torch.stack(out)


# --------------------------------------------------------------------------- value optimisation
@dataclass
class ValueResult:
    delta: torch.Tensor       # (n, d) optimised residual-stream delta per request
    loss: list[float]         # final loss per request
    nll: list[float]          # final NLL per request
    steps: list[int]          # forward passes per request until it stopped


@torch.enable_grad()
def optimize_value(tail: StreamDelta, rows: EditRows, layer: int, capture: LayerCapture, init_norm: torch.Tensor,
                   hp: LocateParams) -> ValueResult:
    """The official ROME/MEMIT value objective for every request of ``rows`` at once.

    ``init_norm`` (n,) is the norm of the vector the delta is added to (ROME: the MLP
    output at the subject token; MEMIT: the residual stream after the layer), which sets
    the weight decay scale and the clamp radius.
    """
    n = rows.n_requests
    h0 = capture.hidden
    device = h0.device
    rows.to(device)
    d = h0.shape[-1]
    pos_rows = torch.cat([rows.target_rows, rows.kl_rows])
    pos_cols = torch.cat([rows.target_cols, rows.lookup[rows.kl_rows]])
    n_t = rows.target_rows.shape[0]
    target_req = rows.request[rows.target_rows]
    row_req = rows.request
    rows_per_req = torch.tensor([sum(len(g) for g in groups) for groups in rows.groups], device=device,
                                dtype=torch.float32)
    tgt_len = rows.target_len.to(device).float()

    delta = torch.zeros(n, d, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    init_norm = init_norm.to(device).float()
    max_norm = hp.clamp_norm_factor * init_norm
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = [0] * n
    kl_init = None
    loss_vec = nll_vec = None
    batch = rows.stream_batch()
    # bfloat16 autocast (hp.autocast): the layers above `layer` and the head in half precision
    # for the whole search; delta, Adam and the losses stay float32
    with mixed_precision(tail.model, tail.arch, layer + 1, hp.autocast):
        for it in range(hp.v_num_grad_steps):
            logits = tail.logits(layer, h0, delta[row_req], batch, pos_rows, pos_cols)
            logp = torch.log_softmax(logits.float(), dim=-1)
            # NLL of every target token, summed per row, / target length, averaged over the rows
            tok_lp = logp[:n_t].gather(-1, rows.target_ids[:, None])[:, 0]
            per_req_sum = torch.zeros(n, device=device).index_add(0, target_req, tok_lp)
            nll = -per_req_sum / tgt_len / rows_per_req
            kl_lp = logp[n_t:]
            if kl_init is None:
                kl_init = kl_lp.detach()
            kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)          # KL(current || initial) per request
            decay = hp.v_weight_decay * delta.norm(dim=-1) / init_norm ** 2
            loss = nll + hp.kl_factor * kl + decay
            loss_vec, nll_vec = loss.detach(), nll.detach()
            for i in range(n):
                if not done[i]:
                    steps[i] = it + 1
            done = done | (loss_vec < hp.early_stop_loss)
            if bool(done.all()) or it == hp.v_num_grad_steps - 1:
                break
            opt.zero_grad(set_to_none=True)
            loss[~done].sum().backward()
            before = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[done] = before[done]
                norms = delta.norm(dim=-1)
                over = norms > max_norm
                if bool(over.any()):
                    delta[over] = delta[over] * (max_norm[over] / norms[over])[:, None]
    return ValueResult(delta.detach(), loss_vec.tolist(), nll_vec.tolist(), steps)


# --------------------------------------------------------------------------- weight updates
@dataclass
class RankOneUpdate:
    """ROME's update of one weight: ``W_out_in += outer(right, left)``."""

    layer: int
    weight: str               # parameter name
    left: torch.Tensor        # (d_in,)  u = C^-1 k / |C^-1 k|
    right: torch.Tensor       # (d_out,) (v* - W k*) / (u . k*)
    key: torch.Tensor         # k*: the key at the bare prompt
    value: torch.Tensor       # v*: the value the new weight maps k* to
    info: dict = field(default_factory=dict)

    def delta(self) -> torch.Tensor:
        return torch.outer(self.right, self.left)


def rome_rank_one(key_mean: torch.Tensor, key_star: torch.Tensor, value_star: torch.Tensor,
                  current_value: torch.Tensor, cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's (left, right) vectors (``compute_u`` / ``compute_v`` of kmeng01/rome).

    ``left = C^-1 k / |C^-1 k|`` with k the template-averaged key (no C: ``k / |k|``);
    ``right = (v* - W k*) / (left . k*)`` with k* the key at the prompt itself, so that the
    updated weight maps k* exactly to v*.
    """
    k = key_mean.double()
    u = torch.linalg.solve(cov.double(), k) if cov is not None else k
    u = u / u.norm()
    right = (value_star.double() - current_value.double()) / torch.dot(key_star.double(), u)
    return u.float(), right.float()


def memit_weight_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor,
                       mom2_update_weight: float) -> torch.Tensor:
    """MEMIT's ``ΔW = R K^T (λ C + K K^T)^-1`` (d_out, d_in), in double precision.

    ``keys`` (n, d_in) and ``resid`` (n, d_out) hold one row per edit.
    """
    K = keys.double().T                    # (d_in, n)
    R = resid.double().T                   # (d_out, n)
    adj = torch.linalg.solve(mom2_update_weight * cov.double() + K @ K.T, K)   # (d_in, n)
    return (R @ adj.T).float()


@torch.no_grad()
def add_to_weight(param: torch.Tensor, delta_out_in: torch.Tensor, arch: ArchSpec,
                  master: torch.Tensor | None = None) -> None:
    """``W += delta`` in place, with delta given as (out_features, in_features).

    With ``master`` (the parameter's float32 master in a half-precision model,
    :meth:`editors.lib.precision.Float32Masters.master`), the delta is added to the master in
    float32 and the model gets the master rounded to its dtype; without it (float32 models)
    the delta is added to the weight itself.
    """
    if master is None:
        view = arch.weight_out_in(param)
        view.add_(delta_out_in.to(device=view.device, dtype=view.dtype))
        return
    mview = arch.weight_out_in(master)
    mview.add_(delta_out_in.to(device=mview.device, dtype=torch.float32))
    write_rounded(param, master)
