"""The restore check: checksums of a model's weights, buffers and module tree.

After every chunk the runner calls ``editor.reset()`` and then :meth:`WeightGuard.verify`
on the parameters the editor reports as touched; :meth:`WeightGuard.verify_all` re-hashes
everything (once per process after the first chunk, and at the end of a run) to catch
changes an editor did not report. A mismatch is a :class:`RestoreError` naming the editor
(exit status 3). :func:`weights_digest` is the one-value form the training pipeline uses to
prove that training left the LLM's own weights untouched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch


class RestoreError(RuntimeError):
    """An editor's reset() did not return the model to its original state (an editor bug)."""


class WeightGuard:
    """Checksums of the original parameters, buffers and module tree, to verify a reset.

    Everything is hashed once at the start; after each reset only the parameters the
    editor reports as touched are hashed again, so the check stays cheap.
    :meth:`verify_all` re-hashes everything (the runner does it after the first chunk it
    computes and at the end of the run) to catch changes an editor did not report.
    """

    def __init__(self, model: torch.nn.Module, cache: Path | None = None):
        """With ``cache`` (a folder), the original digests are read from
        ``cache/<weights_sample(model)>.json`` when a run of the same weights wrote them, so a
        model is hashed in full once, not at the start of every run (a 7B model: ~15 s)."""
        self.model = model
        path = None if cache is None else Path(cache) / f"{weights_sample(model)}.json"
        saved = _read_digests(path)
        if saved is None:
            saved = {"params": _param_digests(model),
                     "buffers": {n: _digest(b) for n, b in _persistent_buffers(model).items()}}
            if path is not None:
                from editbench.results import atomic_write_text

                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(saved, sort_keys=True))
        self.digests, self.buffer_digests = saved["params"], saved["buffers"]
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


def weights_sample(model: torch.nn.Module) -> str:
    """A cheap id of a model's weights (milliseconds): every parameter's and persistent
    buffer's name, shape and dtype, and the bytes of its first and last 256 values. It keys
    caches of what the weights determine (the guard's digests, the reference pass); a model
    changed anywhere else still fails the restore check loudly, never silently."""
    h = hashlib.blake2b(digest_size=16)
    named = list(model.named_parameters(remove_duplicate=False)) + sorted(_persistent_buffers(model).items())
    for name, t in named:
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        for part in (flat[:256], flat[-256:]):
            h.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_digests(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and {"params", "buffers"} <= set(saved) else None


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


def weights_digest(model: torch.nn.Module) -> str:
    """One digest of every parameter (name and bytes) of ``model``."""
    joined = "\n".join(f"{name}={digest}" for name, digest in _param_digests(model).items())
    return hashlib.blake2b(joined.encode(), digest_size=16).hexdigest()
