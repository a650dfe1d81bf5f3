"""Safe, atomic checkpoints for trained editors and cached statistics.

Loading a pickle can run any code, so editbench never unpickles a file it did not make
in the same process: tensors are stored with safetensors, and everything else (sizes,
hyperparameters, step counts, the cache key) as JSON.

A checkpoint is ONE ``.safetensors`` file. Its header holds the JSON metadata under the
key ``editbench`` (read it without loading the tensors with :func:`read_meta`, or with
any safetensors tool). One file means one atomic write: it is written to a temporary file
in the same folder, flushed to disk, then renamed over the target, so a reader sees the
old checkpoint or the new one, never a torn one, and a killed process leaves at most a
hidden ``.<name>.*.tmp`` file behind.

Typical use in a trained editor (DESIGN.md: checkpoints are cached by a hash of
(editor cfg, model id, train data, seed))::

    key = checkpoint_key(self.cfg, model_fingerprint(model_cfg), train_fingerprint, seed)
    path = checkpoint_path(self.name, key)
    if path.is_file():
        tensors, meta = load_checkpoint(path, expect_meta={"key": key})
        self.hypernet.load_state_dict(tensors)
    else:
        ...train...
        save_checkpoint(path, self.hypernet.state_dict(), {"key": key, "steps": n})

Third-party files in torch's format (an official checkpoint someone downloaded) go
through :func:`load_torch_file`, which uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from editbench.models import cache_dir
from editbench.results import default_file_mode

FORMAT = "editbench-checkpoint/1"
_META_KEY = "editbench"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, not ours, or made for other settings."""


def checkpoint_key(*parts: Any) -> str:
    """A stable hash of JSON-able ``parts`` (configs, model fingerprint, data hash, seed)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_path(editor: str, key: str) -> Path:
    """``$EDITBENCH_CACHE/checkpoints/<editor>/<key>.safetensors``."""
    return cache_dir("checkpoints", editor, f"{key}.safetensors")


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` (name -> tensor) and JSON ``meta`` to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        meta_text = json.dumps(dict(meta or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: metadata must be plain JSON ({err})") from None
    prepared: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: '{name}' is a {type(t).__name__}, not a tensor; put it in meta")
        t = t.detach().to("cpu").contiguous()
        span = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if span in seen and t.numel():  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(span)
        prepared[name] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(prepared, tmp, metadata={"format": FORMAT, _META_KEY: meta_text})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint ({_one_line(err)}); "
                              "delete it to recompute") from None
    if header.get("format") != FORMAT or _META_KEY not in header:
        raise CheckpointError(f"{path}: a safetensors file but not an editbench checkpoint (no '{FORMAT}' header)")
    try:
        return json.loads(header[_META_KEY])
    except ValueError as err:
        raise CheckpointError(f"{path}: metadata is not JSON ({err})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    expect_meta: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint written by :func:`save_checkpoint`.

    Every key of ``expect_meta`` must have that value in the metadata (e.g. the cache key
    or the model fingerprint), else the checkpoint is stale: :class:`CheckpointError`.
    A missing file raises FileNotFoundError.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    meta = read_meta(path)
    for key, want in (expect_meta or {}).items():
        if meta.get(key) != want:
            raise CheckpointError(f"{path}: made for {key}={meta.get(key)!r}, not {want!r}; delete it to recompute")
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read its tensors ({_one_line(err)}); delete it to recompute") from None
    return tensors, meta


def load_torch_file(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A file in torch's own format (``.pt``/``.bin``), loaded without running pickled code:
    tensors, dicts, lists, numbers and strings only (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - UnpicklingError and friends
        raise CheckpointError(f"{path}: cannot be loaded safely ({_one_line(err)}); it may hold pickled code, "
                              "which editbench refuses to run") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
