"""UltraEdit: a closed-form parameter shift from hidden states and gradients, lifelong normalised.

Follows Gu et al., 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in
Large Language Models" (arXiv 2505.14679), official code XiaojieGu/UltraEdit
(``editor/ultraedit.py``, ``editor/base.py``, ``nets.py`` ``RunningMeanStd``, ``util.py``
``TracerDict``); the code here is our own.

For a batch of requests (``edit_batch``; ``edit`` is a batch of one; the paper's protocol is
one batch of 100 edits per turn):

1. The requests are sorted by length (longest first, as the official collate does) and cut
   into groups of ``grad_batch_size`` (official ``dataset.batch_size`` 10). For each group, one
   forward pass of (prompt + target without its last token), right-padded, and the backward
   pass of the mean cross entropy over all target tokens of the group. At every edited module
   and every position that predicts a target token (``token=ans``; ``all``: every token of the
   row) the module's input (the *key* ``k``) and the gradient of the loss with respect to its
   output (``g``) are recorded, in float32 (official ``TracerDict``). The model does not change
   during these passes.
2. Lifelong normalisation: every module of one weight shape (``d_in``, ``d_out``) shares one set
   of statistics over ``[k, g]`` (official: one ``RunningMeanStd`` per shape): the count ``n``,
   the mean ``mu`` and the sum of squared deviations ``M2``, merged with every group's rows as
   they arrive and kept over the whole lifelong sequence until ``reset()``;
   ``sigma = sqrt(M2 / (n - 1 + eps))``, ``[k^, g^] = ([k, g] - mu) / (sigma + eps)`` with the
   statistics that already include the current batch (eps: float32's machine epsilon).
3. Per module, with ``K`` (N, d_in) the raw keys of the batch and the pseudo-values
   ``V_i = -lr * |k^_i|^2 * g^_i`` (N, d_out): the ridge solution ``X = (K^T K + I)^-1 K^T V``
   (d_in, d_out), i.e. ``W += X^T`` (out, in) for every edited module at once (the gradients of
   step 1 were all taken before any change).

Official defaults (the official run.sh and configs; ``lr`` 1e-6, ``grad_batch_size`` 10, token
``ans``, ridge ``I`` (weight 1) everywhere):

* GPT-J-6B (conf/editor_model/ultraedit/gptj.yaml): ``fc_out`` of layers 18-26 (its
  ``config/model/gpt-j.yaml``, the zsRE / UltraEditBench setting).
* LLaMA-2-7B (conf/editor_model/ultraedit/llama2.yaml): the official code has no LLaMA-2
  config; its ``llama-3-instruct`` config (LLaMA-3-8B-Instruct, the same architecture family,
  32 layers, hidden 4096) is used: ``gate_proj`` of layers 11-15 and ``up_proj`` of 18-24.
* SmolLM2-135M (conf/editor/ultraedit.yaml): chosen on ``data=cf data.split=val`` only
  (docs/editors-locate.md, "UltraEdit").

Modules are named as ``{module, layers}`` groups (``edit_modules``): ``module`` is an ArchSpec
template (``mlp_in``, ``mlp_out``, ``attn_out``) or the name of a submodule of the layer's MLP
(``gate_proj``), so one config serves both families where the names agree.

Deviations:

* The statistics merge a block of m rows exactly (Chan et al.'s parallel update,
  ``M2 += M2_block + delta^2 n m / (n + m)``); the official update adds ``m * x.var(0)`` (the
  unbiased block variance times m, i.e. ``M2_block * m / (m - 1)``), which depends on how the
  rows are grouped into blocks (about 2% on the variance for its blocks of ~50 rows) and is NaN
  for a one-row block (a one-token target edited alone). With the exact merge a stream of
  edits leaves the same statistics as the same rows in one batch (tested). They are kept in
  float64 (official float32).
* The ridge solution is computed as ``K^T (K K^T + I)^-1 V`` (an N x N system, the same matrix
  by the push-through identity) when N < d_in, in float64; the official code solves the
  d_in x d_in system in float32. Its chunking of the normalisation into zero-padded blocks of
  ``editor.batch_size`` 128 rows changes nothing (the padding rows are dropped) and is omitted.
* The (prompt, target) tokenisation is the harness's (``editbench.scoring.encode``), so the
  edited tokens are the scored ones; the layers below the lowest edited module are run once
  without gradients (``editors.lib.forward.UpperStack``) and the head only where the loss
  reads; the cross entropy is computed in float32.
* In a half-precision model the shifts accumulate in float32 masters
  (editors/lib/precision.py); the official code adds them to the bfloat16 weights.
* ``reset()`` restores the weights bit for bit and empties the statistics (official: reload
  the model; its statistics live until the process ends).

A one-row statistics set has ``sigma = 0`` and normalises its row to zero, so the very first
edit of a one-token target alone changes nothing: the method is built for batches (the paper
edits 100 facts per turn; conf/editor/ultraedit.yaml sets ``batch_edit: true``; for a
chunk of 1000 the paper's protocol is ``runner.edit_batch_size=100``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from editbench.editor import Editor, hparams_from_cfg
from editbench.models import ArchSpec
from editbench.records import EditRequest
from editbench.registry import register
from editbench.scoring import encode, pad_batch
from editors.lib.forward import UpperStack
from editors.lib.locate import add_to_weight
from editors.lib.precision import Float32Masters

#: ArchSpec templates an edit module may name; any other name is a submodule of the layer's MLP
ARCH_TEMPLATES = ("mlp_in", "mlp_out", "attn_out")
TOKENS = ("ans", "all")
_EPS = torch.finfo(torch.float32).eps


@dataclass
class UltraEditParams:
    #: [{module: <ArchSpec template or MLP submodule>, layers: [...]}, ...]
    edit_modules: list = field(default_factory=lambda: [{"module": "mlp_out", "layers": [-3, -2]}])
    lr: float = 1e-6
    grad_batch_size: int = 10
    token: str = "ans"

    def __post_init__(self):
        if not isinstance(self.edit_modules, (list, tuple)) or not self.edit_modules:
            raise ValueError("editor 'ultraedit': edit_modules must be a non-empty list of {module, layers}")
        for group in self.edit_modules:
            if (not isinstance(group, dict) or set(group) != {"module", "layers"} or not isinstance(group["module"], str)
                    or not isinstance(group["layers"], (list, tuple)) or not group["layers"]
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in group["layers"])):
                raise ValueError(f"editor 'ultraedit': edit_modules entry {group!r} must be "
                                 f"{{module: <name>, layers: [<int>, ...]}}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"editor 'ultraedit': lr must be a number > 0, got {self.lr!r}")
        if isinstance(self.grad_batch_size, bool) or not isinstance(self.grad_batch_size, int) \
                or self.grad_batch_size < 1:
            raise ValueError(f"editor 'ultraedit': grad_batch_size must be a positive integer, got "
                             f"{self.grad_batch_size!r}")
        if self.token not in TOKENS:
            raise ValueError(f"editor 'ultraedit': token must be one of {', '.join(TOKENS)}, got {self.token!r}")


# --------------------------------------------------------------------------- lifelong normalisation
class LifelongNormalizer:
    """Running count, mean and sum of squared deviations of feature rows (float64), merged
    block by block exactly, so the order and grouping of the rows do not matter."""

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        self.n = 0
        self.mean = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(self.size, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x`` (m, size)."""
        if x.ndim != 2 or x.shape[1] != self.size:
            raise ValueError(f"normaliser of size {self.size} got rows of shape {tuple(x.shape)}")
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(self.device, torch.float64)
        block_mean = x.mean(0)
        block_m2 = (x - block_mean).pow(2).sum(0)
        delta = block_mean - self.mean
        n = self.n + m
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + block_m2 + delta.pow(2) * (self.n * m / n)
        self.n = n

    @property
    def std(self) -> torch.Tensor:
        """``sqrt(M2 / (n - 1 + eps))`` (the official ``RunningMeanStd.std``)."""
        return (self.m2 / (self.n - 1 + _EPS)).sqrt()

    @torch.no_grad()
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + eps)``, in float64."""
        return (x.to(self.device, torch.float64) - self.mean) / (self.std + _EPS)


# --------------------------------------------------------------------------- the math
def pseudo_values(keys: torch.Tensor, grads: torch.Tensor, normalizer: LifelongNormalizer, lr: float) -> torch.Tensor:
    """``V_i = -lr * |k^_i|^2 * g^_i`` (N, d_out) from the normalised ``[k, g]`` rows."""
    z = normalizer.normalize(torch.cat([keys, grads], -1))
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], -1)
    return -lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat


def ridge_shift(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``((K^T K + I)^-1 K^T V)^T`` (d_out, d_in), in float64: the shift that maps each key
    ``k_i`` close to ``V_i`` (ridge weight 1, as the official code)."""
    K = keys.to(torch.float64)
    V = values.to(device=K.device, dtype=torch.float64)
    n, d_in = K.shape
    if n < d_in:   # K^T (K K^T + I)^-1 V: the same matrix, an n x n system
        eye = torch.eye(n, dtype=torch.float64, device=K.device)
        X = K.T @ torch.linalg.solve(K @ K.T + eye, V)
    else:
        eye = torch.eye(d_in, dtype=torch.float64, device=K.device)
        X = torch.linalg.solve(K.T @ K + eye, K.T @ V)
    return X.T


# --------------------------------------------------------------------------- features
@dataclass
class EditFeatures:
    """Per edited module: the keys (N, d_in) and output gradients (N, d_out) of one batch, as
    blocks (one per forward/backward group, in the order the statistics merge them)."""

    keys: dict[str, list[torch.Tensor]]
    grads: dict[str, list[torch.Tensor]]
    loss: list[float]

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.keys[name]), torch.cat(self.grads[name])


def resolve_module(arch: ArchSpec, module: str, layer: int) -> str:
    """The module name of an ``edit_modules`` entry at ``layer``."""
    if module in ARCH_TEMPLATES:
        return arch.name(module, layer)
    return f"{arch.name('mlp', layer)}.{module}"


def edit_features(model: nn.Module, arch: ArchSpec, tok, requests: Sequence[EditRequest], modules: dict[str, int],
                  grad_batch_size: int, token: str = "ans") -> EditFeatures:
    """Step 1 of the module docstring: keys and output gradients of ``requests`` at
    ``modules`` (name -> layer index) on the model as it is."""
    encs = [encode(tok, r.prompt, r.target_new) for r in requests]
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids), reverse=True)   # stable, as the official
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = min(modules.values())
    head = arch.module(model, "lm_head")
    out = EditFeatures({n: [] for n in modules}, {n: [] for n in modules}, [])
    for s in range(0, len(order), grad_batch_size):
        group = [encs[i] for i in order[s:s + grad_batch_size]]
        ids, mask = pad_batch([e.ids[:-1] for e in group], pad, "right", device)
        rows, cols, labels = [], [], []
        for r, e in enumerate(group):
            for k, t in enumerate(e.target_ids):
                rows.append(r)
                cols.append(e.start - 1 + k)
                labels.append(t)
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        if token == "ans":
            where = (rows_t, cols_t)
        else:
            where = torch.nonzero(mask, as_tuple=True)
        got_k: dict[str, torch.Tensor] = {}
        got_g: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(module, args, output):
                got_k[name] = args[0][where].detach().float()

                def grad_hook(grad):
                    got_g[name] = grad[where].detach().float()
                output.register_hook(grad_hook)
            return fn

        upper = UpperStack.capture(model, arch, start, ids, mask)
        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in modules]
        try:
            with torch.enable_grad():
                hidden = upper.hidden.clone().requires_grad_(True)
                logits = head(upper.hidden_states(hidden)[rows_t, cols_t])
                loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels, device=device))
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        out.loss.append(loss.item())
        for n in modules:
            out.keys[n].append(got_k[n])
            out.grads[n].append(got_g[n])
    return out


# --------------------------------------------------------------------------- the editor
@register("ultraedit")
class UltraEdit(Editor):
    supports_batch = True

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(UltraEditParams, cfg, "ultraedit")
        #: module name -> layer index, in config order
        self.modules: dict[str, int] = {}
        for group in self.hp.edit_modules:
            for layer in group["layers"]:
                try:
                    j = arch.layer_index(layer)
                except ValueError as err:
                    raise ValueError(f"editor 'ultraedit': edit_modules {group['module']!r}: {err}") from None
                name = resolve_module(arch, group["module"], j)
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"editor 'ultraedit': edit_modules entry {group['module']!r} names {name!r}, "
                                     f"which this {arch.family} model does not have (use one of "
                                     f"{', '.join(ARCH_TEMPLATES)} or a submodule of {arch.mlp!r})") from None
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                    raise ValueError(f"editor 'ultraedit': {name!r} (edit_modules {group['module']!r}) is not a "
                                     f"linear layer with a 2-d weight")
                if name in self.modules:
                    raise ValueError(f"editor 'ultraedit': {name!r} is listed twice in edit_modules")
                self.modules[name] = j
        #: module name -> (d_in, d_out); the modules of one shape share one set of statistics
        self.shapes = {n: tuple(arch.weight_out_in(model.get_submodule(n).weight).shape[::-1]) for n in self.modules}
        self.normalizers: dict[tuple[int, int], LifelongNormalizer] = {}
        for n, shape in self.shapes.items():
            if shape not in self.normalizers:
                self.normalizers[shape] = LifelongNormalizer(sum(shape), model.get_submodule(n).weight.device)
        #: float32 masters of the edited weights of a half-precision model (editors/lib/precision.py)
        self.masters = Float32Masters(self._originals)

    # ------------------------------------------------------------------ steps
    def features(self, requests: Sequence[EditRequest]) -> EditFeatures:
        """Keys and output gradients of ``requests`` on the model as it is (step 1)."""
        return edit_features(self.model, self.arch, self.tok, requests, self.modules, self.hp.grad_batch_size,
                             self.hp.token)

    def update_statistics(self, feats: EditFeatures) -> None:
        """Merge every block of ``feats`` into the lifelong statistics of its module's shape (step 2)."""
        for n, shape in self.shapes.items():
            for k, g in zip(feats.keys[n], feats.grads[n]):
                self.normalizers[shape].update(torch.cat([k, g], -1))

    def parameter_shifts(self, feats: EditFeatures) -> dict[str, torch.Tensor]:
        """Per module, the (out, in) shift of step 3 under the current statistics."""
        shifts = {}
        for n, shape in self.shapes.items():
            keys, grads = feats.rows(n)
            values = pseudo_values(keys, grads, self.normalizers[shape], self.hp.lr)
            shifts[n] = ridge_shift(keys, values)
        return shifts

    # ------------------------------------------------------------------ protocol
    def edit(self, request: EditRequest) -> dict[str, Any]:
        return self.edit_batch([request])

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        feats = self.features(requests)
        self.update_statistics(feats)
        shifts = self.parameter_shifts(feats)
        for n, delta in shifts.items():
            name = f"{n}.weight"
            (param,) = self.remember([name])
            add_to_weight(param, delta, self.arch, self.masters.master(name, param))
        n_rows = sum(k.shape[0] for k in feats.keys[next(iter(self.modules))])
        return {"rows": n_rows, "loss": round(sum(feats.loss) / len(feats.loss), 4),
                "shift_norm": round(max(float(d.norm()) for d in shifts.values()), 6)}

    def reset(self) -> None:
        for norm in self.normalizers.values():
            norm.clear()
        self.masters.clear()
        super().reset()

    def stats(self) -> dict[str, float]:
        """Rows merged into the lifelong statistics since the last reset (per shape, summed)."""
        return {"normalizer_rows": float(sum(norm.n for norm in self.normalizers.values()))}
