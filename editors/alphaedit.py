"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge.

Follows Fang et al., 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models" (ICLR), official code jianghoucheng/AlphaEdit (``AlphaEdit/AlphaEdit_main.py``,
``get_project`` in ``experiments/evaluate.py``), with the hyperparameters of
``hparams/AlphaEdit/EleutherAI_gpt-j-6B.json`` in conf/editor_model/alphaedit/gptj.yaml; the
official code has no LLaMA-2 config, so conf/editor_model/alphaedit/llama2.yaml holds its
``Llama3-8B.json`` values (the paper's LLaMA model).

Once, when the editor is built: for each layer l of ``layers``, ``C_l = E[k k^T]`` of the
inputs of ``mlp_out`` (the covariance statistics ROME/MEMIT use, editors/lib/layer_stats.py,
computed once and cached on disk) and ``P_l = U_0 U_0^T`` from the eigenvectors of ``C_l``
whose eigenvalue is below ``nullspace_threshold`` (the null space of the preserved keys;
:func:`null_space_projection`).

For a batch of requests (``edit_batch``; ``edit`` is a batch of one), exactly MEMIT's steps
(the target ``z`` after the last layer with the official value objective; per layer, lowest
first, the template-averaged keys ``K`` and the residual ``R`` spread over the layers left),
but each layer's update is

    ``ΔW_l = Xᵀ``,  ``(P_l (K Kᵀ + K_p K_pᵀ) + L2 I) X = P_l K Rᵀ``

(:func:`alphaedit_weight_delta`), where ``K_p K_pᵀ`` is the sum over the keys
of every earlier edit of the lifelong sequence at that layer: after each batch, the keys of
its requests are captured again on the edited model and added to it (the official
``cache_c``). ``X`` lies in the range of ``P_l``, so the output of the layer at every
preserved key (``P_l k = 0``) is unchanged; the earlier edits' keys enter the least squares,
so the update keeps their outputs close. ``reset()`` restores the weights bit for bit and
clears ``K_p K_pᵀ``.

Official defaults (GPT-J-6B; Llama3-8B): layers 3–8; 4–8, ``clamp_norm_factor`` 0.75,
``v_lr`` 0.5; 0.1, ``v_weight_decay`` 0.5, ``kl_factor`` 0.0625, 25 value steps, context
templates ``[[10, 5]]``, ``nullspace_threshold`` 2e-2, ``L2`` 10, 100,000 Wikipedia texts for
the statistics. The paper's protocol edits in batches of 100 (``runner.edit_batch_size=100``).

SmolLM2 defaults (conf/editor/alphaedit.yaml): the official GPT-J values (threshold 2e-2, L2
10, clamp 0.75, lr 0.5, decay 0.5, 25 steps, ``[[10, 5]]``) except layers 3–7 (MEMIT's SmolLM2
layers, 30 layers deep as LLaMA's 4–8 of 32) and statistics from 2000 texts (those MEMIT uses
on SmolLM2, so one cached file serves both); checked on ``data.split=val`` only
(docs/editors-locate.md: MEMIT's SmolLM2 clamp 4 gave the same numbers as 0.75 there).

Deviations: as in editors/memit.py (the value deltas of a batch are optimised together, with
the official per-request loss, early stop and clamp; seeded context templates; the loss read
from the output logits). The official hyperparameter files list ``mom2_update_weight``, which
its update never reads; it is not a hyperparameter here. The projection is an eigen-
decomposition (``eigh``) of the symmetric second moment where the official code takes its SVD
(the same vectors and values); it is computed when the editor is built (seconds on SmolLM2)
rather than stored on disk. The statistics use the local corpus (``provenance()`` reports the
texts and tokens used). In a half-precision model the updates accumulate in float32 masters
(editors/lib/precision.py), and ``K_p K_pᵀ`` is kept in float64 (official: float32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from editbench.editor import Editor, hparams_from_cfg
from editbench.records import EditRequest
from editbench.registry import register
from editors.lib.forward import StreamDelta
from editors.lib.layer_stats import second_moments_with_provenance
from editors.lib.locate import (LocateParams, add_to_weight, build_edit_rows, capture_layers,
                                generate_context_templates, grouped_key_means, optimize_value)
from editors.lib.precision import Float32Masters


# --------------------------------------------------------------------------- the math
# Here rather than in editors/lib/locate.py: no other editor uses it, and locate.py is in the
# import closure (the code fingerprint) of MEND/MALMEN/DAFNet's trained checkpoints.
def null_space_projection(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit's projection onto the null space of the preserved knowledge's keys.

    ``cov`` (d_in, d_in) is the keys' second moment ``E[k k^T]`` (editors/lib/layer_stats.py);
    its eigenvectors with eigenvalue below ``threshold`` span the null space (jianghoucheng/AlphaEdit
    ``get_project``, which takes the SVD of the same symmetric matrix). Returns ``P = U_0 U_0^T``
    (float32, on ``cov``'s device) and the null space's dimension. ``P k = 0`` for every ``k`` in
    the span of the other eigenvectors (the preserved subspace).
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    small = evecs[:, evals < threshold]
    return (small @ small.T).float(), int(small.shape[1])


def alphaedit_weight_delta(keys: torch.Tensor, resid: torch.Tensor, projection: torch.Tensor,
                           prev_keys_cov: torch.Tensor | None, l2: float) -> torch.Tensor:
    """AlphaEdit's update (d_out, d_in), in double precision: ``ΔW = Xᵀ`` with
    ``(P (K Kᵀ + K_p K_pᵀ) + l2 I) X = P K Rᵀ``.

    ``keys`` (n, d_in) and ``resid`` (n, d_out) hold one row per edit, ``projection`` is
    :func:`null_space_projection`'s ``P`` and ``prev_keys_cov`` the sum ``K_p K_pᵀ`` over the
    keys of earlier edits (None: no earlier edit). ``X = P (...) / l2`` lies in the range of
    ``P``, so ``ΔW k = 0`` for a preserved key ``k`` (``P k = 0``).
    """
    K = keys.double().T                    # (d_in, n)
    R = resid.double().T                   # (d_out, n)
    P = projection.double()
    gram = K @ K.T
    if prev_keys_cov is not None:
        gram = gram + prev_keys_cov.double()
    lhs = P @ gram + l2 * torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    X = torch.linalg.solve(lhs, P @ K @ R.T)   # (d_in, d_out)
    return X.T.float()


@dataclass
class AlphaEditParams(LocateParams):
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])
    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if not self.layers:
            raise ValueError("editor 'alphaedit': layers must not be empty")
        if not self.nullspace_threshold > 0:
            raise ValueError(f"editor 'alphaedit': nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if not self.L2 > 0:
            raise ValueError(f"editor 'alphaedit': L2 must be > 0, got {self.L2}")


@register("alphaedit")
class AlphaEdit(Editor):
    supports_batch = True

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(AlphaEditParams, cfg, self.name)
        self.edit_layers = sorted({arch.layer_index(int(i)) for i in self.hp.layers})
        self.templates = generate_context_templates(model, tokenizer, self.hp.context_template_length_params,
                                                    self.hp.context_template_seed, separate_bare=True)
        self.tail = StreamDelta(model, arch)
        cov, info = second_moments_with_provenance(model, tokenizer, arch, self.edit_layers, self.hp.stats_config())
        #: per layer: P, the projection onto the null space of the preserved keys
        self.projection: dict[int, torch.Tensor] = {}
        #: per layer: the null space's dimension (of d_in)
        self.null_dims: dict[int, int] = {}
        for layer in self.edit_layers:
            self.projection[layer], self.null_dims[layer] = null_space_projection(cov[layer],
                                                                                  self.hp.nullspace_threshold)
            if self.null_dims[layer] == 0:
                raise ValueError(f"editor 'alphaedit': no eigenvalue of layer {layer}'s key covariance is below "
                                 f"nullspace_threshold={self.hp.nullspace_threshold}: the update would be zero")
        del cov
        self.cov_provenance: dict[str, Any] = {"used": True, **info}
        #: per layer: K_p K_p^T over the keys of the earlier edits since the last reset (float64)
        self.prev_keys: dict[int, torch.Tensor] = {}
        self.n_prev_keys = 0
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
            P = self.projection[layer]
            delta = alphaedit_weight_delta(keys.to(P.device), resid.to(P.device), P, self.prev_keys.get(layer),
                                           hp.L2)
            name = f"{arch.name('mlp_out', layer)}.weight"
            (param,) = self.remember([name])
            add_to_weight(param, delta, arch, self.masters.master(name, param))
        # the official cache_c: this batch's keys, captured again on the edited model, join K_p K_p^T
        caps = capture_layers(self.model, arch, rows, self.edit_layers)
        for layer in self.edit_layers:
            K = grouped_key_means(rows, caps[layer].keys).double().to(self.projection[layer].device)
            gram = K.T @ K
            self.prev_keys[layer] = gram if layer not in self.prev_keys else self.prev_keys[layer] + gram
        self.n_prev_keys += len(requests)
        return {"layers": list(self.edit_layers), "v_loss": round(sum(res.loss) / len(res.loss), 4),
                "v_steps": max(res.steps), "subject_found": all(rows.subject_found)}

    def reset(self) -> None:
        self.prev_keys.clear()
        self.n_prev_keys = 0
        self.masters.clear()
        super().reset()

    def stats(self) -> dict[str, float]:
        """``prev_keys``: the earlier edits' keys the next update accounts for (per layer)."""
        return {"prev_keys": float(self.n_prev_keys)}

    def provenance(self) -> dict[str, Any]:
        """The covariance statistics' corpus, texts and tokens, and the null space per layer."""
        d_in = {layer: int(p.shape[0]) for layer, p in self.projection.items()}
        return {"covariance": dict(self.cov_provenance),
                "null_space": {str(layer): {"dim": self.null_dims[layer], "of": d_in[layer],
                                            "threshold": self.hp.nullspace_threshold}
                               for layer in self.edit_layers}}
