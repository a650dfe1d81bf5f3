"""editbench.validate: the whole composed config is checked before any data or model is loaded;
a bad value is one line naming the key, the value and what is allowed (CLI exit 2)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from editbench.editor import CONFIG_BOOKKEEPING
from editbench.plan import plan_chunks
from editbench.train.loop import TRAIN_DEFAULTS, train_settings
from editbench.validate import RULES, validate_config
from tests.conftest import CONF, ROOT, compose_cfg, toy_cases

EDITORS = sorted(p.stem for p in (CONF / "editor").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))

#: (overrides, the key the error must name, a substring of what is allowed)
BAD: list[tuple[tuple[str, ...], str, str]] = [
    # runner
    (("runner.steps=5",), "runner.steps", "must be a list of positive integers, e.g. [1,10,100]"),
    (("runner.steps=[0]",), "runner.steps", "list of positive integers"),
    (("runner.steps=[]",), "runner.steps", "list of positive integers"),
    (("runner.steps=[1,-10]",), "runner.steps", "list of positive integers"),
    (("runner.steps=[1.5]",), "runner.steps", "list of positive integers"),
    (("~runner.steps",), "runner.steps", "is not set"),
    (("runner.n_cases=0",), "runner.n_cases", "positive integer or null"),
    (("runner.n_cases=-3",), "runner.n_cases", "positive integer or null"),
    (("runner.n_cases=2.5",), "runner.n_cases", "positive integer or null"),
    (("runner.seed=abc",), "runner.seed", "must be an integer"),
    (("runner.seed=true",), "runner.seed", "must be an integer"),
    (("runner.shuffle=yes",), "runner.shuffle", "true or false"),
    (("runner.batch_size=0",), "runner.batch_size", "positive integer"),
    (("runner.padding_side=middle",), "runner.padding_side", "right or left"),
    (("runner.exact_match=1",), "runner.exact_match", "true or false"),
    (("runner.batch_edit=sometimes",), "runner.batch_edit", "true, false or null"),
    (("runner.edit_batch_size=0",), "runner.edit_batch_size", "positive integer"),
    (("runner.edit_batch_size=10", "runner.batch_edit=true"), "runner.edit_batch_size", "not together with"),
    (("runner.reuse_stale=no",), "runner.reuse_stale", "true or false"),
    (("runner.curve=2",), "runner.curve", "true or false"),
    (("runner.progress=off",), "runner.progress", "true or false"),
    # evaluation
    (("eval=5",), "eval", "a mapping or null"),
    (("eval.mode=greedy",), "eval.mode", "teacher_forced, wild, both"),
    (("eval.when=never",), "eval.when", "after_chunk, after_each"),
    (("eval.wild_context=chat",), "eval.wild_context", "question-only, qa_inst, chat_temp"),
    (("eval.wild_budget_factor=-1",), "eval.wild_budget_factor", ">= 0"),
    (("eval.wild_budget_extra=-2",), "eval.wild_budget_extra", "non-negative integer"),
    (("eval.wild_max_new_tokens=0",), "eval.wild_max_new_tokens", "positive integer"),
    (("eval.wild_batch_size=0",), "eval.wild_batch_size", "positive integer"),
    (("eval.wild_stop=5",), "eval.wild_stop", "list of non-empty strings"),
    (("eval.judge='not a path'",), "eval.judge", "dotted path"),
    (("+eval.temperature=0.7",), "eval.temperature", "not an eval setting; valid: mode"),
    (("runner.curve=true", "eval.mode=wild"), "runner.curve", "needs teacher-forced scoring"),
    # experiment tracking
    (("tracking=5",), "tracking", "a mapping (tensorboard, dir) or null"),
    (("tracking.tensorboard=yes",), "tracking.tensorboard", "true or false"),
    (("tracking.dir=[a]",), "tracking.dir", "a folder path"),
    (("+tracking.wandb=true",), "tracking.wandb", "not a tracking setting; valid: tensorboard, dir"),
    # run folder
    (("out_dir=''",), "out_dir", "non-empty string"),
    (("out_dir=null",), "out_dir", "non-empty string"),
    (("run_id=''",), "run_id", "non-empty name"),
    (("run_id=[a]",), "run_id", "non-empty name"),
    (("data_root=5",), "data_root", "a string"),
    # data
    (("data.name=''",), "data.name", "non-empty string"),
    (("data.kind=nope",), "data.kind", "cf, dafset, ripe, sample, zsre"),
    (("++data.train_kind=nope",), "data.train_kind", "dataset kind"),
    (("data=cf", "data.path=null"), "data.path", "null only with data.kind=sample"),
    (("data.path=5",), "data.path", "a string"),
    (("data.train_path=5",), "data.train_path", "or null"),
    (("data.cf_metrics=yes",), "data.cf_metrics", "true or false"),
    (("data.split=train",), "data.split", "val, test, all"),
    (("data.val=5",), "data.val", "a mapping"),
    (("data.val.from=test",), "data.val.from", "eval or train"),
    (("data=zsre", "data.train_path=null"), "data.val.from", "train needs data.train_path"),
    (("data.val.fraction=0",), "data.val.fraction", "strictly between 0 and 1"),
    (("data.val.fraction=1",), "data.val.fraction", "strictly between 0 and 1"),
    (("data.val.fraction=1.5",), "data.val.fraction", "strictly between 0 and 1"),
    (("data.val.fraction=true",), "data.val.fraction", "strictly between 0 and 1"),
    (("data.val.salt=[a]",), "data.val.salt", "a string"),
    (("data=cf", "+data.runner=5"), "data.runner", "a mapping of runner defaults"),
    (("data.runner.steps=[0]",), "data.runner.steps", "list of positive integers"),
    (("data.runner.n_cases=0",), "data.runner.n_cases", "positive integer or null"),
    (("+data.runner.seed=3",), "data.runner.seed", "valid: steps, n_cases"),
    (("++data.hub_split=''",), "data.hub_split", "a split name"),
    (("++data.hub_train_split=5",), "data.hub_train_split", "a split name"),
    (("++data.hub_config=[a]",), "data.hub_config", "a string"),
    (("++data.hub_revision=[a]",), "data.hub_revision", "a string"),
    (("++data.data_files=5",), "data.data_files", "a file pattern"),
    # model
    (("model.name=''",), "model.name", "non-empty string"),
    (("model.description=[a]",), "model.description", "a string or null"),
    (("model.source=local",), "model.source", "hf, gguf, random"),
    (("model.family=mamba",), "model.family", "llama, gptj, gpt2, gpt_neox"),
    (("model=tiny-llama", "model.family=gpt2"), "model.family", "model.source=random one of llama, gptj"),
    (("model=tiny-llama", "model.family=null"), "model.family", "model.source=random one of llama, gptj"),
    (("model.dtype=int8",), "model.dtype", "float32, bfloat16, float16"),
    (("model.device=gpu",), "model.device", "cpu, cuda, cuda:N or auto"),
    (("model.device=cuda:x",), "model.device", "cpu, cuda, cuda:N or auto"),
    (("model=llama2", "model.path=null"), "model.path", "with model.source=hf"),
    (("model=llama2", "model.path=''"), "model.path", "with model.source=hf"),
    (("model=smollm2", "model.gguf=null"), "model.gguf", "package and file"),
    (("model=smollm2", "~model.gguf.file"), "model.gguf", "package and file"),
    (("model=tiny-llama", "model.tokenizer_from=null"), "model.tokenizer_from", "package and file"),
    (("++model.tokenizer=5",), "model.tokenizer", "a string"),
    (("model=tiny-llama", "model.arch=null"), "model.arch", "a mapping"),
    (("model=tiny-llama", "model.seed=abc"), "model.seed", "an integer"),
    (("model.trust_remote_code=yes",), "model.trust_remote_code", "true or false"),
    # general ability
    (("general.tasks=[csqa,trivia]",), "general.tasks", "csqa, anli, mmlu, squad2"),
    (("general.tasks=csqa",), "general.tasks", "must be a list of task names"),
    (("general.n=0",), "general.n", "positive integer or null"),
    (("general.seed=-1",), "general.seed", "non-negative integer"),
    (("general.path=[a]",), "general.path", "a string"),
    (("general.source=web",), "general.source", "local or hf"),
    (("general.files=5",), "general.files", "task -> path"),
    (("general.files.csqa=[a]",), "general.files", "task -> path"),
    (("general.splits=5",), "general.splits", "task -> split"),
    (("general.format=mc",), "general.format", "letter or cloze"),
    (("general.cloze_norm=max",), "general.cloze_norm", "sum or mean"),
    (("general.chunks=0",), "general.chunks", "positive integer or null"),
    (("general.max_tokens=0",), "general.max_tokens", "positive integer"),
    (("general.squad_context_tokens=-5",), "general.squad_context_tokens", "positive integer"),
    (("general.batch_size=0",), "general.batch_size", "positive integer or null"),
    (("general.batch_tokens=0",), "general.batch_tokens", "positive integer"),
    (("general.cache=no",), "general.cache", "true or false"),
    (("general.steps=[0]",), "general.steps", "list of positive integers"),
    (("general.backend=vllm",), "general.backend", "builtin or lm_eval"),
    (("general.lm_eval_tasks=[arc_easy]",), "general.lm_eval_tasks", "empty otherwise"),
    (("general.lm_eval_tasks=[arc_easy]", "general.backend=lm_eval"), "general.lm_eval_tasks",
     "general.tasks must name at least one built-in task"),
    (("general.lm_eval_include=[a]",), "general.lm_eval_include", "a folder of lm-eval task YAMLs"),
    (("general.lm_eval_limit=0",), "general.lm_eval_limit", "positive integer"),
    (("general.lm_eval_num_fewshot=-1",), "general.lm_eval_num_fewshot", "non-negative integer"),
    # editor: the keys the harness reads
    (("editor.name=nope",), "editor.name", "registered editor: "),
    (("++editor.variant=[a]",), "editor.variant", "a string or null"),
    (("++editor.batch_edit=yes",), "editor.batch_edit", "true, false or null"),
    (("editor=mend", "editor.train=5"), "editor.train", "a mapping or null"),
    (("editor=mend", "editor.train.steps=0"), "editor.train.steps", "positive integer"),
    (("editor=mend", "editor.train.batch_size=0"), "editor.train.batch_size", "positive integer"),
    (("editor=mend", "editor.train.lr=0"), "editor.train.lr", "> 0"),
    (("editor=mend", "++editor.train.lr_schedule=linear"), "editor.train.lr_schedule", "constant or cosine"),
    (("editor=mend", "++editor.train.warmup_steps=-1"), "editor.train.warmup_steps", "non-negative integer"),
    (("editor=mend", "editor.train.weight_decay=-0.1"), "editor.train.weight_decay", ">= 0"),
    (("editor=mend", "editor.train.grad_clip=0"), "editor.train.grad_clip", "> 0 or null"),
    (("editor=mend", "editor.train.n_val=-1"), "editor.train.n_val", "non-negative integer"),
    (("editor=mend", "editor.train.val_every=-1"), "editor.train.val_every", "non-negative integer"),
    (("editor=mend", "editor.train.ckpt_every=0"), "editor.train.ckpt_every", "positive integer"),
    (("editor=mend", "editor.train.seed=abc"), "editor.train.seed", "an integer"),
    (("editor=mend", "editor.train.progress=yes"), "editor.train.progress", "true or false"),
    (("editor=mend", "++editor.train.autocast=int8"), "editor.train.autocast", "bfloat16, float16"),
    (("editor=mend", "+editor.train.epochs=3"), "editor.train.epochs", "not a train setting; valid: autocast"),
]


#: runs each row of BAD through the real entry point, ``python -m editbench <overrides>`` (runpy runs
#: the package's __main__ exactly as ``-m`` does), in one process so that the whole table costs one start-up
_CLI_BATCH = r"""
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
rows, dest = json.loads(sys.argv[1]), sys.argv[2]
results = []
for overrides in rows:
    sys.argv = ["editbench", *overrides]
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module("editbench", run_name="__main__", alter_sys=True)
        except SystemExit as err:
            code = err.code
    GlobalHydra.instance().clear()
    results.append({"code": code, "output": out.getvalue()})
with open(dest, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> tuple[list[dict], object]:
    """Every row of BAD through the command line: [{code, output}], and the out_dir they were given."""
    tmp = tmp_path_factory.mktemp("bad-cli")
    out_dir = tmp / "results"
    rows = [[*o, f"out_dir={out_dir}"] if not any(x.startswith("out_dir=") for x in o) else list(o) for o, _, _ in BAD]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    r = subprocess.run([sys.executable, "-c", _CLI_BATCH, json.dumps(rows), str(tmp / "results.json")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((tmp / "results.json").read_text()), out_dir


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_value_exits_2_with_one_line_naming_the_key_the_value_and_what_is_allowed(cli_results, i):
    """Through ``python -m editbench``: exit status 2, the whole output one line
    ``<key>=<value>: <what is allowed>`` (or ``<key> is not set: ...``), no traceback, and nothing
    written (the check comes before any run folder, data, model or training)."""
    overrides, key, allowed = BAD[i]
    results, out_dir = cli_results
    code, output = results[i]["code"], results[i]["output"]
    assert "Traceback" not in output and "Error executing job" not in output, output
    assert code == 2, f"exit {code}: {output}"
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"{key}=") or lines[0].startswith(f"{key} is not set:"), lines[0]
    assert allowed in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_validate_config_raises_the_same_one_line_value_error():
    """The check itself (``runner.run`` and ``python -m editbench.train`` call it first): a
    ``ValueError`` whose message is the line the command prints."""
    with pytest.raises(ValueError) as err:
        validate_config(compose_cfg("runner.steps=[0]"))
    assert str(err.value) == "runner.steps=[0]: must be a list of positive integers, e.g. [1,10,100]"


def test_every_rule_has_a_bad_value_and_every_harness_key_has_a_rule():
    """The table above covers every rule, and the rules cover every key the shipped configs
    give the harness (runner, run folder, data, model, general, the editor's bookkeeping and
    train settings): a key added to a config without a rule fails here."""
    rules = {r.key for r in RULES}
    wildcards = {r for r in rules if r.endswith(".*")}   # their errors name the unknown key itself
    assert rules - wildcards <= {b[1] for b in BAD}
    for w in wildcards:
        assert any(b[1].startswith(w[:-1]) and b[1].count(".") == w.count(".") for b in BAD), w
    keys = {f"runner.{k}" for k in compose_cfg().runner} | {f"general.{k}" for k in compose_cfg().general}
    keys |= {f"eval.{k}" for k in compose_cfg().eval} | {f"tracking.{k}" for k in compose_cfg().tracking}
    keys |= {"out_dir", "run_id", "data_root"} | {f"editor.{k}" for k in CONFIG_BOOKKEEPING}
    keys |= {"editor.train"} | {f"editor.train.{k}" for k in TRAIN_DEFAULTS}
    for model in MODELS:
        keys |= {f"model.{k}" for k in compose_cfg(f"model={model}").model}
    for data in DATA:
        cfg = compose_cfg(f"data={data}").data
        keys |= {f"data.{k}" for k in cfg} | {f"data.val.{k}" for k in cfg.get("val") or {}}
    assert keys - rules == set()


@pytest.mark.parametrize("overrides,key,allowed", [b for b in BAD if b[1].startswith("editor.train.")
                                                   and b[1] not in ("editor.train.progress",)],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_train_setting_rules_are_the_pipelines_own(overrides, key, allowed):
    """What validate refuses under editor.train, train_settings refuses too (no invented rule;
    validate only says it before the model is loaded). ``progress`` is the exception: the loop
    takes bool() of anything, validate wants true or false."""
    value = compose_cfg(*overrides).editor.train[key.rsplit(".", 1)[1]]
    with pytest.raises(ValueError):
        train_settings(SimpleNamespace(name="mend", cfg={"train": {key.rsplit(".", 1)[1]: value}}))


@pytest.mark.parametrize("editor", EDITORS)
def test_every_shipped_editor_model_data_combination_validates(editor):
    bad = []
    for model in MODELS:
        for data in DATA:
            try:
                validate_config(compose_cfg(f"editor={editor}", f"model={model}", f"data={data}"))
            except ValueError as err:
                bad.append(f"{editor} x {model} x {data}: {err}")
    assert not bad, "\n".join(bad)


def test_steps_larger_than_the_cases_run_with_a_clear_warning(caplog):
    """T above the selected cases is not refused (other T of the run still run): the plan says
    which T gets no chunk and why."""
    validate_config(compose_cfg("runner.steps=[1,1000]", "runner.n_cases=3"))
    with caplog.at_level(logging.WARNING, logger="editbench.runner"):
        plan = plan_chunks(toy_cases(3), [1, 1000])
    assert [T for T, _, _ in plan] == [1, 1, 1]
    assert "T=1000: only 3 case(s) selected; no chunk of 1000 to run" in caplog.text


def _cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "editbench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


#: the originally reported bugs (issue #24), each exactly as reported, through ``python -m editbench``
REPORTED = [("runner.steps=[0]", "runner.steps=[0]: must be a list of positive integers, e.g. [1,10,100]"),
            ("runner.steps=5", "runner.steps=5: must be a list of positive integers, e.g. [1,10,100]"),
            ("model.dtype=int8", "model.dtype='int8': must be one of float32, bfloat16, float16"),
            ("runner.n_cases=0", "runner.n_cases=0: must be a positive integer or null (all cases)")]


@pytest.mark.parametrize("override,line", REPORTED, ids=[r[0] for r in REPORTED])
def test_cli_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path, override, line):
    r = _cli(override, f"out_dir={tmp_path}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == line   # the whole output: one line, no traceback
    assert not any(tmp_path.iterdir())             # refused before a run folder was made


def test_cli_steps_larger_than_the_cases_say_what_was_run(tmp_path):
    """``runner.steps=[1,1000]`` with 3 cases: T=1 runs; the log says T=1000 has no chunk, and
    the printed table and summary.csv have T=1 only (exit 0)."""
    r = _cli("model=tiny-llama", "runner.steps=[1,1000]", "runner.n_cases=3", "runner.progress=false",
             f"out_dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "T=1000: only 3 case(s) selected; no chunk of 1000 to run" in out
    assert "Traceback" not in out
    table = out[out.index("mean [95% CI] n"):].splitlines()
    assert table[1].split() == ["metric", "T=1"], table[:3]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(set(pd.read_csv(run / "summary.csv")["T"])) == [1]
