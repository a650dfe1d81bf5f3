"""DAFNet (editors/dafnet.py): training lowers the loss and leaves the LLM untouched, an edit
after brief training raises the target's probability, lifelong edits combine as the method says
(past scale, signals from the unedited model, stored edit representations), reset restores the
weights bit for bit, the update scales and the inter-editing attention behave as specified, the
curriculum grows the number of modelled edits and survives an interrupted training, bad configs
fail clearly, and a trained checkpoint is reused through the pipeline. Real model: an edit on SmolLM2 and its exact reset."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from editbench.records import EditRequest
from editbench.runner import run
from editbench.session import build_editor
from editbench.train import FINAL, ensure_trained, train_key, train_settings
from editors.dafnet import SEQ_N, update_scales
from tests.conftest import compose_cfg, target_nll, toy_cases, write_train_file


def _editor(lm, *overrides):
    return build_editor(compose_cfg(f"model={lm.name}", "editor=dafnet", *overrides), lm)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _assert_untouched(model, state, structure):
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], state[n]) for n in state)
    assert _structure(model) == structure
    assert not any(p.requires_grad for p in model.parameters())


def _train(editor, cases, steps, lr=1e-3, seed=None):
    """Manual AdamW steps (the pipeline's loop is tested in tests/test_train.py); ``seed``: the
    same draw of the number of edits at every step."""
    params = [p for p in editor.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    editor.trainable().train()
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        loss, _ = editor.training_loss(cases)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    editor.trainable().eval()
    return losses


# --------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_leaves_the_llm_untouched(tiny):
    editor = _editor(tiny)
    state, structure = _state(tiny.model), _structure(tiny.model)
    losses = _train(editor, toy_cases(4), 8, seed=0)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1e-3, losses
    _assert_untouched(tiny.model, state, structure)
    net = next(iter(editor.hyper.nets.values()))
    assert float(net.norm.count) > 8
    assert {"curriculum", "edit_lrs"} <= set(editor.trained_state())
    # the update-scale attention gets no gradient (official: detached); the rest does
    score = [p for n, p in editor.hyper.named_parameters() if "outer_score" in n]
    others = [p for n, p in editor.hyper.named_parameters() if "outer_score" not in n]
    assert score and all(p.grad is None or not p.grad.any() for p in score)
    assert all(p.grad is not None for p in others)


def test_curriculum_grows_the_number_of_modelled_edits(tiny_llama):
    editor = _editor(tiny_llama, "editor.max_seq_modeling=4", "editor.increase_seq_modeling_i=3",
                     "editor.train.batch_size=4")
    c = editor.hyper.curriculum
    for _ in range(3):                       # a new EMA minimum every step: no growth
        editor.advance_curriculum(0.0)
    assert int(c[SEQ_N]) == 1
    for _ in range(4):                       # flat loss: no new minimum for more than 3 steps
        editor.advance_curriculum(5.0)
    assert int(c[SEQ_N]) == 4                # 1 + max(0.25, 10) capped at max_seq_modeling
    # the budget cap: growth after max_steps_per_seq_n steps at one level, even while the loss improves
    capped = _editor(tiny_llama, "editor.max_seq_modeling=4", "editor.increase_seq_modeling_i=1000",
                     "editor.train.batch_size=4", "editor.max_steps_per_seq_n=3")
    for k in range(6):
        capped.advance_curriculum(1.0 - 0.1 * k)      # a new minimum every step
        assert int(capped.hyper.curriculum[SEQ_N]) == (1 if k < 2 else 4)
    # a training step edits between 1 and seq_n of the batch's cases
    editor.trainable().train()
    seen = set()
    for s in range(12):
        torch.manual_seed(s)
        _, parts = editor.training_loss(toy_cases(4))
        seen.add(int(parts["n_edits"]))
    assert seen <= {1, 2, 3, 4} and len(seen) > 1


# --------------------------------------------------------------------------- the network
def test_update_scales_share_out_the_whole_weight():
    assert [float(x) for x in update_scales(torch.tensor([1.0]))[0]] == [1.0]
    assert float(update_scales(torch.tensor([1.0]))[1]) == 0.0
    a = torch.tensor([0.3, 0.6, 0.2])
    scale, past = update_scales(a)
    assert torch.allclose(scale, torch.tensor([0.3 * 0.4 * 0.8, 0.6 * 0.8, 0.2]))
    assert torch.isclose(past, torch.tensor(0.7 * 0.4 * 0.8))
    assert torch.isclose(scale.sum() + past, torch.tensor(1.0))


def test_inter_editing_attention_is_causal_and_intra_attention_per_edit(tiny_llama):
    """An edit's transformed rows do not depend on edits after it in the sequence (intra-editing
    attention stays inside each edit, inter-editing attention looks back only)."""
    editor = _editor(tiny_llama)
    _train(editor, toy_cases(6)[3:], 2)
    factors = editor.request_factors([c.request for c in toy_cases(3)])
    with torch.no_grad():
        alone = editor.transform(factors[:1], 0)
        first_two = editor.transform(factors[:2], 0)
        three = editor.transform(factors, 0)
        # the same sequence, the third edit given the first two as stored representations
        _, _, _, reps, _ = editor.transform(factors[:2], 0)
        third_lifelong = editor.transform(factors[2:], 0, reps)
    n0 = factors[0][editor.modules[0].name][0].shape[0]
    n01 = n0 + factors[1][editor.modules[0].name][0].shape[0]
    assert torch.allclose(alone[0], three[0][:n0], atol=1e-5)          # u~ of edit 0
    assert torch.allclose(first_two[0], three[0][:n01], atol=1e-5)
    assert torch.allclose(third_lifelong[0], three[0][n01:], atol=1e-5)
    # the scale of the last edit is its own self-attention: the same in both forms
    assert torch.allclose(third_lifelong[1], three[1][n01:], atol=1e-5)
    assert len(reps) == editor.hp.n_layers and reps[0].shape[0] == 2


# --------------------------------------------------------------------------- editing
def test_edit_after_training_raises_the_target_probability_and_reset_is_exact(tiny):
    editor = _editor(tiny)
    _train(editor, toy_cases(6)[2:], 6)
    model, tok = tiny.model, tiny.tokenizer
    state, structure = _state(model), _structure(model)
    reqs = [c.request for c in toy_cases(2)]
    before = [target_nll(model, tok, r.prompt, r.target_new) for r in reqs]
    info = editor.edit(reqs[0])
    assert info["shift_norm"] > 0 and info["past_scale"] == 0.0
    assert target_nll(model, tok, reqs[0].prompt, reqs[0].target_new) < before[0] - 1e-3
    assert sorted(editor.touched_parameters()) == sorted(m.weight for m in editor.modules)
    info = editor.edit(reqs[1])                      # lifelong: the first edit's shift is rescaled
    assert 0 < info["past_scale"] < 1 and editor.stats()["edits_remembered"] == 2
    assert target_nll(model, tok, reqs[1].prompt, reqs[1].target_new) < before[1] - 1e-3
    editor.reset()
    _assert_untouched(model, state, structure)
    assert editor.touched_parameters() == [] and editor.stats()["edits_remembered"] == 0


def test_lifelong_edit_is_past_scale_times_old_shift_plus_new_shift_from_the_unedited_model(tiny_llama):
    editor = _editor(tiny_llama)
    _train(editor, toy_cases(6)[2:], 3)
    model, arch = tiny_llama.model, tiny_llama.arch
    r1, r2 = [c.request for c in toy_cases(2)]
    w0 = {m.weight: arch.weight_out_in(model.get_parameter(m.weight)).detach().clone() for m in editor.modules}
    factors2 = editor.request_factors([r2])          # on the unedited model
    editor.edit(r1)
    w1 = {n: arch.weight_out_in(model.get_parameter(n)).detach().clone() for n in w0}
    reps = {m.name: list(editor._reps[m.name]) for m in editor.modules}
    editor.edit(r2)
    with torch.no_grad():
        for i, m in enumerate(editor.modules):
            left, right, past_scale, _, _ = editor.transform(factors2, i, reps[m.name])
            want = w0[m.weight] + float(past_scale) * (w1[m.weight] - w0[m.weight]) + right.T @ left
            got = arch.weight_out_in(model.get_parameter(m.weight))
            assert torch.allclose(got, want, atol=1e-6), m.name
    editor.reset()
    assert all(torch.equal(arch.weight_out_in(model.get_parameter(n)), w) for n, w in w0.items())


def test_batch_edit_is_one_sequence(tiny_gptj):
    editor = _editor(tiny_gptj)
    _train(editor, toy_cases(6)[3:], 2)
    model, arch = tiny_gptj.model, tiny_gptj.arch
    reqs = [c.request for c in toy_cases(3)]
    w0 = {m.weight: arch.weight_out_in(model.get_parameter(m.weight)).detach().clone() for m in editor.modules}
    factors = editor.request_factors(reqs)
    editor.edit_batch(reqs)
    with torch.no_grad():
        for i, m in enumerate(editor.modules):
            left, right, _, reps, _ = editor.transform(factors, i)
            got = arch.weight_out_in(model.get_parameter(m.weight))
            assert torch.allclose(got, w0[m.weight] + right.T @ left, atol=1e-6)
            assert editor._reps[m.name][0].shape[0] == 3
    editor.reset()
    assert all(torch.equal(arch.weight_out_in(model.get_parameter(n)), w) for n, w in w0.items())


def test_official_lifelong_edits_share_one_unit_of_scale(tiny_llama):
    """The cause of the fade (docs/editors-hypernet.md): with the official update scales, the
    effective weights of k lifelong edits, ``a_i * prod_{i<j<=k} past_j``, always sum to 1, so on
    average each edit keeps 1/k of its own shift; with the score attention at its initial weights
    (it is never trained: detached) a_k is close to 1/k."""
    editor = _editor(tiny_llama)
    _train(editor, toy_cases(6)[4:], 2)
    own, past = [], []
    for c in toy_cases(4):
        info = editor.edit(c.request)
        own.append(info["edit_scale"])
        past.append(info["past_scale"])
    weights = [own[i] * float(torch.tensor(past[i + 1:]).prod()) for i in range(4)]
    assert own[0] == 1.0 and past[0] == 0.0
    assert abs(sum(weights) - 1) < 1e-3, weights
    assert all(abs(own[k] * (k + 1) - 1) < 0.2 for k in range(4)), own
    editor.reset()


def test_additive_variant_keeps_every_shift_at_full_scale(tiny_llama):
    """dafnet[additive] (update_scale: none): every edit enters at scale 1 and the earlier shift
    is kept, so two lifelong edits give W0 + (W1 - W0) + dW2, dW2 from the unedited model."""
    editor = _editor(tiny_llama, "editor.update_scale=none")
    _train(editor, toy_cases(6)[2:], 3)
    model, arch = tiny_llama.model, tiny_llama.arch
    r1, r2 = [c.request for c in toy_cases(2)]
    w0 = {m.weight: arch.weight_out_in(model.get_parameter(m.weight)).detach().clone() for m in editor.modules}
    factors2 = editor.request_factors([r2])
    info1 = editor.edit(r1)
    w1 = {n: arch.weight_out_in(model.get_parameter(n)).detach().clone() for n in w0}
    reps = {m.name: list(editor._reps[m.name]) for m in editor.modules}
    info2 = editor.edit(r2)
    assert info1["edit_scale"] == info2["edit_scale"] == info2["past_scale"] == 1.0
    with torch.no_grad():
        for i, m in enumerate(editor.modules):
            left, right, past_scale, _, scale = editor.transform(factors2, i, reps[m.name])
            assert float(past_scale) == 1.0 and scale.tolist() == [1.0]
            got = arch.weight_out_in(model.get_parameter(m.weight))
            assert torch.allclose(got, w1[m.weight] + right.T @ left, atol=1e-6), m.name
    editor.reset()
    assert all(torch.equal(arch.weight_out_in(model.get_parameter(n)), w) for n, w in w0.items())


def test_sequence_validation_reports_each_length(tiny_llama):
    """val_seq_lens: the held-out cases edited as sequences of each length; a sequence of one is
    the T=1 validation."""
    editor = _editor(tiny_llama, "editor.val_seq_lens=[1,3]")
    _train(editor, toy_cases(6)[3:], 2)
    out = editor.validation_metrics(toy_cases(3))
    assert {"seq1_reliability", "seq1_locality", "seq3_reliability", "seq3_locality"} <= set(out)
    assert out["seq1_reliability"] == pytest.approx(out["reliability"], abs=1e-6)
    assert out["seq1_locality"] == pytest.approx(out["locality"], abs=1e-6)
    assert out["seq_reliability"] == out["seq3_reliability"]


# --------------------------------------------------------------------------- configuration
def test_bad_configuration_fails_with_a_clear_message(tiny_llama):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        _editor(tiny_llama, "+editor.layer_n=2")
    with pytest.raises(ValueError, match="must not exceed train.batch_size"):
        _editor(tiny_llama, "editor.max_seq_modeling=10")
    with pytest.raises(ValueError, match="unknown module 'mlp_middle'"):
        _editor(tiny_llama, "editor.modules=[mlp_middle]")
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        _editor(tiny_llama, "editor.n_layers=0")
    with pytest.raises(ValueError, match="out of range"):
        _editor(tiny_llama, "editor.layers=[7]")
    with pytest.raises(ValueError, match="update_scale must be attention or none"):
        _editor(tiny_llama, "editor.update_scale=uniform")


def test_official_configs_compose():
    llama = compose_cfg("model=llama2", "editor=dafnet").editor
    assert llama.layers == [29, 30, 31] and llama.inner_att_dim == 1024 and llama.max_seq_modeling == 1000
    assert llama.loss_sample_max_count == 48 and llama.train.lr == 1e-6 and llama.train.batch_size >= 1000
    assert llama.max_steps_per_seq_n is None and llama.update_scale == "attention"
    gptj = compose_cfg("model=gptj", "editor=dafnet").editor
    assert gptj.modules == ["mlp_in", "mlp_out"] and gptj.layers == [25, 26, 27]
    assert gptj.loss_sample_max_count == 64
    small = compose_cfg("model=smollm2", "editor=dafnet").editor
    assert small.max_seq_modeling <= small.train.batch_size and small.train.steps > 0
    assert small.max_seq_modeling >= 100 and small.update_scale == "attention"     # issue #20's curriculum
    assert (small.relia_lambda, small.gen_lambda, small.loc_lambda) == (0.1, 0.1, 0.2)  # official


def test_additive_variant_is_dafnet_with_one_setting_changed():
    from editbench.results import editor_label

    for model in ("smollm2", "llama2", "gptj", "tiny-llama"):
        base = compose_cfg(f"model={model}", "editor=dafnet").editor
        variant = compose_cfg(f"model={model}", "editor=dafnet_additive").editor
        assert editor_label(variant) == "dafnet[additive]" and editor_label(base) == "dafnet"
        assert variant.update_scale == "none"
        # SmolLM2 (and the tiny test models, which inherit its file): the variant's locality weight was
        # chosen on validation for it; the official models keep the official weights
        differ = ("update_scale", "variant") + (() if model in ("llama2", "gptj") else ("loc_lambda",))
        same = {k: v for k, v in base.items() if k not in differ}
        assert {k: v for k, v in variant.items() if k not in differ} == same


# --------------------------------------------------------------------------- pipeline
def test_pipeline_trains_then_reuses_the_checkpoint_and_the_runner_edits_with_it(tiny_llama, private_cache,
                                                                                  tmp_path):
    train = write_train_file(tmp_path / "train.json", n=16)
    overrides = ("model=tiny-llama", "editor=dafnet", "data=dafset", f"data.train_path={train}",
                 "editor.train.steps=8", "editor.train.n_val=2")
    cfg = compose_cfg(*overrides)
    editor = build_editor(cfg, tiny_llama)
    state, structure = _state(tiny_llama.model), _structure(tiny_llama.model)
    path = ensure_trained(cfg, tiny_llama, editor)
    assert path.name == FINAL and (path.parent / "history.csv").is_file()
    history = pd.read_csv(path.parent / "history.csv")
    assert len(history) == 8 and {"val/reliability", "val/seq_reliability", "train/seq_n"} <= set(history.columns)
    assert history["train/rel"].iloc[-2:].mean() < history["train/rel"].iloc[:2].mean()
    _assert_untouched(tiny_llama.model, state, structure)
    trained = editor.trained_state()
    assert float(trained["curriculum"][4]) == 8          # the curriculum state is checkpointed

    again = build_editor(cfg, tiny_llama)
    again.training_loss = lambda batch: (_ for _ in ()).throw(AssertionError("retrained"))
    assert ensure_trained(cfg, tiny_llama, again) == path
    assert all(torch.equal(again.trained_state()[n], t) for n, t in trained.items())
    chunked_cfg = compose_cfg(*overrides, "editor.chunk_size=2")       # inference only: same checkpoint
    chunked = build_editor(chunked_cfg, tiny_llama)
    chunked.training_loss = again.training_loss
    assert ensure_trained(chunked_cfg, tiny_llama, chunked) == path
    other = compose_cfg(*overrides, "editor.ffn_dim=8")
    assert train_key(other, build_editor(other, tiny_llama), train_settings(again))[0] != path.parent.name

    out = run(compose_cfg(*overrides, "runner.steps=[2]", f"out_dir={tmp_path / 'res'}", "runner.progress=false"),
              cases=toy_cases(2), lm=tiny_llama)
    s = pd.read_csv(out / "summary.csv")
    assert {"reliability", "locality", "edit_time_s"} <= set(s["metric"])
    _assert_untouched(tiny_llama.model, state, structure)


def test_interrupted_training_resumes_with_the_curriculum_state(tiny_llama, private_cache, tmp_path, monkeypatch):
    """The curriculum (seq_n, EMA, step) lives in the checkpoint: a training interrupted after a
    partial checkpoint ends with the trained state of an uninterrupted one."""
    train = write_train_file(tmp_path / "train.json", n=24)
    cfg = compose_cfg("model=tiny-llama", "editor=dafnet", "data=cf", f"data.train_path={train}",
                      "editor.train.steps=6", "editor.train.n_val=0", "editor.increase_seq_modeling_i=1")
    whole = build_editor(cfg, tiny_llama)
    ensure_trained(cfg, tiny_llama, whole)
    want = whole.trained_state()
    assert int(want["curriculum"][SEQ_N]) > 1

    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "other"))
    broken = build_editor(cfg, tiny_llama)
    real, calls = broken.training_loss, []

    def interrupted(batch):
        calls.append(1)
        if len(calls) > 5:                     # steps 1..5 run, partial checkpoints at 2 and 4
            raise KeyboardInterrupt
        return real(batch)
    broken.training_loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        ensure_trained(cfg, tiny_llama, broken)
    resumed = build_editor(cfg, tiny_llama)
    ensure_trained(cfg, tiny_llama, resumed)
    got = resumed.trained_state()
    assert set(got) == set(want)
    assert all(torch.allclose(got[n].double(), want[n].double(), atol=1e-6) for n in want), \
        [n for n in want if not torch.allclose(got[n].double(), want[n].double(), atol=1e-6)][:3]


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_edit_and_exact_reset_on_smollm2(smollm2):
    """The SmolLM2 configuration builds, edits twice (lifelong) without a second model copy and
    resets bit for bit."""
    model = smollm2.model
    state = _state(model)
    editor = _editor(smollm2)
    editor.update_norms(editor.request_factors([c.request for c in toy_cases(4)]))
    infos = [editor.edit(EditRequest("The Eiffel Tower is located in", "Rome")),
             editor.edit(EditRequest("The capital of Japan is", "Lagos"))]
    assert all(i["shift_norm"] > 0 for i in infos) and 0 < infos[1]["past_scale"] < 1
    editor.reset()
    assert all(torch.equal(model.state_dict()[n], state[n]) for n in state)
