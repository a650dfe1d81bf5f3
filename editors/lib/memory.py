"""What the retrieval-memory editors (R-ROME, RECIPE, LTE) share: the query rows and the counters.

* :func:`prompt_token_rows`: per scored row, the token ids a retriever may read (the
  user's prompt only, never the answer being scored or generated).
* :class:`RetrievalCounters`: how many queried rows retrieved a fact since the last reset,
  and the ``stats()`` entries that report it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def prompt_token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: torch.Tensor | None = None) -> list[list[int]]:
    """Per row, the token ids of the user's prompt: the first ``prompt_len[row]`` real tokens
    (left or right padding), or every real token when ``prompt_len`` is None.

    This is what a retrieval editor may use as its query: with ``prompt_len`` given, no token
    of the answer being scored or generated is included.
    """
    rows = []
    for r, (ids, m) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        real = [t for t, keep in zip(ids, m) if keep]
        rows.append(real if prompt_len is None else real[:int(prompt_len[r])])
    return rows


@dataclass
class RetrievalCounters:
    """Retrieval counts since the last reset (an editor starts a new instance on reset).

    ``queried``/``retrieved``: rows whose query was looked up / that got a fact.
    ``exact_queries``/``exact_hits``: queried rows whose query is an edited prompt / whose
    best fact is that edit's own (counted only by editors that can tell, LTE).
    """

    queried: int = 0
    retrieved: int = 0
    exact_queries: int = 0
    exact_hits: int = 0

    def count(self, queried: int, retrieved: int) -> None:
        """``queried`` more rows were looked up, ``retrieved`` of them got a fact."""
        self.queried += queried
        self.retrieved += retrieved

    def count_exact(self, hit: bool) -> None:
        """One more queried row was an edited prompt; ``hit``: its best fact was that edit's."""
        self.exact_queries += 1
        self.exact_hits += hit

    def stats(self, memory_size: int) -> dict[str, float]:
        """``memory_size``; ``retrieval_rate`` (retrieved / queried) once a row was queried;
        ``retrieval_hit_rate`` (exact_hits / exact_queries) once an edited prompt was queried."""
        out = {"memory_size": float(memory_size)}
        if self.queried:
            out["retrieval_rate"] = self.retrieved / self.queried
        if self.exact_queries:
            out["retrieval_hit_rate"] = self.exact_hits / self.exact_queries
        return out
