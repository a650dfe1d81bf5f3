"""benchmarks/perf.py: the FLOP model against hand counts, and one short run on tiny-llama."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from editors.ft import FTParams

ROOT = Path(__file__).resolve().parents[1]


def _perf():
    spec = importlib.util.spec_from_file_location("editbench_perf_bench", ROOT / "benchmarks" / "perf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


perf = _perf()

#: 2 layers, d=4, ff=8 (gated MLP: 3 matrices), 2 heads of 2, one KV head (kv_dim 2), vocabulary 10
TINY = perf.Shape(n_layers=2, d=4, ff=8, n_heads=2, kv_dim=2, vocab=10, n_mlp=3)


def test_flop_model_matches_a_hand_count():
    # per token and layer: q, o 2*4*4 each; k, v 2*4*2 each; MLP 3 * 2*4*8  ->  32+32+16+16+192 = 288
    assert TINY.linear == 288
    # 3 tokens (contexts 1, 2, 3), 2 layers, head at 1 position:
    # 2 * (3*288 + 4*4*(1+2+3)) + 2*4*10  =  2 * (864 + 96) + 80
    assert TINY.forward(perf.causal(3), 2, 1) == 2000
    # backward: Linears once more, attention twice its forward, head input gradient, + weight gradient
    assert TINY.backward(perf.causal(3), 2, 1, weight_grad=7) == 2 * (864 + 192) + 80 + 7
    # FT at layer 1, 2 steps, trained down_proj (4 x 8: 64 FLOPs of weight gradient per token):
    # lower forward 960 + 2 * (upper forward 960 + 80  +  upper backward 1056 + 80 + 3*64)
    assert perf.trained_upper_flops(TINY, 3, 1, 1, 2, 64) == 960 + 2 * (1040 + 1328)
    # statistics over one 3-token text at layers [0, 1]: forward of 2 layers + 2 * ff^2 * tokens * layers
    assert perf.stats_flops(TINY, [3], [0, 1]) == 2 * 960 + 2 * 64 * 3 * 2


def test_shape_from_transformers_configs():
    from transformers import GPTJConfig, LlamaConfig

    llama = perf.Shape.of(SimpleNamespace(config=LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100)))
    assert (llama.n_layers, llama.d, llama.ff, llama.kv_dim, llama.n_mlp, llama.vocab) == (4, 64, 128, 32, 3, 100)
    gptj = perf.Shape.of(SimpleNamespace(config=GPTJConfig(n_embd=64, n_layer=4, n_head=4, vocab_size=100)))
    assert (gptj.n_layers, gptj.d, gptj.ff, gptj.kv_dim, gptj.n_mlp) == (4, 64, 256, 64, 2)


class _WordTokenizer:
    """One token per whitespace-separated word (a slow tokenizer: no offsets)."""

    is_fast = False

    def __call__(self, text, **_):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_ft_floor_is_below_a_full_fine_tune_and_uses_the_reported_steps():
    shape = perf.Shape(n_layers=8, d=64, ff=128, n_heads=4, kv_dim=32, vocab=1000, n_mlp=3)
    weight = torch.zeros(64, 128)
    editor = SimpleNamespace(name="ft", tok=_WordTokenizer(), layer_indices=[6], weight_names=["w"],
                             hp=FTParams(layers=[6], objective="target_new", num_steps=25),
                             model=SimpleNamespace(get_parameter=lambda name: weight))
    floor = perf.EditFloor(editor, shape)
    request = SimpleNamespace(prompt="The capital of Country0 is", target_new="City zero")
    reported = floor(request, {"steps": 5})
    assert floor.steps_basis == {"reported"}
    configured = floor(request, {})
    assert "configured max" in floor.steps_basis and configured > reported
    # 7 tokens, 2 of them scored; same steps for the full fine-tune
    assert reported < perf.full_finetune_flops(shape, 7, 2, 5) / 2
    assert perf.EditFloor(SimpleNamespace(name="mend", tok=None), shape)(request, {}) is None


FIGURES_PER_T = {"edit_s_per_edit", "edit_cpu_s_per_edit", "scoring_qps", "scoring_wall_s_per_case",
                 "forward_qps", "scoring_over_forward", "case_s_end_to_end", "restore_s_per_chunk",
                 "cpu_s_per_case", "peak_memory", "reliability", "generality", "locality", "failed_cases"}


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    return perf.run(["model=tiny-llama", "editor=ft", "runner.progress=false", "bench.n_cases=4", "bench.T=[1,2]",
                     f"bench.out={out}", "bench.gemm_seconds=0.1"])


def test_perf_run_writes_every_figure_with_finite_ratios(ft_run):
    path = ft_run["csv"]
    assert path.is_file() and ft_run["md"].is_file()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == perf.CSV_FIELDS
    assert {r["figure"] for r in rows if r["T"] == "-"} >= {"gemm_throughput", "model_load", "editor_build"}
    for T in ("1", "2"):
        assert {r["figure"] for r in rows if r["T"] == T} >= FIGURES_PER_T
    by = {(r["T"], r["figure"]): r for r in rows}
    for key in [(T, f) for T in ("1", "2") for f in ("edit_s_per_edit", "scoring_qps", "forward_qps",
                                                      "case_s_end_to_end", "scoring_wall_s_per_case")]:
        r = by[key]
        assert float(r["value"]) > 0 and float(r["floor"]) > 0, r
        value, floor, ratio = float(r["value"]), float(r["floor"]), float(r["ratio"])
        # "times worse than the floor": measured / floor for times, floor / measured for rates
        # (no bound on the ratio itself: it is a timing, which a busy machine moves either way)
        want = floor / value if r["unit"] == "queries/s" else value / floor
        assert math.isfinite(ratio) and ratio == pytest.approx(want, rel=1e-2), r
    for r in rows:
        if r["ratio"]:
            assert math.isfinite(float(r["ratio"])) and float(r["ratio"]) > 0, r
        assert r["device"] == "cpu" and r["dtype"] == "float32" and int(r["threads"]) >= 1
    assert by[("2", "edit_s_per_edit")]["note"].startswith("4 edits")
    assert 0.0 <= float(by[("1", "reliability")]["value"]) <= 1.0
    assert float(by[("1", "failed_cases")]["value"]) == 0


def test_perf_run_ft_floor_is_below_a_full_fine_tune(ft_run):
    """The measured run's FT floor (FLOPs = floor seconds x probed throughput) is below one
    fine-tuning step of every weight over a single token, times the configured steps."""
    shape, gemm = ft_run["shape"], ft_run["gemm"]
    edit = next(r for r in ft_run["rows"] if r["figure"] == "edit_s_per_edit" and r["T"] == 1)
    ft_flops = edit["floor"] * gemm
    assert 0 < ft_flops < perf.full_finetune_flops(shape, 4, 1, 25)
