"""Second-moment statistics of MLP output-projection inputs, computed once and cached.

ROME's covariance adjustment (``C^-1 k``) and MEMIT's least-squares update need, per
edited layer, ``C = E[k k^T]`` over the inputs ``k`` of the MLP output projection
(``arch.mlp_out``) on generic text. The official code (kmeng01/rome ``layer_stats.py``)
streams ``mom2_n_samples`` Wikipedia texts through the model and accumulates the
uncentred second moment over every non-padding token; this module does the same with
these choices:

* **Corpus**: a local text file with one paragraph per line (offline default:
  ``${data_root}/corpus/wiki_paragraphs.txt``). When the file is absent and
  ``online_dataset`` names one (``wikitext``), the texts come from the
  ``datasets`` library (``wikitext-103-raw-v1``, train split) instead.
* **Samples**: the first ``n_samples`` texts of a seeded shuffle (seed 1, as the
  official ``tally(random_sample=1)``), each truncated to ``max_length`` tokens. When the
  corpus has fewer texts, all are used (and the cache key records the real count): the
  llama2/gptj configs ask for the official 100,000, but the local
  ``wiki_paragraphs.txt`` has 6,268 paragraphs, so their statistics use 6,268 texts.
* **Provenance**: each cache file records the texts and tokens the statistics actually
  used (``texts``, ``tokens``), and :func:`second_moments_with_provenance` returns them with
  the corpus and the requested count; ROME/WilKE/R-ROME and MEMIT report them through
  ``Editor.provenance()`` (the run's env.json, under ``editor.covariance``). Every call
  logs one warning when the statistics use fewer texts than requested.
* **One pass for all layers**: every requested layer is hooked at once and the forward
  pass stops after the deepest of them, so the layers above it cost nothing.
* **Cache**: one file per (model fingerprint, module, corpus, count, dtype, max length)
  under ``editbench.models.cache_dir("stats")``, written atomically (temp file +
  ``os.replace``). A second call loads the files and runs no forward pass.

The model fingerprint is computed from the weights themselves (:func:`weights_fingerprint`),
so a different checkpoint, dtype or random seed never reuses another model's statistics,
and the statistics are always those of the model the editor was built on.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from editbench.models import ArchSpec, cache_dir
from editors.lib.forward import StopForward

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StatsConfig:
    """Where the statistics come from and how many samples they use."""

    dataset: str                     # a text file (one paragraph per line) or "wikitext"
    n_samples: int = 100_000         # number of texts (official: 100000)
    dtype: str = "float32"           # accumulation precision (official mom2_dtype)
    max_length: int = 256            # tokens per text
    batch_size: int = 16             # texts per forward pass
    online_dataset: str | None = None  # used when `dataset` is not an existing file
    progress: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"mom2_dtype must be one of {sorted(DTYPES)}, got '{self.dtype}'")
        if self.n_samples < 1:
            raise ValueError(f"mom2_n_samples must be >= 1, got {self.n_samples}")


# --------------------------------------------------------------------------- fingerprints
def weights_fingerprint(model: nn.Module) -> str:
    """A stable id of a model's weights: config, and for every parameter its name,
    shape, dtype and a strided sample of its values (cheap even for 7B models)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].float().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_id(cfg: StatsConfig) -> str:
    """Name + content hash of the corpus a config points at."""
    path = Path(cfg.dataset)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
        h.update(str(path.stat().st_size).encode())
        return f"{path.stem}-{h.hexdigest()[:10]}"
    return _online_name(cfg)


def _online_name(cfg: StatsConfig) -> str:
    if cfg.online_dataset in (None, "", "none"):
        raise FileNotFoundError(
            f"covariance corpus '{cfg.dataset}' not found. Point editor.mom2_dataset at a text file "
            "(one paragraph per line), set editor.mom2_online_dataset=wikitext to download one, "
            "or disable the adjustment (editor.mom2_adjustment=false, ROME/WilKE/R-ROME only)")
    if cfg.online_dataset != "wikitext":
        raise ValueError(f"mom2_online_dataset must be 'wikitext' or null, got '{cfg.online_dataset}'")
    return "wikitext-103-raw-v1"


def corpus_texts(cfg: StatsConfig) -> list[str]:
    """The first ``n_samples`` non-empty texts of the seeded shuffle of the corpus."""
    path = Path(cfg.dataset)
    if path.is_file():
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        _online_name(cfg)
        from datasets import load_dataset

        texts = [t.strip() for t in load_dataset("wikitext", "wikitext-103-raw-v1", split="train")["text"]]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"covariance corpus '{cfg.dataset}' has no text")
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    return [texts[i] for i in order[:cfg.n_samples]]


def stats_path(fingerprint: str, module_name: str, cfg: StatsConfig, n_texts: int, corpus: str) -> Path:
    return cache_dir("stats", fingerprint) / (
        f"{module_name}.{corpus}.n{n_texts}.{cfg.dtype}.len{cfg.max_length}.pt")


# --------------------------------------------------------------------------- computation
def second_moments(model: nn.Module, tok, arch: ArchSpec, layers: Sequence[int], cfg: StatsConfig,
                   template: str = "mlp_out") -> dict[int, torch.Tensor]:
    """``E[k k^T]`` of the inputs of ``arch.<template>`` at each layer, as float32 tensors on
    that module's device. Cached layers are loaded; the others are computed together
    in one pass over the corpus."""
    return second_moments_with_provenance(model, tok, arch, layers, cfg, template)[0]


def second_moments_with_provenance(model: nn.Module, tok, arch: ArchSpec, layers: Sequence[int], cfg: StatsConfig,
                                   template: str = "mlp_out") -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """:func:`second_moments` and what they were computed from::

        {"corpus": <file or online name>, "corpus_id": <name-hash>, "corpus_texts": <non-empty
         texts in the file, None online>, "requested_samples": n_samples, "texts": <texts
         used>, "tokens": <tokens used>, "max_length": ..., "dtype": ..., "layers": [...],
         "module": <template>}

    ``texts`` and ``tokens`` are those recorded in the cache files (the same for every layer:
    one pass over the same texts). Logs a warning when ``texts < requested_samples``.
    """
    layers = sorted({arch.layer_index(i) for i in layers})
    if not layers:
        return {}, {}
    fingerprint = weights_fingerprint(model)
    corpus = corpus_id(cfg)
    n_texts = n_texts_used(cfg)
    out: dict[int, torch.Tensor] = {}
    used: dict[int, tuple[int, int]] = {}   # layer -> (texts, tokens)
    missing = []
    for layer in layers:
        path = stats_path(fingerprint, arch.name(template, layer), cfg, n_texts, corpus)
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            out[layer] = saved["mom2"]
            # files written before "texts"/"tokens" were recorded hold n_texts / count
            used[layer] = (int(saved.get("texts", saved.get("n_texts"))), int(saved.get("tokens", saved["count"])))
        else:
            missing.append(layer)
    if missing:
        computed, n_used, count = _compute(model, tok, arch, missing, cfg, template)
        for layer, mom2 in computed.items():
            path = stats_path(fingerprint, arch.name(template, layer), cfg, n_texts, corpus)
            atomic_torch_save({"mom2": mom2, "count": count, "corpus": corpus, "n_texts": n_texts,
                          "texts": n_used, "tokens": count, "requested_samples": cfg.n_samples,
                          "module": arch.name(template, layer)}, path)
            out[layer] = mom2
            used[layer] = (n_used, count)
    if len(set(used.values())) > 1:
        log.warning("covariance statistics of layers %s were computed from different texts/tokens %s",
                    layers, sorted(set(used.values())))
    texts, tokens = used[layers[0]]
    path = Path(cfg.dataset)
    provenance = {"corpus": str(cfg.dataset) if path.is_file() else corpus, "corpus_id": corpus,
                  "corpus_texts": corpus_size(cfg), "requested_samples": cfg.n_samples, "texts": texts,
                  "tokens": tokens, "max_length": cfg.max_length, "dtype": cfg.dtype, "layers": layers,
                  "module": template}
    if texts < cfg.n_samples:
        log.warning("covariance statistics use %d texts (%d tokens) of corpus %s, fewer than the %d requested "
                    "(mom2_n_samples)", texts, tokens, provenance["corpus"], cfg.n_samples)
    mom2 = {layer: out[layer].to(device=_module_device(arch.module(model, template, layer)), dtype=torch.float32)
            for layer in layers}
    return mom2, provenance


_CORPUS_SIZE: dict[tuple[str, int, int], int] = {}


def corpus_size(cfg: StatsConfig) -> int | None:
    """Non-empty texts of the corpus file (None for the online corpus)."""
    path = Path(cfg.dataset)
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CORPUS_SIZE:
        with open(path, encoding="utf-8") as f:
            _CORPUS_SIZE[key] = sum(1 for line in f if line.strip())
    return _CORPUS_SIZE[key]


def n_texts_used(cfg: StatsConfig) -> int:
    """How many texts the statistics will actually use (min of n_samples and corpus size)."""
    size = corpus_size(cfg)
    if size is None:
        return cfg.n_samples  # the online corpus is far larger than any sensible count
    return min(size, cfg.n_samples)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _compute(model: nn.Module, tok, arch: ArchSpec, layers: list[int], cfg: StatsConfig,
             template: str) -> tuple[dict[int, torch.Tensor], int, int]:
    """(per layer E[k k^T], texts used, tokens used)."""
    texts = corpus_texts(cfg)
    dtype = DTYPES[cfg.dtype]
    sums: dict[int, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    last = max(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            x = args[0]
            m = mask_holder["mask"].to(x.device).reshape(-1).bool()
            feats = x.reshape(-1, x.shape[-1])[m].to(dtype)
            acc = sums.get(layer)
            if acc is None:
                acc = sums[layer] = torch.zeros(feats.shape[1], feats.shape[1], dtype=dtype, device=feats.device)
            acc.addmm_(feats.T, feats)
            if layer == last:
                raise StopForward
        return hook

    handles = [arch.module(model, template, layer).register_forward_hook(make_hook(layer)) for layer in layers]
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [tok(t, truncation=True, max_length=cfg.max_length)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    count = 0
    n_used = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=f"layer stats ({len(layers)} layer(s))", disable=not cfg.progress,
               leave=False)
    try:
        for b in range(0, len(order), cfg.batch_size):
            batch = [encoded[i] for i in order[b:b + cfg.batch_size] if encoded[i]]
            if not batch:
                continue
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            mask_holder["mask"] = mask
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False)
            except StopForward:
                pass
            count += int(mask.sum())
            n_used += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    return {layer: (acc / count).float().cpu() for layer, acc in sums.items()}, n_used, count


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a unique temporary file, so parallel writers (pytest-xdist workers,
    two grid cells) never see or clobber a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
