"""General ability after editing: CSQA, ANLI, MMLU, SQuAD 2.0 (DESIGN.md, "Metrics").

The runner calls :func:`general_ability_hook` once per run when ``general.tasks`` is not
empty; the function it returns is called as ``fn(editor, T, chunk_index)`` after the T-th
edit of a chunk (before ``reset``) and returns the numbers stored in the chunk record
under ``"general"``, one ``general/<key>`` summary row each (mean over chunks, n = chunks):

``<task>``           the edited model's score, through ``editor.logits``
``<task>_unedited``  the same examples on the unedited model (computed once, cached)
``<task>_chance``    what a uniform guesser scores (1/#options; 1/vocab for SQuAD)
``<task>_agree``     choice tasks: share of examples whose chosen option is the unedited
                     model's choice (1.0 = editing changed no answer; sensitive even
                     where the scores sit at chance)
``seconds``          wall time of the measurement

Only the first ``general.chunks`` chunks of each T are measured (null: all), and only at the T
listed in ``general.steps`` (null: every T); later chunks
return ``{}``. The unedited scores are kept in memory and on disk under
``cache_dir("general")``, keyed by the model fingerprint, task, n, seed, format and a
digest of the tokenised queries (so a changed prompt or data file is a new key).

With ``general.backend=lm_eval`` the hook also evaluates ``general.lm_eval_tasks`` through
lm-evaluation-harness on the editor's logits (:mod:`editbench.general.lm_eval_backend`), its
rows ``lm_eval/<task>/<metric>`` and ``..._unedited`` beside the built-in tasks' rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from editbench.general.data import TASKS, load_items, select
from editbench.general.tasks import ContinuationQuery, Query, TaskScore, build_queries, chance_level, score_queries
from editbench.models import cache_dir, model_fingerprint
from editbench.scoring import LogitsFn, PlainLogits

log = logging.getLogger(__name__)

__all__ = ["TASKS", "GeneralSuite", "enabled", "general_ability_hook"]

#: bump when prompts or scoring change in a way the query digest does not see
PROTOCOL_VERSION = 1
_MEMORY: dict[str, TaskScore] = {}


@dataclass
class _Task:
    name: str
    queries: list[Query]
    chance: float
    unedited: TaskScore


class GeneralSuite:
    """The selected examples of each task, their queries, chance levels and unedited scores."""

    def __init__(self, gcfg: Mapping[str, Any], lm, fingerprint: str, padding_side: str = "right"):
        self.cfg = dict(gcfg)
        self.tasks_cfg = [str(t) for t in self.cfg.get("tasks") or []]
        unknown = sorted(set(self.tasks_cfg) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown general ability task(s) {unknown}; known: {', '.join(TASKS)}")
        self.tok = lm.tokenizer
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.padding_side = padding_side
        self.fmt = str(self.cfg.get("format", "letter"))
        n = self.cfg.get("n")
        self.n = None if n is None else int(n)
        if self.n is not None and self.n < 1:
            raise ValueError(f"general.n must be a positive number of examples or null (all), got {n}")
        self.seed = int(self.cfg.get("seed", 0))
        self.kw = dict(batch_tokens=int(self.cfg.get("batch_tokens", 4096)),
                       max_batch=int(self.cfg.get("batch_size") or 32), padding_side=padding_side,
                       cloze_norm=str(self.cfg.get("cloze_norm", "sum")))
        model = lm.model
        vocab = model.get_output_embeddings().weight.shape[0]
        device = next(model.parameters()).device
        max_tokens = int(self.cfg.get("max_tokens", 1024))
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if positions:
            max_tokens = min(max_tokens, int(positions))
        self.tasks: list[_Task] = []
        for name in self.tasks_cfg:
            t0 = time.perf_counter()
            items = select(load_items(name, self.cfg), self.n, self.seed)
            queries = build_queries(name, items, self.tok, self.fmt, max_tokens,
                                    int(self.cfg.get("squad_context_tokens", 256)))
            unedited = self._unedited(name, queries, fingerprint,
                                      PlainLogits(model), device)
            self.tasks.append(_Task(name, queries, chance_level(name, queries, vocab), unedited))
            log.info("general/%s: unedited %.4f (chance %.3g, n=%d, format=%s; %.1f s)", name, unedited.score,
                     self.tasks[-1].chance, len(queries), self.fmt, time.perf_counter() - t0)

    # ------------------------------------------------------------------ unedited cache
    def cache_key(self, task: str, queries: Sequence[Query], fingerprint: str) -> str:
        digest = hashlib.sha256()
        for q in queries:
            if isinstance(q, ContinuationQuery):
                digest.update(repr([(e.ids, e.start) for e in q.options]).encode())
            else:
                digest.update(repr((q.prompt_ids, q.option_ids)).encode())
            digest.update(str(q.answer).encode())
        import transformers

        key = {"v": PROTOCOL_VERSION, "model": fingerprint, "task": task, "n": self.n, "seed": self.seed,
               "format": self.fmt, "source": self.cfg.get("source", "local"), "cloze_norm": self.kw["cloze_norm"],
               "queries": digest.hexdigest(), "torch": torch.__version__, "transformers": transformers.__version__}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _unedited(self, task: str, queries: list[Query], fingerprint: str, logits_fn: LogitsFn,
                  device: torch.device) -> TaskScore:
        key = self.cache_key(task, queries, fingerprint)
        if key in _MEMORY:
            return _MEMORY[key]
        path = cache_dir("general", f"{task}-{key}.json")
        use_disk = bool(self.cfg.get("cache", True))
        if use_disk and path.is_file():
            rec = json.loads(path.read_text(encoding="utf-8"))
            score = TaskScore(rec["values"], rec["preds"])
        else:
            score = score_queries(task, queries, logits_fn, self.pad_id, device=device, **self.kw)
            if use_disk:
                from editbench.results import atomic_write_text

                atomic_write_text(path, json.dumps({"task": task, "fingerprint": fingerprint, "n": self.n,
                                                    "seed": self.seed, "format": self.fmt,
                                                    "values": score.values, "preds": score.preds}))
        _MEMORY[key] = score
        return score

    # ------------------------------------------------------------------ measuring
    def measure(self, logits_fn: LogitsFn, device: torch.device | str = "cpu") -> dict[str, float]:
        """Every task's score under ``logits_fn`` beside its unedited score and chance level."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for t in self.tasks:
            s = score_queries(t.name, t.queries, logits_fn, self.pad_id, device=device, **self.kw)
            out[t.name] = s.score
            out[f"{t.name}_unedited"] = t.unedited.score
            out[f"{t.name}_chance"] = t.chance
            if s.preds is not None and t.unedited.preds is not None:
                out[f"{t.name}_agree"] = sum(a == b for a, b in zip(s.preds, t.unedited.preds)) / len(s.preds)
        out["seconds"] = time.perf_counter() - t0
        return out


def enabled(gcfg: Mapping[str, Any] | None) -> bool:
    """Whether a ``general`` config measures anything: built-in tasks, or lm-eval tasks with
    ``backend=lm_eval``."""
    gcfg = gcfg or {}
    return bool(gcfg.get("tasks")) or (str(gcfg.get("backend", "builtin")) == "lm_eval"
                                       and bool(gcfg.get("lm_eval_tasks")))


def general_ability_hook(cfg, lm) -> Callable[[Any, int, int], dict[str, float]]:
    """The runner's after-edit measurement: ``fn(editor, T, chunk_index) -> {key: value}``."""
    padding_side = str(cfg.runner.get("padding_side", "right"))
    suite = GeneralSuite(cfg.general, lm, model_fingerprint(cfg.model), padding_side)
    harness = None   # general.backend=lm_eval: the lm-eval tasks too (editbench/general/lm_eval_backend.py)
    if str(cfg.general.get("backend", "builtin")) == "lm_eval":
        from editbench.general.lm_eval_backend import LmEvalSuite

        harness = LmEvalSuite(cfg.general, lm, model_fingerprint(cfg.model), padding_side)
    chunks = cfg.general.get("chunks", 1)
    steps = cfg.general.get("steps")  # null: every T; a list: only these T (the leaderboard: [100, 1000])
    steps = None if steps is None else {int(t) for t in steps}

    def measure(editor, T: int, chunk_index: int) -> dict[str, float]:
        if chunks is not None and chunk_index >= int(chunks):
            return {}
        if steps is not None and T not in steps:
            return {}
        out = suite.measure(editor, editor.device)
        if harness is not None:
            t0 = time.perf_counter()
            out.update(harness.measure(editor, editor.device))
            out["seconds"] += time.perf_counter() - t0
        return out

    return measure
