"""FT: constrained fine-tuning of chosen MLP output projections, one edit at a time.

Follows the FT baseline of ROME (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT", kmeng01/rome ``baselines/ft``) and EasyEdit's FT/FT-M
(zjunlp/EasyEdit ``easyeditor/models/ft``):

* ``objective=prompt_last`` (FT-L, the ROME paper's baseline): only the prompt is fed;
  at its last position the loss is the mean negative log-probability of the target's
  tokens (a bag-of-tokens objective, exactly as the official code computes it).
* ``objective=target_new`` (FT-M, EasyEdit): prompt + target teacher-forced, cross
  entropy on the target tokens only (prompt positions masked).

Adam on the weights of ``module`` at ``layers``, ``num_steps`` steps, stop early once the
loss is below ``early_stop_loss``; ``norm_constraint`` (a float) clamps every weight to
within that distance of its original value after each step (ROME's "constrained FT").

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

Deviation: none in the algorithm. The tokenisation of (prompt, target) is the harness's
(``editbench.scoring.encode``), so that training and scoring see the same target tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editbench.registry import register
from editbench.scoring import encode
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.forward import UpperStack


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

    def __post_init__(self):
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
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.weight_decay)
        steps = 0
        loss_value = float("nan")
        try:
            for steps in range(1, hp.num_steps + 1):
                opt.zero_grad(set_to_none=True)
                logits = head(upper.hidden_states()[0, positions])
                loss = -torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).mean()
                loss_value = loss.item()
                if loss_value < hp.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for w, w0 in zip(weights, originals):
                            w.copy_(torch.clamp(w, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        return {"steps": steps, "final_loss": loss_value}
