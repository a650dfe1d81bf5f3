"""MEND: Model Editor Networks with gradient Decomposition.

Follows Mitchell et al., 2022, "Fast Model Editing at Scale" (ICLR), official code
eric-mitchell/mend (``algs/mend.py``: GradientTransform and MEND.edit; ``nn.py``: IDMLP /
LRLinear; ``hooks.py``; ``trainer.py``: EditTrainer.edit_step; ``losses.py``: kl_loc_loss;
``config/alg/mend.yaml``, ``config/config.yaml``, ``config/model/gptj.yaml``). The shared math
(factor capture, normalisation, the low-rank networks, the hooks) is in editors/lib/hypernet.py.

Edit of one request (``edit``; lifelong: each edit is computed on the already edited model):

1. The mean NLL of ``target_new`` after ``prompt`` (teacher forced) is back-propagated to the
   edited modules; every real position with a non-zero gradient gives a rank-one factor pair
   (u = module input, delta = gradient of the module output), as the official ``nz_mask``.
2. Each pair, concatenated and standardised by running statistics (``norm: true``), goes
   through the module shape's network (``combine: true``, ``mlp_class: IDMLP``, ``n_hidden: 1``
   = two residual low-rank layers, ``rank: 1920``, ``init: id``, ``shared: true``: one network
   per shape with a learned scale/shift per module applied before the ReLU, as ``LRLinear``).
3. The pseudo-gradient ``sum_t delta~_t u~_t^T`` times the module's learned edit rate (init
   ``edit_lr``) is subtracted from the weight, in place (remembered, so ``reset`` restores the
   weights bit for bit).

Training (``training = "pipeline"``; the loop, data order, optimiser and cache are editbench/train/):
per training case, edit with its request (each case alone, official ``n_edits: 1``), then on
the edited model ``loss = cedit * NLL(edit rows) + cloc * KL(unedited || edited)`` on the
locality probes (official ``cedit: 0.1, cloc: 1.0``, ``train_base: false``), averaged over the
``editor.train.batch_size`` cases of a step (official: ``accumulate_bs: 10`` single edits per
optimiser step). The edit is applied through forward hooks that add the shift to the modules'
outputs: the LLM's weights are never changed during training. Optimiser settings: official Adam
``lr: 1e-6`` for the network, ``lr_lr: 1e-4`` for the edit rates, ``grad_clip: 100``.

Official defaults used: everything above, and the edited modules (GPT-J: ``fc_in`` and
``fc_out`` of layers 25-27, config/model/gptj.yaml). LLaMA-2 has no official config; its file
follows EasyEdit's hparams/TRAINING/MEND/llama-7b.yaml (gate/up/down_proj of layers 29-31,
the same method settings). SmolLM2 and the tiny models: conf/editor/mend.yaml and
conf/editor_model/mend/tiny.yaml (a CPU budget, docs/editors-hypernet.md).

Deviations, and why:

* Sign: the shift is ``W - lr * pseudo_grad`` (the paper's equation, and MALMEN's MEND
  re-implementation); the official code adds it (``p + lr * g``) and lets training flip the
  sign. Starting in the descent direction matters on a short CPU budget.
* Edit loss: ``edit_loss_on`` lists the rows whose NLL is the edit loss. The official trainer
  uses the rephrase only (``data.rephrase: true``); the default here also includes the request
  itself (``[request, generality]``), since the harness scores reliability on it. The
  official-model files set ``[generality]``.
* Locality KL at the locality probe's answer positions (what the harness scores), not at every
  position of the locality text.
* One optimiser: the pipeline's AdamW (weight decay 0 = Adam) trains everything at
  ``train.lr``. The edit rates are stored divided by ``lr_lr / train.lr`` and multiplied back
  when used; Adam's steps do not depend on a gradient's scale, so they move at ``lr_lr`` per
  step as with the official second optimiser (clipping sees their gradient scaled by the same
  factor). The official code also steps them with the first optimiser (``lr`` 1e-6 on top of
  1e-4): negligible, not reproduced.
* Running statistics: updated with every training batch's factor rows in one exact parallel
  update (official: row by row, same result), never at edit or validation time, and the
  identity before two rows were seen (official: NaN). They are part of the checkpoint.
* The gradient of the outer loss is taken in the decoupled form of the official MALMEN code
  (exact, see editors/lib/hypernet.py); the official MEND differentiates end to end through
  ``higher``. Same gradient.
* SmolLM2 CPU budget (conf/editor/mend.yaml): ``train.lr`` 1e-5 (official 1e-6 over ~100k GPU
  steps; here ~400 steps), the other method settings official.
* The layers below the lowest edited one run once per batch (``UpperStack``), and with
  ``cache_hidden`` once per training row for the whole training (the LLM is frozen); the LM
  head runs only at scored positions: speed only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from editbench.records import EditRequest
from editbench.registry import register
from editors.lib.hypernet import (GENERALITY, REQUEST, Factors, HypernetEditor, HypernetParams, Shift,
                                  stack_groups)


@dataclass
class MENDParams(HypernetParams):
    modules: list[str] = field(default_factory=lambda: ["mlp_in", "mlp_out"])
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    rank: int = 1920
    n_blocks: int = 2                 # official n_hidden: 1 -> two LRLinear layers
    edit_lr: float = 1e-4             # initial per-module edit rate
    lr_lr: float = 1e-4               # learning rate of the edit rates
    cedit: float = 0.1
    cloc: float = 1.0
    edit_loss_on: list[str] = field(default_factory=lambda: [REQUEST, GENERALITY])

    def check(self, editor: str) -> None:
        super().check(editor)
        if not self.lr_lr > 0:
            raise ValueError(f"editor '{editor}': lr_lr must be > 0, got {self.lr_lr}")
        if self.cedit < 0 or self.cloc < 0:
            raise ValueError(f"editor '{editor}': cedit and cloc must be >= 0, got {self.cedit} and {self.cloc}")


@register("mend")
class MEND(HypernetEditor):
    params_cls = MENDParams
    positions = "all"
    conditioning = "pre"
    norm_eps = 1e-7

    def _extra_parameters(self) -> dict[str, torch.Tensor]:
        return {"edit_lrs": torch.full((len(self.modules),), self.hp.edit_lr / self.lr_scale(self.hp.lr_lr))}

    def edit_lrs(self) -> torch.Tensor:
        """(n_modules,) effective edit rates."""
        return self.hyper.edit_lrs * self.lr_scale(self.hp.lr_lr)

    def loss_weights(self) -> tuple[float, float]:
        return self.hp.cedit, self.hp.cloc

    def make_shifts(self, factors: Sequence[Factors], groups: Sequence[Sequence[int]]) -> dict[str, Shift]:
        """Group g's shift is minus its edit rate times the summed pseudo-gradients of its requests."""
        lrs = self.edit_lrs()
        dev = lrs.device
        out = {}
        for i, m in enumerate(self.modules):
            us = [f[m.name][0].to(dev) for f in factors]
            ds = [f[m.name][1].to(dev) for f in factors]
            u_t, d_t = self.net(m)(torch.cat(us), torch.cat(ds), m.mode)
            sizes = [u.shape[0] for u in us]
            u_rows, d_rows = u_t.split(sizes), (-lrs[i] * d_t).split(sizes)
            out[m.name] = stack_groups([torch.cat([u_rows[j] for j in g]) for g in groups],
                                       [torch.cat([d_rows[j] for j in g]) for g in groups])
        return out

    @torch.no_grad()
    def edit(self, request: EditRequest) -> dict[str, Any]:
        factors = self.request_factors([request])
        shifts = self.make_shifts(factors, [[0]])
        info = self.apply_shifts({name: s.dense(0) for name, s in shifts.items()})
        info["factor_rows"] = int(next(iter(factors[0].values()))[0].shape[0])
        return info

    def _scalar_logs(self) -> dict[str, float]:
        return {"edit_lr_mean": float(self.edit_lrs().detach().mean())}
