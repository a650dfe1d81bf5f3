"""Dataset loaders: one module per format, each returning :class:`EditCase` records.

``load_cases(kind, path)`` is the single entry point (``data=<kind> data.path=<path>``):

=========  ==============================================================  ==============
kind       formats                                                          module
=========  ==============================================================  ==============
sample     the embedded 40-edit default (path None) or a flat CF file        sample
zsre       MEND/ROME zsRE, or KnowEdit ZsRE (detected per file)                zsre
cf         flat CounterFact (RECIPE/EasyEdit/DAFSet) or ROME's original     counterfact
ripe       RippleEdits: original benchmark, RECIPE-flattened, KnowEdit      ripple
dafset     DAFNet's meta-training folder (or one of its part files)         dafset
=========  ==============================================================  ==============

``data.path`` may also name a Hugging Face dataset (``<owner>/<name>``) or a local folder in
a hub layout (:mod:`editbench.data.hub`): its records are written to a JSON file and read
by the same loader. Files may be JSON (a top-level list) or JSONL. Malformed input raises
:class:`~editbench.records.DataError` at the first bad record, with a one-line message
naming the file, the record and the field. With ``skip_invalid=True`` bad records are
skipped instead: the result's ``n_skipped`` attribute counts them and one warning per
file is logged. File-level problems (unreadable, not UTF-8, invalid JSON, wrong top
level) always raise. Records that a dataset is known to contain but that cannot be
edited (zsRE's empty ``alt``) are always skipped, counted and logged the same way.

The result is a :class:`~editbench.data.common.Cases`: a plain ``list`` of EditCase in
file order with the extra attribute ``n_skipped``. ``limit`` keeps the first ``limit``
valid cases.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from editbench.data.common import Cases
from editbench.data.counterfact import load_counterfact
from editbench.data.dafset import load_dafset
from editbench.data.hub import resolve_path
from editbench.data.ripple import load_ripple
from editbench.data.sample import load_sample
from editbench.data.zsre import load_zsre

__all__ = ["LOADERS", "SPLITS", "Cases", "evaluation_cases", "in_val", "load_cases", "load_train_cases",
           "train_holds_val"]

Loader = Callable[..., Cases]

#: dataset kind -> loader(path, limit=None, skip_invalid=False) -> Cases
LOADERS: dict[str, Loader] = {
    "sample": load_sample,
    "zsre": load_zsre,
    "cf": load_counterfact,
    "ripe": load_ripple,
    "dafset": load_dafset,
}


def load_cases(kind: str, path: str | Path | None, limit: int | None = None,
               skip_invalid: bool = False) -> Cases:
    """Load the edit cases of dataset ``kind`` from ``path``.

    ``path`` may be None only for ``sample`` (the packaged file). ``limit`` (None = all)
    keeps the first ``limit`` valid cases in file order.
    """
    if kind not in LOADERS:
        raise ValueError(
            f"unknown dataset kind {kind!r}; valid kinds: {', '.join(sorted(LOADERS))}")
    if path is None and kind != "sample":
        raise ValueError(f"dataset kind {kind!r} needs a path (data.path=<file or folder>)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
    return LOADERS[kind](path, limit=limit, skip_invalid=skip_invalid)


def _eval_path(data_cfg):
    """``data.path``, or the JSON file of its records when it names a hub dataset (editbench.data.hub)."""
    return resolve_path(data_cfg.get("path"), str(data_cfg.kind), data_cfg)


def _train_path(data_cfg):
    """``data.train_path``, or the JSON file of its records when it names a hub dataset."""
    return resolve_path(data_cfg.get("train_path"), str(data_cfg.get("train_kind") or data_cfg.kind), data_cfg,
                        train=True)


#: the values of ``data.split``
SPLITS = ("val", "test", "all")


def _val_settings(data_cfg) -> tuple[str, float, str]:
    """(where the val part comes from, its share, the hash salt) of a data config."""
    val = data_cfg.get("val") or {}
    source = str(val.get("from", "eval"))
    if source not in ("eval", "train"):
        raise ValueError(f"data.val.from must be 'eval' or 'train', got {source!r}")
    fraction = val.get("fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) < 1:
        raise ValueError(f"data.val.fraction must be a number strictly between 0 and 1, got {fraction!r}")
    if source == "train" and not data_cfg.get("train_path"):
        raise ValueError(f"data.val.from=train but data '{data_cfg.get('name')}' has no train_path")
    return source, float(fraction), str(val.get("salt", "editbench-val-1"))


def in_val(case_id: str, fraction: float, salt: str) -> bool:
    """Whether a case belongs to the val part: a hash of (salt, case id) below ``fraction``.
    Deterministic, independent of the selection (``n_cases``, seeds) and of the other cases."""
    h = int(hashlib.sha256(f"{salt}:{case_id}".encode()).hexdigest()[:15], 16)
    return h / 16**15 < fraction


def _part(cases: Cases, keep_val: bool, fraction: float, salt: str) -> Cases:
    out = Cases(c for c in cases if in_val(c.case_id, fraction, salt) == keep_val)
    out.n_skipped = getattr(cases, "n_skipped", 0)
    return out


def evaluation_cases(data_cfg) -> Cases:
    """The evaluation cases of ``data.split`` (docs/protocol.md, "Splits"):

    * ``val.from: eval``: ``val`` is the hashed share ``val.fraction`` of the evaluation file,
      ``test`` the rest;
    * ``val.from: train``: ``val`` is that share of the train file (held out of training),
      ``test`` the whole evaluation file;
    * ``all``: every record of the evaluation file (no split; e.g. the embedded sample).
    """
    split = str(data_cfg.get("split") or "all")
    if split not in SPLITS:
        raise ValueError(f"data.split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return load_cases(data_cfg.kind, _eval_path(data_cfg))
    source, fraction, salt = _val_settings(data_cfg)
    if source == "train":
        if split == "test":
            return load_cases(data_cfg.kind, _eval_path(data_cfg))
        return _part(load_cases(data_cfg.get("train_kind") or data_cfg.kind, _train_path(data_cfg)), True,
                     fraction, salt)
    return _part(load_cases(data_cfg.kind, _eval_path(data_cfg)), split == "val", fraction, salt)


def load_train_cases(data_cfg, editor_name: str) -> Cases:
    """The train split of a data config (``data.train_path``, read as ``data.train_kind`` or
    ``data.kind``): what every editor that learns or builds a memory is given. When the val
    part comes from the train file (``data.val.from: train``), its cases are left out."""
    path = data_cfg.get("train_path")
    if not path:
        raise ValueError(f"editor '{editor_name}' needs training data: set data.train_path")
    cases = load_cases(data_cfg.get("train_kind") or data_cfg.kind, _train_path(data_cfg))
    if train_holds_val(data_cfg):
        _, fraction, salt = _val_settings(data_cfg)
        cases = _part(cases, False, fraction, salt)
    return cases


def train_holds_val(data_cfg) -> bool:
    """True when the val part is held out of the train file (``data.val.from: train``, whatever
    ``data.split`` a run evaluates): the trained editors then never see a val case."""
    return (data_cfg.get("val") or {}).get("from") == "train"
