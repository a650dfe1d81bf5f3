"""The lifelong editing protocol (DESIGN.md, "The lifelong protocol").

For each T in ``runner.steps``: take the seeded shuffle of the evaluation cases (the
first ``runner.n_cases``), cut it into consecutive chunks of T (an incomplete last chunk
is dropped and reported), and for each chunk:

1. score the chunk through ``editor.logits`` before any edit: this pass is the unedited
   locality reference, the ``unedited/*`` metrics and the reference time for
   ``infer_overhead`` (same queries, same batches as the post-edit pass);
2. apply the T edits one after another (or one ``edit_batch`` with
   ``runner.batch_edit=true``, or consecutive ``edit_batch`` calls of B edits with
   ``runner.edit_batch_size=B``: :func:`editbench.plan.edit_schedule`), timing each;
3. score every probe of the chunk after the T-th edit (``eval.when=after_each``: each case's
   probes right after its own edit call instead); ``eval.mode`` picks teacher forcing, WILD
   generation or both (:class:`editbench.scoring.Scorer`), and under WILD the chunk record
   keeps what the model said (``generations.jsonl``);
4. ``reset()`` and verify that every parameter the editor touched is bit-identical to
   the original and that no module was left replaced or hooked.

With ``runner.curve=true``, chunks of T >= CURVE_MIN_T also record a retention curve:
after edit k for k in 1, 2, 5, 10, 20, 50, ... (and T), the reliability of every case
edited so far, binned by edit age (see :func:`curve_checkpoints`, :func:`curve_entries`).

Each finished (T, chunk) is written atomically to ``chunks/``; a rerun of the same
command skips it, so an interrupted run loses at most the chunk in progress.

Failures (docs/reliability.md):

* An edit that leaves NaN/Inf in a parameter it touched, or that raises
  :class:`~editbench.records.EditFailed` or ``torch.linalg.LinAlgError``, fails its
  case: the case is recorded with ``status="failed"`` and the reason, the editor is
  reset and the chunk's earlier successful edits are replayed (each edit is seeded by
  (seed, T, chunk, position), so the replay reproduces them), and the chunk goes on
  without the failed edit. A case whose post-edit logits hold NaN/Inf fails the same way.
  Every case is scored after the chunk's edits on the model as it stands (a failed edit is
  scored as not made), so every quality mean covers every case; ``failed_cases`` counts the
  failed ones beside the means.
* Any other exception stops the run: the model is reset first (callers that pass ``lm``
  get it back clean) and the chunk in progress is not written.
* A reset that does not restore the model bit for bit raises :class:`RestoreError`
  naming the editor; the chunk is not written.
* Bad cases (a query that cannot be tokenised or is longer than the model's context)
  raise a one-line :class:`~editbench.records.DataError` before the first edit.

This module is the protocol only. Case selection, chunking, run ids and resume are in
:mod:`editbench.plan`; the model, scorer, editor and its training are built by
:mod:`editbench.session`; the restore check is :mod:`editbench.guard`; the code fingerprints
that decide what may be reused are :mod:`editbench.fingerprint`.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from editbench import results
from editbench.fingerprint import chunk_code
from editbench.guard import RestoreError, nonfinite_parameters
from editbench.models import LoadedModel
from editbench.plan import (Planned, cases_fingerprint, check_unique_ids, edit_schedule, edit_seed, pending_chunks,
                            plan_chunks, run_id, seed_all, select_cases)
from editbench.records import EditCase, EditFailed
from editbench.reference import unedited_pass
from editbench.scoring import Timing, sync
from editbench.session import Session, check_compatible, open_session
from editbench.validate import validate_config

log = logging.getLogger(__name__)

#: exceptions that an edit may raise to say it failed numerically (the case fails, the run goes on)
NUMERICAL_FAILURES = (EditFailed, torch.linalg.LinAlgError)


#: chunks shorter than this record no retention curve (runner.curve=true)
CURVE_MIN_T = 10


def geometric_grid(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (inclusive)."""
    grid, base = [], 1
    while base <= limit:
        grid += [v for v in (base, 2 * base, 5 * base) if v <= limit]
        base *= 10
    return grid


def eval_when(cfg: DictConfig) -> str:
    """``eval.when``: score after the chunk's T-th edit (``after_chunk``, the lifelong protocol)
    or each case right after its own edit call (``after_each``, EasyEdit's sequential numbers)."""
    return str((cfg.get("eval") or {}).get("when", "after_chunk"))


def curve_checkpoints(T: int) -> list[int]:
    """After which edits of a chunk of T the retention curve is measured: the geometric
    grid below T, and T itself (whose scores are the chunk's final scoring pass)."""
    return sorted(set(geometric_grid(T)) | {T})


def age_bin(age: int) -> int:
    """The smallest grid value >= ``age``: bin 5 holds ages 3-5, bin 10 ages 6-10, ..."""
    base = 1
    while True:
        for v in (base, 2 * base, 5 * base):
            if age <= v:
                return v
        base *= 10


def curve_entries(k: int, reliability: dict[int, float]) -> list[dict[str, Any]]:
    """Curve entries after ``k`` edits from {position in the chunk (0-based): reliability}:
    one per age bin (age = k - position: 1 is the latest edit), with the mean and count."""
    bins: dict[int, list[float]] = {}
    for pos, rel in reliability.items():
        bins.setdefault(age_bin(k - pos), []).append(rel)
    return [{"after_edits": k, "age": a, "reliability": float(np.mean(v)), "n": len(v)}
            for a, v in sorted(bins.items())]


def peak_mem_mb(device: torch.device) -> float:
    """GPU max allocated on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- the run
def run(cfg: DictConfig, cases: Sequence[EditCase] | None = None,
        lm: LoadedModel | None = None) -> Path:
    """Run the protocol for ``cfg``; return the run folder. ``cases``/``lm`` may be passed
    in (tests, notebooks) to skip loading them again."""
    validate_config(cfg)   # the whole composed config, before anything slow
    cls = check_compatible(cfg)
    meta = results.run_meta(cfg)
    if cases is None:
        from editbench.data import evaluation_cases

        cases = evaluation_cases(cfg.data)   # the cases of data.split
    else:
        meta["split"] = "given"              # the caller chose the cases
    check_unique_ids(cases)
    selected = select_cases(cases, cfg.runner.n_cases, cfg.runner.seed, cfg.runner.shuffle)
    run = results.RunDir(Path(cfg.out_dir) / run_id(cfg))
    with run.lock():
        run.remove_partial_files()
        run.set_aside_invalid()
        results.atomic_write_text(run.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        plan = plan_chunks(selected, cfg.runner.steps)
        code = chunk_code(cls)
        todo = pending_chunks(run, plan, code, reuse_stale=bool(cfg.runner.get("reuse_stale")))
        log.info("run %s: %d chunk(s) planned, %d already done", run.path, len(plan), len(plan) - len(todo))
        if todo:
            session = open_session(cfg, [c for _, _, chunk in todo for c in chunk], lm, run)
            run_chunks(session, todo, code)
        summary = results.write_tables(run, meta, code)
        from editbench.report import plot_run, write_curve

        plot_run(summary, run.path / "metrics.png")
        if cfg.runner.get("curve"):
            write_curve(run.path)
    log.info("wrote %s", run.path / "summary.csv")
    return run.path


def run_chunks(ctx: Session, todo: Sequence[Planned], code: str) -> None:
    """Compute the ``todo`` chunks and write each one's record as it finishes."""
    run, editor = ctx.run, ctx.editor
    written: list[Path] = []
    current: tuple[int, int] | None = None
    bar = tqdm(todo, desc=f"{ctx.cfg.editor.name} chunks", disable=not ctx.cfg.runner.progress)
    try:
        for T, i, chunk in bar:
            current = (T, i)
            bar.set_postfix(T=T)
            record = run_chunk(ctx, T, i, chunk)
            record["code"] = code
            record["cases_sha"] = cases_fingerprint(chunk)
            if ctx.stale:
                record["stale"] = ctx.stale
            if not written:  # once per process: also the parameters the editor did not report
                ctx.guard.verify_all(editor.name)
            run.write_chunk(T, i, record)
            written.append(run.chunk_file(T, i))
    except KeyboardInterrupt:
        lost = (f"chunk {current[1]} of T={current[0]} was in progress and is not written; "
                if current and not run.has_chunk(*current) else "")
        n_done = len(list(run.chunks.glob("T*-c*.json"))) if run.chunks.is_dir() else 0
        log.error("interrupted: %s%d finished chunk(s) are kept in %s; rerun the same command to resume",
                  lost, n_done, run.path)
        raise
    try:
        if len(written) > 1:  # the first chunk was checked right after it (nothing else ran since)
            ctx.guard.verify_all(editor.name)
    except RestoreError as err:
        # Some chunk of this process changed the model for good: none of them can be trusted.
        rejected = run.chunks / "rejected"
        rejected.mkdir(exist_ok=True)
        for path in written:
            os.replace(path, rejected / path.name)
        err.add_note(f"the {len(written)} chunk(s) computed by this run were moved to {rejected}")
        raise


def run_chunk(ctx: Session, T: int, idx: int, chunk: list[EditCase]) -> dict[str, Any]:
    """Edit, score, reset and verify one chunk; return its record.

    Whatever goes wrong (an exception, Ctrl-C, SIGTERM), the editor is reset before the
    exception leaves, so a model passed in by the caller comes back unedited.
    """
    try:
        return _run_chunk(ctx, T, idx, chunk)
    except BaseException as err:
        try:
            ctx.editor.reset()
        except Exception as reset_err:  # noqa: BLE001 - report both
            err.add_note(f"and reset() after it failed too: {type(reset_err).__name__}: {reset_err}")
        raise


def _run_chunk(ctx: Session, T: int, idx: int, chunk: list[EditCase]) -> dict[str, Any]:
    cfg, editor, scorer, model = ctx.cfg, ctx.editor, ctx.scorer, ctx.lm.model
    cpu0, wall0 = time.process_time(), time.perf_counter()  # the chunk's CPU seconds (all threads) and wall
    seed = int(cfg.runner.seed)
    seed_all(edit_seed(seed, T, idx, -1))
    device = editor.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()
    # the unedited model on this chunk: shared by every editor and rerun (editbench/reference.py)
    unedited, ref_timing, ref_cached = unedited_pass(scorer, model, chunk, ctx.model_id)

    #: position in the chunk -> why its edit failed
    failures: dict[int, str] = {}
    curve: list[dict[str, Any]] = []
    curve_at: set[int] = set()
    infos: list[dict[str, Any] | None] = [None] * T
    times: list[float | None] = [None] * T
    groups, batched = edit_schedule(cfg, T, editor.supports_batch)
    applied: list[int] = []
    if ctx.curve_scorer is not None and T >= CURVE_MIN_T:
        curve_at = set(curve_checkpoints(T))
    progress = cfg.runner.progress and len(groups) >= 10
    after_each = eval_when(cfg) == "after_each"
    each: dict[str, dict[str, float]] = {}
    each_timing, each_wild = Timing(), Timing()
    each_faults: dict[str, list[str]] = {}
    each_gens: dict[str, list[dict]] = {}
    for group in tqdm(groups, desc=f"T={T} edits", leave=False, disable=not progress):
        k = group[0]
        seed_all(edit_seed(seed, T, idx, k))
        sync(device)
        t0 = time.perf_counter()
        try:
            if batched:
                info, fault = _attempt(editor.edit_batch, [chunk[j].request for j in group])
            else:
                info, fault = _attempt(editor.edit, chunk[k].request)
        except Exception as err:
            what = f"edit {k + 1}" if len(group) == 1 else f"the batch of edits {k + 1}-{group[-1] + 1}"
            first = "case" if len(group) == 1 else "first case"
            err.add_note(f"editor '{editor.name}', {what} of {T} in chunk {idx} of T={T}: {first} "
                         f"{chunk[k].case_id} ({chunk[k].source or 'no source'})")
            raise
        sync(device)
        elapsed = time.perf_counter() - t0
        fault = fault or _nonfinite_fault(model, editor.touched_parameters())
        for j in group:
            times[j] = elapsed / len(group)
        if fault is None:
            for j in group:
                infos[j] = info
            applied += list(group)
        else:
            failures.update({j: fault for j in group})
            if len(group) == 1:
                log.warning("T=%d chunk %d: edit of case %s failed (%s); resetting the editor and replaying the "
                            "%d earlier edit(s) of the chunk", T, idx, chunk[k].case_id, fault, len(applied))
            else:
                log.warning("T=%d chunk %d: the batched edit of positions %d-%d failed (%s); its %d cases are marked "
                            "failed; resetting the editor and replaying the %d earlier edit(s) of the chunk",
                            T, idx, k + 1, group[-1] + 1, fault, len(group), len(applied))
            _reset_and_verify(ctx)
            _replay(ctx, chunk, [g for g in groups if g[0] in applied], batched, seed, T, idx)
        if after_each:  # eval.when=after_each: this call's cases, on the model as it stands now
            model.eval()
            got, t_each = scorer.score(editor, [chunk[j] for j in group])
            each.update(got)
            each_timing.add(t_each)
            each_wild.add(scorer.wild_timing)
            each_faults.update(scorer.nonfinite)
            each_gens.update(scorer.generations)
        end = group[-1] + 1
        if end in curve_at and end < T and applied:
            curve += curve_entries(end, _reliability_so_far(ctx, chunk, applied))

    # Every case is scored, on the model as it stands: a failed edit was rolled back (its case
    # is scored as not edited), so every mean covers every case.
    model.eval()
    if after_each:
        edited, timing, wild_timing, faults, generations = each, each_timing, each_wild, each_faults, each_gens
    else:
        edited, timing = scorer.score(editor, chunk)
        wild_timing, faults, generations = scorer.wild_timing, scorer.nonfinite, scorer.generations
    logit_faults = {cid: f"NaN/Inf logits after the edits on {', '.join(what)}" for cid, what in faults.items()}
    extra = {name: hook(editor, T, idx) for name, hook in ctx.after_edit_hooks.items()}
    stats = editor.stats()
    _reset_and_verify(ctx)

    cases = []
    for k, case in enumerate(chunk):
        entry: dict[str, Any] = {"case_id": case.case_id, "edit_time_s": times[k], "info": infos[k] or {},
                                 "status": "ok", "metrics": {}}
        error = failures.get(k) or logit_faults.get(case.case_id)
        if error:
            entry.update(status="failed", error=error)
        metrics = dict(edited[case.case_id])
        for key in ("reliability", "generality"):
            if key in unedited[case.case_id]:
                metrics[f"unedited/{key}"] = unedited[case.case_id][key]
        entry["metrics"] = metrics
        if scorer.mode != "teacher_forced":
            entry["generations"] = generations.get(case.case_id, [])
        cases.append(entry)
    record = {"T": T, "chunk": idx, "cases": cases, "editor_stats": stats, "peak_mem_mb": peak_mem_mb(device),
              "timing": {"seconds": timing.seconds, "queries": timing.queries},
              "reference_timing": {"seconds": ref_timing.seconds, "queries": ref_timing.queries,
                                   "cached": ref_cached}}
    if T in curve_at:  # the last checkpoint is the chunk's final scoring pass
        final = {k: edited[c.case_id]["reliability"] for k, c in enumerate(chunk)
                 if k not in failures and c.case_id not in logit_faults}
        curve += curve_entries(T, final) if final else []
        record["curve"] = curve
    record.update(extra)
    if scorer.mode != "teacher_forced":
        record["wild"] = {"judge": scorer.judge_name, "context": scorer.wild.context,
                          "timing": {"seconds": wild_timing.seconds, "queries": wild_timing.queries}}
    record["edit_batch_size"] = max(len(g) for g in groups)   # edits per editor call (summary.csv)
    record["cpu_s"], record["wall_s"] = time.process_time() - cpu0, time.perf_counter() - wall0
    return record


def _attempt(fn: Callable, arg: Any) -> tuple[Any, str | None]:
    """``fn(arg)``; a numerical failure it raises becomes a one-line reason instead."""
    try:
        return fn(arg), None
    except NUMERICAL_FAILURES as err:
        return None, " ".join(f"{type(err).__name__}: {err}".split())


def _reliability_so_far(ctx: Session, chunk: list[EditCase], applied: list[int]) -> dict[int, float]:
    """Reliability of the cases edited so far (position -> token accuracy) through
    ``editor.logits``: the retention curve's checkpoint. Only the edit request is scored."""
    model = ctx.lm.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores, _ = ctx.curve_scorer.score(ctx.editor, [replace(chunk[j], generality={}, locality={},
                                                                           portability={}) for j in applied])
    finally:
        model.train(training)
    return {j: scores[chunk[j].case_id]["reliability"] for j in applied}


def _nonfinite_fault(model: torch.nn.Module, touched: Sequence[str]) -> str | None:
    bad = nonfinite_parameters(model, touched)
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"NaN/Inf weights after the edit in {', '.join(bad[:3])}{more}"


def _reset_and_verify(ctx: Session) -> None:
    touched = ctx.editor.touched_parameters()
    ctx.editor.reset()
    ctx.guard.verify(touched, ctx.editor.name)


def _replay(ctx: Session, chunk: list[EditCase], groups: Sequence[range], batched: bool, seed: int, T: int,
            idx: int) -> None:
    """Re-apply the chunk's successful edits (the same groups in order, same seeds) after a reset."""
    editor, model = ctx.editor, ctx.lm.model
    for group in groups:
        seed_all(edit_seed(seed, T, idx, group[0]))
        if batched:
            _, fault = _attempt(editor.edit_batch, [chunk[j].request for j in group])
        else:
            _, fault = _attempt(editor.edit, chunk[group[0]].request)
        fault = fault or _nonfinite_fault(model, editor.touched_parameters())
        if fault:
            raise RuntimeError(f"editor '{editor.name}': replaying the successful edit of case "
                               f"{chunk[group[0]].case_id} after a failed edit failed ({fault}): its edits are not "
                               f"reproducible")
