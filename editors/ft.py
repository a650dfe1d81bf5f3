"""FT: fine-tuning of chosen MLP output projections, one edit at a time (EasyEdit's FT-L / FT-M).

What is implemented is EasyEdit's FT (zjunlp/EasyEdit ``easyeditor/models/ft``,
``hparams/FT/*.yaml``), whose ``prompt_last`` objective is the loss of ROME's FT baseline code
(kmeng01/rome ``baselines/ft``):

* ``objective=prompt_last``: EasyEdit's **FT-L** (its survey, arXiv 2401.01286). Only the
  prompt is fed; at its last position the loss is the mean negative log-probability of the
  target's tokens (a bag-of-tokens objective, exactly as both official codes compute it).
* ``objective=target_new``: EasyEdit's **FT-M**. Prompt + target teacher-forced, cross
  entropy on the target tokens only (prompt positions masked).

**Not the ROME paper's constrained baseline.** The ROME paper (Meng et al., 2022) compares
against FT+L, fine-tuning with an L-infinity constraint on the weight change (after Zhu et
al., 2020, arXiv 2012.00363): after every step each weight is clamped to
``[w0 - eps, w0 + eps]`` around its original. EasyEdit's FT-L keeps the name but runs
without the constraint (``norm_constraint: false`` in every EasyEdit FT config), and so do
the defaults here; the tables therefore name the editor ``ft[easyedit-prompt_last]`` or
``ft[easyedit-target_new]`` (``variant`` in conf/editor/ft.yaml). The constraint is the
option ``norm_constraint`` (a float eps; null: off). The paper's FT+L is
``objective=prompt_last``, ``layers=[0]``, lr 5e-4, 25 steps, ``norm_constraint=5e-5`` for
GPT-J-6B (kmeng01/rome ``hparams/FT/EleutherAI_gpt-j-6B_constr.json``; GPT-2 XL: 5e-4);
run it with ``editor.variant=null`` so that it is labelled plain ``ft`` (the editor warns
when a constraint is set under an ``easyedit-*`` label).

Adam on the weights of ``module`` at ``layers``, ``num_steps`` steps, stop early once the
loss is below ``early_stop_loss``.

Precision: in a half-precision model (llama2 and gptj load in bfloat16) Adam steps float32
master copies of the trained weights (``editors.lib.precision.Float32Masters``, kept until
``reset`` so they accumulate over the lifelong sequence), and after every step the model
gets the master rounded to its dtype; the gradients are those of the model as it is
(bfloat16). Stepping the bfloat16 weights themselves would lose every step smaller than half
a unit in the last place (at lr 4e-5 every weight with ``|w| > ~0.016``); the official codes
run in float32. The constraint clamps the master; the model's weight is its rounding, so in
bfloat16 it can exceed ``eps`` by up to half a unit in the last place of the weight. Float32
models take exactly the code path they always took.

Defaults (conf/editor/ft.yaml, conf/editor_model/ft/*.yaml):
* GPT-J-6B: fc_out of layers 25-27, lr 5e-4, 25 steps (as the harness issue specifies;
  EasyEdit's gpt-j-6B.yaml uses layer 21 alone with the same lr and steps).
* LLaMA-2-7B: down_proj of the last three layers, lr 4e-5 as in RECIPE's FT baseline
  (EasyEdit's llama-7b.yaml uses layer 21, lr 5e-4).
* SmolLM2-135M and the tiny models: see conf/editor/ft.yaml (tuned here, documented in
  docs/editors.md).

Speed: the layers below the lowest edited layer are run once per edit, without
gradients (``editors.lib.forward.UpperStack``), and the LM head is applied only at the
positions the loss reads; the loss and its gradients are unchanged.

Deviations: the tokenisation of (prompt, target) is the harness's
(``editbench.scoring.encode``), so that training and scoring see the same target tokens.
Only the projection's ``weight`` is trained; the official codes select parameters by name
prefix, which also trains GPT-J's ``fc_out.bias`` (LLaMA's ``down_proj`` has no bias).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from editbench.registry import register
from editbench.scoring import encode
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.forward import UpperStack
from editors.lib.precision import Float32Masters, check_autocast, mixed_precision

log = logging.getLogger(__name__)


@dataclass
class FTParams:
    layers: list[int] = field(default_factory=lambda: [-1])
    module: str = "mlp_out"
    objective: str = "target_new"
    lr: float = 5e-4
    num_steps: int = 25
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2
    #: null (float32) | bfloat16: the training steps' forward passes under autocast
    #: (editbench.models.autocast_context); Adam steps float32 weights (or masters)
    autocast: str | None = None

    def __post_init__(self):
        check_autocast("ft", self.autocast)
        if self.objective not in ("prompt_last", "target_new"):
            raise ValueError(f"editor 'ft': objective must be prompt_last or target_new, got '{self.objective}'")
        if isinstance(self.norm_constraint, bool):  # EasyEdit writes `norm_constraint: false`
            self.norm_constraint = None


@register("ft")
class FT(Editor):
    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(FTParams, cfg, "ft")
        self.layer_indices = [arch.layer_index(layer) for layer in self.hp.layers]
        self.weight_names = [f"{arch.name(self.hp.module, layer)}.weight" for layer in self.layer_indices]
        #: float32 masters of the trained weights of a half-precision model (editors/lib/precision.py)
        self.masters = Float32Masters(self._originals)
        variant = str(self.cfg.get("variant") or "")
        if self.hp.norm_constraint is not None and variant.startswith("easyedit"):
            log.warning("editor 'ft': norm_constraint=%g is the ROME paper's constrained FT+L, not EasyEdit's "
                        "unconstrained FT-L/FT-M, but the tables label it ft[%s]; set editor.variant=null "
                        "(or another name) to label it correctly", self.hp.norm_constraint, variant)

    def edit(self, request):
        hp = self.hp
        enc = encode(self.tok, request.prompt, request.target_new)
        ids = torch.tensor([enc.ids], device=self.device)
        targets = torch.tensor(enc.target_ids, device=self.device)
        if hp.objective == "prompt_last":
            inputs = ids[:, :enc.start]
            positions = torch.tensor([enc.start - 1] * len(enc.target_ids), device=self.device)
        else:
            inputs = ids
            positions = torch.arange(enc.start - 1, len(enc.ids) - 1, device=self.device)
        # Layers below the lowest edited one never change: run them once.
        upper = UpperStack.capture(self.model, self.arch, min(self.layer_indices), inputs, torch.ones_like(inputs))
        head = self.arch.module(self.model, "lm_head")
        weights = self.remember(self.weight_names)
        originals = [self._originals[n] for n in self.weight_names]
        # Half-precision models: Adam steps float32 masters (accumulated over the edits since the
        # last reset) and the model gets them rounded after every step; the gradients are those
        # of the model as it is. Float32 models: Adam steps the weights themselves, as always.
        masters = [self.masters.master(n, w) for n, w in zip(self.weight_names, weights)]
        stepped = [w if m is None else m for w, m in zip(weights, masters)]
        if hp.norm_constraint is not None:   # the clamp's centre, in the dtype of what Adam steps
            bounds = [w0 if m is None else w0.float() for w0, m in zip(originals, masters)]
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(stepped, lr=hp.lr, weight_decay=hp.weight_decay)
        steps = 0
        loss_value = float("nan")
        try:
            # bfloat16 autocast (hp.autocast): the layers from the lowest trained one and the head
            # in half precision for the whole loop; the trained weights and Adam stay float32
            with mixed_precision(self.model, self.arch, min(self.layer_indices), hp.autocast, keep=weights):
                for steps in range(1, hp.num_steps + 1):
                    opt.zero_grad(set_to_none=True)
                    for w, m in zip(weights, masters):
                        if m is not None:
                            w.grad = None
                    logits = head(upper.hidden_states()[0, positions])
                    loss = -torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).mean()
                    loss_value = loss.item()
                    if loss_value < hp.early_stop_loss:
                        break
                    loss.backward()
                    for w, m in zip(weights, masters):
                        if m is not None:
                            m.grad = None if w.grad is None else w.grad.float()
                    opt.step()
                    with torch.no_grad():
                        if hp.norm_constraint is not None:
                            for t, t0 in zip(stepped, bounds):
                                t.copy_(torch.clamp(t, t0 - hp.norm_constraint, t0 + hp.norm_constraint))
                        for n, w, m in zip(self.weight_names, weights, masters):
                            if m is not None:
                                self.masters.write(n, w)
        finally:
            for w, m in zip(weights, masters):
                w.requires_grad_(False)
                w.grad = None
                if m is not None:
                    m.grad = None
        return {"steps": steps, "final_loss": loss_value}

    def reset(self) -> None:
        self.masters.clear()
        super().reset()
