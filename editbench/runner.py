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

Each finished (T, chunk) is written atomically to ``chunks/``; a rerun of the same
command skips it, so an interrupted run loses at most the chunk in progress.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from editbench import results
from editbench.models import LoadedModel, load_model
from editbench.records import EditCase
from editbench.registry import editor_class
from editbench.scoring import Scorer, sync

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- restore check
class WeightGuard:
    """Checksums of the original parameters and the module tree, to verify a reset.

    Every parameter is hashed once at the start; after each reset only the parameters
    the editor reports as touched are hashed again, so the check stays cheap.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.digests = {n: _digest(p) for n, p in model.named_parameters()}
        self.structure = _structure(model)

    def verify(self, touched: Sequence[str], editor: str) -> None:
        bad = [n for n in touched if _digest(self.model.get_parameter(n)) != self.digests.get(n)]
        if bad:
            raise RuntimeError(f"editor '{editor}': reset() did not restore {len(bad)} parameter(s) bit for bit: "
                               f"{bad[:5]}")
        if _structure(self.model) != self.structure:
            raise RuntimeError(f"editor '{editor}': reset() left modules replaced, added or hooked")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def _structure(model: torch.nn.Module) -> list[tuple[str, str, int, int, int]]:
    return [(name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


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


def build_editor(cfg: DictConfig, lm: LoadedModel):
    cls = editor_class(cfg.editor.name)
    editor_cfg = OmegaConf.to_container(cfg.editor, resolve=True)
    return cls(lm.model, lm.tokenizer, lm.arch, editor_cfg)


def check_compatible(cfg: DictConfig) -> type:
    """Fail before loading weights when the editor does not support the model's family."""
    cls = editor_class(cfg.editor.name)
    family = cfg.model.get("family")
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
    selected = select_cases(cases, cfg.runner.n_cases, cfg.runner.seed, cfg.runner.shuffle)
    run = results.RunDir(Path(cfg.out_dir) / run_id(cfg))
    run.path.mkdir(parents=True, exist_ok=True)
    results.atomic_write_text(run.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    meta = {"editor": cfg.editor.name, "model": cfg.model.name, "data": cfg.data.name}

    plan = []
    for T in cfg.runner.steps:
        chunks, dropped = chunks_of(selected, int(T))
        if dropped:
            log.warning("T=%d: %d case(s) do not fill a last chunk and are dropped", T, dropped)
        if not chunks:
            log.warning("T=%d: fewer than %d cases selected; no chunk to run", T, T)
        plan += [(int(T), i, ch) for i, ch in enumerate(chunks)]
    todo = [(T, i, ch) for T, i, ch in plan if not run.has_chunk(T, i)]
    log.info("run %s: %d chunk(s) planned, %d already done", run.path, len(plan), len(plan) - len(todo))

    if todo:
        if lm is None:
            lm = load_model(cfg.model)
        run.write_env(str(lm.model.device if hasattr(lm.model, "device") else "cpu"))
        editor = build_editor(cfg, lm)
        if cls.needs_training:
            editor.fit(_train_cases(cfg))
        scorer = Scorer(lm.tokenizer, batch_size=cfg.runner.batch_size, padding_side=cfg.runner.padding_side,
                        cf_metrics=bool(cfg.data.get("cf_metrics", False)),
                        exact_match=bool(cfg.runner.exact_match), device=editor.device)
        ctx = Context(cfg, lm, editor, scorer, WeightGuard(lm.model), run, after_edit_hooks={})
        for name, hook in _after_edit_hooks(cfg, lm).items():
            ctx.after_edit_hooks[name] = hook
        bar = tqdm(todo, desc=f"{cfg.editor.name} chunks", disable=not cfg.runner.progress)
        for T, i, chunk in bar:
            bar.set_postfix(T=T)
            run.write_chunk(T, i, run_chunk(ctx, T, i, chunk))
    summary = results.write_tables(run, meta)
    from editbench.report import plot_run

    plot_run(summary, run.path / "metrics.png")
    log.info("wrote %s", run.path / "summary.csv")
    return run.path


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
    """Edit, score, reset and verify one chunk; return its record."""
    cfg, editor, scorer = ctx.cfg, ctx.editor, ctx.scorer
    torch.manual_seed(int(cfg.runner.seed) * 1_000_003 + T * 1009 + idx)
    device = editor.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    unedited, ref_timing = scorer.score(editor.logits, chunk, reference=True)

    infos: list[dict[str, Any] | None] = []
    times: list[float] = []
    progress = cfg.runner.progress and T >= 10
    if cfg.runner.batch_edit:
        sync(device)
        t0 = time.perf_counter()
        info = editor.edit_batch([c.request for c in chunk])
        sync(device)
        times = [(time.perf_counter() - t0) / T] * T
        infos = [info] * T
    else:
        for case in tqdm(chunk, desc=f"T={T} edits", leave=False, disable=not progress):
            sync(device)
            t0 = time.perf_counter()
            infos.append(editor.edit(case.request))
            sync(device)
            times.append(time.perf_counter() - t0)

    edited, timing = scorer.score(editor.logits, chunk)
    extra = {name: hook(editor, T, idx) for name, hook in ctx.after_edit_hooks.items()}
    stats = editor.stats()
    touched = editor.touched_parameters()
    editor.reset()
    ctx.guard.verify(touched, editor.name)

    cases = []
    for case, info, t in zip(chunk, infos, times):
        metrics = dict(edited[case.case_id])
        for k in ("reliability", "generality"):
            if k in unedited[case.case_id]:
                metrics[f"unedited/{k}"] = unedited[case.case_id][k]
        cases.append({"case_id": case.case_id, "edit_time_s": t, "info": info or {}, "status": "ok",
                      "metrics": metrics})
    record = {"T": T, "chunk": idx, "cases": cases, "editor_stats": stats, "peak_mem_mb": peak_mem_mb(device),
              "timing": {"seconds": timing.seconds, "queries": timing.queries},
              "reference_timing": {"seconds": ref_timing.seconds, "queries": ref_timing.queries}}
    record.update(extra)
    return record
