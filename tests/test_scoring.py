"""Scoring: tokenisation of (prompt, target), batching and padding invariance, metrics."""
from __future__ import annotations

import pytest
import torch

from editbench.scoring import (Scorer, encode, greedy_generate, model_logits, pad_batch, teacher_forced)
from tests.conftest import toy_cases

PAIRS = [("The capital of France is", "Paris"), ("Danielle Darrieux's mother tongue is", "French"),
         ("Q: What university did Watts Humphrey attend? A:", "Trinity College Dublin"),
         ("x", "a much longer target with several tokens in it")]


def test_encode_splits_prompt_and_target(tiny_llama):
    tok = tiny_llama.tokenizer
    for prompt, target in PAIRS:
        e = encode(tok, prompt, target)
        assert tok.decode(e.prompt_ids, skip_special_tokens=True).strip() == prompt
        assert tok.decode(e.target_ids, skip_special_tokens=True).strip() == target
        assert e.ids == tuple(tok(f"{prompt} {target}")["input_ids"])


def test_encode_rejects_empty_target(tiny_llama):
    with pytest.raises(ValueError, match="empty target"):
        encode(tiny_llama.tokenizer, "prompt", "  ")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_one_by_one(tiny, side):
    model, tok = tiny.model, tiny.tokenizer
    enc = [encode(tok, p, t) for p, t in PAIRS]
    fn = lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)  # noqa: E731
    batched, timing = teacher_forced(fn, enc, tok.pad_token_id, batch_size=8, padding_side=side)
    assert timing.queries == len(enc)
    for e, b in zip(enc, batched):
        [single], _ = teacher_forced(fn, [e], tok.pad_token_id, batch_size=1)
        assert single.argmax == b.argmax
        assert single.target_ids == list(e.target_ids)
        assert torch.allclose(torch.tensor(single.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_teacher_forced_matches_manual_computation(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    e = encode(tok, *PAIRS[2])
    fn = lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)  # noqa: E731
    [r], _ = teacher_forced(fn, [e], tok.pad_token_id)
    with torch.no_grad():
        logits = model(torch.tensor([e.ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    expect_arg = [int(logits[e.start - 1 + k].argmax()) for k in range(len(e.target_ids))]
    expect_lp = [float(logp[e.start - 1 + k, t]) for k, t in enumerate(e.target_ids)]
    assert r.argmax == expect_arg
    assert r.logprobs == pytest.approx(expect_lp, abs=1e-5)


def test_greedy_generate_matches_transformers_generate(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = [tok(p)["input_ids"] for p, _ in PAIRS]
    fn = lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)  # noqa: E731
    ours = greedy_generate(fn, prompts, [5] * len(prompts), tok.pad_token_id, batch_size=3)
    for p, mine in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, min_new_tokens=5,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert mine == ref


def test_scorer_unedited_locality_is_one_and_metrics_present(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    fn = lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)  # noqa: E731
    cases = toy_cases(4)
    scorer = Scorer(tok, batch_size=3, cf_metrics=True)
    ref, _ = scorer.score(fn, cases, reference=True)
    again, _ = scorer.score(fn, cases)
    for c in cases:
        m = again[c.case_id]
        assert m["locality"] == 1.0 and m["locality/neighborhood"] == 1.0
        assert m["reliability"] == ref[c.case_id]["reliability"]
        assert {"generality", "generality/rephrase", "gen_exact_match", "cf_efficacy", "cf_paraphrase",
                "cf_neighborhood"} <= set(m)


def test_scorer_without_reference_fails_loudly(tiny_llama):
    scorer = Scorer(tiny_llama.tokenizer)
    fn = lambda ids, mask, prompt_len=None: model_logits(tiny_llama.model, ids, mask)  # noqa: E731
    with pytest.raises(RuntimeError, match="no unedited locality reference"):
        scorer.score(fn, toy_cases(1))


def test_locality_counts_changed_positions(tiny_llama):
    """A logits function that flips the argmax at one answer position lowers locality exactly."""
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    case = toy_cases(1)[0]
    scorer = Scorer(tok, exact_match=False)
    base = lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)  # noqa: E731
    scorer.score(base, [case], reference=True)
    probe = case.locality["neighborhood"][1]
    e = encode(tok, probe.prompt, probe.target)

    def perturbed(ids, mask, prompt_len=None):
        logits = base(ids, mask).clone()
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            if tuple(ids[row, :n].tolist()) == e.ids:  # only this probe, first answer position
                logits[row, e.start - 1, :] = 0
                logits[row, e.start - 1, 7] = 100.0
        return logits

    scores, _ = scorer.score(perturbed, [case])
    m = scores[case.case_id]
    n_pos = len(e.target_ids)
    ref_first = scorer.locality_reference[case.case_id][1][0]
    expect_probe = 1.0 if ref_first == 7 else (n_pos - 1) / n_pos
    assert m["locality"] == pytest.approx((1.0 + expect_probe) / 2)


def test_pad_batch_sides():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gptj"])
def test_head_only_logits_equal_the_full_forward_pass_at_the_read_positions(fixture, request):
    """Scoring reads a few positions; computing the head there alone changes no number."""
    from editbench.scoring import PlainLogits, model_logits_at

    lm = request.getfixturevalue(fixture)
    cases = toy_cases(3)
    ids, mask = pad_batch([encode(lm.tokenizer, c.request.prompt, c.request.target_new).ids for c in cases],
                          lm.tokenizer.eos_token_id, "left")
    rows, cols = torch.tensor([0, 1, 2, 2]), torch.tensor([ids.shape[1] - 1, 3, 2, ids.shape[1] - 1])
    with torch.no_grad():
        full = model_logits(lm.model, ids, mask)[rows, cols]
        fast = model_logits_at(lm.model, ids, mask, rows, cols)
    assert torch.allclose(full, fast, rtol=1e-5, atol=1e-5)
    plain = lambda i, m, prompt_len=None: model_logits(lm.model, i, m)  # noqa: E731
    for side in ("left", "right"):
        a = Scorer(lm.tokenizer, padding_side=side)
        b = Scorer(lm.tokenizer, padding_side=side)
        a.score(plain, cases, reference=True)
        b.score(PlainLogits(lm.model), cases, reference=True)
        assert a.score(plain, cases)[0] == b.score(PlainLogits(lm.model), cases)[0]
        assert a.locality_reference == b.locality_reference
