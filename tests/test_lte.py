"""LTE (editors/lte.py): retrieval of edit facts into the official template, logits aligned
with the caller's tokens (either padding), the query built from the prompt only, exact
reset, the LoRA alignment through the training pipeline (cached, LLM frozen), stats, and
on the real model: edits take effect, and the retrieval hit rate on CounterFact."""
from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from editbench.data import load_cases
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import encode, model_logits, pad_batch
from editbench.train import FINAL, ensure_trained
from editors.lte import LTE, retrieval_report
from tests.conftest import compose_cfg, shared, toy_cases, write_train_file

UNRELATED = [("Water boils at", "one hundred degrees"), ("A year has twelve", "months")]


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _editor(lm, *overrides):
    return build_editor(compose_cfg(f"model={lm.name}", "editor=lte", *overrides), lm)


def _batch(tok, pairs, side):
    encs = [encode(tok, p, t) for p, t in pairs]
    ids, mask = pad_batch([e.ids for e in encs], tok.pad_token_id, side)
    return encs, ids, mask, torch.tensor([e.start for e in encs])


# --------------------------------------------------------------------------- inference
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_a_forward_pass_on_the_template_and_are_aligned(tiny, side):
    editor = _editor(tiny)
    tok, model = tiny.tokenizer, tiny.model
    cases = toy_cases(3)
    pairs = [(c.request.prompt, c.request.target_new) for c in cases] + UNRELATED
    encs, ids, mask, plen = _batch(tok, pairs, side)
    with torch.no_grad():
        assert torch.equal(editor.logits(ids, mask, prompt_len=plen), model_logits(model, ids, mask))  # empty memory
        for c in cases:
            editor.edit(c.request)
        out = editor.logits(ids, mask, prompt_len=plen)
    assert out.shape == (*ids.shape, len(tok)) and torch.isfinite(out).all()
    for row, e in enumerate(encs):
        [(j,)] = editor.retrieve(ids[row:row + 1], mask[row:row + 1], plen[row:row + 1])
        fact = editor.facts[j]
        prefix = tok(editor.hp.template.replace("{facts}", fact), add_special_tokens=False)["input_ids"]
        full = torch.tensor([prefix + list(e.ids)])
        with torch.no_grad():
            ref = model_logits(model, full, torch.ones_like(full))[0, len(prefix):]
        real = mask[row].bool()
        assert torch.allclose(out[row][real], ref, atol=1e-4), row
    # the edited prompts retrieve their own facts; the answer is not part of the query
    assert editor.stats()["retrieval_hit_rate"] == 1.0 and editor.stats()["memory_size"] == 3.0


def test_query_is_the_prompt_only(tiny_llama):
    editor = _editor(tiny_llama)
    tok = tiny_llama.tokenizer
    cases = toy_cases(4)
    for c in cases:
        editor.edit(c.request)
    prompt = cases[0].request.prompt
    # the same prompt with answers that name the other cases' facts: the query must not see them
    pairs = [(prompt, c.request.target_new + " " + c.request.prompt) for c in cases]
    _, ids, mask, plen = _batch(tok, pairs, "left")
    with torch.no_grad():
        assert editor.retrieve(ids, mask, plen) == [(0,)] * len(pairs)
        whole = editor.retrieve(ids, mask)              # without prompt_len: the whole row is the query
    assert whole != [(0,)] * len(pairs)


def test_threshold_retrieval_leaves_unrelated_prompts_bit_identical(tiny_llama):
    editor = _editor(tiny_llama, "editor.retrieval=threshold", "editor.sim_threshold=0.8")
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    cases = toy_cases(2)
    for c in cases:
        editor.edit(c.request)
    encs, ids, mask, plen = _batch(tok, UNRELATED + [(cases[1].request.prompt, cases[1].request.target_new)], "right")
    with torch.no_grad():
        out = editor.logits(ids, mask, prompt_len=plen)
        plain = model_logits(model, ids, mask)
    assert torch.equal(out[:2], plain[:2])             # below the threshold: the model as is, bit for bit
    assert not torch.allclose(out[2], plain[2])        # the edited prompt gets its fact
    assert editor.stats()["retrieval_rate"] == pytest.approx(1 / 3)


def test_reset_restores_everything_and_keeps_the_adapters(tiny, private_cache):
    editor = _editor(tiny, "editor.align=true")
    model, tok = tiny.model, tiny.tokenizer
    state = {n: p.clone() for n, p in model.state_dict().items()}
    structure = _structure(model)
    assert structure == _structure(model) and not hasattr(model, "peft_config")  # adapters live outside the model
    with torch.no_grad():
        for p in editor.trainable().parameters():
            if p.requires_grad:
                p.add_(0.01)           # as if trained: the adapters now change the output
    adapters = {n: t.clone() for n, t in editor.trained_state().items()}
    encs, ids, mask, plen = _batch(tok, UNRELATED, "right")
    with torch.no_grad():
        before = editor.logits(ids, mask, prompt_len=plen)
        assert not torch.allclose(before, model_logits(model, ids, mask))
        for c in toy_cases(3):
            editor.edit(c.request)
        editor.logits(ids, mask, prompt_len=plen)
    assert _structure(model) == structure                # no wrapper left in the model after a call
    editor.reset()
    assert editor.facts == [] and editor.keys.shape[0] == 0 and editor.stats() == {"memory_size": 0.0}
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], state[n]) for n in state)
    assert _structure(model) == structure and editor.touched_parameters() == []
    assert all(torch.equal(editor.trained_state()[n], t) for n, t in adapters.items())
    with torch.no_grad():
        assert torch.equal(editor.logits(ids, mask, prompt_len=plen), before)


def test_same_prompt_edited_twice_keeps_the_latest_fact(tiny_llama):
    editor = _editor(tiny_llama)
    c = toy_cases(1)[0]
    editor.edit(c.request)
    info = editor.edit(type(c.request)(c.request.prompt, "Elsewhere", c.request.subject))
    assert info == {"memory_size": 1} and editor.facts == [f"{c.request.prompt} Elsewhere"]


def test_bad_config_fails_with_a_clear_message(tiny_llama):
    for override, message in [("+editor.topk=2", r"unknown hyperparameter\(s\) \['topk'\]"),
                              ("editor.retrieval=sometimes", "retrieval must be always or threshold"),
                              ("editor.template=no-placeholder", "template must contain '{facts}'"),
                              ("editor.key_text=subject", "key_text must be prompt or fact"),
                              ("editor.distractor_probs=[0.5,0.4]", "distractor_probs must be non-negative and sum")]:
        with pytest.raises(ValueError, match=message):
            _editor(tiny_llama, override)
    with pytest.raises(ValueError, match="no module 'model.layers.0.self_attn.qkv' for LoRA"):
        _editor(tiny_llama, "editor.align=true", "editor.lora_modules=[qkv]")
    plain = _editor(tiny_llama)
    assert plain.training is None and LTE.training == "pipeline"  # the instance narrows the class
    with pytest.raises(ValueError, match="nothing to train with align=false"):
        plain.trainable()


# --------------------------------------------------------------------------- alignment
def test_alignment_trains_lora_through_the_pipeline_and_is_cached(tiny_llama, private_cache, tmp_path, monkeypatch):
    train = write_train_file(tmp_path / "train.json")
    cfg = compose_cfg("model=tiny-llama", "editor=lte", "editor.align=true", "data=cf", f"data.train_path={train}")
    model = tiny_llama.model
    state = {n: p.clone() for n, p in model.state_dict().items()}
    editor = build_editor(cfg, tiny_llama)
    assert editor.training == "pipeline"
    init = {n: t.clone() for n, t in editor.trained_state().items()}
    assert init and all("lora_" in n for n in init)
    path = ensure_trained(cfg, tiny_llama, editor)
    trained = {n: t.clone() for n, t in editor.trained_state().items()}
    assert any(not torch.equal(init[n], trained[n]) for n in init)
    after = model.state_dict()
    assert all(torch.equal(after[n], state[n]) for n in state)      # the LLM is untouched
    hist = pd.read_csv(path.parent / "history.csv")
    assert {"train/edit", "train/locality", "train/no_fact", "val/reliability", "val/locality"} <= set(hist.columns)

    def no_training(self, batch):
        raise AssertionError("the cached checkpoint must be reused, not retrained")

    monkeypatch.setattr(LTE, "training_loss", no_training)
    again = build_editor(cfg, tiny_llama)
    assert ensure_trained(cfg, tiny_llama, again) == path
    assert all(torch.equal(again.trained_state()[n], t) for n, t in trained.items())
    # inference-only settings share the checkpoint
    other = build_editor(compose_cfg("model=tiny-llama", "editor=lte", "editor.align=true", "data=cf",
                                     f"data.train_path={train}", "editor.top_k=2"), tiny_llama)
    assert ensure_trained(cfg, tiny_llama, other) == path
    # the threshold variant is the same aligned model: it loads this checkpoint, no training of its own
    variant_cfg = compose_cfg("model=tiny-llama", "editor=lte_threshold", "editor.align=true", "data=cf",
                              f"data.train_path={train}")
    variant = build_editor(variant_cfg, tiny_llama)
    assert variant.hp.retrieval == "threshold"
    assert ensure_trained(variant_cfg, tiny_llama, variant) == path


def test_defaults_are_the_papers_lte_and_the_threshold_is_a_named_variant():
    """SmolLM2 (and the official models): the aligned model with always-insert retrieval is
    ``lte``; the similarity threshold is ``lte[threshold]``, otherwise the same config."""
    from editbench.results import editor_label

    for model in ("smollm2", "llama2", "gptj"):
        lte = compose_cfg(f"model={model}", "editor=lte").editor
        variant = compose_cfg(f"model={model}", "editor=lte_threshold").editor
        assert editor_label(lte) == "lte" and lte.align is True and lte.retrieval == "always" and lte.top_k == 1
        assert editor_label(variant) == "lte[threshold]" and variant.retrieval == "threshold"
        rest = ("variant", "retrieval")
        assert {k: v for k, v in variant.items() if k not in rest} == {k: v for k, v in lte.items() if k not in rest}
    tiny = compose_cfg("model=tiny-llama", "editor=lte_threshold").editor
    assert tiny.retrieval == "threshold" and tiny.align is False


def test_runner_trains_aligned_lte_and_reports_stats(tiny_llama, private_cache, tmp_path):
    train = write_train_file(tmp_path / "train.json")
    cfg = compose_cfg("model=tiny-llama", "editor=lte", "editor.align=true", "data=cf", f"data.train_path={train}",
                      "runner.steps=[1,3]", f"out_dir={tmp_path / 'res'}", "runner.progress=false")
    out = run(cfg, cases=toy_cases(3), lm=tiny_llama)
    assert list(private_cache.glob(f"trained/lte/*/{FINAL}"))
    s = pd.read_csv(out / "summary.csv")
    got = {(int(r["T"]), r["metric"]): r["mean"] for _, r in s.iterrows()}
    assert got[(3, "editor/memory_size")] == 3 and got[(3, "editor/retrieval_hit_rate")] == 1.0
    assert got[(1, "editor/retrieval_rate")] == 1.0 and {(3, "locality"), (3, "infer_overhead")} <= set(got)
    # align=false needs no training data at all
    plain = compose_cfg("model=tiny-llama", "editor=lte", "runner.steps=[2]", f"out_dir={tmp_path / 'res2'}",
                        "runner.progress=false")
    run(plain, cases=toy_cases(2), lm=tiny_llama)


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_edits_take_effect_on_smollm2(smollm2):
    """The unaligned model with the similarity threshold (retrieval of lte[threshold]): the edit
    prompts answer target_new; a rephrase that retrieves its fact makes target_new more likely; a
    prompt that retrieves nothing is scored by the unedited model."""
    cases = load_cases("cf", shared("counterfact", "counterfact-edit.json"))[:3]
    editor = _editor(smollm2, "editor.align=false", "editor.retrieval=threshold", "editor.sim_threshold=0.6")
    assert editor.hp.retrieval == "threshold" and editor.training is None
    tok = smollm2.tokenizer
    pairs = [(c.request.prompt, c.request.target_new) for c in cases]
    pairs += [(p.prompt, c.request.target_new) for c in cases for _, p in c.probes("generality")]
    pairs += [(p.prompt, p.target) for c in cases for _, p in c.probes("locality")]
    encs, ids, mask, plen = _batch(tok, pairs, "right")
    with torch.no_grad():
        before = model_logits(smollm2.model, ids, mask)
        for c in cases:
            editor.edit(c.request)
        after = editor.logits(ids, mask, prompt_len=plen)
        got_fact = [bool(p) for p in editor.retrieve(ids, mask, plen)]
    first = [e.start - 1 for e in encs]
    hit_before = [int(before[r, first[r]].argmax()) == e.target_ids[0] for r, e in enumerate(encs)]
    hit_after = [int(after[r, first[r]].argmax()) == e.target_ids[0] for r, e in enumerate(encs)]
    assert got_fact[:3] == [True] * 3 and not any(hit_before[:3]) and all(hit_after[:3])
    assert any(got_fact[3:6])
    for r in range(3, len(encs)):
        if got_fact[r] and r < 6:     # a rephrase with its fact: the new target gains probability
            lp = [torch.log_softmax(x[r, first[r]], -1)[encs[r].target_ids[0]] for x in (before, after)]
            assert lp[1] > lp[0] + 1.0, r
        if not got_fact[r]:
            # the unedited model (run in another batch, so equal up to the float rounding of
            # a different batch shape when torch uses several threads)
            assert torch.allclose(after[r][mask[r].bool()], before[r][mask[r].bool()], rtol=1e-4, atol=1e-3), r
    assert editor.stats()["retrieval_hit_rate"] == 1.0


@pytest.mark.real
def test_retrieval_hits_on_counterfact(tiny_llama):
    """The retrieval ground truth where it is known: each CounterFact case's own fact is the
    top-1 for its edit prompt and (almost always) for its rephrase, among 100 stored edits."""
    cases = load_cases("cf", shared("counterfact", "counterfact-edit.json"))
    random.Random(0).shuffle(cases)
    report = retrieval_report(_editor(tiny_llama), cases[:100])
    assert report["request"] >= 0.98 and report["generality"] >= 0.95, report
