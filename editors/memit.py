"""MEMIT: mass-editing memory in a transformer, spread over a range of MLP layers.

Follows Meng et al., 2023, "Mass-Editing Memory in a Transformer" (ICLR), official code
kmeng01/memit (``memit/memit_main.py``, ``compute_z.py``, ``compute_ks.py``), with the
hyperparameters of kmeng01/memit ``hparams/MEMIT/EleutherAI_gpt-j-6B.json`` and EasyEdit's
``hparams/MEMIT/llama-7b.yaml`` in conf/editor_model/memit/{gptj,llama2}.yaml.

For a batch of requests (``edit_batch``; ``edit`` is a batch of one):

1. ``z_i`` = residual stream after the LAST layer of ``layers`` at request i's subject
   token, plus a delta optimised with the official loss (NLL on the templated prompts,
   KL on ``"{subject} is a"``, weight decay, clamp ``clamp_norm_factor`` x |h|);
2. for each layer l of ``layers``, lowest first, on the model edited so far:
   ``K`` = keys at l (mean over the template groups [bare prompt], [5 prefixes]),
   ``R = (z - h_last(current)) / (layers left)``,
   ``ΔW_l = R K^T (mom2_update_weight * C_l + K K^T)^-1`` (double precision),
   ``W_l += ΔW_l`` (in a half-precision model: added to a float32 master of ``W_l`` that
   accumulates every edit, and ``W_l`` is the master rounded to the model's dtype,
   editors/lib/precision.py; the official code runs in float32).

Shared math: ``editors/lib/locate.py``; statistics: ``editors/lib/layer_stats.py``.

SmolLM2 default: ``mom2_update_weight`` 1500 instead of 15000. The fraction of a key's
residual a layer writes is ``s / (λ + s)`` with ``s = kᵀ C⁻¹ k ≈ d_in``: 15000 suits GPT-J's
``d_in = 16384`` but writes only ~9% per layer with SmolLM2's 1536 (docs/editors-locate.md).

Covariance statistics: as ROME's (a local corpus; the llama2/gptj configs request 100,000
texts and the local corpus has 6,268); ``provenance()`` reports the texts and tokens used.

Deviations: the value deltas of a batch are optimised together (one forward pass per
step for all requests); the objective, the per-request early stop and the per-request
clamp are those of the official per-request loop, so the result is the same up to float
rounding. Context templates are sampled with a fixed seed. The loss is read from the
output logits (the official ``v_loss_layer`` is the last layer in every config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from editbench.records import EditRequest
from editbench.registry import register
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.layer_stats import second_moments_with_provenance
from editors.lib.forward import StreamDelta
from editors.lib.precision import Float32Masters
from editors.lib.locate import (LocateParams, add_to_weight, build_edit_rows, capture_layers,
                                generate_context_templates, grouped_key_means, memit_weight_delta, optimize_value)


@dataclass
class MEMITParams(LocateParams):
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    mom2_update_weight: float = 15000.0
    v_num_grad_steps: int = 25
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])

    def __post_init__(self):
        super().__post_init__()
        if not self.layers:
            raise ValueError("editor 'memit': layers must not be empty")


@register("memit")
class MEMIT(Editor):
    supports_batch = True

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(MEMITParams, cfg, self.name)
        self.edit_layers = sorted({arch.layer_index(int(i)) for i in self.hp.layers})
        self.templates = generate_context_templates(model, tokenizer, self.hp.context_template_length_params,
                                                    self.hp.context_template_seed, separate_bare=True)
        self.tail = StreamDelta(model, arch)
        self.cov, info = second_moments_with_provenance(model, tokenizer, arch, self.edit_layers,
                                                        self.hp.stats_config())
        #: what the covariance statistics were computed from (``provenance()``)
        self.cov_provenance: dict[str, Any] = {"used": True, **info}
        #: float32 masters of the edited weights of a half-precision model (editors/lib/precision.py)
        self.masters = Float32Masters(self._originals)

    def edit(self, request: EditRequest) -> dict[str, Any]:
        return self.edit_batch([request])

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        hp, arch = self.hp, self.arch
        rows = build_edit_rows(self.tok, requests, self.templates, hp.fact_token, hp.kl_prompt).to(self.device)
        bare, look = rows.bare_rows, rows.lookup[rows.bare_rows]
        z_layer = self.edit_layers[-1]

        cap = capture_layers(self.model, arch, rows, [z_layer])[z_layer]
        z_init = cap.hidden[bare, look].float()
        res = optimize_value(self.tail, rows, z_layer, cap, z_init.norm(dim=-1), hp)
        z = z_init + res.delta.to(z_init.device)

        for i, layer in enumerate(self.edit_layers):
            caps = capture_layers(self.model, arch, rows, [layer, z_layer])
            keys = grouped_key_means(rows, caps[layer].keys)                  # (n, d_in)
            current = caps[z_layer].hidden[bare, look].float()                # (n, d)
            resid = (z - current.to(z.device)) / (len(self.edit_layers) - i)  # spread over the layers left
            cov = self.cov[layer]
            delta = memit_weight_delta(keys.to(cov.device), resid.to(cov.device), cov, hp.mom2_update_weight)
            name = f"{arch.name('mlp_out', layer)}.weight"
            (param,) = self.remember([name])
            add_to_weight(param, delta, arch, self.masters.master(name, param))
        return {"layers": list(self.edit_layers), "v_loss": round(sum(res.loss) / len(res.loss), 4),
                "v_steps": max(res.steps), "subject_found": all(rows.subject_found)}

    def reset(self) -> None:
        self.masters.clear()
        super().reset()

    def provenance(self) -> dict[str, Any]:
        """``{"covariance": ...}``: the corpus, requested and used texts and tokens of the statistics."""
        return {"covariance": dict(self.cov_provenance)}
