"""General ability through lm-evaluation-harness (general.backend=lm_eval): the LM wrapper scores
what the model says, the runner writes the lm-eval rows, editor=none changes no score."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from editbench.general import general_ability_hook
from editbench.runner import run
from editbench.scoring import PlainLogits, model_logits
from editbench.session import build_editor
from editbench.validate import validate_config
from tests.conftest import compose_cfg, toy_cases
from tests.general_fixture import write_fixture

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e \".[lm_eval]\")")

from editbench.general.lm_eval_backend import LmEvalSuite, editor_lm  # noqa: E402

#: a tiny multiple-choice task on a local file (written by the fixture)
TASK_YAML = """task: tinymc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
PAIRS = [(1, 2), (3, 4), (5, 1), (2, 2), (7, 3), (6, 6), (4, 1), (8, 1)]


@pytest.fixture()
def task_dir(tmp_path):
    folder = tmp_path / "lm_eval_tasks"
    folder.mkdir()
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
             "answer": k % 3} for k, (a, b) in enumerate(PAIRS)]
    (folder / "tinymc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tinymc.yaml").write_text(TASK_YAML.format(data=folder / "tinymc.jsonl"))
    return folder


def _cfg(task_dir, *overrides):
    return compose_cfg("model=tiny-llama", "general.backend=lm_eval", "general.lm_eval_tasks=[tinymc]",
                       f"general.lm_eval_include={task_dir}", "general.lm_eval_limit=null", *overrides)


class _Request:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_models_own_sum_of_log_probabilities(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    lm = editor_lm(PlainLogits(model), tok)
    reqs = [_Request("Question: What is 1 plus 2?\nAnswer:", " 3"), _Request("The capital of France is ", "Paris"),
            _Request("", "hello world")]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip([r.args for r in reqs], got):
        enc = lm.encode_pair(ctx, cont)
        ids = torch.tensor([enc.ids])
        logp = torch.log_softmax(model_logits(model, ids, torch.ones_like(ids)).float(), -1)[0]
        targets = list(enc.ids[enc.start:])
        want = sum(float(logp[enc.start - 1 + k, t]) for k, t in enumerate(targets))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[enc.start - 1 + k].argmax()) == t for k, t in enumerate(targets))
    # lm-eval's convention: the context's trailing space moves to the continuation
    assert lm.encode_pair("The capital of France is ", "Paris") == lm.encode_pair("The capital of France is", " Paris")
    # the rolling log-likelihood of a text is the loglikelihood of it after the prefix token
    (rolling,) = lm.loglikelihood_rolling([_Request("hello world")])
    assert rolling == pytest.approx(got[2][0], abs=1e-4)


def test_none_editor_scores_the_same_before_and_after_and_the_scores_follow_the_logits(
        tiny_llama, task_dir):
    cfg = _cfg(task_dir, "editor=none")  # lm-eval tasks only (general.tasks=[]): the hook itself
    editor = build_editor(cfg, tiny_llama)
    hook = general_ability_hook(cfg, tiny_llama)
    out = hook(editor, 1, 0)
    assert set(out) >= {"lm_eval/tinymc/acc", "lm_eval/tinymc/acc_unedited", "seconds"}
    assert out["lm_eval/tinymc/acc"] == out["lm_eval/tinymc/acc_unedited"]
    assert 0.0 <= out["lm_eval/tinymc/acc"] <= 1.0
    assert hook(editor, 1, 1) == {}  # only the first general.chunks chunk(s) are measured

    # the wrapper scores through the logits it is given: under uniform logits each choice's
    # log-likelihood is -(its token count) * log(vocab), so lm-eval picks the shortest choice
    suite = LmEvalSuite(cfg.general, tiny_llama, "fp")
    vocab = tiny_llama.model.get_output_embeddings().weight.shape[0]
    lm = editor_lm(PlainLogits(tiny_llama.model), tiny_llama.tokenizer)
    docs = [json.loads(line) for line in (task_dir / "tinymc.jsonl").read_text().splitlines()]
    hits = 0
    for d in docs:
        lengths = [len(e.ids) - e.start for e in (lm.encode_pair(f"Question: {d['question']}\nAnswer:", f" {c}")
                                                 for c in d["choices"])]
        hits += lengths.index(min(lengths)) == d["answer"]
    res = suite.measure(lambda ids, mask, prompt_len=None: torch.zeros(*ids.shape, vocab))
    assert res["lm_eval/tinymc/acc"] == pytest.approx(hits / len(docs))
    assert res["lm_eval/tinymc/acc_unedited"] == out["lm_eval/tinymc/acc_unedited"]


def test_runner_writes_lm_eval_rows_beside_the_builtin_tasks(tiny_llama, task_dir, tmp_path):
    write_fixture(tmp_path / "general")
    cfg = _cfg(task_dir, "editor=none", f"general.path={tmp_path / 'general'}", "general.tasks=[csqa]",
               "general.cache=false", f"out_dir={tmp_path}/out", "runner.progress=false", "runner.steps=[2]",
               "runner.exact_match=false", "general.lm_eval_limit=5")
    path = run(cfg, cases=toy_cases(2), lm=tiny_llama)
    rows = pd.read_csv(path / "summary.csv").set_index("metric")
    for m in ("general/csqa", "general/csqa_unedited", "general/lm_eval/tinymc/acc",
              "general/lm_eval/tinymc/acc_unedited"):
        assert rows.loc[m, "n"] == 1, m
    assert rows.loc["general/lm_eval/tinymc/acc", "mean"] == rows.loc["general/lm_eval/tinymc/acc_unedited", "mean"]
    assert rows.loc["general/csqa", "mean"] == rows.loc["general/csqa_unedited", "mean"]
    # limit=5: five documents, so the accuracy is a multiple of 1/5
    assert round(rows.loc["general/lm_eval/tinymc/acc", "mean"] * 5, 6) % 1 == 0


@pytest.mark.parametrize("overrides, message", [
    (["general.lm_eval_tasks=[]"], "general.lm_eval_tasks=[]: must be a list of lm-eval task names"),
    (["general.backend=lmeval"], "general.backend='lmeval': must be builtin or lm_eval"),
    (["general.lm_eval_limit=0"], "general.lm_eval_limit=0: must be a positive integer"),
    (["general.tasks=[]"], "general.tasks must name at least one built-in task too"),
])
def test_bad_lm_eval_settings_are_one_line(task_dir, overrides, message):
    cfg = _cfg(task_dir, "general.tasks=[csqa]", *overrides)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(cfg)


def test_an_unknown_lm_eval_task_is_a_clear_error(tiny_llama, task_dir):
    cfg = _cfg(task_dir, "general.lm_eval_tasks=[no_such_task_xyz]")
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        LmEvalSuite(cfg.general, tiny_llama, "fp")
