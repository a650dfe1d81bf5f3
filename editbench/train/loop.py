"""The one training loop for editors that learn (MEND, MALMEN, DAFNet, RECIPE, LTE aligned).

An editor that declares ``training = "pipeline"`` supplies only what is specific to its method
(``trainable()``, ``training_loss(batch)``, ``validation_metrics(cases)``,
``trained_state()`` / ``load_trained_state()``, see editbench/editor.py). Everything else lives
here, once: the data split and order, the optimiser, validation, checkpoints, the cache.
docs/training.md is the user-facing description.

* Settings: ``editor.train.*`` (:data:`TRAIN_DEFAULTS` below, overridable per editor
  config and on the command line; an unknown key is an error naming the valid ones).
* Data: the train split ``data.train_path`` (``editbench.data.load_train_cases``), shuffled with
  ``seed``; the first ``n_val`` cases are held out for validation. The batch of step ``s``
  is a slice of the seeded permutation of its epoch, so it depends on (seed, step) only;
  before each step the global RNGs (torch, random, numpy) are seeded from (seed, step), so
  the editor's own random choices (a sampled data recipe, dropout) are also a function of
  the step. A resumed run therefore sees exactly the batches and draws of an
  uninterrupted one and ends with the same trained state.
* Optimiser: AdamW over the parameters of ``editor.trainable()`` that require grad; the
  LLM's own weights are never handed to it (checked), and are verified bit-identical after
  training. Learning rate: constant or cosine, with linear warm-up.
* Cache: ``cache_dir("trained", <editor>, <key>)``; the key hashes the editor config (minus
  the keys the editor class lists in ``inference_only`` and the train settings that do not
  change the weights: ``progress``, ``val_every``, ``ckpt_every``), the model fingerprint,
  the train data kind and a content hash of the train file(s), the val part held out of it
  (``data.val.from: train``), the seed, and the fingerprint of the code that trains
  (:func:`editbench.fingerprint.training_code`). The folder
  holds ``final.safetensors`` (the trained state; JSON meta), ``partial.safetensors``
  (trained state + optimiser state + step + history, every ``ckpt_every`` steps, written
  atomically; removed once the final checkpoint exists), ``history.csv`` and ``loss.png``.
  A ``.lock`` (flock) makes a second process wait for the first instead of training twice.
* ``ensure_trained(cfg, lm, editor)`` loads the final checkpoint when it exists (no
  training step), else trains, resuming from the partial checkpoint when there is one.
  A corrupt or mismatched checkpoint is a :class:`~editbench.checkpoints.CheckpointError`
  naming the file.

The package: this module is the loop, the settings, the cache key and the checkpoints;
:mod:`editbench.train.history` writes ``history.csv`` and ``loss.png``;
:mod:`editbench.train.__main__` is the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from editbench.checkpoints import CheckpointError, checkpoint_key, load_checkpoint, read_meta, save_checkpoint
from editbench.data import load_train_cases, train_holds_val
from editbench.fingerprint import training_code
from editbench.guard import weights_digest
from editbench.models import AUTOCAST_DTYPES, autocast_context, cache_dir, model_fingerprint
from editbench.plan import derived_seed, seed_all
from editbench.records import EditCase
from editbench.train.history import write_history

log = logging.getLogger("editbench.train")

#: defaults of ``editor.train.*``; an editor config overrides any of them under ``train:``
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,            # optimiser steps
    "batch_size": 8,          # training cases per step
    "lr": 1e-4,
    "lr_schedule": "constant",  # constant | cosine (to 0 at the last step)
    "warmup_steps": 0,        # linear warm-up from 0 over the first steps
    "weight_decay": 0.0,
    "grad_clip": 1.0,         # max global grad norm; null: no clipping
    "n_val": 64,              # held-out train cases for validation (0: none)
    "val_every": 100,         # validate every N steps and after the last one (0: never)
    "ckpt_every": 50,         # write partial.safetensors every N steps
    "seed": 0,
    "progress": True,         # tqdm bar with the loss in its postfix
    "autocast": None,         # null (full precision) | bfloat16 | float16: mixed-precision training steps
}
#: train settings that do not change the trained weights: left out of the cache key
NOT_IN_KEY = ("progress", "val_every", "ckpt_every")
#: train settings added after checkpoints were cached: in the key only when set (not null), so
#: that a config without them keeps the key it had
KEY_WHEN_SET = ("autocast",)
FINAL = "final.safetensors"
PARTIAL = "partial.safetensors"


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    weight_decay: float
    grad_clip: float | None
    n_val: int
    val_every: int
    ckpt_every: int
    seed: int
    progress: bool
    autocast: str | None = None

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be constant or cosine, got '{self.lr_schedule}'")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.n_val < 0 or self.val_every < 0:
            problems.append(f"n_val and val_every must be >= 0, got {self.n_val} and {self.val_every}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            problems.append(f"autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, got '{self.autocast}'")
        if self.ckpt_every < 1:
            problems.append(f"ckpt_every must be >= 1, got {self.ckpt_every}")
        if problems:
            raise ValueError("editor.train: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        return self.lr


def train_settings(editor) -> TrainSettings:
    """The editor's ``train:`` mapping over :data:`TRAIN_DEFAULTS`; unknown keys are an error."""
    given = dict(editor.cfg.get("train") or {})
    unknown = sorted(set(given) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"editor '{editor.name}': unknown train setting(s) {unknown}; valid: {sorted(TRAIN_DEFAULTS)}")
    merged = {**TRAIN_DEFAULTS, **given}
    try:
        return TrainSettings(
            steps=int(merged["steps"]), batch_size=int(merged["batch_size"]), lr=float(merged["lr"]),
            lr_schedule=str(merged["lr_schedule"]), warmup_steps=int(merged["warmup_steps"]),
            weight_decay=float(merged["weight_decay"]),
            grad_clip=None if merged["grad_clip"] is None else float(merged["grad_clip"]),
            n_val=int(merged["n_val"]), val_every=int(merged["val_every"]), ckpt_every=int(merged["ckpt_every"]),
            seed=int(merged["seed"]), progress=bool(merged["progress"]),
            autocast=None if merged["autocast"] is None else str(merged["autocast"]))
    except (TypeError, ValueError) as err:
        if str(err).startswith("editor.train"):
            raise ValueError(f"editor '{editor.name}': {err}") from None
        raise ValueError(f"editor '{editor.name}': bad train setting ({err})") from None


# --------------------------------------------------------------------------- cache key
def data_fingerprint(path: str | os.PathLike) -> str:
    """A content hash of a train file, or of every file under a train folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train data {path} not found (data.train_path)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def keyed_config(editor) -> dict[str, Any]:
    """The editor config as the cache key sees it: without inference-only keys and without
    the train settings that do not change the trained weights."""
    drop = set(getattr(type(editor), "inference_only", ()) or ()) | {"variant", "batch_edit"}  # protocol, not training
    out = {k: v for k, v in editor.cfg.items() if k not in drop and not str(k).startswith("_")}
    out["train"] = {k: v for k, v in {**TRAIN_DEFAULTS, **dict(editor.cfg.get("train") or {})}.items()
                    if k not in NOT_IN_KEY and not (k in KEY_WHEN_SET and v is None)}
    return out


def train_key(cfg, editor, settings: TrainSettings) -> tuple[str, dict[str, Any]]:
    """(cache key, the JSON-able parts it hashes)."""
    train_path = cfg.data.get("train_path")
    if not train_path:
        raise ValueError(f"editor '{editor.name}' needs training data: set data.train_path")
    parts = {"editor": editor.name, "config": keyed_config(editor), "model": model_fingerprint(cfg.model),
             "data_kind": str(cfg.data.get("train_kind") or cfg.data.kind),
             "data": data_fingerprint(train_path), "seed": settings.seed,
             "code": training_code(type(editor))}
    if train_holds_val(cfg.data):   # the val part is held out of the train file: other training data
        val = cfg.data.val
        parts["val_held_out"] = {"fraction": float(val.fraction), "salt": str(val.get("salt", "editbench-val-1"))}
    return checkpoint_key(parts), parts


def stale_checkpoint(editor_name: str, parts: Mapping[str, Any]) -> Path | None:
    """A final checkpoint of ``editor_name`` whose key parts equal ``parts`` except the code
    fingerprint (trained by other code), or None."""
    want = {k: v for k, v in json.loads(json.dumps(parts, default=str)).items() if k != "code"}
    for path in sorted(cache_dir("trained", editor_name).glob(f"*/{FINAL}")):
        try:
            have = dict(read_meta(path).get("key_parts") or {})
        except (CheckpointError, OSError, ValueError):
            continue
        if {k: v for k, v in have.items() if k != "code"} == want:
            return path
    return None


def trained_dir(editor_name: str, key: str) -> Path:
    return cache_dir("trained", editor_name, key)


# --------------------------------------------------------------------------- data order
def split_cases(cases: Sequence[EditCase], n_val: int, seed: int) -> tuple[list[EditCase], list[EditCase]]:
    """(train, validation): the seeded shuffle of ``cases``, the first ``n_val`` held out."""
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    val = [cases[i] for i in order[:n_val]]
    train = [cases[i] for i in order[n_val:]]
    return train, val


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> list[int]:
    """Indices into the train cases for optimiser step ``step`` (0-based).

    Steps walk through one seeded permutation per epoch; the permutation of epoch e
    depends on (seed, e) only, so any step's batch can be recomputed without the others.
    """
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, within = divmod(pos, n)
        g = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
        out.append(int(torch.randperm(n, generator=g)[within]))
    return out


def seed_step(seed: int, step: int) -> None:
    """Seed torch, random and numpy from (seed, step) before an optimiser step."""
    seed_all(derived_seed(seed, "step", step))


# --------------------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state as flat tensors (``optim.<param index>.<name>``) and JSON meta."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "n_params": sum(len(g["params"]) for g in sd["param_groups"])}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    path: Path) -> None:
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    if meta.get("n_params") != len(params):
        raise CheckpointError(f"{path}: optimiser state for {meta.get('n_params')} parameter tensors, the editor "
                              f"trains {len(params)}; delete it to retrain")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and st[key].shape != params[idx].shape:
                raise CheckpointError(f"{path}: optimiser state '{key}' of parameter {idx} has shape "
                                      f"{tuple(st[key].shape)}, the parameter {tuple(params[idx].shape)}; "
                                      "delete it to retrain")
    groups = []
    for g, saved in zip(sd["param_groups"], meta["param_groups"]):
        groups.append({**saved, "params": g["params"]})
    opt.load_state_dict({"state": state, "param_groups": groups})


def _load_state(editor, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        editor.load_trained_state(tensors)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit editor '{editor.name}' as configured ({err}); "
                              "delete it to retrain") from None


def load_final(path: Path, editor, key: str) -> dict[str, Any]:
    """Load a final checkpoint into the editor; return its meta."""
    tensors, meta = load_checkpoint(path, expect_meta={"key": key, "kind": "final"})
    _load_state(editor, tensors, path)
    return meta


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive (blocking) lock of a trained folder: a second process waits for the first."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(folder / ".lock", "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is training into %s; waiting for it", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("cannot lock %s (%s); not guarding against a second process", folder, err)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the loop
def ensure_trained(cfg, lm, editor, reuse_stale: bool = False) -> Path:
    """Make ``editor`` trained: load the cached final checkpoint, or train (resuming from the
    newest partial checkpoint). Returns the final checkpoint's path.

    The cache key includes the code fingerprint (:func:`editbench.fingerprint.training_code`):
    a checkpoint trained by other code is not found, and the editor is trained again. With
    ``reuse_stale`` such a checkpoint is loaded instead (its path, under another key, is
    returned, so the caller can mark the results stale)."""
    if editor.training != "pipeline":
        raise ValueError(f"editor '{editor.name}' is not trained by editbench.train (training={editor.training!r})")
    settings = train_settings(editor)
    key, parts = train_key(cfg, editor, settings)
    folder = trained_dir(editor.name, key)
    final = folder / FINAL
    if reuse_stale and not final.is_file():
        old = stale_checkpoint(editor.name, parts)
        if old is not None:
            tensors, meta = load_checkpoint(old, expect_meta={"kind": "final"})
            _load_state(editor, tensors, old)
            log.warning("editor '%s': loaded %s, trained by other code (runner.reuse_stale=true); results are "
                        "marked stale", editor.name, old)
            return old
    with _folder_lock(folder):
        if final.is_file():
            meta = load_final(final, editor, key)
            log.info("editor '%s': loaded the trained state from %s (%s steps)", editor.name, final, meta.get("steps"))
            return final
        cases = load_train_cases(cfg.data, editor.name)
        train(editor, lm.model, cases, settings, folder, key, parts)
    return final


def train(editor, model: nn.Module, cases: Sequence[EditCase], settings: TrainSettings, folder: Path, key: str,
          key_parts: Mapping[str, Any] | None = None) -> Path:
    """Train ``editor`` on ``cases`` into ``folder`` (resuming from its partial checkpoint)."""
    train_cases, val_cases = split_cases(cases, settings.n_val, settings.seed)
    if not train_cases:
        raise ValueError(f"editor '{editor.name}': no training cases left after holding out n_val={settings.n_val} "
                         f"of {len(cases)}")
    trainable = editor.trainable()
    params = [p for p in trainable.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"editor '{editor.name}': trainable() has no parameter that requires grad")
    model_params = {id(p): n for n, p in model.named_parameters()}
    leaked = [model_params[id(p)] for p in params if id(p) in model_params]
    if leaked:
        raise ValueError(f"editor '{editor.name}': trainable() would train the model's own weights {leaked[:3]}; "
                         "the LLM must stay frozen")
    before = weights_digest(model)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    partial = folder / PARTIAL
    start, history = 0, []
    if partial.is_file():
        start, history = _load_partial(partial, editor, opt, key)
        log.info("editor '%s': resuming training from step %d (%s)", editor.name, start, partial)
    prepare = getattr(editor, "prepare_training", None)
    if prepare is not None:
        prepare(train_cases)
    elapsed = history[-1]["seconds"] if history else 0.0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=f"train {editor.name}",
               disable=not settings.progress)
    trainable.train()
    try:
        for step in bar:
            batch = [train_cases[i] for i in batch_indices(settings.seed, step, settings.batch_size, len(train_cases))]
            seed_step(settings.seed, step)
            lr = settings.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            with _autocast(model, settings.autocast):
                loss, loss_parts = editor.training_loss(batch)
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"editor '{editor.name}': training loss is {float(loss)} at step {step + 1} "
                                         f"(parts {loss_parts}); lower editor.train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
                         if settings.grad_clip is not None else None)
            opt.step()
            done = step + 1
            row: dict[str, Any] = {"step": done, "loss": float(loss.detach()),
                                   **{f"train/{k}": float(v) for k, v in loss_parts.items()},
                                   "lr": lr, "grad_norm": grad_norm}
            if val_cases and settings.val_every and (done % settings.val_every == 0 or done == settings.steps):
                row.update({f"val/{k}": float(v) for k, v in validate(editor, trainable, val_cases).items()})
            row["seconds"] = elapsed + time.perf_counter() - t0
            history.append({k: _finite_or_none(v) for k, v in row.items()})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % settings.ckpt_every == 0 and done < settings.steps:
                _save_partial(partial, editor, opt, key, done, history)
                write_history(folder, history)
    finally:
        trainable.eval()
    if weights_digest(model) != before:
        raise RuntimeError(f"editor '{editor.name}': the model's own weights changed during training; "
                           "trainable() must not expose them")
    final = folder / FINAL
    meta = {"kind": "final", "key": key, "editor": editor.name, "steps": settings.steps,
            "settings": dataclasses.asdict(settings), "key_parts": dict(key_parts or {}),
            "final_loss": history[-1]["loss"] if history else None,
            "val": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val/")},
            "seconds": history[-1]["seconds"] if history else 0.0}
    save_checkpoint(final, editor.trained_state(), json.loads(json.dumps(meta, default=str)))
    write_history(folder, history)
    if partial.is_file():
        partial.unlink()
    log.info("editor '%s': trained %d steps in %.0f s -> %s", editor.name, settings.steps, meta["seconds"], final)
    return final


def _autocast(model: nn.Module, dtype: str | None):
    """Mixed precision for one training step: the frozen LLM's and the trained modules' matmuls
    in ``dtype`` (weights and optimiser state stay float32); a no-op for ``None``."""
    return autocast_context(next(model.parameters()).device, dtype)


def validate(editor, trainable: nn.Module, cases: Sequence[EditCase]) -> dict[str, float]:
    """``editor.validation_metrics`` in eval mode, without gradients, and without touching
    the RNG streams of training (so validating does not change what is trained)."""
    trainable.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            state = random.getstate(), np.random.get_state()
            try:
                return dict(editor.validation_metrics(cases))
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
    finally:
        trainable.train()


def _save_partial(path: Path, editor, opt, key: str, step: int, history: list[dict[str, Any]]) -> None:
    tensors = {f"state.{n}": t for n, t in editor.trained_state().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    save_checkpoint(path, tensors, {"kind": "partial", "key": key, "step": step, "history": history,
                                    "optimizer": opt_meta})


def _load_partial(path: Path, editor, opt, key: str) -> tuple[int, list[dict[str, Any]]]:
    tensors, meta = load_checkpoint(path, expect_meta={"key": key, "kind": "partial"})
    state = {n[len("state."):]: t for n, t in tensors.items() if n.startswith("state.")}
    _load_state(editor, state, path)
    try:
        _load_optimizer(opt, {n: t for n, t in tensors.items() if n.startswith("optim.")}, meta["optimizer"], path)
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: optimiser state does not fit ({err}); delete it to retrain") from None
    return int(meta["step"]), list(meta.get("history") or [])


def _finite_or_none(v: Any) -> Any:
    """History rows go into JSON (checkpoint meta): NaN/Inf become None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
