"""Shared pieces of the hypernetwork editors MEND (editors/mend.py) and MALMEN (editors/malmen.py).

Both methods edit chosen linear modules W (d_out x d_in) of the LLM from the rank-one factors
of the fine-tuning gradient. For a loss L on an edit's target tokens,
``dL/dW = sum_t delta_t u_t^T`` where ``u_t`` is the module's input at position t (MALMEN calls
it the key) and ``delta_t`` the gradient of L with respect to the module's output there (the
value gradient). A hypernetwork maps each normalised pair (u_t, delta_t) to a pseudo pair
(u~_t, delta~_t); there is one network per module SHAPE, shared by the modules of that shape and
told which module it serves by a learned per-module scale and shift. MEND sums the pseudo pairs
into a pseudo-gradient; MALMEN turns them into desired output changes and solves a regularised
least-squares problem for the weight shift.

The pieces, in the order an edit uses them:

* :func:`resolve_modules` -> :class:`EditModule`: which weights are edited, their shapes and the
  index of each among the modules of its shape (the networks' conditioning "mode").
* :func:`rows_of` -> :class:`TokenRows`: encoded (prompt, target) pairs as right-padded token rows
  with the positions that predict each target token (the harness's tokenisation,
  ``editbench.scoring.encode``).
* :func:`build_row_batches` -> :class:`RowBatch`: the rows of a set of edit cases (request,
  generality, locality), one kind per batch and sorted by length, with the frozen layers below
  the lowest edited one run once (``editors.lib.forward.UpperStack``; during training optionally
  once per row for the whole training, :meth:`UpperStack.from_hidden`); every later pass runs only
  the layers from the lowest edited one upwards, and the LM head only at the positions a loss
  reads.
* :func:`gradient_factors`: one backward pass of each request's mean target NLL; forward hooks
  record every edited module's input (u) and make its output a tensor whose gradient is asked
  for (delta). Positions ``"all"`` (MEND: every real position with a non-zero gradient) or
  ``"answer"`` (MALMEN's ``token: ans``: the positions that predict a target token).
* :class:`RunningNorm`: per-dimension running mean / std of the concatenated (u, delta) rows,
  updated only while training (Chan et al.'s parallel form of Welford's update).
* :class:`LowRankBlock` and :class:`GradientNet`: the residual low-rank MLP of both papers.
* :class:`Shift` and :func:`shifted`: a weight shift per group of rows in factored form,
  ``dW_g = right_g^T left_g``, applied through forward hooks as ``out += (x left_g^T) right_g``
  (the weights are never touched during training or validation).
* :func:`least_squares_shift` / :func:`least_squares_dense`: MALMEN's normal equation.
* :class:`HypernetEditor`: the plumbing the two editors share (module list, the trained
  container, factor capture, the decoupled outer loss, validation, in-place application and
  checkpoints). Each editor adds only its own shift rule and settings.

Training is decoupled as in the official MALMEN code: the outer loss is computed with the
shift's tensors as detached leaves, its gradient G with respect to them is taken (batch by
batch of rows, so memory does not grow with the number of edits), and the returned loss is
``value + sum(G * shift(theta)) - sum(G * shift(theta)).detach()``: its value is the real loss
and its gradient with respect to the hypernetwork parameters is exactly the end-to-end
gradient (the LLM's own weights are frozen and never receive one).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editbench.models import ArchSpec
from editbench.records import EditCase, EditFailed, EditRequest
from editbench.scoring import encode, pad_batch
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.locate import add_to_weight
from editors.lib.forward import UpperStack

MODULE_TEMPLATES = ("mlp_in", "mlp_out", "attn_out")


# --------------------------------------------------------------------------- edited modules
@dataclass(frozen=True)
class EditModule:
    """One edited linear module and where its hypernetwork finds it."""

    name: str       # module path, e.g. model.layers.27.mlp.down_proj
    weight: str     # its weight parameter's name
    layer: int      # decoder layer index (non-negative)
    d_in: int
    d_out: int
    mode: int       # index among the edited modules of the same shape (the network's conditioning)

    @property
    def shape(self) -> str:
        """Key of the hypernetwork that serves this module: ``"<d_in>x<d_out>"``."""
        return f"{self.d_in}x{self.d_out}"


def resolve_modules(model: nn.Module, arch: ArchSpec, templates: Sequence[str], layers: Sequence[int],
                    editor: str) -> list[EditModule]:
    """The edited modules, layer by layer (each layer: ``templates`` in order).

    A template is an ArchSpec name (``mlp_in``, ``mlp_out``, ``attn_out``) or a module path with
    ``{}`` for the layer (``model.layers.{}.mlp.gate_proj``)."""
    if not templates or not layers:
        raise ValueError(f"editor '{editor}': modules and layers must not be empty")
    out: list[EditModule] = []
    modes: Counter[str] = Counter()
    seen = set()
    for layer in layers:
        idx = arch.layer_index(int(layer))
        for t in templates:
            if "{}" in t:
                name = t.format(idx)
            elif t in MODULE_TEMPLATES:
                name = arch.name(t, idx)
            else:
                raise ValueError(f"editor '{editor}': unknown module '{t}'; use one of {', '.join(MODULE_TEMPLATES)} "
                                 "or a module path with {} for the layer")
            if name in seen:
                raise ValueError(f"editor '{editor}': module {name} is listed twice")
            seen.add(name)
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"editor '{editor}': the model has no module {name}") from None
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"editor '{editor}': {name} is not a linear layer with a 2-D weight")
            d_out, d_in = arch.weight_out_in(weight).shape
            shape = f"{d_in}x{d_out}"
            out.append(EditModule(name, f"{name}.weight", idx, int(d_in), int(d_out), modes[shape]))
            modes[shape] += 1
    return out


def modes_per_shape(modules: Sequence[EditModule]) -> dict[str, tuple[int, int, int]]:
    """shape key -> (d_in, d_out, number of modules of that shape)."""
    count = Counter(m.shape for m in modules)
    first = {}
    for m in modules:
        first.setdefault(m.shape, m)
    return {s: (first[s].d_in, first[s].d_out, n) for s, n in count.items()}


# --------------------------------------------------------------------------- token rows
@dataclass
class TokenRows:
    """Right-padded token rows; ``pos_row/pos_col`` is the position predicting each target token
    (``target``), in row order."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos_row: torch.Tensor
    pos_col: torch.Tensor
    target: torch.Tensor

    def positions_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Boolean (P,) selecting the target positions that belong to ``rows`` (bool (R,))."""
        return rows[self.pos_row]


def rows_of(enc: Sequence, tok, device: torch.device | str) -> TokenRows:
    """Encoded pairs (``editbench.scoring.Encoded``) -> right-padded :class:`TokenRows`."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = pad_batch([e.ids for e in enc], pad, "right", device)
    rows, cols, targets = [], [], []
    for r, e in enumerate(enc):
        n = len(e.ids) - e.start
        rows += [r] * n
        cols += list(range(e.start - 1, e.start - 1 + n))
        targets += list(e.target_ids)
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=ids.device)  # noqa: E731
    return TokenRows(ids, mask, t(rows), t(cols), t(targets))


#: kinds of rows built for a case
REQUEST, GENERALITY, LOCALITY = "request", "generality", "locality"


@dataclass
class RowBatch:
    """Token rows of some edit cases, with the frozen layers below the edited ones run once.

    ``kind[r]`` is REQUEST, GENERALITY or LOCALITY; ``case[r]`` the index of the row's case in
    the list the batch was built from."""

    rows: TokenRows
    kind: list[str]
    case: torch.Tensor
    stack: UpperStack

    def is_kind(self, *kinds: str) -> torch.Tensor:
        return torch.tensor([k in kinds for k in self.kind], device=self.rows.ids.device)

    def logits_at(self, head: nn.Module, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (P', V) at the target positions (those selected by ``select``), under the
        current weights and hooks; gradients flow when grad mode is on."""
        h = self.stack.hidden_states()
        r, c = self.rows.pos_row, self.rows.pos_col
        if select is not None:
            r, c = r[select], c[select]
        return head(h[r, c]).float()


def case_pairs(case: EditCase, kinds: Sequence[str]) -> list[tuple[str, tuple[str, str]]]:
    """(kind, (prompt, target)) of the rows a case contributes: REQUEST, its GENERALITY probes,
    its LOCALITY probes, as asked."""
    out = []
    r = case.request
    for kind in kinds:
        if kind == REQUEST:
            out.append((REQUEST, (r.prompt, r.target_new)))
        elif kind == GENERALITY:
            out += [(GENERALITY, (p.prompt, p.target)) for _, p in case.probes("generality")]
        elif kind == LOCALITY:
            out += [(LOCALITY, (p.prompt, p.target)) for _, p in case.probes("locality")]
    return out


def build_row_batches(model: nn.Module, arch: ArchSpec, tok, lowest_layer: int,
                      items: Sequence[tuple[int, str, tuple[str, str]]], device, max_rows: int,
                      max_padding: float = 1.3, hidden_cache: dict | None = None) -> list[RowBatch]:
    """:class:`RowBatch` objects of ``(case index, kind, (prompt, target))`` items: one kind per batch
    (only request rows need the gradient pass), rows sorted by length and cut so that a batch
    holds at most ``max_rows`` rows and pads at most ``max_padding`` times its real tokens
    (the locality answers of some data sets are a hundred tokens long). Batching never changes
    a row's result (position ids follow the mask).

    ``hidden_cache`` (a dict owned by the caller): each row's input to layer ``lowest_layer`` is
    kept there, keyed by its token ids, and reused by later batches instead of running the
    layers below again (:meth:`UpperStack.from_hidden`). Valid only while those layers' weights do
    not change (MEND and MALMEN never edit below their lowest edited layer)."""
    enc = [encode(tok, p, t) for _, _, (p, t) in items]
    out = []
    for kind in (REQUEST, GENERALITY, LOCALITY):
        order = sorted((i for i, it in enumerate(items) if it[1] == kind), key=lambda i: len(enc[i].ids))
        groups: list[list[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            n = len(enc[i].ids)
            if (g is None or len(g) >= max_rows
                    or (len(g) >= 4 and n * (len(g) + 1) > max_padding * (sum(len(enc[j].ids) for j in g) + n))):
                groups.append([i])
            else:
                g.append(i)
        for g in groups:
            rows = rows_of([enc[i] for i in g], tok, device)
            keys = [(lowest_layer, enc[i].ids) for i in g]
            if hidden_cache is not None and all(k in hidden_cache for k in keys):
                stack = UpperStack.from_hidden(model, arch, lowest_layer, rows.ids, rows.mask,
                                               [hidden_cache[k] for k in keys])
            else:
                stack = UpperStack.capture(model, arch, lowest_layer, rows.ids, rows.mask)
                if hidden_cache is not None:
                    for r, (k, i) in enumerate(zip(keys, g)):
                        hidden_cache[k] = stack.hidden[r, :len(enc[i].ids)].clone()
            case = torch.tensor([items[i][0] for i in g], dtype=torch.long, device=rows.ids.device)
            out.append(RowBatch(rows, [kind] * len(g), case, stack))
    return out


# --------------------------------------------------------------------------- gradient factors
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]   # module name -> (u (T, d_in), delta (T, d_out))


@contextlib.contextmanager
def _capture(model: nn.Module, modules: Sequence[EditModule]) -> Iterator[tuple[dict, dict]]:
    """Forward hooks recording each module's input and a gradient-carrying handle on its output."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            if not output.requires_grad:  # the lowest edited module: nothing below needs a gradient
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output
        return hook

    handles = [model.get_submodule(m.name).register_forward_hook(hook_for(m.name)) for m in modules]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def mean_nll_per_row(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) mean negative log-likelihood of each row's target tokens (0 for rows without any)."""
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    total = torch.zeros(n_rows, device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
    count = torch.zeros(n_rows, device=nll.device, dtype=nll.dtype).index_add(0, rows, torch.ones_like(nll))
    return total / count.clamp(min=1)


def gradient_factors(model: nn.Module, arch: ArchSpec, modules: Sequence[EditModule], batch: RowBatch,
                     positions: str) -> tuple[dict[int, Factors], torch.Tensor | None]:
    """For each REQUEST row of ``batch``: {module: (u, delta)} of the gradient of that row's
    mean target NLL under the current weights, keyed by the row's case; and, for a batch of
    LOCALITY rows, the log-probabilities (P, V) at its target positions (the unedited
    reference). Other batches: ({}, None).

    ``positions``: ``"all"`` keeps every position whose u and delta are both non-zero (MEND's
    ``nz_mask``: the prompt positions too, since later positions attend to them), ``"answer"``
    only the positions predicting a target token (MALMEN's ``token: ans``)."""
    head = arch.module(model, "lm_head")
    rows = batch.rows
    if LOCALITY in batch.kind:
        with torch.no_grad():
            return {}, torch.log_softmax(batch.logits_at(head), -1)
    if REQUEST not in batch.kind:
        return {}, None
    n_rows = rows.ids.shape[0]
    with torch.enable_grad(), _capture(model, modules) as (inputs, outputs):
        logits = batch.logits_at(head)
        per_row = mean_nll_per_row(logits, rows.target, rows.pos_row, n_rows)
        grads = torch.autograd.grad(per_row.sum(), [outputs[m.name] for m in modules])
    out: dict[int, Factors] = {}
    for r in range(n_rows):
        fac: Factors = {}
        for m, g in zip(modules, grads):
            u, d = inputs[m.name][r].float(), g[r].float()
            if positions == "answer":
                cols = rows.pos_col[rows.pos_row == r]
            else:
                keep = rows.mask[r].bool() & (u != 0).any(-1) & (d != 0).any(-1)
                cols = torch.nonzero(keep)[:, 0]
            fac[m.name] = (u[cols], d[cols])
        out[int(batch.case[r])] = fac
    return out, None


# --------------------------------------------------------------------------- the networks
class RunningNorm(nn.Module):
    """Running per-dimension mean and (unbiased) standard deviation of the rows it is shown.

    ``update`` merges a batch of rows (Chan et al.'s parallel Welford update: exact, whatever
    the batch sizes); ``forward`` standardises ``(x - mean) / (std + eps)``. Before two rows have
    been seen it is the identity (the official codes fail or divide by zero there)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.detach().to(self.mean.device, torch.float64)
        n_b = float(x.shape[0])
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        diff = mean_b - self.mean
        self.mean += diff * (n_b / n)
        self.m2 += m2_b + diff ** 2 * (self.count * n_b / n)
        self.count.fill_(n)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1).clamp(min=1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            return x
        mean = self.mean.to(x.dtype)
        std = self.std.to(x.dtype)
        return (x - mean) / (std + self.eps)


class LowRankBlock(nn.Module):
    """``z -> z + h(z)`` with ``h`` a low-rank linear map, a ReLU and a per-module scale and shift.

    ``conditioning="pre"`` (MEND's ``LRLinear`` with ``init: id``): ``h = relu(scale_m * (z D U + b)
    + shift_m)``; ``"post"`` (MALMEN's block): ``h = scale_m * relu(z D U + b) + shift_m``. ``D``
    (size x rank) starts Gaussian and ``U`` (rank x size) at zero, so every block starts as the
    identity."""

    def __init__(self, size: int, rank: int, n_modes: int, conditioning: str, generator: torch.Generator):
        super().__init__()
        if conditioning not in ("pre", "post"):
            raise ValueError(f"conditioning must be pre or post, got '{conditioning}'")
        r = min(rank, size)
        self.conditioning = conditioning
        self.down = nn.Parameter(torch.randn(size, r, generator=generator))
        self.up = nn.Parameter(torch.zeros(r, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modes, size))
        self.shift = nn.Parameter(torch.zeros(n_modes, size))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        h = z @ self.down @ self.up + self.bias
        if self.conditioning == "pre":
            h = (h * self.scale[mode] + self.shift[mode]).clamp(min=0)
        else:
            h = h.clamp(min=0) * self.scale[mode] + self.shift[mode]
        return z + h


class GradientNet(nn.Module):
    """The hypernetwork for modules of one shape: (u, delta) -> (u~, delta~).

    The concatenated row ``[u, delta]`` is standardised (:class:`RunningNorm`), passed through
    ``n_blocks`` :class:`LowRankBlock` and split again (MEND ``combine: true``; MALMEN always)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int, conditioning: str,
                 eps: float, generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out, eps)
        self.blocks = nn.ModuleList([LowRankBlock(d_in + d_out, rank, n_modes, conditioning, generator)
                                     for _ in range(n_blocks)])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(torch.cat([u, delta], -1))
        for block in self.blocks:
            z = block(z, mode)
        u_t, d_t = z.split([self.d_in, self.d_out], -1)
        return u_t, d_t


# --------------------------------------------------------------------------- shifts
@dataclass
class Shift:
    """Weight shifts of one module for G groups of rows, in factored form:
    ``dW_g = right[g]^T @ left[g]`` (d_out x d_in), so that ``dW_g x = (x @ left[g]^T) @ right[g]``.
    ``left`` is (G, T, d_in), ``right`` (G, T, d_out); unused rows are zero."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self, g: int = 0) -> torch.Tensor:
        """(d_out, d_in) shift of group ``g``."""
        return self.right[g].T @ self.left[g]

    def leaves(self) -> "Shift":
        """The same values as tensors detached from their graph (gradients can be asked for)."""
        return Shift(self.left.detach().requires_grad_(self.left.requires_grad),
                     self.right.detach().requires_grad_(self.right.requires_grad))


def stack_groups(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor]) -> Shift:
    """Pad per-group factors (T_g, d) to the longest T with zero rows and stack them."""
    t = max(1, max(x.shape[0] for x in lefts))
    pad = lambda x: F.pad(x, (0, 0, 0, t - x.shape[0]))  # noqa: E731
    return Shift(torch.stack([pad(x) for x in lefts]), torch.stack([pad(x) for x in rights]))


@contextlib.contextmanager
def shifted(model: nn.Module, shifts: Mapping[str, Shift], row_group: torch.Tensor) -> Iterator[None]:
    """Forward hooks adding each row's group shift to the named modules' outputs:
    ``out[r] += (x[r] @ left[g]^T) @ right[g]`` with ``g = row_group[r]``. Weights are untouched."""
    handles = []

    def hook_for(shift: Shift):
        def hook(module, args, output):
            x = args[0]
            left = shift.left.to(x.device)[row_group.to(x.device)]    # (R, T, d_in)
            right = shift.right.to(x.device)[row_group.to(x.device)]  # (R, T, d_out)
            coeff = torch.einsum("rsi,rti->rst", x.to(left.dtype), left)
            return output + torch.einsum("rst,rto->rso", coeff, right).to(output.dtype)
        return hook

    try:
        for name, shift in shifts.items():
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(shift)))
        yield
    finally:
        for h in handles:
            h.remove()


def least_squares_shift(keys: torch.Tensor, values: torch.Tensor,
                        lamda: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MALMEN's regularised least squares in factored (dual) form.

    ``dW^T = argmin_S ||K S - V||^2 + lamda ||S||^2 = (K^T K + lamda I)^-1 K^T V
    = K^T (K K^T + lamda I)^-1 V`` (the push-through identity). Returns (left, right) =
    (K, (K K^T + lamda I)^-1 V), so that ``dW = right^T @ left``; the system solved is n x n
    (n keys) instead of d_in x d_in. Solved in float64; differentiable in ``values`` and ``lamda``."""
    k = keys.double()
    gram = k @ k.T + lamda.double() * torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    right = torch.linalg.solve(gram, values.double())
    return keys, right.to(values.dtype)


def least_squares_dense(keys: torch.Tensor, values: torch.Tensor, lamda: torch.Tensor) -> torch.Tensor:
    """The same solution in the official (primal) form: (d_out, d_in) ``dW`` with
    ``(K^T K + lamda I) dW^T = K^T V``. Used when there are more keys than input dimensions."""
    k = keys.double()
    gram = k.T @ k + lamda.double() * torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(gram, k.T @ values.double()).T.to(values.dtype)


# --------------------------------------------------------------------------- shared editor plumbing
@dataclass
class HypernetParams:
    """Settings the two editors share (their dataclasses add their own)."""

    modules: list[str] = dataclasses.field(default_factory=lambda: ["mlp_out"])
    layers: list[int] = dataclasses.field(default_factory=lambda: [-1])
    rank: int = 1920
    n_blocks: int = 2
    edit_loss_on: list[str] = dataclasses.field(default_factory=lambda: [GENERALITY])
    chunk_size: int = 32          # rows per forward pass (memory only; results do not depend on it)
    cache_hidden: bool = False    # training: keep each row's input to the lowest edited layer (speed only)
    init_seed: int = 0            # seed of the networks' Gaussian initialisation
    train: dict = dataclasses.field(default_factory=dict)

    def check(self, editor: str) -> None:
        problems = []
        if self.rank < 1 or self.n_blocks < 1:
            problems.append(f"rank and n_blocks must be >= 1, got {self.rank} and {self.n_blocks}")
        bad = [k for k in self.edit_loss_on if k not in (REQUEST, GENERALITY)]
        if bad or not self.edit_loss_on:
            problems.append(f"edit_loss_on must list request and/or generality, got {list(self.edit_loss_on)}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if problems:
            raise ValueError(f"editor '{editor}': " + "; ".join(problems))


class HypernetEditor(Editor):
    """What MEND and MALMEN share. A subclass sets ``params_cls``, ``positions``, ``conditioning``,
    ``norm_eps``, and implements :meth:`_extra_parameters`, :meth:`make_shifts` and
    :meth:`loss_weights`."""

    training = "pipeline"
    inference_only: ClassVar[tuple[str, ...]] = ("chunk_size", "cache_hidden")
    params_cls: ClassVar[type] = HypernetParams
    #: "all" (MEND) or "answer" (MALMEN): the positions whose gradient factors are used
    positions: ClassVar[str] = "all"
    conditioning: ClassVar[str] = "pre"
    norm_eps: ClassVar[float] = 1e-7

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(self.params_cls, cfg, self.name)
        self.hp.check(self.name)
        self.modules = resolve_modules(model, arch, list(self.hp.modules), list(self.hp.layers), self.name)
        self.lowest = min(m.layer for m in self.modules)
        #: (layer, token ids) -> the row's input to layer ``lowest`` under the unedited weights
        self._hidden_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        gen = torch.Generator().manual_seed(int(self.hp.init_seed))
        self.hyper = nn.Module()
        self.hyper.nets = nn.ModuleDict({
            shape: GradientNet(d_in, d_out, self.hp.rank, self.hp.n_blocks, n, self.conditioning, self.norm_eps, gen)
            for shape, (d_in, d_out, n) in modes_per_shape(self.modules).items()})
        for pname, tensor in self._extra_parameters().items():
            self.hyper.register_parameter(pname, nn.Parameter(tensor))
        self.hyper.to(self._net_device()).eval()

    # ------------------------------------------------------------------ subclass hooks
    def _extra_parameters(self) -> dict[str, torch.Tensor]:
        """Per-module learned scalars (edit learning rates, MALMEN's lambda), as (n_modules,)."""
        return {}

    def make_shifts(self, factors: Sequence[Factors], groups: Sequence[Sequence[int]]) -> dict[str, Shift]:
        """One :class:`Shift` per module: group g edits with the requests ``groups[g]``."""
        raise NotImplementedError

    def loss_weights(self) -> tuple[float, float]:
        """(weight of the edit NLL, weight of the locality KL) in the training loss."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def lr_scale(self, lr_lr: float | None) -> float:
        """Factor by which a per-module edit rate is stored divided, so that the pipeline's single
        optimiser (``train.lr``) moves it at ``lr_lr`` per step: Adam's step does not depend on a
        gradient's scale, so a parameter used as ``stored * s`` moves ``s * train.lr`` per step.
        1 when ``lr_lr`` is None (the rate trains at ``train.lr``)."""
        if lr_lr is None:
            return 1.0
        from editbench.train import TRAIN_DEFAULTS

        return float(lr_lr) / float((self.hp.train or {}).get("lr", TRAIN_DEFAULTS["lr"]))

    def _net_device(self) -> torch.device:
        return self.model.get_parameter(self.modules[0].weight).device

    def net(self, module: EditModule) -> GradientNet:
        return self.hyper.nets[module.shape]

    def _batches(self, cases: Sequence[EditCase], kinds: Sequence[str], cached: bool = False) -> list[RowBatch]:
        """The cases' rows of ``kinds`` as :class:`RowBatch` objects (``case`` = index in ``cases``);
        ``cached``: reuse the lower layers' outputs kept by earlier training/validation batches
        (``cache_hidden``; the LLM is frozen then)."""
        items = [(i, k, p) for i, case in enumerate(cases) for k, p in case_pairs(case, kinds)]
        cache = self._hidden_cache if cached and self.hp.cache_hidden else None
        return build_row_batches(self.model, self.arch, self.tok, self.lowest, items, self.device,
                                 self.hp.chunk_size, hidden_cache=cache)

    def _factors(self, batches: Sequence[RowBatch], n_cases: int
                 ) -> tuple[list[Factors], list[torch.Tensor | None]]:
        """(factors of each case's request, in case order; per batch its locality reference or None)."""
        factors: dict[int, Factors] = {}
        refs = []
        for batch in batches:
            fac, ref = gradient_factors(self.model, self.arch, self.modules, batch, self.positions)
            factors.update(fac)
            refs.append(ref)
        return [factors[i] for i in range(n_cases)], refs

    def update_norms(self, factors: Sequence[Factors]) -> None:
        """Show every factor row to its network's running statistics (training only)."""
        for m in self.modules:
            rows = [torch.cat([f[m.name][0], f[m.name][1]], -1) for f in factors]
            self.net(m).norm.update(torch.cat(rows))

    def request_factors(self, requests: Sequence[EditRequest]) -> list[Factors]:
        """Gradient factors of each request under the current weights."""
        cases = [EditCase(case_id=str(i), request=r) for i, r in enumerate(requests)]
        factors, _ = self._factors(self._batches(cases, [REQUEST]), len(cases))
        return factors

    def apply_shifts(self, shifts: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Add dense (d_out, d_in) shifts to the weights in place (remembered for ``reset``); return the
        overall Frobenius norm of the shift."""
        for name, delta in shifts.items():
            if not bool(torch.isfinite(delta).all()):
                raise EditFailed(f"editor '{self.name}': the weight shift of {name} is not finite")
        with torch.no_grad():
            for m in self.modules:
                (param,) = self.remember([m.weight])
                add_to_weight(param, shifts[m.name], self.arch)
        return {"shift_norm": float(torch.stack([shifts[m.name].float().norm() for m in self.modules]).norm())}

    # ------------------------------------------------------------------ training protocol
    def trainable(self) -> nn.Module:
        return self.hyper

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Network parameters, per-module scalars AND the running normalisation statistics."""
        return {n: t.detach() for n, t in self.hyper.state_dict().items()}

    def load_trained_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.hyper.state_dict()
        if set(own) != set(state):
            diff = sorted(set(own) ^ set(state))
            raise ValueError(f"editor '{self.name}': checkpoint tensors {diff[:5]} do not match the hypernetwork")
        bad = [n for n in own if tuple(own[n].shape) != tuple(state[n].shape)]
        if bad:
            raise ValueError(f"editor '{self.name}': checkpoint tensor {bad[0]} has shape "
                             f"{tuple(state[bad[0]].shape)}, the hypernetwork {tuple(own[bad[0]].shape)}")
        self.hyper.load_state_dict({n: t.to(own[n].device, own[n].dtype) for n, t in state.items()})

    def training_groups(self, n_cases: int) -> list[list[int]]:
        """Which requests edit together in a training step (MEND: each alone; MALMEN: all)."""
        return [[i] for i in range(n_cases)]

    def training_loss(self, batch: Sequence[EditCase]) -> tuple[torch.Tensor, dict[str, float]]:
        """Edit with each training group's requests, then on the edited model: the NLL of the
        ``edit_loss_on`` rows (token mean over the batch) and the KL(unedited || edited) at the
        locality rows' answer positions (mean over positions), weighted by :meth:`loss_weights`.
        Decoupled backward (module docstring): the returned loss has the real value and the
        exact gradient for the hypernetwork."""
        outer = [k for k in (REQUEST, GENERALITY) if k in self.hp.edit_loss_on]
        batches = self._batches(batch, [REQUEST, GENERALITY, LOCALITY], cached=True)
        factors, refs = self._factors(batches, len(batch))
        if self.hyper.training:
            self.update_norms(factors)
        groups = self.training_groups(len(batch))
        group_of = torch.empty(len(batch), dtype=torch.long)
        for g, members in enumerate(groups):
            group_of[members] = g
        shifts = self.make_shifts(factors, groups)
        leaves = {n: s.leaves() for n, s in shifts.items()}
        tensors = [t for s in leaves.values() for t in (s.left, s.right) if t.requires_grad]
        live = [t for s in shifts.values() for t in (s.left, s.right) if t.requires_grad]
        w_edit, w_loc = self.loss_weights()
        head = self.arch.module(self.model, "lm_head")
        with_gen = {int(c) for b in batches if GENERALITY in b.kind for c in b.case}
        used = []   # (batch, reference, "edit" | "loc")
        for b, ref in zip(batches, refs):
            if ref is not None:
                used.append((b, ref, "loc"))
            elif b.kind[0] in outer:
                used.append((b, None, "edit"))
            elif b.kind[0] == REQUEST and GENERALITY in outer and REQUEST not in outer:
                lone = torch.tensor([int(c) not in with_gen for c in b.case], device=b.case.device)
                if lone.any():   # a case without a generality probe is scored on its request (as MEND)
                    used.append((b, lone, "edit"))
        # the whole batch's token counts, so that the batches' sums add up to batch means
        n_edit = max(1, sum(int(self._edit_positions(b, sel).sum()) for b, sel, k in used if k == "edit"))
        n_loc = max(1, sum(int(b.rows.target.numel()) for b, _, k in used if k == "loc"))
        grads = [torch.zeros_like(t) for t in tensors]
        edit_sum, loc_sum = 0.0, 0.0
        for b, ref, kind in used:
            with torch.enable_grad(), shifted(self.model, leaves, group_of.to(b.case.device)[b.case]):
                if kind == "edit":
                    pos = self._edit_positions(b, ref)
                    logp = torch.log_softmax(b.logits_at(head, pos), -1)
                    part = -logp.gather(-1, b.rows.target[pos][:, None]).sum()
                    loss = w_edit * part / n_edit
                else:
                    logp = torch.log_softmax(b.logits_at(head), -1)
                    part = (ref.exp() * (ref - logp)).sum()
                    loss = w_loc * part / n_loc
                if tensors:
                    for acc, g in zip(grads, torch.autograd.grad(loss, tensors, allow_unused=True)):
                        if g is not None:
                            acc += g
            if kind == "edit":
                edit_sum += float(part.detach())
            else:
                loc_sum += float(part.detach())
        edit_loss, loc_loss = edit_sum / n_edit, loc_sum / n_loc
        value = w_edit * edit_loss + w_loc * loc_loss
        surrogate = sum(((g * t).sum() for g, t in zip(grads, live)), torch.zeros((), device=self._net_device()))
        if not surrogate.requires_grad:   # nothing trainable reached the shift (cannot happen once built)
            surrogate = surrogate + sum(p.sum() * 0 for p in self.hyper.parameters())
        loss = surrogate - surrogate.detach() + value
        return loss, {"edit": edit_loss, "loc": loc_loss, **self._scalar_logs()}

    @staticmethod
    def _edit_positions(batch: RowBatch, rows: torch.Tensor | None) -> torch.Tensor:
        """Target positions of the selected rows (all rows when ``rows`` is None)."""
        if rows is None:
            return torch.ones_like(batch.rows.target, dtype=torch.bool)
        return batch.rows.positions_of(rows)

    def _scalar_logs(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def validation_metrics(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Each held-out case edited ALONE (T=1), as the harness measures: token accuracy on the
        request (reliability) and on the generality probes, and the fraction of locality answer
        positions whose argmax is unchanged by the edit."""
        head = self.arch.module(self.model, "lm_head")
        names = {REQUEST: "reliability", GENERALITY: "generality", LOCALITY: "locality"}
        buckets: dict[str, list[torch.Tensor]] = {n: [] for n in names.values()}
        for start in range(0, len(cases), self.hp.chunk_size):
            chunk = list(cases[start:start + self.hp.chunk_size])
            batches = self._batches(chunk, [REQUEST, GENERALITY, LOCALITY], cached=True)
            factors, refs = self._factors(batches, len(chunk))
            shifts = self.make_shifts(factors, [[i] for i in range(len(chunk))])
            for b, ref in zip(batches, refs):
                with shifted(self.model, shifts, b.case):
                    arg = b.logits_at(head).argmax(-1)
                want = ref.argmax(-1) if ref is not None else b.rows.target
                buckets[names[b.kind[0]]].append((arg == want).float())
        return {name: float(torch.cat(v).mean()) for name, v in buckets.items() if v}
