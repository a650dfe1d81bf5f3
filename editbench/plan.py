"""Planning a run: which cases, in which chunks, under which run id, and what is already done.

* :func:`select_cases`: the seeded shuffle of the evaluation cases, the first ``n_cases``.
* :func:`plan_chunks`: for each T, consecutive chunks of T (an incomplete last chunk is
  dropped and reported).
* :func:`run_id`: ``<editor>_<model>_<data>_<hash of the config>``, so a rerun of the same
  command finds its folder and resumes.
* :func:`check_cases`: every query tokenised before the first edit, so a bad case stops the
  run at once with a one-line DataError.
* :func:`pending_chunks`: the planned chunks still to compute; a finished chunk must hold
  the cases the plan puts in it (:func:`cases_fingerprint`), and one computed by other code
  (:mod:`editbench.fingerprint`) is recomputed unless ``runner.reuse_stale=true``.
* :func:`edit_schedule`: how a chunk's edits are grouped (``runner.edit_batch_size``,
  ``runner.batch_edit``, the editor's ``batch_edit`` protocol).
* Seeds: :func:`derived_seed` and :func:`seed_all`, the one way every part of the harness
  (edits, training steps) derives and sets its seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from editbench.records import DataError, EditCase
from editbench.results import RunDir
from editbench.scoring import Scorer

log = logging.getLogger("editbench.runner")

#: (T, chunk index, the chunk's cases)
Planned = tuple[int, int, list[EditCase]]


# --------------------------------------------------------------------------- seeds
def derived_seed(*parts) -> int:
    """A 32-bit seed derived from ``parts`` (stable across processes and platforms)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def seed_all(seed: int) -> None:
    """Seed torch, random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def edit_seed(seed: int, T: int, idx: int, k: int) -> int:
    """The seed set before edit ``k`` of chunk ``idx`` of T (so a replay repeats the edit)."""
    return derived_seed(seed, T, idx, k)


# --------------------------------------------------------------------------- protocol
def batch_mode(cfg: DictConfig) -> bool:
    """Whether a chunk's edits go in one ``edit_batch``: ``runner.batch_edit`` when set, else
    the editor's protocol (``editor.batch_edit``, e.g. MALMEN's batch edits)."""
    chosen = cfg.runner.get("batch_edit")
    if chosen is None and cfg.runner.get("edit_batch_size") is not None:
        return False   # runner.edit_batch_size decides the batches (edit_schedule)
    return bool(cfg.editor.get("batch_edit", False)) if chosen is None else bool(chosen)


def edit_schedule(cfg: DictConfig, T: int, supports_batch: bool) -> tuple[list[range], bool]:
    """How a chunk of T edits is applied: consecutive groups of chunk positions, and whether
    each group goes through one ``edit_batch`` (True) or one ``edit`` per position (False).

    * ``runner.edit_batch_size=B``: groups of B (the last one may be shorter), through
      ``edit_batch`` where the editor ``supports_batch`` (B=1 without it: plain ``edit``);
    * else :func:`batch_mode`: one group of T through ``edit_batch``;
    * else: one ``edit`` per case.
    """
    B = cfg.runner.get("edit_batch_size")
    if B is not None:
        B = int(B)
        return [range(s, min(s + B, T)) for s in range(0, T, B)], supports_batch
    if batch_mode(cfg):
        return [range(T)], True
    return [range(k, k + 1) for k in range(T)], False


# --------------------------------------------------------------------------- cases and chunks
def select_cases(cases: Sequence[EditCase], n_cases: int | None, seed: int, shuffle: bool = True) -> list[EditCase]:
    """The seeded shuffle of ``cases`` (file order when ``shuffle`` is false), first ``n_cases``."""
    order = list(range(len(cases)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if n_cases is not None:
        order = order[:n_cases]
    return [cases[i] for i in order]


def chunks_of(cases: Sequence[EditCase], T: int) -> tuple[list[list[EditCase]], int]:
    """Consecutive chunks of T cases and the number of cases left over (dropped)."""
    n = len(cases) // T
    return [list(cases[i * T:(i + 1) * T]) for i in range(n)], len(cases) - n * T


def run_id(cfg: DictConfig) -> str:
    """``<editor>_<model>_<data>_<hash>``; the hash covers everything that changes results.

    ``runner.steps`` is left out so that adding a T to a finished run reuses its chunks; so are
    the keys that cannot change a number (display, logging, caches, a model's description, the
    lm-eval settings while ``general.backend=builtin``, the WILD settings under teacher forcing).
    """
    if cfg.get("run_id"):
        return str(cfg.run_id)
    keyed = OmegaConf.to_container(cfg, resolve=True)
    keyed.pop("out_dir", None)
    keyed.pop("run_id", None)
    keyed.pop("hydra", None)
    keyed.get("runner", {}).pop("steps", None)
    keyed.get("runner", {}).pop("progress", None)
    keyed.get("runner", {}).pop("reuse_stale", None)   # decides reuse, not results
    keyed.pop("tracking", None)                          # logging
    keyed.get("model", {}).pop("description", None)      # a comment (the exact name in the tables)
    general = keyed.get("general") or {}
    general.pop("cache", None)                           # where the unedited scores are kept
    if general.get("backend", "builtin") == "builtin":   # the lm-eval settings are unused
        for key in [k for k in general if k.startswith("lm_eval_")]:
            general.pop(key)
    keyed_eval(keyed)
    if keyed.get("runner", {}).get("edit_batch_size") is None:   # unset: the ids of runs made before the key
        keyed.get("runner", {}).pop("edit_batch_size", None)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.editor.name}_{cfg.model.name}_{cfg.data.name}_{digest}"


def keyed_eval(keyed: dict) -> None:
    """Keep in the run id only the ``eval`` keys that change results: none with the defaults
    (teacher forcing after the chunk), so that runs from before ``eval`` existed keep their id;
    ``eval.when`` once it is not ``after_chunk``; the WILD keys only when WILD is scored."""
    ev = dict(keyed.pop("eval", None) or {})
    if ev.get("mode", "teacher_forced") == "teacher_forced":
        ev = {k: v for k, v in ev.items() if not (k.startswith("wild_") or k in ("judge", "mode"))}
    if ev.get("when", "after_chunk") == "after_chunk":
        ev.pop("when", None)
    if ev:
        keyed["eval"] = ev


def check_unique_ids(cases: Sequence[EditCase]) -> None:
    """Every result is keyed by case_id: two cases with one id would overwrite each other."""
    seen: dict[str, EditCase] = {}
    for case in cases:
        if case.case_id in seen:
            raise ValueError(f"duplicate case_id {case.case_id!r}: {seen[case.case_id].source or 'a case'} and "
                             f"{case.source or 'another case'}")
        seen[case.case_id] = case


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position encoding is configured for."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_cases(cases: Sequence[EditCase], scorer: Scorer, max_len: int | None) -> None:
    """Tokenise every query the scorer will ask before the first edit, so that a bad case
    stops the run at once with a one-line DataError naming its record and field, instead
    of failing hours later (or, past the model's context, giving garbage)."""
    for case in cases:
        for q in scorer.queries(case):
            field, prompt, target = q.field, q.prompt, q.target
            try:
                enc = scorer.encode(prompt, target)
            except Exception as err:  # noqa: BLE001 - any tokeniser failure is bad input
                raise case_error(case, field, f"cannot be tokenised ({type(err).__name__}: {err})") from None
            if max_len and len(enc.ids) > max_len:
                raise case_error(case, field, f"prompt + target is {len(enc.ids)} tokens, longer than the "
                                               f"model's {max_len} positions")


def case_error(case: EditCase, field: str, problem: str) -> DataError:
    path, _, index = case.source.rpartition("#")
    if path and index.isdigit():
        return DataError(path, int(index), field, f"case {case.case_id}: {problem}")
    return DataError(f"case {case.case_id}", None, field, problem)


def cases_fingerprint(chunk: Sequence[EditCase]) -> str:
    """A hash of what a chunk edits and scores (requests and probes; not ``source``)."""
    content = [{k: v for k, v in dataclasses.asdict(c).items() if k != "source"} for c in chunk]
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def plan_chunks(selected: Sequence[EditCase], steps: Sequence[int]) -> list[Planned]:
    """Every (T, chunk index, cases) of a run, in order of ``steps``; warns about T that get
    no chunk or leave cases over."""
    plan: list[Planned] = []
    for T in steps:
        chunks, dropped = chunks_of(selected, int(T))
        if not chunks:
            log.warning("T=%d: only %d case(s) selected; no chunk of %d to run", T, len(selected), T)
        elif dropped:
            log.warning("T=%d: %d case(s) do not fill a last chunk and are dropped", T, dropped)
        plan += [(int(T), i, ch) for i, ch in enumerate(chunks)]
    return plan


def pending_chunks(run: RunDir, plan: list[Planned], code: str, reuse_stale: bool = False) -> list[Planned]:
    """The planned chunks still to compute. Every finished one must hold the cases the plan
    puts in it (else the data or the selection changed under the same config). A finished
    chunk computed by other code (its record's ``code`` is not ``code``: see
    :mod:`editbench.fingerprint`) or from a stale checkpoint is recomputed, unless
    ``reuse_stale`` (``runner.reuse_stale=true``) keeps it; summary.csv then counts it in
    ``stale_chunks``."""
    todo, planned, stale = [], {}, 0
    for T, i, chunk in plan:
        planned.setdefault(T, set()).add(i)
        if not run.has_chunk(T, i):
            todo.append((T, i, chunk))
            continue
        record = run.read_chunk(T, i)
        have = [str(c.get("case_id")) for c in record["cases"]]
        want = [c.case_id for c in chunk]
        if have != want:
            raise ValueError(f"{run.chunk_file(T, i)} holds cases {_short(have)} but this run puts {_short(want)} "
                             f"in chunk {i} of T={T}: the data changed since it was computed; use another "
                             f"out_dir or delete {run.path}")
        if record.get("cases_sha", cases_fingerprint(chunk)) != cases_fingerprint(chunk):
            raise ValueError(f"{run.chunk_file(T, i)} was computed on other contents of cases {_short(want)} "
                             f"(same ids, other prompts or targets): the data changed since; use another out_dir "
                             f"or delete {run.path}")
        if is_stale(record, code):
            stale += 1
            if not reuse_stale:
                todo.append((T, i, chunk))
    if stale and reuse_stale:
        log.warning("%d finished chunk(s) in %s were computed by other code or from a stale checkpoint; they are "
                    "reused (runner.reuse_stale=true) and counted in summary.csv as stale_chunks", stale, run.path)
    elif stale:
        log.warning("%d finished chunk(s) in %s were computed by other code or from a stale checkpoint; they are "
                    "recomputed (runner.reuse_stale=true keeps them, marked stale)", stale, run.path)
    for T, indices in planned.items():
        extra = sorted(p.name for p in run.chunks.glob(f"T{T}-c*.json")
                       if int(p.stem.split("-c")[1]) not in indices) if run.chunks.is_dir() else []
        if extra:
            raise ValueError(f"{run.chunks} holds chunk(s) {extra[:3]} that this run does not plan for T={T}: "
                             f"the data changed since they were computed; use another out_dir or delete {run.path}")
    return todo


def is_stale(record: dict, code: str) -> bool:
    """A chunk record computed by other code than ``code``, or from a stale checkpoint."""
    return record.get("code") != code or bool(record.get("stale"))


def _short(ids: list[str]) -> str:
    return str(ids if len(ids) <= 4 else ids[:3] + [f"... ({len(ids)} cases)"])
