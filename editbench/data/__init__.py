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

Files may be JSON (a top-level list) or JSONL. Malformed input raises
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

from pathlib import Path
from typing import Callable

from editbench.data.common import Cases
from editbench.data.counterfact import load_counterfact
from editbench.data.dafset import load_dafset
from editbench.data.ripple import load_ripple
from editbench.data.sample import load_sample
from editbench.data.zsre import load_zsre

__all__ = ["LOADERS", "Cases", "load_cases", "load_train_cases"]

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


def load_train_cases(data_cfg, editor_name: str) -> Cases:
    """The train split of a data config (``data.train_path``, read as ``data.train_kind`` or
    ``data.kind``): what every editor that learns or builds a memory is given."""
    path = data_cfg.get("train_path")
    if not path:
        raise ValueError(f"editor '{editor_name}' needs training data: set data.train_path")
    return load_cases(data_cfg.get("train_kind") or data_cfg.kind, path)
