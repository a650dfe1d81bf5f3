"""ROME: rank-one model editing of one MLP output projection.

Follows Meng et al., 2022, "Locating and Editing Factual Associations in GPT" (NeurIPS),
official code kmeng01/rome (``rome/rome_main.py``, ``compute_u.py``, ``compute_v.py``),
with the hyperparameters of EasyEdit's ``hparams/ROME/llama-7b.yaml`` and
``gpt-j-6B.yaml`` (zjunlp/EasyEdit) in conf/editor_model/rome/{llama2,gptj}.yaml.

Per edit and per layer in ``layers`` (one layer in every official config):

1. key ``k`` = mean input of ``mlp_out`` at the subject's last token over the context
   templates (``"" + prompt`` and 20 sampled prefixes); ``k*`` = the key at the prompt itself;
2. ``u = C^-1 k / |C^-1 k|`` with ``C = E[k k^T]`` from the covariance statistics
   (``mom2_adjustment``; EasyEdit's LLaMA config turns it off: ``u = k / |k|``);
3. ``v* = W k* + b + delta`` with ``delta`` optimised by the official loss (NLL of the new
   target on the templated prompts + ``kl_factor`` x KL on ``"{subject} is a"`` + weight
   decay, norm clamped to ``clamp_norm_factor`` x |W k* + b|);
4. ``W += (v* - W k* - b) u^T / (u . k*)`` so that the new weight maps k* exactly to v*.
   In a half-precision model (llama2, gptj load in bfloat16) the update is added to a
   float32 master of W that accumulates every edit, and W is that master rounded to the
   model's dtype (editors/lib/precision.py); the official code runs in float32.

Shared math lives in ``editors/lib/locate.py``; the statistics in ``editors/lib/layer_stats.py``.

Deviations (all documented in docs/editors-locate.md):

* Context templates are sampled from the model as in the official code but with a fixed
  seed (``context_template_seed``) and the five starters of MEMIT/EasyEdit ("The",
  "Therefore", ...) instead of GPT-2's ``<|endoftext|>``, so runs are reproducible and
  every tokenizer works.
* The subject's last token is found from tokenizer offsets of ``request.subject`` inside
  ``request.prompt``. When the prompt does not contain the subject, the prompt's last
  token is used and the edit info says ``subject_found: false``.
* The (prompt, target) tokenisation is the harness's (``editbench.scoring.encode``).
* ``v_loss_layer`` is not a parameter: the loss is read from the model's output logits,
  which is what the official code does whenever ``v_loss_layer`` is the last layer (it is
  in every official config).
* Covariance statistics come from a local corpus (see layer_stats.py) with a configurable
  sample count, instead of downloaded Wikipedia statistics: the llama2/gptj configs request
  the official 100,000 texts, but the local ``wiki_paragraphs.txt`` has 6,268 paragraphs,
  all of which are then used. ``provenance()`` reports the corpus and the texts and tokens
  actually used (the run's env.json), and building the editor warns when they are fewer
  than requested.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from editbench.records import EditRequest
from editbench.registry import register
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.layer_stats import second_moments_with_provenance
from editors.lib.forward import StreamDelta
from editors.lib.precision import Float32Masters
from editors.lib.locate import (LocateParams, RankOneUpdate, add_to_weight, build_edit_rows,
                                capture_layers, generate_context_templates, grouped_key_means, optimize_value,
                                rome_rank_one)

log = logging.getLogger(__name__)


@dataclass
class ROMEParams(LocateParams):
    layers: list = field(default_factory=lambda: [5])
    mom2_adjustment: Any = True          # true | false | auto (use the statistics when available)

    def __post_init__(self):
        super().__post_init__()
        if self.mom2_adjustment not in (True, False, "auto"):
            raise ValueError(f"mom2_adjustment must be true, false or auto, got {self.mom2_adjustment!r}")


@register("rome")
class ROME(Editor):
    params_cls: type = ROMEParams

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(self.params_cls, cfg, self.name)
        self.edit_layers = [arch.layer_index(int(i)) for i in self.candidate_layers()]
        if not self.edit_layers:
            raise ValueError(f"editor '{self.name}': no layer to edit")
        self.templates = generate_context_templates(model, tokenizer, self.hp.context_template_length_params,
                                                    self.hp.context_template_seed)
        self.tail = StreamDelta(model, arch)
        self.cov = self._covariances(self.edit_layers)
        #: the updates of the last edit (for inspection and tests)
        self.last_updates: list[RankOneUpdate] = []
        #: float32 masters of the edited weights of a half-precision model (editors/lib/precision.py)
        self.masters = Float32Masters(self._originals)

    def candidate_layers(self) -> Sequence[int]:
        return self.hp.layers

    def _covariances(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        #: what the covariance statistics were computed from (``provenance()``)
        self.cov_provenance: dict[str, Any] = {"used": False, "reason": "mom2_adjustment=false"}
        if self.hp.mom2_adjustment is False:
            return {}
        try:
            cov, info = second_moments_with_provenance(self.model, self.tok, self.arch, layers,
                                                       self.hp.stats_config())
        except FileNotFoundError as e:
            if self.hp.mom2_adjustment == "auto":
                log.warning("editor '%s': no covariance statistics (%s); editing without C^-1", self.name, e)
                self.cov_provenance = {"used": False, "reason": f"mom2_adjustment=auto and no corpus: {e}"}
                return {}
            raise
        self.cov_provenance = {"used": True, **info}
        return cov

    def provenance(self) -> dict[str, Any]:
        """``{"covariance": ...}``: the corpus, requested and used texts and tokens of the
        covariance statistics (``{"used": false, "reason": ...}`` when editing without C^-1)."""
        return {"covariance": dict(self.cov_provenance)}

    # ------------------------------------------------------------------ the math
    def compute_updates(self, request: EditRequest, layers: Sequence[int]) -> list[RankOneUpdate]:
        """ROME's update at each of ``layers``, each computed on the current model (one
        shared forward pass for the keys and the residual streams). Nothing is changed."""
        hp = self.hp
        rows = build_edit_rows(self.tok, [request], self.templates, hp.fact_token, hp.kl_prompt).to(self.device)
        caps = capture_layers(self.model, self.arch, rows, layers)
        bare = int(rows.bare_rows[0])
        updates = []
        for layer in layers:
            layer = self.arch.layer_index(layer)
            cap = caps[layer]
            current = cap.values[bare].float()           # W k* + b: the MLP output at the subject token
            res = optimize_value(self.tail, rows, layer, cap, current.norm()[None], hp)
            value_star = current + res.delta[0].to(current.device)
            key_star = cap.keys[bare].float()
            key_mean = grouped_key_means(rows, cap.keys)[0]
            left, right = rome_rank_one(key_mean, key_star, value_star, current, self.cov.get(layer))
            updates.append(RankOneUpdate(
                layer=layer, weight=f"{self.arch.name('mlp_out', layer)}.weight", left=left, right=right,
                key=key_star, value=value_star,
                info={"layer": layer, "v_loss": round(res.loss[0], 4), "v_steps": res.steps[0],
                      "subject_found": rows.subject_found[0]}))
        return updates

    def apply(self, update: RankOneUpdate) -> None:
        (param,) = self.remember([update.weight])
        add_to_weight(param, update.delta(), self.arch, self.masters.master(update.weight, param))

    def relative_change(self, update: RankOneUpdate) -> float:
        """|ΔW|_F / |W|_F of an update against the current weight (WilKE's criterion)."""
        w = self.model.get_parameter(update.weight).detach().float()
        return float(update.right.norm() * update.left.norm() / w.norm())

    # ------------------------------------------------------------------ protocol
    def edit(self, request: EditRequest) -> dict[str, Any]:
        self.last_updates = []
        for layer in self.edit_layers:  # official: sequentially, each on the model edited so far
            (update,) = self.compute_updates(request, [layer])
            self.apply(update)
            self.last_updates.append(update)
        return dict(self.last_updates[-1].info)

    def reset(self) -> None:
        self.masters.clear()
        super().reset()
