"""UltraEdit (editors/ultraedit.py) on the tiny random models of both architectures."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from editbench.records import EditRequest
from editbench.runner import run
from editbench.scoring import encode
from editbench.session import build_editor
from editors.ultraedit import LifelongNormalizer, pseudo_values, ridge_shift
from tests.conftest import compose_cfg, toy_cases


def _editor(lm, *overrides):
    return build_editor(compose_cfg(f"model={lm.name}", "editor=ultraedit", *overrides), lm)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _target_scores(editor, tok, request):
    """(argmax == target at each target position, mean NLL of the target)."""
    enc = encode(tok, request.prompt, request.target_new)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = torch.log_softmax(editor.logits(ids, torch.ones_like(ids))[0].float(), -1)
    pos = [enc.start - 1 + k for k in range(len(enc.target_ids))]
    hits = [int(logp[p].argmax()) == t for p, t in zip(pos, enc.target_ids)]
    return hits, -sum(logp[p, t].item() for p, t in zip(pos, enc.target_ids)) / len(pos)


# --------------------------------------------------------------------------- lifelong normalisation
def test_normaliser_merges_blocks_exactly_whatever_their_sizes():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(23, 5, generator=gen, dtype=torch.float64) * 3 + 1
    streamed = LifelongNormalizer(5)
    for a, b in [(0, 1), (1, 2), (2, 9), (9, 10), (10, 23)]:   # one-row blocks included (official: NaN)
        streamed.update(rows[a:b])
    whole = LifelongNormalizer(5)
    whole.update(rows)
    assert streamed.n == whole.n == 23
    torch.testing.assert_close(streamed.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.std, rows.std(0), rtol=1e-6, atol=0)   # sample std (n - 1 + eps)
    torch.testing.assert_close(streamed.m2, whole.m2, rtol=1e-12, atol=1e-12)
    z = streamed.normalize(rows)
    torch.testing.assert_close(z.mean(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ridge_shift_is_the_official_solution_in_both_regimes():
    gen = torch.Generator().manual_seed(1)
    for n, d_in in [(7, 12), (12, 7)]:   # n < d_in: push-through form; n >= d_in: the direct system
        K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        V = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        official = torch.linalg.solve(K.T @ K + torch.eye(d_in, dtype=torch.float64), K.T @ V)   # (d_in, d_out)
        torch.testing.assert_close(ridge_shift(K, V), official.T, rtol=1e-10, atol=1e-12)


def test_pseudo_values_follow_the_normalised_gradient():
    gen = torch.Generator().manual_seed(2)
    keys, grads = torch.randn(9, 6, generator=gen), torch.randn(9, 3, generator=gen)
    norm = LifelongNormalizer(9)
    norm.update(torch.cat([keys, grads], -1))
    z = norm.normalize(torch.cat([keys, grads], -1))
    expected = -0.5 * z[:, :6].pow(2).sum(-1, keepdim=True) * z[:, 6:]
    torch.testing.assert_close(pseudo_values(keys, grads, norm, 0.5), expected)


def test_stream_of_edits_leaves_the_statistics_of_the_same_edits_in_one_batch(tiny):
    """The issue's check: the statistics after a stream of edits (each edit's keys and
    gradients taken on the model edited so far) equal those of the same rows merged at once."""
    editor = _editor(tiny)
    reqs = [c.request for c in toy_cases(5)]
    rows: dict[tuple[int, int], list[torch.Tensor]] = {shape: [] for shape in editor.normalizers}
    for r in reqs:
        feats = editor.features([r])    # exactly what edit() computes next, on the same model
        for name, shape in editor.shapes.items():
            k, g = feats.rows(name)
            rows[shape].append(torch.cat([k, g], -1))
        editor.edit(r)
        name = next(iter(editor.shapes))
        assert not torch.equal(editor.features([r]).rows(name)[1], feats.rows(name)[1])   # the model moved on
    assert len(editor.normalizers) == 1   # mlp_out of layers 2 and 3: one shape, shared statistics
    for shape, norm in editor.normalizers.items():
        batch = LifelongNormalizer(norm.size)
        batch.update(torch.cat(rows[shape]))
        assert norm.n == batch.n == sum(x.shape[0] for x in rows[shape]) > len(reqs)
        torch.testing.assert_close(norm.mean, batch.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.m2, batch.m2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.std, batch.std, rtol=1e-10, atol=1e-12)
        assert bool((norm.std > 0).all())
    editor.reset()


def test_batch_and_one_at_a_time_statistics_agree_when_the_rows_do(tiny):
    """edit_batch of several requests merges the same statistics as the same groups fed one by
    one through update_statistics (grad_batch_size=1: each request is its own group)."""
    editor = _editor(tiny, "editor.grad_batch_size=1")
    reqs = [c.request for c in toy_cases(4)]
    feats = [editor.features([r]) for r in reqs]
    editor.edit_batch(reqs)
    streamed = _editor(tiny, "editor.grad_batch_size=1")
    for f in feats:
        streamed.update_statistics(f)
    for shape, norm in editor.normalizers.items():
        other = streamed.normalizers[shape]
        assert norm.n == other.n
        torch.testing.assert_close(norm.mean, other.mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(norm.std, other.std, rtol=1e-6, atol=1e-9)
    editor.reset()


# --------------------------------------------------------------------------- edits and reset
def test_edit_changes_the_prediction_and_reset_restores_bit_for_bit(tiny):
    editor = _editor(tiny)
    before = _state(tiny.model)
    hooks = [len(m._forward_hooks) for m in tiny.model.modules()]   # a session fixture: other tests' hooks count
    reqs = [c.request for c in toy_cases(6)]
    scores0 = [_target_scores(editor, tiny.tokenizer, r) for r in reqs]
    info = editor.edit_batch(reqs)
    scores1 = [_target_scores(editor, tiny.tokenizer, r) for r in reqs]
    assert info["rows"] == sum(len(encode(tiny.tokenizer, r.prompt, r.target_new).target_ids) for r in reqs)
    assert not any(h[0] for h, _ in scores0)              # no target's first token was the argmax before
    assert all(h[0] for h, _ in scores1), scores1          # every edited fact now predicts it
    assert all(n1 < n0 - 0.1 for (_, n0), (_, n1) in zip(scores0, scores1))
    expected = {f"{tiny.arch.name('mlp_out', i)}.weight" for i in (2, 3)}
    changed = {n for n, p in tiny.model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed == expected == set(editor.touched_parameters())
    assert editor.stats()["normalizer_rows"] == 2 * info["rows"]   # two modules of one shape
    editor.reset()
    after = tiny.model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert editor.touched_parameters() == [] and editor.stats()["normalizer_rows"] == 0
    for norm in editor.normalizers.values():
        assert norm.n == 0 and not norm.mean.any() and not norm.m2.any()
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert [len(m._forward_hooks) for m in tiny.model.modules()] == hooks   # no hook left behind
    # after the reset the editor starts afresh: the same batch gives the same shift
    editor.edit_batch(reqs)
    again = {n: p.detach().clone() for n, p in tiny.model.named_parameters() if n in expected}
    editor.reset()
    fresh = _editor(tiny)
    fresh.edit_batch(reqs)
    assert all(torch.equal(again[n], tiny.model.get_parameter(n)) for n in expected)
    fresh.reset()


def test_modules_of_the_mlp_by_name_and_shapes_share_statistics(tiny_llama):
    editor = _editor(tiny_llama, "editor.edit_modules=[{module:gate_proj,layers:[1]},{module:mlp_in,layers:[2]},"
                                 "{module:mlp_out,layers:[3]}]")
    assert list(editor.modules) == ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj",
                                    "model.layers.3.mlp.down_proj"]
    assert sorted(editor.normalizers) == [(64, 128), (128, 64)]   # gate and up (64 -> 128) share one
    info = editor.edit_batch([c.request for c in toy_cases(3)])
    assert editor.normalizers[(64, 128)].n == 2 * info["rows"] and editor.normalizers[(128, 64)].n == info["rows"]
    editor.reset()


def test_runner_applies_a_chunk_as_one_batch(tmp_path, tiny_gptj):
    cfg = compose_cfg("model=tiny-gptj", "editor=ultraedit", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.exact_match=false", "runner.steps=[3]", "runner.n_cases=3")
    run_dir = run(cfg)
    summary = pd.read_csv(run_dir / "summary.csv")
    assert set(summary["edit_batch_size"]) == {3}          # batch_edit: true, the paper's protocol
    rel = summary[summary.metric == "reliability"]["mean"].item()
    assert rel > 0


def test_official_configs_compose_for_llama2_and_gptj():
    gptj = compose_cfg("model=gptj", "editor=ultraedit").editor
    assert [dict(g) for g in gptj.edit_modules] == [{"module": "mlp_out", "layers": list(range(18, 27))}]
    llama2 = compose_cfg("model=llama2", "editor=ultraedit").editor
    assert [dict(g) for g in llama2.edit_modules] == [{"module": "gate_proj", "layers": list(range(11, 16))},
                                                      {"module": "mlp_in", "layers": list(range(18, 25))}]
    assert gptj.lr == llama2.lr == 1e-6 and gptj.grad_batch_size == llama2.grad_batch_size == 10
    assert gptj.batch_edit is True and llama2.token == "ans"


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("override,message", [
    ("editor.lr=0", "lr must be a number > 0"),
    ("editor.grad_batch_size=0", "grad_batch_size must be a positive integer"),
    ("editor.token=subject", "token must be one of ans, all"),
    ("editor.edit_modules=[]", "edit_modules must be a non-empty list"),
    ("editor.edit_modules=[{module:mlp_out}]", "must be {module: <name>, layers: [<int>, ...]}"),
    ("editor.edit_modules=[{module:mlp_out,layers:[9]}]", "layer 9 is out of range"),
    ("editor.edit_modules=[{module:fc_missing,layers:[1]}]", "which this llama model does not have"),
    ("editor.edit_modules=[{module:mlp_out,layers:[1,-3]}]", "is listed twice"),
    ("+editor.ridge=2", "unknown hyperparameter(s) ['ridge']"),
])
def test_bad_settings_fail_with_a_clear_message(tiny_llama, override, message):
    with pytest.raises(ValueError, match=r"editor 'ultraedit'") as err:
        _editor(tiny_llama, override)
    assert message in str(err.value)


def test_empty_target_fails_clearly(tiny_llama):
    editor = _editor(tiny_llama)
    with pytest.raises(ValueError, match="empty target"):
        editor.edit(EditRequest("The capital of France is", " ", "France", "Paris"))
    assert editor.touched_parameters() == [] and all(n.n == 0 for n in editor.normalizers.values())
