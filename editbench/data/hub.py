"""Hugging Face datasets as ``data.path`` (docs/data.md, "Hub datasets").

``data.path`` (and ``data.train_path``) may name, instead of a file:

* a dataset on the Hugging Face hub, ``<owner>/<name>`` (e.g. ``azhx/counterfact``,
  ``zjunlp/KnowEdit`` with ``data.data_files``): a path of that shape that is not a local
  file or folder. It is loaded with ``datasets.load_dataset`` (which uses the local hub
  cache when ``HF_DATASETS_OFFLINE=1``);
* a local folder in a hub layout: one written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``), or a folder of data
  files as a hub dataset repository holds them (read with ``datasets.load_dataset(folder)``).
  (``data.kind=dafset`` reads its own folder layout and is never taken for this.)

Options (with ``+`` on the command line where the data config does not list them):
``data.hub_split`` (the split of ``data.path``, default ``train``), ``data.hub_train_split``
(of ``data.train_path``, default ``train``), ``data.hub_config`` (the dataset's configuration
name), ``data.data_files`` (a file pattern, a list, or a split -> pattern mapping, passed to
``load_dataset``), ``data.hub_revision``.

The records of the split are written once as a JSON list under
``$EDITBENCH_CACHE/hub/<id>-<split>-<digest>.json`` and read by the loader of ``data.kind``,
so a hub dataset is mapped exactly as the same records in a file (the same fields, the same
one-line errors naming the record, which name that JSON file). When the hub cannot be
reached, the error is one line saying what to download and where to put it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["HUB_OPTIONS", "INSTALL_HINT", "hub_kind", "resolve_path"]

INSTALL_HINT = "pip install -e \".[hub]\" (or pip install datasets)"
#: the data config keys read here
HUB_OPTIONS = ("hub_split", "hub_train_split", "hub_config", "data_files", "hub_revision")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def hub_kind(path: str | Path | None, kind: str) -> str | None:
    """``"hub"`` (a hub id), ``"saved"`` (a save_to_disk folder), ``"folder"`` (a folder of data
    files) or None (a path the loader of ``kind`` reads itself)."""
    if path is None:
        return None
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if kind == "dafset":
            return None
        return "saved" if any((p / f).is_file() for f in _SAVED_FILES) else "folder"
    if p.exists() or p.suffix in (".json", ".jsonl") or not _HUB_ID.match(str(path)):
        return None
    return "hub"


def _plain(value: Any) -> Any:
    """An OmegaConf node (or anything) as plain dicts / lists / scalars."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def _download_hint(path: str, split: str, config: Any, data_files: Any) -> str:
    args = [repr(path)] + ([repr(config)] if config else []) + \
        ([f"data_files={data_files!r}"] if data_files else []) + [f"split={split!r}"]
    return (f"download it where the hub is reachable: python -c \"import datasets; "
            f"datasets.load_dataset({', '.join(args)}).save_to_disk('<dir>')\", copy <dir> here and set "
            f"data.path=<dir> (or fill the hub cache and set HF_DATASETS_OFFLINE=1)")


def _load(path: str, how: str, split: str, opts: Mapping[str, Any]):
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"data.path={path!r} is a Hugging Face dataset: reading it needs {INSTALL_HINT}")
    import datasets

    config, data_files, revision = opts.get("hub_config"), _plain(opts.get("data_files")), opts.get("hub_revision")
    if how == "saved":
        try:
            ds = datasets.load_from_disk(str(Path(path).expanduser()))
        except Exception as err:  # noqa: BLE001 - any reason is reported in one line
            raise ValueError(f"data.path={path!r}: cannot read the saved dataset ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.hub_split={split!r}: {path} holds the splits {', '.join(ds)}")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(str(Path(path).expanduser()) if how == "folder" else path, config,
                                     data_files=data_files, split=split, revision=revision)
    except (FileNotFoundError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if how == "folder":
            raise ValueError(f"data.path={path!r}: cannot read the folder as a dataset ({reason})") from None
        raise ValueError(f"data.path={path!r}: cannot load the Hugging Face dataset ({reason}); "
                         + _download_hint(path, split, config, data_files)) from None
    except Exception as err:  # noqa: BLE001 - no network, offline mode, ...: one line with what to do
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"data.path={path!r}: the Hugging Face hub cannot be reached ({type(err).__name__}: "
                         f"{reason}); " + _download_hint(path, split, config, data_files)) from None


def resolve_path(path: str | Path | None, kind: str, data_cfg: Mapping[str, Any] | None = None,
                 train: bool = False) -> str | Path | None:
    """``path`` itself when the loader of ``kind`` reads it; for a hub id or a hub-layout
    folder, the JSON file its split's records were written to (``$EDITBENCH_CACHE/hub``)."""
    how = hub_kind(path, kind)
    if how is None:
        return path
    opts = dict(data_cfg or {})
    split = str(opts.get("hub_train_split" if train else "hub_split") or "train")
    ds = _load(str(path), how, split, opts)
    from editbench.models import cache_dir
    from editbench.results import atomic_write_text

    key = json.dumps({"path": str(path), "how": how, "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
                      "config": opts.get("hub_config"), "data_files": _plain(opts.get("data_files")),
                      "revision": opts.get("hub_revision"), "rows": ds.num_rows}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "_", Path(str(path)).name if how != "hub" else str(path))
    out = cache_dir("hub", f"{slug}-{split}-{digest}.json")
    if not out.is_file():
        atomic_write_text(out, json.dumps(ds.to_list(), ensure_ascii=False, default=str))
    return out
