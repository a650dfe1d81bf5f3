"""WISE: routing (edited fact -> side memory, unrelated -> main memory, bit for bit), the edit's
effect, the merge of two shards keeping both edits (WISE-Retrieve and WISE-Merge), the official
router rules and Ties-merge on hand-made tensors, padding invariance, exact reset, bad settings."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from editbench.records import EditCase, EditRequest, Probe
from editbench.runner import run
from editbench.scoring import encode, greedy_generate, model_logits, reads_model_forward, teacher_forced
from editbench.session import build_editor
from editors.wise import WiseFFN, WiseParams, prefix_scores, ties_merge
from tests.conftest import compose_cfg, toy_cases

#: the unrelated training texts (official loc_prompt): one per edit, in order
UNRELATED_TRAIN = [("Rain falls from the", "clouds"), ("My favourite colour is", "green"),
                   ("Seven plus two equals", "nine"), ("The piano was built in", "Vienna")]


def _fit_cases():
    return [EditCase(case_id=f"u{i}", request=EditRequest(p, t), generality={}, locality={"n": [Probe(p, t)]})
            for i, (p, t) in enumerate(UNRELATED_TRAIN)]


def _editor(tiny, *overrides):
    torch.manual_seed(0)
    editor = build_editor(compose_cfg(f"model={tiny.name}", "editor=wise", *overrides), tiny)
    editor.fit(_fit_cases())
    return editor


def _run(editor, prompt, target):
    """(route per position, logits, encoded) of one unpadded query through the editor."""
    e = encode(editor.tok, prompt, target)
    ids = torch.tensor([e.ids])
    with torch.no_grad():
        logits = editor.logits(ids, torch.ones_like(ids))
    return editor.ffn.last_route[0], logits[0], e


def _first_token_ok(logits, e) -> bool:
    return int(logits[e.start - 1].argmax()) == e.target_ids[0]


def _nll(logits, e) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    cols = torch.arange(e.start - 1, len(e.ids) - 1)
    return -logp[cols, torch.tensor(e.target_ids)].mean().item()


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


# --------------------------------------------------------------------------- routing and the edit
def test_wise_routes_the_edited_fact_to_the_side_memory_and_unrelated_text_to_the_main_one(tiny):
    editor = _editor(tiny)
    req = toy_cases(1)[0].request
    e = encode(tiny.tokenizer, req.prompt, req.target_new)
    ids = torch.tensor([e.ids])
    with torch.no_grad():
        before = model_logits(tiny.model, ids, torch.ones_like(ids))[0]
        unrelated_ids = torch.tensor([encode(tiny.tokenizer, *UNRELATED_TRAIN[0]).ids])
        unrelated_before = model_logits(tiny.model, unrelated_ids, torch.ones_like(unrelated_ids))

    info = editor.edit(req)
    assert info["act_loss"] == 0.0   # the margins hold on the edit's rows and its unrelated row
    route, logits, _ = _run(editor, req.prompt, req.target_new)
    # every position that predicts a target token is answered by the side memory (index 0)
    assert route[e.start - 1:len(e.ids) - 1].tolist() == [0] * len(e.target_ids)
    # the edit changed the edited fact's prediction
    assert not _first_token_ok(before, e) and _first_token_ok(logits, e)
    assert _nll(logits, e) < _nll(before, e) - 0.3
    # the unrelated text of the edit stays with the main memory at every position: bit for bit
    route_u, logits_u, _ = _run(editor, *UNRELATED_TRAIN[0])
    assert (route_u == -1).all()
    assert torch.equal(logits_u, unrelated_before[0])
    assert editor.touched_parameters() == []   # the main memory's weights are never changed
    editor.reset()


def test_wise_threshold_is_the_edits_own_router_score(tiny_llama):
    """The edit's activation is the score the router computes for the edit's prompt where it
    decides the first target token (at the last forward pass, before the last step, as
    officially), so that query passes the act_ratio x activation threshold."""
    editor = _editor(tiny_llama)
    req = toy_cases(1)[0].request
    info = editor.edit(req)
    ffn = editor.ffn
    assert ffn.shard_min == pytest.approx(info["activation"])
    e = encode(tiny_llama.tokenizer, req.prompt, req.target_new)
    captured = {}
    handle = ffn.inner.register_forward_hook(lambda m, a, o: captured.update(x=a[0], main=o))
    _run(editor, req.prompt, req.target_new)
    handle.remove()
    score = prefix_scores(ffn.distance(captured["main"], ffn.side(captured["x"], ffn.current)),
                          torch.ones(1, len(e.ids), dtype=torch.bool))
    assert score[0, e.start - 1].item() == pytest.approx(info["activation"], rel=0.05)
    assert score[0, e.start - 1].item() >= ffn.hp.act_ratio * info["activation"]
    editor.reset()


@pytest.mark.parametrize("retrieve", [True, False])
def test_wise_merge_of_two_shards_keeps_both_edits(tiny, retrieve):
    editor = _editor(tiny, "editor.save_freq=1", "editor.merge_freq=2", f"editor.retrieve={str(retrieve).lower()}")
    a, b = [c.request for c in toy_cases(2)]
    act_a = editor.edit(a)["activation"]
    ffn = editor.ffn
    mask_a = ffn.mask.clone()
    assert (len(ffn.memories), len(ffn.pending)) == ((1, 0) if retrieve else (0, 1))   # shard A saved
    act_b = editor.edit(b)["activation"]
    assert not torch.equal(ffn.mask, mask_a)            # each shard draws its own gradient mask
    if retrieve:
        assert len(ffn.memories) == 1                   # shards A and B merged into one memory
        assert ffn.memories[0][1] == min(act_a, act_b)  # with the lower of their thresholds
    else:
        assert ffn.merged is not None and ffn.pending == [] and ffn.current_edits == 0
    assert editor.stats() == {"side_memories": 1.0}
    for req in (a, b):
        route, logits, e = _run(editor, req.prompt, req.target_new)
        assert route[e.start - 1].item() == 0, req.prompt      # the merged memory answers
        assert _first_token_ok(logits, e), req.prompt           # and still holds the edit
    editor.reset()


def test_wise_merge_mode_merges_the_unsaved_shard_at_the_first_inference(tiny_llama):
    """Official WISE-Merge: with at least save_freq edits, the first forward pass after editing
    merges the shard in progress too."""
    editor = _editor(tiny_llama, "editor.retrieve=false", "editor.save_freq=1", "editor.merge_freq=4")
    a, b = [c.request for c in toy_cases(2)]
    editor.edit(a)
    editor.edit(b)
    ffn = editor.ffn
    assert len(ffn.pending) == 2 and ffn.merged is None
    _, logits, e = _run(editor, a.prompt, a.target_new)
    assert len(ffn.pending) == 0 and ffn.merged is not None
    editor.reset()


def test_wise_scores_are_the_same_alone_and_in_padded_batches(tiny):
    editor = _editor(tiny)
    cases = toy_cases(2)
    for c in cases:
        editor.edit(c.request)
    encoded = [encode(tiny.tokenizer, p.prompt, p.target) for c in cases for p in
               [Probe(c.request.prompt, c.request.target_new)] + [q for _, q in c.probes("generality")]
               + [q for _, q in c.probes("locality")]] + [encode(tiny.tokenizer, *t) for t in UNRELATED_TRAIN]
    alone, _ = teacher_forced(editor, encoded, tiny.tokenizer.pad_token_id, batch_size=1)
    for side in ("right", "left"):
        batched, _ = teacher_forced(editor, encoded, tiny.tokenizer.pad_token_id, batch_size=len(encoded),
                                    padding_side=side)
        for x, y in zip(alone, batched):
            assert x.argmax == y.argmax
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
    editor.reset()


def test_wise_generation_reruns_the_full_input_and_equals_stepwise_decoding(tiny):
    """WILD generation asks for the KV cache; WISE's router reads each row's whole prefix, so
    generation must rerun the full input (a cached step would see one token): with and
    without ``kv_cache`` the answers are those of stepwise decoding through ``logits``."""
    editor = _editor(tiny)
    cases = toy_cases(2)
    for c in cases:
        editor.edit(c.request)
    assert reads_model_forward(editor) is None
    edits = [encode(tiny.tokenizer, c.request.prompt, c.request.target_new) for c in cases]
    prompts = [e.ids[:e.start] for e in edits] + [encode(tiny.tokenizer, *t).ids for t in UNRELATED_TRAIN[:2]]
    pad = tiny.tokenizer.pad_token_id
    cached = greedy_generate(editor, prompts, [4] * len(prompts), pad, kv_cache=True)
    plain = greedy_generate(editor, prompts, [4] * len(prompts), pad, kv_cache=False)
    assert cached == plain
    for p, got in zip(prompts, cached):   # stepwise, one query at a time, through the full logits
        seq = list(p)
        with torch.no_grad():
            for _ in range(4):
                ids = torch.tensor([seq])
                seq.append(int(editor.logits(ids, torch.ones_like(ids))[0, -1].argmax()))
        assert seq[len(p):] == got
    editor.reset()


def test_wise_reset_restores_the_model_bit_for_bit(tiny):
    model = tiny.model
    state, structure = _state(model), _structure(model)
    editor = _editor(tiny, "editor.save_freq=1", "editor.merge_freq=2")
    original = model.get_submodule(editor.module_name)
    for c in toy_cases(3):
        editor.edit(c.request)
    assert isinstance(model.get_submodule(editor.module_name), WiseFFN)
    assert _structure(model) != structure            # wrapper and mask hooks are in place
    editor.reset()
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], state[n]) for n in state)
    assert _structure(model) == structure             # same modules, no hook left
    assert model.get_submodule(editor.module_name) is original
    assert not any(p.requires_grad for p in model.parameters())
    assert editor.stats() == {"side_memories": 0.0}
    editor.edit(toy_cases(1)[0].request)              # usable again (the next chunk)
    assert editor.stats() == {"side_memories": 1.0}
    editor.reset()
    assert _structure(model) == structure


# --------------------------------------------------------------------------- the official rules
def _ffn(retrieve=True):
    inner = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        inner.weight.copy_(torch.eye(2))
    return WiseFFN(inner, torch.nn.Identity(), False, WiseParams(retrieve=retrieve, act_ratio=1.0))


def test_wise_router_follows_the_official_order():
    """Current shard first (answers if it reaches its threshold; its score is the bar either
    way), then each saved memory that beats the best score so far *and* its own threshold."""
    ffn = _ffn()
    w = torch.eye(2)
    ffn.current, ffn.current_edits, ffn.shard_min = w, 1, 20.0
    ffn.memories = [(w, 20.0), (w, 5.0)]
    s = lambda *v: torch.tensor([list(v)])  # noqa: E731  (one position per case below)
    scores = [s(10.0, 25.0, 10.0, 10.0), s(15.0, 21.0, 25.0, 8.0), s(12.0, 30.0, 9.0, 9.0)]
    # pos 0: current fails (10 < 20); mem0 15 beats 10 but fails its 20; mem1 12 beats 10 and 5 -> mem1
    #        (an argmax over all memories would pick mem0 and, failing its threshold, the main memory)
    # pos 1: current passes (25); mem0 21 < 25; mem1 30 > 25 and > 5 -> mem1
    # pos 2: current fails; mem0 25 passes -> mem0; mem1 9 < 25 -> stays mem0
    # pos 3: current fails; mem0 8 < 10; mem1 9 < 10 -> main
    assert ffn.route(scores).tolist() == [[2, 2, 1, -1]]


def test_wise_merge_mode_router_compares_merged_and_current():
    ffn = _ffn(retrieve=False)
    w = torch.eye(2)
    ffn.current, ffn.current_edits, ffn.merged, ffn.shard_min = w, 1, w, 10.0
    current, merged = torch.tensor([[5.0, 12.0, 12.0, 11.0]]), torch.tensor([[6.0, 11.0, 13.0, 3.0]])
    # both below 10 -> main; else the larger of the two (merged only when strictly larger)
    assert ffn.route([current, merged]).tolist() == [[-1, 0, 1, 0]]


def test_ties_merge_trims_elects_signs_and_averages_the_agreeing_entries():
    base = torch.zeros(2, 2)
    t1 = torch.tensor([[4.0, 0.1], [-2.0, 0.0]])
    t2 = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    # density 0.5: t1 keeps 4, -2; t2 keeps 2, 3. Weights 0.5 each.
    # entry (0,0): both +, mean 3; (0,1): trimmed; (1,0): -1 vs +0.5 -> sum -0.5 < 0: only t1, -2;
    # (1,1): only t2, 3 (its weight alone divides)
    merged = ties_merge(base, [t1, t2], [0.5, 0.5], density=0.5)
    assert merged.tolist() == [[3.0, 0.0], [-2.0, 3.0]]
    # no trimming and one tensor: the merge is the tensor itself
    assert torch.equal(ties_merge(base, [t1], [1.0], density=1.0), t1)


def test_prefix_scores_are_causal_and_skip_padding():
    d = torch.tensor([[9.0, 1.0, 3.0, 5.0]])
    left_padded = torch.tensor([[False, True, True, True]])
    assert prefix_scores(d, torch.ones(1, 4, dtype=torch.bool))[0].tolist() == pytest.approx([9.0, 5.0, 13 / 3, 4.5])
    assert prefix_scores(d, left_padded)[0, 1:].tolist() == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- settings and the runner
@pytest.mark.parametrize("override, message", [
    ("editor.merge_freq=750", r"merge_freq \(750\) must be a positive multiple of save_freq \(500\)"),
    ("editor.act_margin=[5.0,20.0]", r"act_margin must be \[alpha, beta, gamma\]"),
    ("editor.merge_alg=dare_ties", "merge_alg must be ties"),
    ("editor.mask_ratio=0", r"mask_ratio must be in \(0, 1\]"),
    ("+editor.replay=true", "unknown hyperparameter"),
])
def test_wise_rejects_bad_settings_with_a_clear_message(tiny_llama, override, message):
    with pytest.raises(ValueError, match=f"editor 'wise': {message}"):
        build_editor(compose_cfg("model=tiny-llama", "editor=wise", override), tiny_llama)


def test_wise_needs_fit_before_editing(tiny_llama):
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=wise"), tiny_llama)
    with pytest.raises(RuntimeError, match="call fit"):
        editor.edit(toy_cases(1)[0].request)


def test_wise_official_defaults_per_model():
    llama, gptj = (compose_cfg(f"model={m}", "editor=wise").editor for m in ("llama2", "gptj"))
    assert (llama.layer, list(llama.act_margin), gptj.layer, list(gptj.act_margin)) == \
        (27, [5.0, 20.0, 10.0], 21, [15.0, 40.0, 20.0])
    for e in (llama, gptj):
        assert (e.mask_ratio, e.edit_lr, e.n_iter, e.norm_constraint, e.act_ratio, e.save_freq, e.merge_freq,
                e.densities, e.weights, e.retrieve, list(e.context_lengths)) == \
            (0.2, 1.0, 70, 1.0, 0.88, 500, 1000, 0.53, 1.0, True, [5, 10])


def test_wise_through_the_runner_passes_the_reset_check(tmp_path, tiny_llama):
    train = Path(__file__).resolve().parents[1] / "editbench" / "data" / "sample_facts.json"
    cfg = compose_cfg("model=tiny-llama", "editor=wise", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[2]", f"data.train_path={train}", "eval.mode=both")
    path = run(cfg, cases=toy_cases(2), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["editor/side_memories", "mean"] == 1.0
    assert s.loc["reliability", "mean"] > 0
    assert 0 <= s.loc["wild_reliability", "mean"] <= 1   # WILD generation runs through the side memory
