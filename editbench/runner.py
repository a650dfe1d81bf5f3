"""The lifelong editing protocol (DESIGN.md, "The lifelong protocol").

For each T in ``runner.steps``: take the seeded shuffle of the evaluation cases (the
first ``runner.n_cases``), cut it into consecutive chunks of T (an incomplete last chunk
is dropped and reported), and for each chunk:

1. score the chunk through ``editor.logits`` before any edit: this pass is the unedited
   locality reference, the ``unedited/*`` metrics and the reference time for
   ``infer_overhead`` (same queries, same batches as the post-edit pass);
2. apply the T edits one after another (or one ``edit_batch`` with
   ``runner.batch_edit=true``), timing each;
3. score every probe of the chunk after the T-th edit;
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
  Failed cases are counted in ``failed_cases`` and left out of the quality means.
* Any other exception stops the run: the model is reset first (callers that pass ``lm``
  get it back clean) and the chunk in progress is not written.
* A reset that does not restore the model bit for bit raises :class:`RestoreError`
  naming the editor; the chunk is not written.
* Bad cases (a query that cannot be tokenised or is longer than the model's context)
  raise a one-line :class:`~editbench.records.DataError` before the first edit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from editbench import results
from editbench.models import SUPPORTED_FAMILIES, LoadedModel, load_model
from editbench.records import DataError, EditCase, EditFailed
from editbench.registry import editor_class
from editbench.scoring import Scorer, Timing, sync

log = logging.getLogger(__name__)

#: exceptions that an edit may raise to say it failed numerically (the case fails, the run goes on)
NUMERICAL_FAILURES = (EditFailed, torch.linalg.LinAlgError)


# --------------------------------------------------------------------------- planning
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

    ``runner.steps`` is left out so that adding a T to a finished run reuses its chunks.
    """
    if cfg.get("run_id"):
        return str(cfg.run_id)
    keyed = OmegaConf.to_container(cfg, resolve=True)
    keyed.pop("out_dir", None)
    keyed.pop("run_id", None)
    keyed.pop("hydra", None)
    keyed.get("runner", {}).pop("steps", None)
    keyed.get("runner", {}).pop("progress", None)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.editor.name}_{cfg.model.name}_{cfg.data.name}_{digest}"


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
        r = case.request
        queries = [("request", r.prompt, r.target_new)]
        queries += [(f"generality.{fam}[{j}]", p.prompt, p.target)
                    for fam, ps in case.generality.items() for j, p in enumerate(ps)]
        queries += [(f"locality.{fam}[{j}]", p.prompt, p.target)
                    for fam, ps in case.locality.items() for j, p in enumerate(ps)]
        if scorer.cf_metrics and r.ground_truth:
            queries += [("request.ground_truth", r.prompt, r.ground_truth)]
            queries += [(f"generality.{fam}[{j}] with ground_truth", p.prompt, r.ground_truth)
                        for fam, ps in case.generality.items() for j, p in enumerate(ps)]
            queries += [(f"locality.{fam}[{j}] with target_new", p.prompt, r.target_new)
                        for fam, ps in case.locality.items() for j, p in enumerate(ps)]
        for field, prompt, target in queries:
            try:
                enc = scorer.encode(prompt, target)
            except Exception as err:  # noqa: BLE001 - any tokeniser failure is bad input
                raise _case_error(case, field, f"cannot be tokenised ({type(err).__name__}: {err})") from None
            if max_len and len(enc.ids) > max_len:
                raise _case_error(case, field, f"prompt + target is {len(enc.ids)} tokens, longer than the "
                                               f"model's {max_len} positions")


def _case_error(case: EditCase, field: str, problem: str) -> DataError:
    path, _, index = case.source.rpartition("#")
    if path and index.isdigit():
        return DataError(path, int(index), field, f"case {case.case_id}: {problem}")
    return DataError(f"case {case.case_id}", None, field, problem)


def cases_fingerprint(chunk: Sequence[EditCase]) -> str:
    """A hash of what a chunk edits and scores (requests and probes; not ``source``)."""
    import dataclasses

    content = [{k: v for k, v in dataclasses.asdict(c).items() if k != "source"} for c in chunk]
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def code_fingerprint(cls: type) -> str:
    """A hash of the code that decides a chunk's numbers: the editor's module, the shared
    editor code (``editors/base.py``, ``editors/lib/``) and the scoring. Stored in each
    chunk record so that a resumed run can say when finished chunks came from other code."""
    import inspect

    import editbench.scoring as scoring

    files = {Path(inspect.getfile(cls)), Path(scoring.__file__)}
    editors_dir = Path(inspect.getfile(cls)).parent
    while editors_dir.name and editors_dir.name != "editors" and editors_dir != editors_dir.parent:
        editors_dir = editors_dir.parent
    if editors_dir.name == "editors":
        files |= {editors_dir / "base.py", *editors_dir.glob("lib/*.py")}
    h = hashlib.sha256()
    for f in sorted(files):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def edit_seed(seed: int, T: int, idx: int, k: int) -> int:
    """The seed set before edit ``k`` of chunk ``idx`` of T (so a replay repeats the edit)."""
    return int(hashlib.sha256(f"{seed}:{T}:{idx}:{k}".encode()).hexdigest()[:8], 16)


#: chunks shorter than this record no retention curve (runner.curve=true)
CURVE_MIN_T = 10


def geometric_grid(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (inclusive)."""
    grid, base = [], 1
    while base <= limit:
        grid += [v for v in (base, 2 * base, 5 * base) if v <= limit]
        base *= 10
    return grid


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


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------- restore check
class RestoreError(RuntimeError):
    """An editor's reset() did not return the model to its original state (an editor bug)."""


class WeightGuard:
    """Checksums of the original parameters, buffers and module tree, to verify a reset.

    Everything is hashed once at the start; after each reset only the parameters the
    editor reports as touched are hashed again, so the check stays cheap.
    :meth:`verify_all` re-hashes everything (the runner does it after the first chunk it
    computes and at the end of the run) to catch changes an editor did not report.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.digests = _param_digests(model)
        self.buffer_digests = {n: _digest(b) for n, b in _persistent_buffers(model).items()}
        self.structure = _structure(model)

    def verify(self, touched: Sequence[str], editor: str) -> None:
        """The touched parameters are bit-identical and the module tree is unchanged."""
        bad = [n for n in touched if self._param_digest(n) != self.digests.get(n)]
        if bad:
            raise RestoreError(f"editor '{editor}': reset() did not restore {len(bad)} parameter(s) bit for bit: "
                               f"{bad[:5]}")
        self._verify_structure(editor)

    def verify_all(self, editor: str) -> None:
        """Every parameter and buffer is bit-identical (also those not reported as touched)."""
        now = _param_digests(self.model)
        bad = [n for n, d in self.digests.items() if now.get(n) != d]
        buffers = _persistent_buffers(self.model)
        bad += [n for n, d in self.buffer_digests.items() if n not in buffers or _digest(buffers[n]) != d]
        if bad:
            raise RestoreError(f"editor '{editor}': {len(bad)} parameter(s)/buffer(s) differ from the original "
                               f"after reset(), not all reported by touched_parameters(): {bad[:5]}")
        self._verify_structure(editor)

    def _param_digest(self, name: str) -> str | None:
        try:
            return _digest(self.model.get_parameter(name))
        except AttributeError:  # not a parameter of the model (any more)
            return None

    def _verify_structure(self, editor: str) -> None:
        now = _structure(self.model)
        if now != self.structure:
            diff = next(((a, b) for a, b in zip(self.structure, now) if a != b), None)
            if diff is None:
                where = f"{abs(len(now) - len(self.structure))} module(s) added or removed"
            else:
                where = f"module '{diff[0][0]}' was {diff[0][1:]} and is {diff[1][1:]} (type, hooks)"
            raise RestoreError(f"editor '{editor}': reset() left modules replaced, added or hooked: {where}")


def _param_digests(model: torch.nn.Module) -> dict[str, str]:
    """Digest of every parameter under every name (tied weights: one tensor, hashed once)."""
    memo: dict[int, str] = {}
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = _digest(p)
        out[n] = memo[id(p)]
    return out


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers saved with the model (not caches a model may refresh itself, e.g. dynamic RoPE)."""
    saved = set(model.state_dict(keep_vars=True))
    return {n: b for n, b in model.named_buffers() if n in saved}


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()  # hashes the buffer in place, no copy


def _structure(model: torch.nn.Module) -> list[tuple[str, str, int, int, int]]:
    return [(name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


def nonfinite_parameters(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The named parameters that hold a NaN or an infinity."""
    bad = []
    for n in names:
        try:
            p = model.get_parameter(n)
        except AttributeError:
            continue
        if not bool(torch.isfinite(p).all()):
            bad.append(n)
    return bad


def peak_mem_mb(device: torch.device) -> float:
    """GPU max allocated on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- the run
@dataclass
class Context:
    """Everything a chunk needs; built once per run."""

    cfg: DictConfig
    lm: LoadedModel
    editor: Any
    scorer: Scorer
    guard: WeightGuard
    run: results.RunDir
    #: extra measurements after a chunk's edits: name -> fn(editor, T, chunk_index) -> {key: value}
    after_edit_hooks: dict[str, Callable[[Any, int, int], dict[str, float]]]
    #: scores reliability only, for the retention curve (runner.curve=true); None: no curve
    curve_scorer: Scorer | None = None


def build_editor(cfg: DictConfig, lm: LoadedModel):
    cls = editor_class(cfg.editor.name)
    editor_cfg = OmegaConf.to_container(cfg.editor, resolve=True)
    return cls(lm.model, lm.tokenizer, lm.arch, editor_cfg)


def check_compatible(cfg: DictConfig) -> type:
    """Fail before loading weights when the editor does not support the model's family."""
    cls = editor_class(cfg.editor.name)
    family = cfg.model.get("family")
    if family is not None and family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model '{cfg.model.name}' declares family '{family}', which has no ArchSpec; "
                         f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
    if cls.supported_families is not None and family is not None and family not in cls.supported_families:
        raise ValueError(f"editor '{cls.name}' does not support the {family} architecture of model "
                         f"'{cfg.model.name}'; it supports: {', '.join(cls.supported_families)}")
    if cfg.runner.batch_edit and not cls.supports_batch:
        raise ValueError(f"runner.batch_edit=true but editor '{cls.name}' has no batched edit")
    return cls


def run(cfg: DictConfig, cases: Sequence[EditCase] | None = None,
        lm: LoadedModel | None = None) -> Path:
    """Run the protocol for ``cfg``; return the run folder. ``cases``/``lm`` may be passed
    in (tests, notebooks) to skip loading them again."""
    cls = check_compatible(cfg)
    if cases is None:
        from editbench.data import load_cases

        cases = load_cases(cfg.data.kind, cfg.data.get("path"))
    check_unique_ids(cases)
    selected = select_cases(cases, cfg.runner.n_cases, cfg.runner.seed, cfg.runner.shuffle)
    run = results.RunDir(Path(cfg.out_dir) / run_id(cfg))
    meta = {"editor": cfg.editor.name, "model": cfg.model.name, "data": cfg.data.name}
    with run.lock():
        run.remove_partial_files()
        results.atomic_write_text(run.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        plan = []
        for T in cfg.runner.steps:
            chunks, dropped = chunks_of(selected, int(T))
            if not chunks:
                log.warning("T=%d: only %d case(s) selected; no chunk of %d to run", T, len(selected), T)
            elif dropped:
                log.warning("T=%d: %d case(s) do not fill a last chunk and are dropped", T, dropped)
            plan += [(int(T), i, ch) for i, ch in enumerate(chunks)]
        code = code_fingerprint(cls)
        todo = _check_finished_chunks(run, plan, code)
        log.info("run %s: %d chunk(s) planned, %d already done", run.path, len(plan), len(plan) - len(todo))
        if todo:
            _run_chunks(cfg, cls, run, todo, lm, code)
        summary = results.write_tables(run, meta)
        _plot(summary, run.path / "metrics.png")
        if cfg.runner.get("curve"):
            from editbench.report import write_curve

            write_curve(run.path)
    log.info("wrote %s", run.path / "summary.csv")
    return run.path


def _check_finished_chunks(run: results.RunDir, plan: list[tuple[int, int, list[EditCase]]], code: str
                           ) -> list[tuple[int, int, list[EditCase]]]:
    """The planned chunks still to compute; every finished one must hold the cases the plan
    puts in it (else the data or the selection changed under the same config)."""
    todo, planned, other_code = [], {}, 0
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
        other_code += record.get("code", code) != code
    if other_code:
        log.warning("%d finished chunk(s) in %s were computed by other code (the editor, editors/lib or the "
                    "scoring changed since); they are reused as they are: delete the run folder to recompute",
                    other_code, run.path)
    for T, indices in planned.items():
        extra = sorted(p.name for p in run.chunks.glob(f"T{T}-c*.json")
                       if int(p.stem.split("-c")[1]) not in indices) if run.chunks.is_dir() else []
        if extra:
            raise ValueError(f"{run.chunks} holds chunk(s) {extra[:3]} that this run does not plan for T={T}: "
                             f"the data changed since they were computed; use another out_dir or delete {run.path}")
    return todo


def _short(ids: list[str]) -> str:
    return str(ids if len(ids) <= 4 else ids[:3] + [f"... ({len(ids)} cases)"])


def _run_chunks(cfg: DictConfig, cls: type, run: results.RunDir, todo: list, lm: LoadedModel | None,
                code: str) -> None:
    if lm is None:
        lm = load_model(cfg.model)
    scorer = Scorer(lm.tokenizer, batch_size=cfg.runner.batch_size, padding_side=cfg.runner.padding_side,
                    cf_metrics=bool(cfg.data.get("cf_metrics", False)),
                    exact_match=bool(cfg.runner.exact_match), device=next(lm.model.parameters()).device)
    # Before any training or edit: a bad case must not surface hours into the run.
    check_cases([c for _, _, chunk in todo for c in chunk], scorer, max_positions(lm.model))
    run.write_env(str(lm.model.device if hasattr(lm.model, "device") else "cpu"))
    editor = build_editor(cfg, lm)
    if editor.needs_training:  # the instance decides: LTE trains only with editor.align=true
        from editbench.train import ensure_trained, uses_pipeline

        if uses_pipeline(editor):
            ensure_trained(cfg, lm, editor)   # cached checkpoint, or train / resume (editbench/train.py)
        else:
            editor.fit(_train_cases(cfg))     # editors that only build a memory from the data (T-Patcher)
    lm.model.eval()
    ctx = Context(cfg, lm, editor, scorer, WeightGuard(lm.model), run, after_edit_hooks={})
    if cfg.runner.get("curve"):
        if cfg.runner.batch_edit:
            log.warning("runner.curve=true has no effect with runner.batch_edit=true (no state between edits)")
        else:
            ctx.curve_scorer = Scorer(lm.tokenizer, batch_size=cfg.runner.batch_size,
                                      padding_side=cfg.runner.padding_side, device=scorer.device,
                                      cf_metrics=False, exact_match=False)
    for name, hook in _after_edit_hooks(cfg, lm).items():
        ctx.after_edit_hooks[name] = hook
    written: list[Path] = []
    current: tuple[int, int] | None = None
    bar = tqdm(todo, desc=f"{cfg.editor.name} chunks", disable=not cfg.runner.progress)
    try:
        for T, i, chunk in bar:
            current = (T, i)
            bar.set_postfix(T=T)
            record = run_chunk(ctx, T, i, chunk)
            record["code"] = code
            record["cases_sha"] = cases_fingerprint(chunk)
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
        ctx.guard.verify_all(editor.name)
    except RestoreError as err:
        # Some chunk of this process changed the model for good: none of them can be trusted.
        rejected = run.chunks / "rejected"
        rejected.mkdir(exist_ok=True)
        for path in written:
            os.replace(path, rejected / path.name)
        err.add_note(f"the {len(written)} chunk(s) computed by this run were moved to {rejected}")
        raise


def _plot(summary, path: Path) -> None:
    """plot_run into a temporary file, then rename it (never a half-written png)."""
    from editbench.report import plot_run

    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    try:
        plot_run(summary, tmp)
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _train_cases(cfg: DictConfig) -> list[EditCase]:
    from editbench.data import load_cases

    path = cfg.data.get("train_path")
    if not path:
        raise ValueError(f"editor '{cfg.editor.name}' needs training data: set data.train_path")
    return load_cases(cfg.data.get("train_kind") or cfg.data.kind, path)


def _after_edit_hooks(cfg: DictConfig, lm: LoadedModel) -> dict[str, Callable]:
    """Measurements taken after a chunk's edits besides the probes (general ability)."""
    tasks = list(cfg.get("general", {}).get("tasks", []) or [])
    if not tasks:
        return {}
    from editbench.general import general_ability_hook

    return {"general": general_ability_hook(cfg, lm)}


def run_chunk(ctx: Context, T: int, idx: int, chunk: list[EditCase]) -> dict[str, Any]:
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


def _run_chunk(ctx: Context, T: int, idx: int, chunk: list[EditCase]) -> dict[str, Any]:
    cfg, editor, scorer, model = ctx.cfg, ctx.editor, ctx.scorer, ctx.lm.model
    seed = int(cfg.runner.seed)
    _seed_all(edit_seed(seed, T, idx, -1))
    device = editor.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()
    unedited, ref_timing = scorer.score(editor.logits, chunk, reference=True)
    if scorer.nonfinite:
        cid, what = next(iter(scorer.nonfinite.items()))
        raise RuntimeError(f"the unedited model gives NaN/Inf logits on case {cid} ({', '.join(what)}) before any "
                           f"edit: check model.dtype (float16 overflows on some models) and the model weights")

    #: position in the chunk -> why its edit failed
    failures: dict[int, str] = {}
    curve: list[dict[str, Any]] = []
    curve_at: set[int] = set()
    infos: list[dict[str, Any] | None] = [None] * T
    times: list[float | None] = [None] * T
    if cfg.runner.batch_edit:
        _seed_all(edit_seed(seed, T, idx, 0))
        sync(device)
        t0 = time.perf_counter()
        info, fault = _attempt(editor.edit_batch, [c.request for c in chunk])
        sync(device)
        times = [(time.perf_counter() - t0) / T] * T
        fault = fault or _nonfinite_fault(model, editor.touched_parameters())
        if fault:
            failures = {k: fault for k in range(T)}
            log.warning("T=%d chunk %d: the batched edit failed (%s); all %d cases are marked failed", T, idx, fault, T)
            _reset_and_verify(ctx)
        else:
            infos = [info] * T
    else:
        applied: list[int] = []
        curve_at = set(curve_checkpoints(T)) if ctx.curve_scorer is not None and T >= CURVE_MIN_T else set()
        progress = cfg.runner.progress and T >= 10
        for k, case in enumerate(tqdm(chunk, desc=f"T={T} edits", leave=False, disable=not progress)):
            _seed_all(edit_seed(seed, T, idx, k))
            sync(device)
            t0 = time.perf_counter()
            try:
                info, fault = _attempt(editor.edit, case.request)
            except Exception as err:
                err.add_note(f"editor '{editor.name}', edit {k + 1} of {T} in chunk {idx} of T={T}: case "
                             f"{case.case_id} ({case.source or 'no source'})")
                raise
            sync(device)
            times[k] = time.perf_counter() - t0
            fault = fault or _nonfinite_fault(model, editor.touched_parameters())
            if fault is None:
                infos[k] = info
                applied.append(k)
            else:
                failures[k] = fault
                log.warning("T=%d chunk %d: edit of case %s failed (%s); resetting the editor and replaying the "
                            "%d earlier edit(s) of the chunk", T, idx, case.case_id, fault, len(applied))
                _reset_and_verify(ctx)
                _replay(ctx, chunk, applied, seed, T, idx)
            if k + 1 in curve_at and k + 1 < T and applied:
                curve += curve_entries(k + 1, _reliability_so_far(ctx, chunk, applied))

    ok = [c for k, c in enumerate(chunk) if k not in failures]
    model.eval()
    edited, timing = scorer.score(editor.logits, ok) if ok else ({}, Timing())
    logit_faults = {cid: f"NaN/Inf logits after the edits on {', '.join(what)}"
                    for cid, what in scorer.nonfinite.items()} if ok else {}
    extra = {name: hook(editor, T, idx) for name, hook in ctx.after_edit_hooks.items()} if ok else {}
    stats = editor.stats()
    _reset_and_verify(ctx)

    cases = []
    for k, case in enumerate(chunk):
        entry: dict[str, Any] = {"case_id": case.case_id, "edit_time_s": times[k], "info": infos[k] or {},
                                 "status": "ok", "metrics": {}}
        error = failures.get(k) or logit_faults.get(case.case_id)
        if error:
            entry.update(status="failed", error=error)
        else:
            metrics = dict(edited[case.case_id])
            for key in ("reliability", "generality"):
                if key in unedited[case.case_id]:
                    metrics[f"unedited/{key}"] = unedited[case.case_id][key]
            entry["metrics"] = metrics
        cases.append(entry)
    record = {"T": T, "chunk": idx, "cases": cases, "editor_stats": stats, "peak_mem_mb": peak_mem_mb(device),
              "timing": {"seconds": timing.seconds, "queries": timing.queries},
              "reference_timing": {"seconds": ref_timing.seconds, "queries": ref_timing.queries}}
    if T in curve_at:  # the last checkpoint is the chunk's final scoring pass
        final = {k: edited[c.case_id]["reliability"] for k, c in enumerate(chunk)
                 if k not in failures and c.case_id not in logit_faults}
        curve += curve_entries(T, final) if final else []
        record["curve"] = curve
    record.update(extra)
    return record


def _attempt(fn: Callable, arg: Any) -> tuple[Any, str | None]:
    """``fn(arg)``; a numerical failure it raises becomes a one-line reason instead."""
    try:
        return fn(arg), None
    except NUMERICAL_FAILURES as err:
        return None, " ".join(f"{type(err).__name__}: {err}".split())


def _reliability_so_far(ctx: Context, chunk: list[EditCase], applied: list[int]) -> dict[int, float]:
    """Reliability of the cases edited so far (position -> token accuracy) through
    ``editor.logits``: the retention curve's checkpoint. Only the edit request is scored."""
    model = ctx.lm.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores, _ = ctx.curve_scorer.score(ctx.editor.logits, [replace(chunk[j], generality={}, locality={},
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


def _reset_and_verify(ctx: Context) -> None:
    touched = ctx.editor.touched_parameters()
    ctx.editor.reset()
    ctx.guard.verify(touched, ctx.editor.name)


def _replay(ctx: Context, chunk: list[EditCase], applied: list[int], seed: int, T: int, idx: int) -> None:
    """Re-apply the chunk's successful edits (in order, same seeds) after a reset."""
    editor, model = ctx.editor, ctx.lm.model
    for j in applied:
        _seed_all(edit_seed(seed, T, idx, j))
        _, fault = _attempt(editor.edit, chunk[j].request)
        fault = fault or _nonfinite_fault(model, editor.touched_parameters())
        if fault:
            raise RuntimeError(f"editor '{editor.name}': replaying the successful edit of case {chunk[j].case_id} "
                               f"after a failed edit failed ({fault}): its edits are not reproducible")
