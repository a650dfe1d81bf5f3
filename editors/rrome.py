"""R-ROME: RASE's fact-patch memory over ROME (retrieval-augmented sequential editing).

Follows Han et al., 2023, "Improving Sequential Model Editing with Fact Retrieval"
(Findings of EMNLP; RASE), official code sev777/RASE (the retrieval decision
``edit_cls`` in ``eval.py``, the fact memory ``save_edits`` in ``RASE_pipline.py``), applied
to ROME (editors/rome.py) as the paper's R-ROME. NOT EasyEdit's "R-ROME" (Gupta et al.,
2024, "Rebuilding ROME"), which is an unrelated fix of ROME's update equation.

* ``edit``: compute ROME's rank-one update for the request on the UNEDITED model
  (weights are never changed in place: with several ROME layers each is applied only while
  the next is computed and restored right after, bit for bit; in a half-precision model
  that temporary change goes through a float32 master, editors/lib/precision.py), and store
  (key = encoder embedding of the fact ``"<prompt> <target_new>"``, the update).
* ``logits(ids, mask)``: decode each row, embed it, and retrieve over the stored keys by
  cosine similarity. RASE's rule (``cls_type=hard_thre``) fires when
  ``(s1 - s2 > gap_threshold and std(top-k) > std_threshold) or s1 > sim_threshold`` with
  s1, s2 the two best similarities and ``top_k=6`` (official defaults 0.15, 0.05, 0.9). For
  rows where it fires, the retrieved fact's update is added by a forward hook on the MLP
  output projection (``out += (x . u) v`` for that row only); the hook is removed before
  returning, so the module tree is unchanged. Other rows run the unedited model.
* ``stats()``: ``{"memory_size": n}``. ``infer_overhead`` includes the encoder pass.

Deviations: the retriever is a frozen sentence encoder (all-MiniLM-L6-v2 offline by
default; ``encoder=roberta-base`` or ``contriever-msmarco`` for online users) without
RASE's contrastively trained projection heads (``fit`` is not needed). With fewer than
two stored facts only the absolute threshold applies (the gap is undefined); the std is
over the available top-k. The query is the decoded prompt part of each row (``prompt_len``
from the harness), so the scored answer never reaches the retriever.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from editbench.records import EditRequest
from editbench.registry import register
from editbench.scoring import model_logits
from editors.lib.encoder import SentenceEncoder
from editors.lib.locate import RankOneUpdate, add_to_weight
from editors.lib.memory import RetrievalCounters, prompt_token_rows
from editors.lib.precision import Float32Masters
from editors.rome import ROME, ROMEParams


@dataclass
class RROMEParams(ROMEParams):
    encoder: str = "minilm"              # minilm (offline) | roberta-base | contriever-msmarco | path
    encoder_pooling: str = "mean"
    encoder_max_length: int = 128
    key_text: str = "fact"               # fact: "<prompt> <target_new>" (RASE) | prompt
    top_k: int = 6
    sim_threshold: float = 0.9
    gap_threshold: float = 0.15
    std_threshold: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.key_text not in ("fact", "prompt"):
            raise ValueError(f"editor 'rrome': key_text must be fact or prompt, got '{self.key_text}'")
        if self.top_k < 1:
            raise ValueError(f"editor 'rrome': top_k must be >= 1, got {self.top_k}")


def rase_decision(sims: torch.Tensor, top_k: int, sim_threshold: float, gap_threshold: float,
                  std_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RASE's ``hard_thre`` rule per query row: (fires (Q,) bool, best fact index (Q,)).

    ``sims`` is (Q, N) cosine similarity to the N stored facts (N >= 1).
    """
    k = min(top_k, sims.shape[1])
    top, idx = sims.topk(k, dim=1)
    fires = top[:, 0] > sim_threshold
    if k >= 2:
        gap = top[:, 0] - top[:, 1]
        std = top.std(dim=1, unbiased=False)   # numpy's np.std, as in RASE
        fires = fires | ((gap > gap_threshold) & (std > std_threshold))
    return fires, idx[:, 0]


@register("rrome")
class RROME(ROME):
    custom_logits = True   # retrieval picks which stored ROME edit answers each query
    params_cls = RROMEParams

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.encoder = SentenceEncoder(self.hp.encoder, pooling=self.hp.encoder_pooling,
                                       max_length=self.hp.encoder_max_length, device=self.device)
        self.keys = torch.zeros(0, self.encoder.dim, device=self.encoder.device)
        self.patches: list[list[RankOneUpdate]] = []
        #: how many rows fired / were queried since the last reset (diagnostics)
        self.counters = RetrievalCounters()

    # ------------------------------------------------------------------ editing
    def edit(self, request: EditRequest) -> dict[str, Any]:
        updates: list[RankOneUpdate] = []
        saved: dict[str, torch.Tensor] = {}
        masters = Float32Masters(saved)   # half-precision models: the temporary change as ROME makes it
        try:
            for i, layer in enumerate(self.edit_layers):
                (update,) = self.compute_updates(request, [layer])
                updates.append(update)
                if i + 1 < len(self.edit_layers):  # the next layer's update sees this one, as in ROME
                    param = self.model.get_parameter(update.weight)
                    saved.setdefault(update.weight, param.detach().clone())
                    add_to_weight(param, update.delta(), self.arch, masters.master(update.weight, param))
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self.model.get_parameter(name).copy_(original)
        text = request.prompt.strip()
        if self.hp.key_text == "fact":
            text = f"{text} {request.target_new.strip()}"
        self.keys = torch.cat([self.keys, self.encoder.encode([text])])
        self.patches.append(updates)
        self.last_updates = updates
        return {**updates[-1].info, "memory_size": len(self.patches)}

    # ------------------------------------------------------------------ inference
    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) index of the stored fact applied to each row, -1 where RASE's rule does not fire.

        The query is each row's prompt (``prompt_len``), never the scored answer."""
        choice = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
        if not self.patches:
            return choice
        texts = [self.tok.decode(row, skip_special_tokens=True)
                 for row in prompt_token_rows(input_ids, attention_mask, prompt_len)]
        q = self.encoder.encode(texts)
        fires, best = rase_decision(q @ self.keys.T, self.hp.top_k, self.hp.sim_threshold, self.hp.gap_threshold,
                                    self.hp.std_threshold)
        choice[fires.cpu()] = best[fires].cpu()
        self.counters.count(len(texts), int(fires.sum()))
        return choice

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        choice = self.retrieve(input_ids, attention_mask, prompt_len)
        if bool((choice < 0).all()):
            return model_logits(self.model, input_ids, attention_mask)
        handles = []
        try:
            for slot, layer in enumerate(self.edit_layers):
                handles.append(self.arch.module(self.model, "mlp_out", layer).register_forward_hook(
                    self._patch_hook(slot, choice)))
            return model_logits(self.model, input_ids, attention_mask)
        finally:
            for h in handles:
                h.remove()

    def _patch_hook(self, slot: int, choice: torch.Tensor):
        """Adds each retrieving row's rank-one update to the projection's output."""
        rows = torch.nonzero(choice >= 0)[:, 0]
        ups = [self.patches[int(choice[r])][slot] for r in rows]
        left = torch.stack([u.left for u in ups])      # (R, d_in)
        right = torch.stack([u.right for u in ups])    # (R, d_out)

        def hook(module, args, output):
            x = args[0]
            r = rows.to(x.device)
            coeff = torch.einsum("rsi,ri->rs", x[r].float(), left.to(x.device))
            add = coeff[..., None] * right.to(x.device)[:, None, :]
            return output.index_add(0, r, add.to(output.dtype))
        return hook

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        self.keys = torch.zeros(0, self.encoder.dim, device=self.encoder.device)
        self.patches = []
        self.last_updates = []
        self.counters = RetrievalCounters()
        super().reset()

    def stats(self) -> dict[str, float]:
        return self.counters.stats(len(self.patches))
