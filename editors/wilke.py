"""WilKE: wise-layer knowledge editing — ROME at the layer that needs the smallest change.

Follows Hu et al., 2024, "WilKE: Wise-Layer Knowledge Editor for Lifelong Knowledge
Editing" (Findings of ACL), official code ChenhuiHu/WilKE (``wilke/wilke_main.py``,
hyperparameters ``hparams/WilKE/EleutherAI_gpt-j-6B.json``).

Per edit, on the model as edited so far: compute ROME's rank-one update (editors/rome.py,
the same u/v math) at every layer ``0 .. scanning_ceiling-1``, measure each candidate's
relative change ``LA = |W' - W|_F / |W|_F`` of its MLP output projection, and apply the
candidate with the smallest LA. The chosen layer is returned as ``{"layer": l, "la": ...}``
and lands in the ``info`` column of cases.csv.

Deviations: the official code re-runs ROME at the chosen layer after the scan; the scan
already computed exactly that update on the same model, so it is applied directly (same
result, one ROME computation fewer). All candidate layers share one forward pass for the
keys and residual streams (editors/lib/locate.py). The covariance statistics of every
candidate layer are computed in one pass over the corpus. Other deviations are ROME's.

Precision: the chosen update is applied by ROME's ``apply``, so in a half-precision model it
accumulates in the weight's float32 master (editors/lib/precision.py); LA is measured
against the model's (rounded) weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from editbench.records import EditRequest
from editbench.registry import register
from editors.rome import ROME, ROMEParams


@dataclass
class WilKEParams(ROMEParams):
    layers: list = field(default_factory=list)   # unused: the candidates are the scan range
    scanning_ceiling: int = 7          # candidate layers are 0 .. scanning_ceiling-1 (official GPT-J: 7)
    scanning_floor: int = 0            # first candidate layer (official: 0)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.scanning_floor < self.scanning_ceiling:
            raise ValueError(f"editor 'wilke': need 0 <= scanning_floor < scanning_ceiling, got "
                             f"{self.scanning_floor}, {self.scanning_ceiling}")


@register("wilke")
class WilKE(ROME):
    params_cls = WilKEParams

    def candidate_layers(self) -> Sequence[int]:
        if self.hp.scanning_ceiling > self.arch.n_layers:
            raise ValueError(f"editor 'wilke': scanning_ceiling {self.hp.scanning_ceiling} exceeds the model's "
                             f"{self.arch.n_layers} layers")
        return list(range(self.hp.scanning_floor, self.hp.scanning_ceiling))

    def edit(self, request: EditRequest) -> dict[str, Any]:
        updates = self.compute_updates(request, self.edit_layers)
        las = [self.relative_change(u) for u in updates]
        best = min(range(len(updates)), key=las.__getitem__)
        chosen = updates[best]
        self.apply(chosen)
        self.last_updates = [chosen]
        #: LA of every candidate layer in the last edit (for inspection)
        self.last_scan = {u.layer: la for u, la in zip(updates, las)}
        return {**chosen.info, "layer": chosen.layer, "la": round(las[best], 6)}
