"""General ability after editing (editbench/general): loaders, prompts, scores, cache, runner rows."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from editbench.general import GeneralSuite, general_ability_hook
from editbench.general.data import MCItem, QAItem, load_items, read_mmlu_csv, select
from editbench.general.tasks import (LetterQuery, build_queries, squad2_window, score_queries)
from editbench.records import DataError
from editbench.registry import register
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import model_logits
from editbench.editor import Editor
from tests.conftest import compose_cfg, shared, toy_cases
from tests.general_fixture import ANLI_LABELS, CSQA_ANSWERS, MMLU_ANSWERS, write_fixture

TASKS = ["csqa", "anli", "mmlu", "squad2"]

# --------------------------------------------------------------------------- fixtures
@pytest.fixture()
def fixture_dir(tmp_path):
    write_fixture(tmp_path / "general")
    return tmp_path / "general"


def _gcfg(path, *overrides):
    return compose_cfg("model=tiny-llama", f"general.path={path}", "general.cache=false",
                       "general.tasks=[csqa,anli,mmlu,squad2]", "general.n=null", *overrides)


class _Logits:
    """The smallest stand-in for an editor: a logits function (and a device)."""

    def __init__(self, fn):
        self.logits, self.device = fn, torch.device("cpu")


# --------------------------------------------------------------------------- loaders
def test_loaders_read_the_real_files():
    root = shared("general")
    cfg = compose_cfg(f"general.path={root}").general
    csqa = load_items("csqa", cfg)
    assert len(csqa) == 1221 and all(len(it.options) == 5 for it in csqa)
    assert csqa[0].options[csqa[0].answer] == "bank"  # first record of dev_rand_split.jsonl, answerKey A
    anli = load_items("anli", cfg)
    assert len(anli) == 1000 + 1000 + 1200  # test R1-R3, as RECIPE
    assert {it.label for it in anli} == {0, 1, 2}
    mmlu = load_items("mmlu", cfg)
    assert len(mmlu) == 14042 and {it.answer for it in mmlu} == {0, 1, 2, 3}
    assert mmlu[0].question.startswith("Find the degree for the given field extension")  # abstract_algebra first
    squad = load_items("squad2", cfg)
    assert len(squad) == 6078
    answerable = [it for it in squad if it.answer]
    assert 0 < len(answerable) < len(squad)
    assert all(it.context[it.answer_start:].startswith(it.answer) for it in answerable[:500])


def test_local_fixtures_in_every_supported_format(tmp_path, fixture_dir):
    cfg = _gcfg(fixture_dir).general
    csqa = load_items("csqa", cfg)
    assert "".join("ABCDE"[it.answer] for it in csqa) == CSQA_ANSWERS
    anli = load_items("anli", cfg)  # R3 is empty: the rounds present are read in order
    assert "".join("enc"[it.label] for it in anli) == ANLI_LABELS
    mmlu = load_items("mmlu", cfg)
    assert "".join("ABCD"[it.answer] for it in mmlu) == MMLU_ANSWERS and mmlu[1].options[1] == "1"
    squad = load_items("squad2", cfg)
    assert [it.answer for it in squad] == ["France", "10th and 11th centuries", ""]

    # the original headerless MMLU release with letter answers gives the same items
    write_fixture(tmp_path / "headerless", headerless_mmlu=True)
    headerless = load_items("mmlu", _gcfg(tmp_path / "headerless").general)
    assert [(it.question, it.options, it.answer) for it in headerless] == [
        (it.question, it.options, it.answer) for it in mmlu]

    # HF-style ANLI (premise, label 0/1/2) and the original CSQA release (question{stem, choices})
    hf = tmp_path / "hf" / "anli"
    (hf / "R1").mkdir(parents=True)
    (hf / "R1" / "test.jsonl").write_text("\n".join(json.dumps({"premise": f"p{i}", "hypothesis": "h", "label": i})
                                                    for i in (2, 0, 1)))
    assert [(it.premise, it.label) for it in load_items("anli", {"path": str(hf.parent), "files": {}})] == [
        ("p2", 2), ("p0", 0), ("p1", 1)]
    orig = tmp_path / "orig.jsonl"
    orig.write_text(json.dumps({"answerKey": "C", "question": {
        "stem": "Where?", "choices": [{"label": lab, "text": t} for lab, t in zip("ABCDE", "vwxyz")]}}))
    [item] = load_items("csqa", {"path": str(tmp_path), "files": {"csqa": "orig.jsonl"}})
    assert item == MCItem("Where?", tuple("vwxyz"), 2, f"{orig}#0")


def test_missing_or_malformed_files_give_one_clear_line(tmp_path):
    for task in TASKS:
        with pytest.raises(FileNotFoundError) as err:
            load_items(task, {"path": str(tmp_path / "nowhere")})
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "expected" in msg and task in msg
    bad = tmp_path / "mmlu" / "test"
    bad.mkdir(parents=True)
    (bad / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,F\n")
    with pytest.raises(DataError, match=r"x_test.csv, record 0, field 'answer'"):
        read_mmlu_csv(bad / "x_test.csv")
    with pytest.raises(ValueError, match="unknown general ability task"):
        load_items("hellaswag", {"path": str(tmp_path)})


def test_runner_stops_on_a_missing_general_file_with_one_line(tmp_path, tiny_llama):
    cfg = compose_cfg("model=tiny-llama", "editor=none", "runner.steps=[1]", "general.tasks=[csqa]",
                      f"general.path={tmp_path}/nope", f"out_dir={tmp_path}", "runner.progress=false")
    with pytest.raises(FileNotFoundError) as err:  # python -m editbench prints it as one line, exit 2
        run(cfg, cases=toy_cases(1), lm=tiny_llama)
    assert "\n" not in str(err.value) and f"{tmp_path}/nope/csqa/dev_rand_split.jsonl not found" in str(err.value)


def test_seeded_selection():
    items = list(range(50))
    assert select(items, 10, 0) == select(items, 10, 0) != select(items, 10, 1)
    assert sorted(select(items, None, 3)) == items


# --------------------------------------------------------------------------- prompts
def test_letter_prompts_follow_recipe(tiny_llama):
    tok = tiny_llama.tokenizer
    item = MCItem("Where is the bank?", ("city", "moon"), 0)
    [q] = build_queries("csqa", [item], tok, "letter")
    assert tok.decode(q.prompt_ids) == ("Please select the correct answer for the following questions:\n"
                                        "Where is the bank?\n(A) city\n(B) moon\nAnswer: (")
    assert q.option_ids == (tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0])
    [q] = build_queries("csqa", [item], tok, "letter", max_tokens=5)
    assert len(q.prompt_ids) == 5 and tok.decode(q.prompt_ids).endswith("Answer: (")
    [c] = build_queries("csqa", [item], tok, "cloze")
    assert [tok.decode(e.target_ids) for e in c.options] == [" city", " moon"]


def test_squad_window_keeps_the_answer_and_the_budget(tiny_llama):
    tok = tiny_llama.tokenizer
    ctx = " ".join(f"filler{i}" for i in range(300)) + " The answer is Rouen. " + " ".join("x" * 5 for _ in range(200))
    item = QAItem("T", ctx, "Where?", "Rouen", ctx.index("Rouen"))
    window = squad2_window(tok, item, 40)
    assert "Rouen" in window and len(tok(window, add_special_tokens=False)["input_ids"]) <= 41
    no_answer = QAItem("T", ctx, "Where?", "", -1)
    assert ctx.startswith(squad2_window(tok, no_answer, 40))
    [q] = build_queries("squad2", [no_answer], tok, squad_context_tokens=40)
    assert tok.decode(q.options[0].target_ids) == " N/A"


# --------------------------------------------------------------------------- scores
@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_none_editor_scores_are_deterministic_and_unchanged_with_chance_levels(tiny_llama, fixture_dir, fmt):
    cfg = _gcfg(fixture_dir, "editor=none", f"general.format={fmt}", "general.n=4")
    editor = build_editor(cfg, tiny_llama)
    hook = general_ability_hook(cfg, tiny_llama)
    first, second = hook(editor, 1, 0), hook(editor, 1, 0)
    for task in TASKS:
        assert first[task] == second[task] == first[f"{task}_unedited"]
        if task != "squad2":
            assert first[f"{task}_agree"] == 1.0
    assert 0 < first["squad2"] < 1
    # chance levels: 1/#options; SQuAD: 1/ppl of a uniform next-token distribution
    assert first["csqa_chance"] == pytest.approx(1 / 5)
    assert first["mmlu_chance"] == pytest.approx(1 / 4)
    assert first["anli_chance"] == pytest.approx(1 / 3)
    assert first["squad2_chance"] == pytest.approx(1 / tiny_llama.model.get_output_embeddings().weight.shape[0])
    assert hook(editor, 1, 1) == {}  # general.chunks=1: only the first chunk of each T


def test_logits_that_favour_one_option_move_the_score_to_its_share(tiny_llama, fixture_dir):
    tok = tiny_llama.tokenizer
    a, ent = tok.encode("A", add_special_tokens=False)[0], tok.encode("entailment", add_special_tokens=False)[0]

    def favour(token):
        def fn(ids, mask, prompt_len=None):
            logits = model_logits(tiny_llama.model, ids, mask).clone()
            logits[..., token] += 1e4
            return logits
        return _Logits(fn)

    hook = general_ability_hook(_gcfg(fixture_dir, "editor=none", "general.tasks=[csqa,anli,mmlu]"), tiny_llama)
    out = hook(favour(a), 1, 0)
    assert out["csqa"] == CSQA_ANSWERS.count("A") / len(CSQA_ANSWERS)
    assert out["mmlu"] == MMLU_ANSWERS.count("A") / len(MMLU_ANSWERS)
    assert out["csqa_unedited"] == hook(_Logits(lambda i, m, prompt_len=None: model_logits(tiny_llama.model, i, m)), 1, 0)["csqa"]
    assert hook(favour(ent), 1, 0)["anli"] == ANLI_LABELS.count("e") / len(ANLI_LABELS)


def test_padding_side_and_batching_do_not_change_scores(tiny_llama, fixture_dir):
    cfg = _gcfg(fixture_dir).general
    fn = lambda i, m, prompt_len=None: model_logits(tiny_llama.model, i, m)  # noqa: E731
    for task in ("csqa", "squad2"):
        qs = build_queries(task, select(load_items(task, cfg), None, 0), tiny_llama.tokenizer, "letter")
        ref = score_queries(task, qs, fn, 0, batch_tokens=1, max_batch=1)
        for side in ("left", "right"):
            got = score_queries(task, qs, fn, 0, batch_tokens=10_000, max_batch=8, padding_side=side)
            assert got.preds == ref.preds
            assert got.values == pytest.approx(ref.values, rel=1e-4, abs=1e-6)
    assert isinstance(build_queries("mmlu", load_items("mmlu", cfg)[:1], tiny_llama.tokenizer)[0], LetterQuery)


def test_unedited_scores_are_cached_on_disk(tiny_llama, fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    cfg = _gcfg(fixture_dir, "general.cache=true", "general.tasks=[csqa]", "general.n=6")
    suite = GeneralSuite(cfg.general, tiny_llama, "fp")
    [f] = list((tmp_path / "cache" / "general").glob("csqa-*.json"))
    rec = json.loads(f.read_text())
    assert rec["values"] == suite.tasks[0].unedited.values and rec["n"] == 6
    other = GeneralSuite(_gcfg(fixture_dir, "general.cache=true", "general.tasks=[csqa]", "general.n=5").general,
                         tiny_llama, "fp")
    assert len(list((tmp_path / "cache" / "general").glob("csqa-*.json"))) == 2  # n is part of the key
    assert other.tasks[0].unedited.values == suite.tasks[0].unedited.values[:5]


@register("favour-a-test")
class FavourA(Editor):
    """Each edit adds a bias towards the token "A" to every position's logits (no weights change)."""

    custom_logits = True

    def __init__(self, *args):
        super().__init__(*args)
        self.n_edits = 0
        self.a = self.tok.encode("A", add_special_tokens=False)[0]

    def edit(self, request):
        self.n_edits += 1

    def logits(self, input_ids, attention_mask, prompt_len=None):
        logits = super().logits(input_ids, attention_mask).clone()
        logits[..., self.a] += 1e4 * self.n_edits
        return logits

    def reset(self):
        self.n_edits = 0
        super().reset()


def test_runner_writes_general_rows_for_the_first_chunk_only(tiny_llama, fixture_dir, tmp_path):
    cfg = _gcfg(fixture_dir, "editor=none", "editor.name=favour-a-test", f"out_dir={tmp_path}/out",
                "runner.progress=false", "runner.steps=[2]", "runner.exact_match=false",
                "general.tasks=[csqa,squad2]")
    path = run(cfg, cases=toy_cases(4), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv")
    rows = s[s.metric.str.startswith("general/")].set_index("metric")
    for m in ("csqa", "csqa_unedited", "csqa_chance", "csqa_agree", "squad2", "squad2_unedited", "squad2_chance"):
        assert rows.loc[f"general/{m}", "n"] == 1, m
    assert rows.loc["general/csqa_chance", "mean"] == pytest.approx(0.2)
    assert rows.loc["general/csqa", "mean"] == CSQA_ANSWERS.count("A") / len(CSQA_ANSWERS)
    base = GeneralSuite(cfg.general, tiny_llama, "fp").tasks
    assert rows.loc["general/csqa_unedited", "mean"] == base[0].unedited.score
    assert rows.loc["general/csqa_agree", "mean"] == sum(p == 0 for p in base[0].unedited.preds) / len(CSQA_ANSWERS)
    assert rows.loc["general/squad2", "mean"] < rows.loc["general/squad2_unedited", "mean"]
    chunks = {p.name: json.loads(p.read_text()) for p in (path / "chunks").iterdir()}
    assert chunks["T2-c0.json"]["general"] and chunks["T2-c1.json"]["general"] == {}


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_none_editor_on_smollm2_writes_every_general_row(smollm2, tmp_path):
    root = shared("general")
    cfg = compose_cfg("model=smollm2", "editor=none", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[1]", "runner.exact_match=false", f"general.path={root}",
                      "general.tasks=[csqa,anli,mmlu,squad2]", "general.n=10", "general.cache=false")
    path = run(cfg, cases=toy_cases(1), lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    for task in TASKS:
        assert s.loc[f"general/{task}", "mean"] == s.loc[f"general/{task}_unedited", "mean"]
        assert f"general/{task}_chance" in s.index
    assert s.loc["general/csqa_chance", "mean"] == pytest.approx(0.2)
    assert s.loc["general/mmlu_chance", "mean"] == pytest.approx(0.25)
    assert 0.0 < s.loc["general/squad2", "mean"] < 1.0
