"""MEND and MALMEN (editors/mend.py, editors/malmen.py, math in editors/lib/hypernet.py):
training lowers the loss and leaves the LLM untouched, the decoupled gradient is the end-to-end
one, an edit after brief training raises the target's probability and reset restores the
weights bit for bit, MALMEN's batch edit solves its normal equation, the running statistics
and the hidden-state cache are exact, bad configs fail clearly, and a trained checkpoint is
reused through the pipeline. Real model: edits on SmolLM2 lower the target NLL."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from editbench.data import load_cases
from editbench.records import EditRequest
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import encode
from editbench.train import FINAL, ensure_trained, train_key, train_settings
from editors.lib.hypernet import (GENERALITY, LOCALITY, REQUEST, RunningNorm, build_row_batches,
                                  least_squares_dense, least_squares_shift, shifted)
from tests.conftest import compose_cfg, shared, target_nll, toy_cases, write_train_file

EDITORS = ["mend", "malmen"]


def _editor(lm, name, *overrides):
    return build_editor(compose_cfg(f"model={lm.name}", f"editor={name}", *overrides), lm)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _assert_untouched(model, state, structure):
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], state[n]) for n in state)
    assert _structure(model) == structure
    assert not any(p.requires_grad for p in model.parameters())


def _train(editor, cases, steps, lr=1e-3):
    """A few manual AdamW steps (the pipeline's loop is tested in tests/test_train.py)."""
    params = [p for p in editor.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    editor.trainable().train()
    losses = []
    for _ in range(steps):
        loss, parts = editor.training_loss(cases)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    editor.trainable().eval()
    return losses


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", EDITORS)
def test_training_lowers_the_loss_and_leaves_the_llm_untouched(tiny, name):
    editor = _editor(tiny, name)
    state, structure = _state(tiny.model), _structure(tiny.model)
    cases = toy_cases(4)
    losses = _train(editor, cases, 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1e-3, losses
    _assert_untouched(tiny.model, state, structure)
    # the running statistics saw the factor rows, and are part of the trained state
    net = next(iter(editor.hyper.nets.values()))
    assert float(net.norm.count) > 8 and any(k.endswith("norm.mean") for k in editor.trained_state())


@pytest.mark.parametrize("name", EDITORS)
def test_decoupled_gradient_equals_the_end_to_end_gradient(tiny_llama, name):
    """training_loss differentiates through detached shift leaves and a surrogate; the gradient
    must be that of the loss computed end to end through the hypernetwork."""
    editor = _editor(tiny_llama, name, "editor.edit_loss_on=[request,generality]")
    cases = toy_cases(3)
    _train(editor, cases, 2)                       # non-trivial parameters and statistics
    params = [p for p in editor.trainable().parameters() if p.requires_grad]
    loss, _ = editor.training_loss(cases)          # eval mode: statistics frozen
    got = torch.autograd.grad(loss, params, allow_unused=True)

    head = tiny_llama.arch.module(tiny_llama.model, "lm_head")
    batches = editor._batches(cases, [REQUEST, GENERALITY, LOCALITY])
    factors, refs = editor._factors(batches, len(cases))
    groups = editor.training_groups(len(cases))
    group_of = torch.zeros(len(cases), dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    shifts = editor.make_shifts(factors, groups)   # with the graph to the parameters
    w_edit, w_loc = editor.loss_weights()
    nll, kl, n_edit, n_loc = 0, 0, 0, 0
    for b, ref in zip(batches, refs):
        with shifted(tiny_llama.model, shifts, group_of[b.case]):
            logp = torch.log_softmax(b.logits_at(head), -1)
        if ref is None:
            nll = nll - logp.gather(-1, b.rows.target[:, None]).sum()
            n_edit += b.rows.target.numel()
        else:
            kl = kl + (ref.exp() * (ref - logp)).sum()
            n_loc += b.rows.target.numel()
    direct = w_edit * nll / n_edit + w_loc * kl / n_loc
    assert torch.allclose(loss.detach(), direct.detach(), rtol=1e-5)
    want = torch.autograd.grad(direct, params, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-6 * (1 + w.abs().max())), (g - w).abs().max()


# --------------------------------------------------------------------------- editing
@pytest.mark.parametrize("name", EDITORS)
def test_edit_after_training_raises_the_target_probability_and_reset_is_exact(tiny, name):
    editor = _editor(tiny, name)
    _train(editor, toy_cases(6)[2:], 6)
    model, tok = tiny.model, tiny.tokenizer
    state, structure = _state(model), _structure(model)
    reqs = [c.request for c in toy_cases(2)]
    before = [target_nll(model, tok, r.prompt, r.target_new) for r in reqs]
    info = editor.edit(reqs[0])
    assert info["shift_norm"] > 0
    assert target_nll(model, tok, reqs[0].prompt, reqs[0].target_new) < before[0] - 1e-3
    assert sorted(editor.touched_parameters()) == sorted(m.weight for m in editor.modules)
    editor.edit(reqs[1])                            # lifelong: on top of the first edit
    assert target_nll(model, tok, reqs[1].prompt, reqs[1].target_new) < before[1] - 1e-3
    editor.reset()
    _assert_untouched(model, state, structure)
    assert editor.touched_parameters() == []


def test_malmen_batch_edit_solves_its_normal_equation(tiny_llama):
    editor = _editor(tiny_llama, "malmen")
    _train(editor, toy_cases(6)[3:], 3)
    model = tiny_llama.model
    reqs = [c.request for c in toy_cases(3)]
    factors = editor.request_factors(reqs)          # on the unedited model, as edit_batch sees it
    before = {m.weight: model.get_parameter(m.weight).detach().clone() for m in editor.modules}
    with torch.no_grad():
        systems = {m.name: editor.keys_and_values(factors, m, i) for i, m in enumerate(editor.modules)}
        lamdas = {m.name: float(editor.hyper.lamda[i].exp()) for i, m in enumerate(editor.modules)}
    editor.edit_batch(reqs)
    for m in editor.modules:
        keys, values = systems[m.name]
        k, v = torch.cat(keys).double(), torch.cat(values).double()
        assert k.shape[0] == sum(len(encode(tiny_llama.tokenizer, r.prompt, r.target_new).target_ids) for r in reqs)
        dw = (model.get_parameter(m.weight).detach() - before[m.weight]).double()   # (d_out, d_in)
        lhs = (k.T @ k + lamdas[m.name] * torch.eye(k.shape[1], dtype=torch.float64)) @ dw.T
        rhs = k.T @ v
        assert torch.allclose(lhs, rhs, atol=1e-4 * float(rhs.abs().max()) + 1e-7), m.name
    editor.reset()
    assert all(torch.equal(model.get_parameter(n), w) for n, w in before.items())


def test_least_squares_dual_form_equals_the_primal_form():
    g = torch.Generator().manual_seed(0)
    for n, d_in in ((5, 12), (20, 12)):
        k = torch.randn(n, d_in, generator=g)
        v = torch.randn(n, 7, generator=g)
        lam = torch.tensor(0.3)
        left, right = least_squares_shift(k, v, lam)
        dual = right.T @ left
        primal = least_squares_dense(k, v, lam)
        assert torch.allclose(dual, primal, atol=1e-5)
        # the normal equation of argmin ||K S - V||^2 + lam ||S||^2
        assert torch.allclose((k.T @ k + lam * torch.eye(d_in)) @ primal.T, k.T @ v, atol=1e-4)


# --------------------------------------------------------------------------- exactness of the pieces
def test_running_norm_equals_the_statistics_of_all_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(57, 6, generator=g) * 3 + 1
    norm = RunningNorm(6, eps=0.0)
    assert torch.equal(norm(rows), rows)            # identity before two rows
    for chunk in rows.split([1, 20, 3, 33]):
        norm.update(chunk)
    assert torch.allclose(norm.mean.float(), rows.mean(0), atol=1e-5)
    assert torch.allclose(norm.std.float(), rows.std(0), atol=1e-5)
    assert torch.allclose(norm(rows), (rows - rows.mean(0)) / rows.std(0), atol=1e-4)


def test_cached_lower_layers_give_the_same_logits_as_a_fresh_pass(tiny):
    cases = toy_cases(5)
    items = [(i, k, p) for i, c in enumerate(cases) for k, p in
             [(REQUEST, (c.request.prompt, c.request.target_new))] +
             [(LOCALITY, (p.prompt, p.target)) for _, p in c.probes("locality")]]
    head = tiny.arch.module(tiny.model, "lm_head")
    cache: dict = {}

    def logits_by_row(batches):
        out = {}
        with torch.no_grad():
            for b in batches:
                lg = b.logits_at(head)
                for r in range(b.rows.ids.shape[0]):
                    out[tuple(b.rows.ids[r][b.rows.mask[r].bool()].tolist())] = lg[b.rows.pos_row == r]
        return out

    fresh = logits_by_row(build_row_batches(tiny.model, tiny.arch, tiny.tokenizer, 2, items, "cpu", 32,
                                            hidden_cache=cache))
    assert len(cache) == len(items)
    # other batch compositions (one row per batch, reversed), every lower pass from the cache
    cached = logits_by_row(build_row_batches(tiny.model, tiny.arch, tiny.tokenizer, 2, items[::-1], "cpu", 1,
                                             hidden_cache=cache))
    assert set(fresh) == set(cached)
    assert all(torch.allclose(fresh[k], cached[k], atol=1e-5) for k in fresh)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("name", EDITORS)
def test_bad_configuration_fails_with_a_clear_message(tiny_llama, name):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        _editor(tiny_llama, name, "+editor.n_hidden=1")
    with pytest.raises(ValueError, match="unknown module 'mlp_middle'"):
        _editor(tiny_llama, name, "editor.modules=[mlp_middle]")
    with pytest.raises(ValueError, match="no module model.layers.2.mlp.gate"):
        _editor(tiny_llama, name, "editor.modules=['model.layers.{}.mlp.gate']")
    with pytest.raises(ValueError, match="edit_loss_on"):
        _editor(tiny_llama, name, "editor.edit_loss_on=[locality]")
    with pytest.raises(ValueError, match="out of range"):
        _editor(tiny_llama, name, "editor.layers=[7]")
    # a module path with {} (LLaMA's gate_proj, as EasyEdit's MEND config) is accepted
    editor = _editor(tiny_llama, name, "editor.modules=['model.layers.{}.mlp.gate_proj',mlp_out]")
    assert [m.name for m in editor.modules][:2] == ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj"]


def test_official_configs_compose():
    for name in EDITORS:
        for model in ("llama2", "gptj", "smollm2"):
            cfg = compose_cfg(f"model={model}", f"editor={name}")
            assert cfg.editor.rank == 1920 and cfg.editor.train.steps > 0
    assert compose_cfg("model=gptj", "editor=mend").editor.layers == [25, 26, 27]
    assert compose_cfg("model=gptj", "editor=malmen").editor.layers == [22, 23, 24, 25, 26, 27]
    assert compose_cfg("model=gptj", "editor=malmen").editor.lr_lr is None


# --------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("name", EDITORS)
def test_checkpoint_is_reused_and_the_runner_edits_with_it(tiny_llama, private_cache, tmp_path, name):
    train = write_train_file(tmp_path / "train.json", n=16)
    overrides = ("model=tiny-llama", f"editor={name}", "data=cf", f"data.train_path={train}")
    cfg = compose_cfg(*overrides)
    editor = build_editor(cfg, tiny_llama)
    state, structure = _state(tiny_llama.model), _structure(tiny_llama.model)
    path = ensure_trained(cfg, tiny_llama, editor)
    assert path.name == FINAL and (path.parent / "history.csv").is_file()
    history = pd.read_csv(path.parent / "history.csv")
    assert len(history) == cfg.editor.train.steps and "val/reliability" in history.columns
    _assert_untouched(tiny_llama.model, state, structure)
    trained = editor.trained_state()

    again = build_editor(cfg, tiny_llama)
    again.training_loss = lambda batch: (_ for _ in ()).throw(AssertionError("retrained"))
    assert ensure_trained(cfg, tiny_llama, again) == path
    assert all(torch.equal(again.trained_state()[n], t) for n, t in trained.items())
    # an inference-only setting shares the checkpoint; a training setting does not
    chunked = build_editor(compose_cfg(*overrides, "editor.chunk_size=2"), tiny_llama)
    chunked.training_loss = again.training_loss
    assert ensure_trained(compose_cfg(*overrides, "editor.chunk_size=2"), tiny_llama, chunked) == path
    other = compose_cfg(*overrides, "editor.rank=8")
    other_editor = build_editor(other, tiny_llama)
    assert train_key(other, other_editor, train_settings(other_editor))[0] != path.parent.name

    out = run(compose_cfg(*overrides, "runner.steps=[2]", f"out_dir={tmp_path / 'res'}", "runner.progress=false"),
              cases=toy_cases(2), lm=tiny_llama)
    s = pd.read_csv(out / "summary.csv")
    assert {"reliability", "locality", "edit_time_s"} <= set(s["metric"])
    _assert_untouched(tiny_llama.model, state, structure)


def test_malmen_batch_mode_through_the_runner(tiny_gptj, private_cache, tmp_path):
    train = write_train_file(tmp_path / "train.json", n=16)
    cfg = compose_cfg("model=tiny-gptj", "editor=malmen", "data=cf", f"data.train_path={train}",
                      "runner.steps=[3]", "runner.batch_edit=true", f"out_dir={tmp_path / 'res'}",
                      "runner.progress=false")
    out = run(cfg, cases=toy_cases(3), lm=tiny_gptj)
    assert "reliability" in set(pd.read_csv(out / "summary.csv")["metric"])


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_untrained_edits_lower_the_target_nll_on_smollm2(smollm2):
    """With the normalisation statistics of 16 training requests and the networks at their
    identity initialisation, both editors are a normalised-gradient step: each edit must lower
    its target's NLL on the real model, and reset must restore it exactly."""
    train = load_cases("zsre", shared("zsre", "zsre_mend_train.1k.json"))
    cases = load_cases("zsre", shared("zsre", "zsre_mend_eval.head72.json"))[:2]
    model, tok = smollm2.model, smollm2.tokenizer
    state = _state(model)
    for name, lr in (("mend", "3e-4"), ("malmen", "1e-3")):
        editor = _editor(smollm2, name, f"editor.edit_lr={lr}", "editor.layers=[28,29]", "editor.rank=64")
        editor.update_norms(editor.request_factors([c.request for c in train[:16]]))
        for c in cases:
            r = c.request
            before = target_nll(model, tok, r.prompt, r.target_new)
            editor.edit(EditRequest(r.prompt, r.target_new))
            assert target_nll(model, tok, r.prompt, r.target_new) < before - 0.5, (name, r)
            editor.reset()
        assert all(torch.equal(model.state_dict()[n], state[n]) for n in state)
