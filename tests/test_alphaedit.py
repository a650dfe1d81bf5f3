"""AlphaEdit (editors/alphaedit.py): its math, and the editor on the tiny models (and SmolLM2, marked real).

Tiny random models of both architectures (seconds): the null-space projection's defining
property (the edited layers' outputs at the preserved keys do not move), the earlier edits'
keys in the least squares, that an edit moves the target, bit-exact reset (also of the
previous-keys cache) and the batched edit.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from editbench.runner import run
from editbench.session import build_editor
from editors.alphaedit import alphaedit_weight_delta, null_space_projection
from editors.lib.locate import build_edit_rows, capture_layers, grouped_key_means, optimize_value
from tests.conftest import compose_cfg, shared, toy_cases
from tests.test_locate import _state, stats_env  # noqa: F401 - the fixture


def _editor(lm, stats_env, *overrides):
    cfg = compose_cfg(f"model={lm.name}", "editor=alphaedit", *stats_env, *overrides)
    return build_editor(cfg, lm), cfg


def _weight(lm, layer) -> torch.Tensor:
    """The (out, in) view of ``mlp_out``'s weight at ``layer``, as float64."""
    p = lm.model.get_parameter(f"{lm.arch.name('mlp_out', layer)}.weight")
    return lm.arch.weight_out_in(p).detach().double().clone()


def _keys(editor, lm, requests, layer) -> torch.Tensor:
    """The template-averaged keys of ``requests`` at ``layer`` on the model as it is (n, d_in)."""
    rows = build_edit_rows(lm.tokenizer, requests, editor.templates)
    return grouped_key_means(rows, capture_layers(lm.model, lm.arch, rows, [layer])[layer].keys).double()


# --------------------------------------------------------------------------- the math
def test_null_space_projection_is_the_projector_onto_the_small_eigenvectors():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    evals = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 1e-3, 1e-4, 0.0], dtype=torch.float64)
    cov = U @ torch.diag(evals) @ U.T
    P, dim = null_space_projection(cov, 0.02)
    assert dim == 5                                                    # eigenvalues 0.01 ... 0
    P = P.double()
    assert torch.allclose(P, P.T, atol=1e-6) and torch.allclose(P @ P, P, atol=1e-6)
    assert torch.allclose(P @ U[:, :7], torch.zeros(12, 7, dtype=torch.float64), atol=1e-6)    # preserved: P k = 0
    assert torch.allclose(P @ U[:, 7:], U[:, 7:], atol=1e-6)                                   # null space: kept


def test_update_is_the_stationary_point_of_the_projected_objective():
    """``ΔW = Xᵀ`` minimises ``|Δ P K - R|² + |Δ P K_p|² + L2 |Δ P|²`` over Δ (the paper's
    objective with ``ΔW = Δ P``): its gradient vanishes there, and ``ΔW P = ΔW``."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, n_prev = 10, 6, 3, 4
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    P, _ = null_space_projection(A @ A.T / d_in, 0.5)
    P = P.double()
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    Kp = torch.randn(n_prev, d_in, generator=g, dtype=torch.float64)
    l2 = 0.3
    dW = alphaedit_weight_delta(K, R, P, Kp.T @ Kp, l2).double()
    assert dW.shape == (d_out, d_in)
    assert torch.allclose(dW @ P, dW, atol=1e-5)
    grad = (dW @ K.T - R.T) @ K @ P + dW @ Kp.T @ Kp @ P + l2 * dW @ P
    assert grad.abs().max() < 1e-5, grad.abs().max()
    # without earlier keys the earlier keys' outputs move more
    free = alphaedit_weight_delta(K, R, P, None, l2).double()
    assert (dW @ Kp.T).norm() < (free @ Kp.T).norm()


# --------------------------------------------------------------------------- the editor
def test_edit_leaves_preserved_keys_unchanged_and_moves_the_target(tiny, stats_env):
    editor, cfg = _editor(tiny, stats_env)
    reqs = [c.request for c in toy_cases(2)]
    assert all(0 < editor.null_dims[layer] < editor.projection[layer].shape[0] for layer in editor.edit_layers)
    before = {layer: _weight(tiny, layer) for layer in editor.edit_layers}
    edit_keys = {layer: _keys(editor, tiny, reqs[:1], layer) for layer in editor.edit_layers}
    # the target the edit writes: z = h + delta after the last edited layer at the subject token
    rows = build_edit_rows(tiny.tokenizer, reqs[:1], editor.templates)
    top = editor.edit_layers[-1]
    cap = capture_layers(tiny.model, tiny.arch, rows, [top])[top]
    at = (rows.bare_rows, rows.lookup[rows.bare_rows])
    h0 = cap.hidden[at].float()
    z = h0 + optimize_value(editor.tail, rows, top, cap, h0.norm(dim=-1), editor.hp).delta
    editor.edit(reqs[0])
    h1 = capture_layers(tiny.model, tiny.arch, rows, [top])[top].hidden[at].float()
    # the edited fact's representation is now (nearly) the target: a tiny random model knows no
    # facts and its flat logits hardly move (the prediction itself is tested on SmolLM2 below)
    assert (z - h1).norm() < 0.1 * (z - h0).norm(), ((z - h1).norm(), (z - h0).norm())
    g = torch.Generator().manual_seed(0)
    for layer in editor.edit_layers:
        dW = _weight(tiny, layer) - before[layer]
        P = editor.projection[layer].double().cpu()
        preserved = (torch.eye(P.shape[0], dtype=torch.float64) - P) @ torch.randn(P.shape[0], 16, generator=g,
                                                                                   dtype=torch.float64)
        moved = (dW @ edit_keys[layer].T).norm()           # what the edit writes at its own key
        assert moved > 0
        # W_new k = W_old k on the preserved subspace, up to float32 rounding of the weights
        rel = (dW @ preserved).norm(dim=0) / preserved.norm(dim=0)
        assert rel.max() < 1e-4 * moved / edit_keys[layer].norm(), (rel.max(), moved)
    editor.reset()


def test_earlier_edits_keys_are_kept_by_the_next_update(tiny, stats_env):
    """After edit A, edit B's update moves the output at A's keys far less than the same update
    computed without the previous-keys cache (the official cache_c)."""
    editor, _ = _editor(tiny, stats_env)
    a, b = [c.request for c in toy_cases(2)]
    editor.edit(a)
    assert editor.stats()["prev_keys"] == 1 and set(editor.prev_keys) == set(editor.edit_layers)
    keys_a = {layer: _keys(editor, tiny, [a], layer) for layer in editor.edit_layers}
    mid = {layer: _weight(tiny, layer) for layer in editor.edit_layers}
    editor.edit(b)
    with_cache = {layer: (_weight(tiny, layer) - mid[layer]) @ keys_a[layer].T for layer in editor.edit_layers}
    # the same second edit without the cache: reset, replay A, forget its keys, edit B
    editor.reset()
    editor.edit(a)
    editor.prev_keys.clear()
    editor.edit(b)
    without = {layer: (_weight(tiny, layer) - mid[layer]) @ keys_a[layer].T for layer in editor.edit_layers}
    editor.reset()
    for layer in editor.edit_layers:
        assert with_cache[layer].norm() < 0.5 * without[layer].norm(), (layer, with_cache[layer].norm(),
                                                                        without[layer].norm())


def test_reset_restores_bit_for_bit_and_clears_the_previous_keys(tiny, stats_env):
    editor, cfg = _editor(tiny, stats_env)
    before = _state(tiny.model)
    reqs = [c.request for c in toy_cases(3)]
    editor.edit(reqs[0])
    first = {layer: _weight(tiny, layer) for layer in editor.edit_layers}
    for r in reqs[1:]:
        editor.edit(r)
    expected = {f"{tiny.arch.name('mlp_out', layer)}.weight" for layer in cfg.editor.layers}
    changed = {n for n, p in tiny.model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed == expected and set(editor.touched_parameters()) == expected
    editor.reset()
    after = tiny.model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert editor.prev_keys == {} and editor.stats()["prev_keys"] == 0 and editor.touched_parameters() == []
    # a fresh sequence after reset starts from nothing: its first edit is the first edit again
    editor.edit(reqs[0])
    assert all(torch.equal(_weight(tiny, layer), first[layer]) for layer in editor.edit_layers)
    editor.reset()


def test_batch_edit_moves_every_target_and_a_batch_of_one_is_edit(tiny, stats_env):
    editor, _ = _editor(tiny, stats_env)
    reqs = [c.request for c in toy_cases(3)]
    rows = build_edit_rows(tiny.tokenizer, reqs, editor.templates)
    top = editor.edit_layers[-1]
    cap = capture_layers(tiny.model, tiny.arch, rows, [top])[top]
    at = (rows.bare_rows, rows.lookup[rows.bare_rows])
    h0 = cap.hidden[at].float()
    z = h0 + optimize_value(editor.tail, rows, top, cap, h0.norm(dim=-1), editor.hp).delta
    editor.edit_batch(reqs)
    assert editor.stats()["prev_keys"] == 3
    h1 = capture_layers(tiny.model, tiny.arch, rows, [top])[top].hidden[at].float()
    # every request of the batch is written: its representation is (nearly) its target
    assert ((z - h1).norm(dim=-1) < 0.1 * (z - h0).norm(dim=-1)).all(), ((z - h1).norm(dim=-1), (z - h0).norm(dim=-1))
    editor.reset()
    editor.edit(reqs[0])
    single = {layer: _weight(tiny, layer) for layer in editor.edit_layers}
    editor.reset()
    editor.edit_batch(reqs[:1])
    assert all(torch.equal(_weight(tiny, layer), single[layer]) for layer in editor.edit_layers)
    editor.reset()


def test_configs_compose_with_the_official_defaults():
    gptj = compose_cfg("model=gptj", "editor=alphaedit").editor
    assert (list(gptj.layers), gptj.clamp_norm_factor, gptj.v_lr, gptj.nullspace_threshold, gptj.L2) == \
        ([3, 4, 5, 6, 7, 8], 0.75, 0.5, 0.02, 10.0)
    llama = compose_cfg("model=llama2", "editor=alphaedit").editor
    assert (list(llama.layers), llama.clamp_norm_factor, llama.v_lr, llama.nullspace_threshold, llama.L2) == \
        ([4, 5, 6, 7, 8], 0.75, 0.1, 0.02, 10.0)
    smol = compose_cfg("model=smollm2", "editor=alphaedit").editor
    assert list(smol.layers) == [3, 4, 5, 6, 7] and smol.nullspace_threshold == 0.02


def test_bad_hyperparameters_are_one_line_errors(tiny_llama, stats_env):
    with pytest.raises(ValueError, match="nullspace_threshold must be > 0"):
        _editor(tiny_llama, stats_env, "editor.nullspace_threshold=0")
    with pytest.raises(ValueError, match="no eigenvalue of layer 1's key covariance is below"):
        _editor(tiny_llama, stats_env, "editor.nullspace_threshold=1e-12")


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_alphaedit_edits_counterfact_facts_on_smollm2(tmp_path, smollm2):
    from editbench.data import load_cases

    cases = load_cases("cf", shared("counterfact", "counterfact-edit.json"))
    # one batch of 3 (the paper's batched protocol): one value optimisation, one update per layer
    cfg = compose_cfg("model=smollm2", "editor=alphaedit", "data=cf", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[3]", "runner.n_cases=3", "runner.edit_batch_size=3", "runner.exact_match=false",
                      f"editor.mom2_dataset={shared('corpus', 'wiki_paragraphs.txt')}",
                      "editor.mom2_n_samples=200", "editor.mom2_max_length=128", "editor.mom2_progress=false")
    path = run(cfg, cases=cases, lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")["mean"]
    assert s["reliability"] >= 0.8 and s["locality"] >= 0.8 and s["unedited/reliability"] < 0.5, s
    assert s["editor/prev_keys"] == 3
