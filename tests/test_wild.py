"""WILD evaluation beside teacher forcing (editbench/wild.py, scoring.Scorer, runner eval.when)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from editbench.editor import Editor
from editbench.records import EditCase, EditRequest, Probe
from editbench.results import NONDETERMINISTIC_METRICS
from editbench.runner import run
from editbench.scoring import PlainLogits, Scorer, encode, greedy_generate, model_logits, reads_model_forward
from editbench.validate import validate_config
from editbench.wild import (QA_INSTRUCTION, WildSettings, budget, context_ids, cut, exact_match, load_judge,
                            normalize_answer, token_f1)
from tests.conftest import compose_cfg, toy_cases


@dataclass(frozen=True)
class AliasRequest(EditRequest):
    target_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class AliasProbe(Probe):
    aliases: tuple[str, ...] = ()


def always_right(question, target, generation):
    """A judge for the hook test: every answer is right."""
    return True


def half_right(question, target, generation):
    return 0.5


def bad_judge(question, target, generation):
    return "yes"


# --------------------------------------------------------------------------- text
@pytest.mark.parametrize("text,norm", [("The Eiffel Tower.", "eiffel tower"), ("  an  APPLE, a day ", "apple day"),
                                       ("Paris!", "paris"), ("U.S.A.", "usa"), ("theatre", "theatre")])
def test_normalisation_case_punctuation_articles_whitespace(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_and_f1_on_examples():
    assert exact_match("the Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0          # the whole answer is judged
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0     # any alias
    assert token_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)   # p=1/2, r=1
    assert token_f1("the new york", ["New York City"]) == pytest.approx(0.8)  # p=1, r=2/3
    assert token_f1("Berlin", ["Paris"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("x", [""]) == 0.0
    assert token_f1("Big Apple", ["New York", "big apple"]) == 1.0


def test_cut_budget_and_contexts(tiny_llama):
    assert cut(" Paris. It is", ["\n", "."]) == "Paris"
    assert cut(" Paris\nQ:", ["\n"]) == "Paris" and cut("\nParis", ["\n"]) == ""
    assert cut(" Paris is", []) == "Paris is"
    assert budget(3, 2.0, 4, 50) == 10 and budget(30, 2.0, 4, 50) == 50 and budget(3, 0, 50, 50) == 50
    tok = tiny_llama.tokenizer
    q = "What is the capital of France?"
    assert context_ids(tok, q, "question-only") == tok(q)["input_ids"]
    assert tok.decode(context_ids(tok, q, "qa_inst")) == QA_INSTRUCTION.format(question=q)
    chat = tok.decode(context_ids(tok, q, "chat_temp"))
    assert q in chat and chat != q and chat.rstrip().endswith("assistant")   # SmolLM2's template


def test_judge_hook_loads_by_dotted_path():
    assert load_judge(None)[0] == "exact_match"
    name, fn = load_judge("tests.test_wild.always_right")
    assert name == "tests.test_wild.always_right" and fn("q", "t", "g") is True
    with pytest.raises(ValueError, match="eval.judge='tests.test_wild.nothing'"):
        load_judge("tests.test_wild.nothing")
    with pytest.raises(ValueError, match="cannot import"):
        load_judge("no_such_module_xyz.judge")


# --------------------------------------------------------------------------- generation
def test_kv_cache_generation_equals_recomputing_and_transformers(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "Water boils at", "A",
                                             "The Eiffel Tower is located in the city of")]
    n_new = [6, 3, 5, 1]
    cached = greedy_generate(PlainLogits(model), prompts, n_new, tok.pad_token_id, batch_size=3, kv_cache=True)
    full = greedy_generate(PlainLogits(model), prompts, n_new, tok.pad_token_id, batch_size=3)
    assert cached == full
    for p, n, mine in zip(prompts, n_new, cached):
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert mine == ref
    # a stop rule ends each prompt at its own token, the cache and the recomputing path alike
    stop = lambda i, toks: len(toks) >= 2 + i % 2  # noqa: E731
    assert (greedy_generate(PlainLogits(model), prompts, [6] * 4, tok.pad_token_id, kv_cache=True, stop=stop)
            == greedy_generate(PlainLogits(model), prompts, [6] * 4, tok.pad_token_id, stop=stop)
            == [c[:2 + i % 2] for i, c in enumerate(greedy_generate(PlainLogits(model), prompts, [6] * 4,
                                                                    tok.pad_token_id))])


class _Prepending(Editor):
    """A custom-logits editor for the test: its logits are not the model's own forward."""

    custom_logits = True

    def logits(self, input_ids, attention_mask, prompt_len=None):
        return model_logits(self.model, input_ids, attention_mask).flip(-1)


def test_the_cache_is_used_only_where_scoring_reads_the_models_own_forward(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    assert reads_model_forward(PlainLogits(model)) is model
    plain = Editor(model, tok, tiny_llama.arch, {})
    assert reads_model_forward(plain) is model
    custom = _Prepending(model, tok, tiny_llama.arch, {})
    assert reads_model_forward(custom) is None
    assert reads_model_forward(lambda ids, mask, prompt_len=None: model_logits(model, ids, mask)) is None
    prompts = [tok("The capital of France is")["input_ids"]]
    # the custom editor answers through its logits (flipped vocabulary), even with kv_cache=True
    got = greedy_generate(custom, prompts, [3], tok.pad_token_id, kv_cache=True)
    assert got == greedy_generate(custom, prompts, [3], tok.pad_token_id)
    assert got != greedy_generate(plain, prompts, [3], tok.pad_token_id, kv_cache=True)


# --------------------------------------------------------------------------- the scorer
def _greedy_text_case(tok, model, prompt: str, n: int) -> tuple[str, list[int]] | None:
    """The model's own greedy continuation of ``prompt`` as a target whose teacher-forced
    tokens are exactly the generated ones (None when the tokenizer splits it otherwise)."""
    ids = tok(prompt)["input_ids"]
    toks = greedy_generate(PlainLogits(model), [ids], [n], tok.pad_token_id)[0]
    text = tok.decode(toks).strip()
    if not text or encode(tok, prompt, text).target_ids != tuple(toks) or not normalize_answer(text):
        return None
    return text, toks


def test_teacher_forcing_1_but_wild_0_when_the_answer_goes_on(tiny_llama):
    """The target is the first three tokens the model says: teacher forcing (and the legacy
    fixed-length gen_exact_match) score 1.0, but the model does not stop there, so the whole
    answer is not the target: WILD scores 0."""
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    found = None
    for k in range(40):
        prompt = f"Fact number {k}: the capital of Country{k} is"
        got = _greedy_text_case(tok, model, prompt, 3)
        if got:
            found = (prompt, got[0])
            break
    assert found, "no prompt whose greedy continuation re-tokenises identically"
    prompt, target = found
    case = EditCase("c", EditRequest(prompt, target))
    sc = Scorer(tok, mode="both", wild=WildSettings(stop=(), budget_factor=2.0, budget_extra=4))
    sc.score(PlainLogits(model), [case], reference=True)
    m, _ = sc.score(PlainLogits(model), [case])
    assert m["c"]["reliability"] == 1.0 and m["c"]["gen_exact_match"] == 1.0
    gen = sc.generations["c"][0]
    assert gen["generation"].startswith(target) and len(gen["generation"]) > len(target)
    assert m["c"]["wild_reliability"] == 0.0 and 0 < m["c"]["wild_f1_reliability"] < 1


def test_a_generation_equal_to_an_alias_scores_1(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    settings = WildSettings(stop=(), budget_factor=0, budget_extra=4)   # a fixed budget: 4 tokens
    prompt = "The capital of Country3 is"
    probe = Scorer(tok, mode="wild", wild=settings)
    probe.score(PlainLogits(model), [EditCase("p", EditRequest(prompt, "zzz"))], reference=True)
    probe.score(PlainLogits(model), [EditCase("p", EditRequest(prompt, "zzz"))])
    said = probe.generations["p"][0]["generation"]
    assert normalize_answer(said)
    cases = [EditCase("alias", AliasRequest(prompt, "Somewhere Else", target_aliases=("nope", said.upper() + "."))),
             EditCase("plain", EditRequest(prompt, "Somewhere Else"),
                      generality={"rephrase": [AliasProbe(prompt, "Elsewhere", aliases=(said,)),
                                               Probe(prompt, "Elsewhere")]})]
    sc = Scorer(tok, mode="wild", wild=settings)
    sc.score(PlainLogits(model), cases, reference=True)
    m, _ = sc.score(PlainLogits(model), cases)
    assert m["alias"]["wild_reliability"] == 1.0 and m["alias"]["wild_f1_reliability"] == 1.0
    assert "reliability" not in m["alias"]          # mode=wild: no teacher-forced metric
    assert m["plain"]["wild_reliability"] == 0.0
    assert m["plain"]["wild_generality"] == 0.5 and m["plain"]["wild_generality/rephrase"] == 0.5
    assert sc.generations["alias"][0]["aliases"] == ["nope", said.upper() + "."]


def test_a_judge_decides_and_bad_verdicts_are_refused(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    cases = toy_cases(2)
    for path, expected in (("tests.test_wild.always_right", 1.0), ("tests.test_wild.half_right", 0.5)):
        sc = Scorer(tok, mode="wild", wild=WildSettings(judge=path))
        sc.score(PlainLogits(model), cases, reference=True)
        m, _ = sc.score(PlainLogits(model), cases)
        assert m["toy0"]["wild_reliability"] == expected and m["toy0"]["wild_generality"] == expected
        assert m["toy0"]["wild_locality"] == 1.0   # locality compares the two answers, not the judge
        assert sc.judge_name == path
    sc = Scorer(tok, mode="wild", wild=WildSettings(judge="tests.test_wild.bad_judge"))
    sc.score(PlainLogits(model), cases, reference=True)
    with pytest.raises(ValueError, match="returned 'yes'"):
        sc.score(PlainLogits(model), cases)


def test_chat_template_needs_one(tiny_llama):
    class NoTemplate:
        chat_template = None
        pad_token_id = eos_token_id = 0
    with pytest.raises(ValueError, match="eval.wild_context='chat_temp'.*no chat template"):
        Scorer(NoTemplate(), mode="both", wild=WildSettings(context="chat_temp"))


# --------------------------------------------------------------------------- the protocol
def _cfg(tmp_path, *overrides):
    return compose_cfg("model=tiny-llama", f"out_dir={tmp_path}", "runner.progress=false", *overrides)


def _quality(path) -> pd.DataFrame:
    s = pd.read_csv(path / "summary.csv")
    return s[~s.metric.isin(NONDETERMINISTIC_METRICS)].reset_index(drop=True)


def test_none_editor_wild_locality_is_exactly_one_and_teacher_forced_numbers_do_not_move(tmp_path, tiny_llama):
    cases = toy_cases(6)
    tf = run(_cfg(tmp_path, "editor=none", "runner.steps=[1,3]"), cases=cases, lm=tiny_llama)
    both = run(_cfg(tmp_path, "editor=none", "runner.steps=[1,3]", "eval.mode=both", "eval.wild_context=qa_inst"),
               cases=cases, lm=tiny_llama)
    assert tf != both and not (tf / "generations.jsonl").exists()
    s = _quality(both)
    for metric in ("wild_locality", "wild_locality/neighborhood", "wild_f1_locality"):
        assert (s[s.metric == metric]["mean"] == 1.0).all() and len(s[s.metric == metric]) == 2, metric
    assert set(s.loc[s.metric.str.startswith("wild_reliability"), "judge"]) == {"exact_match"}
    old = _quality(tf)
    pd.testing.assert_frame_equal(s[s.metric.isin(old.metric)][old.columns].reset_index(drop=True), old)
    lines = [json.loads(x) for x in (both / "generations.jsonl").read_text().splitlines()]
    # per T=1 and T=3 chunk case: the request, one rephrase, two locality probes
    assert len(lines) == 2 * 6 * 4
    loc = [x for x in lines if x["kind"] == "loc"]
    assert all(x["generation"] == x["unedited"] and x["score"] == 1.0 for x in loc)
    assert {x["context"] for x in lines} == {"qa_inst"} and {x["judge"] for x in lines} == {"exact_match"}


def test_after_each_equals_after_chunk_at_T1_and_differs_after_more_edits(tmp_path, tiny_llama):
    cases = toy_cases(4)
    runs = {when: run(_cfg(tmp_path, "editor=ft", "runner.steps=[1,4]", "eval.mode=both", f"eval.when={when}"),
                      cases=cases, lm=tiny_llama) for when in ("after_chunk", "after_each")}
    a, b = (pd.read_csv(runs[w] / "cases.csv") for w in ("after_chunk", "after_each"))
    cols = ["T", "case_id", "metric", "value"]
    pd.testing.assert_frame_equal(a[a["T"] == 1][cols].reset_index(drop=True), b[b["T"] == 1][cols].reset_index(drop=True))
    g = {w: [json.loads(x) for x in (runs[w] / "generations.jsonl").read_text().splitlines()] for w in runs}
    assert [x for x in g["after_chunk"] if x["T"] == 1] == [x for x in g["after_each"] if x["T"] == 1]
    # at T=4, the first case is scored after 1 edit (after_each) or after 4 (after_chunk)
    t4 = [x[(x["T"] == 4) & x.metric.eq("locality")].set_index("case_id")["value"] for x in (a, b)]
    assert not t4[0].equals(t4[1])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,key,allowed", [
    ("eval.mode=wld", "eval.mode", "teacher_forced, wild, both"),
    ("eval.when=later", "eval.when", "after_chunk, after_each"),
    ("eval.wild_context=chat", "eval.wild_context", "question-only, qa_inst, chat_temp"),
    ("eval.wild_budget_factor=-1", "eval.wild_budget_factor", ">= 0"),
    ("eval.wild_budget_extra=-2", "eval.wild_budget_extra", "non-negative integer"),
    ("eval.wild_max_new_tokens=0", "eval.wild_max_new_tokens", "positive integer"),
    ("eval.wild_stop=['']", "eval.wild_stop", "non-empty strings"),
    ("eval.judge='not a path'", "eval.judge", "dotted path"),
    ("+eval.judges=x", "eval.judges", "not an eval setting"),
    ("eval=5", "eval", "a mapping"),
])
def test_eval_config_errors_are_one_line(override, key, allowed):
    with pytest.raises(ValueError) as err:
        validate_config(compose_cfg(override))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{key}=") and allowed in msg, msg


def test_curve_needs_teacher_forcing_after_the_chunk():
    validate_config(compose_cfg("runner.curve=true", "eval.mode=both"))
    for bad in ("eval.mode=wild", "eval.when=after_each"):
        with pytest.raises(ValueError, match="runner.curve=True: runner.curve=true needs"):
            validate_config(compose_cfg("runner.curve=true", bad))


def test_run_id_keeps_eval_keys_only_when_they_change_results():
    from editbench.plan import run_id

    base = run_id(compose_cfg())
    assert run_id(compose_cfg("eval.wild_context=qa_inst")) == base      # no WILD scored: no change
    assert run_id(compose_cfg("eval.judge=tests.test_wild.always_right")) == base
    both = run_id(compose_cfg("eval.mode=both"))
    assert len({base, both, run_id(compose_cfg("eval.mode=both", "eval.wild_context=qa_inst")),
                run_id(compose_cfg("eval.when=after_each"))}) == 4
