"""The unedited reference pass of a chunk, computed once and shared by every editor.

Before a chunk's first edit the runner needs, for every case of the chunk, what the
unedited model says: the argmax at every answer position of every locality probe (the
locality reference), the ``unedited/*`` metrics (the base rate an editor must beat), under
WILD the unedited answers to the locality probes, and the time of that pass (the
denominator of ``infer_overhead``). None of it depends on the editor: it is the base model
(:class:`~editbench.scoring.PlainLogits`, before the editor touches anything) on the chunk's
cases, scored in the same length-sorted batches as the pass after the edits. So it is
computed once per (model, chunk cases, scorer settings, code) and kept in memory and on disk
under ``$EDITBENCH_CACHE/reference/``; every editor of a grid, and every rerun, reads it.

The key holds the model's fingerprint and device type, the chunk's cases in order
(:func:`editbench.plan.cases_fingerprint`), every scorer setting that changes what is
computed (batching, padding, metrics, the WILD settings), the code that computes it
(:data:`CODE`, hashed by :func:`editbench.fingerprint.digest`) and the torch/transformers
versions. ``infer_overhead`` then compares the edited model's time with the reference time of
the process that computed the entry (docs/protocol.md, "Reference pass").
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from editbench.fingerprint import ROOT, digest
from editbench.models import cache_dir
from editbench.plan import cases_fingerprint
from editbench.records import EditCase
from editbench.scoring import PlainLogits, Scorer, Timing

log = logging.getLogger(__name__)

__all__ = ["CODE", "reference_key", "unedited_pass"]

#: the modules whose code decides what the reference pass computes
CODE = ("editbench/reference.py", "editbench/scoring.py", "editbench/wild.py", "editbench/records.py")
#: bump when the stored entry's layout changes
LAYOUT = 1
_MEMORY: dict[str, dict[str, Any]] = {}
_CODE: list[str] = []


def code_fingerprint() -> str:
    """The fingerprint of :data:`CODE` (computed once per process)."""
    if not _CODE:
        _CODE.append(digest(ROOT / p for p in CODE))
    return _CODE[0]


def reference_key(scorer: Scorer, chunk: Sequence[EditCase], model_fingerprint: str, device: torch.device) -> str:
    """The cache key of ``chunk``'s reference pass under ``scorer`` on the model."""
    import transformers

    key = {"layout": LAYOUT, "model": model_fingerprint, "device": device.type, "cases": cases_fingerprint(chunk),
           "n": len(chunk), "scorer": scorer.settings(), "code": code_fingerprint(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(key: str) -> Path:
    return cache_dir("reference", key[:2], f"{key}.json")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("layout") != LAYOUT or entry.get("checksum") != _checksum(entry):
        log.warning("%s: a damaged reference entry; it is computed again", path)
        return None
    return entry


def _checksum(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def unedited_pass(scorer: Scorer, model: torch.nn.Module, chunk: Sequence[EditCase], model_fingerprint: str,
                  use_disk: bool = True) -> tuple[dict[str, dict[str, float]], Timing, bool]:
    """The reference pass of ``chunk``: (per-case unedited metrics, its timing, whether it came
    from the cache). Afterwards ``scorer`` holds the chunk's locality references (teacher-forced
    and WILD), as if it had scored the chunk with ``reference=True`` itself.

    A NaN or infinity in the unedited model's logits is an error (nothing is stored)."""
    device = next(model.parameters()).device
    key = reference_key(scorer, chunk, model_fingerprint, device)
    path = _path(key)
    entry = _MEMORY.get(key) or (_read(path) if use_disk and path.is_file() else None)
    if entry is not None:
        scorer.load_reference_state(entry["state"])
        _MEMORY[key] = entry
        return entry["metrics"], Timing(**entry["timing"]), True
    metrics, timing = scorer.score(PlainLogits(model), chunk, reference=True)
    if scorer.nonfinite:
        cid, what = next(iter(scorer.nonfinite.items()))
        raise RuntimeError(f"the unedited model gives NaN/Inf logits on case {cid} ({', '.join(what)}) before any "
                           f"edit: check model.dtype (float16 overflows on some models) and the model weights")
    entry = {"layout": LAYOUT, "key": key, "metrics": metrics,
             "timing": {"seconds": timing.seconds, "queries": timing.queries},
             "state": scorer.reference_state(chunk)}
    entry["checksum"] = _checksum(entry)
    _MEMORY[key] = entry
    if use_disk:
        from editbench.results import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry, sort_keys=True))
    return metrics, timing, False
