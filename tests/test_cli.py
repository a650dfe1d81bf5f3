"""The command line: Hydra composition, a real run through `python -m editbench`, the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from editbench.report import build_report
from editbench.runner import run
from tests.conftest import ROOT, compose_cfg, toy_cases


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "editbench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_compose_llama2_zsre_prints_the_job_config():
    r = _cli("editor=ft", "model=llama2", "data=zsre", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "meta-llama/Llama-2-7b-hf" in r.stdout and "kind: zsre" in r.stdout
    assert "- 29" in r.stdout  # the per-model FT override (conf/editor_model/ft/llama2.yaml) applied
    r = _cli("editor=ft", "model=gptj", "data=cf", "--cfg", "job")
    assert "EleutherAI/gpt-j-6b" in r.stdout and "lr: 0.0005" in r.stdout


def test_cli_run_on_tiny_model_writes_results(tmp_path):
    r = _cli("model=tiny-llama", "editor=ft", "runner.steps=[1,2]", "runner.n_cases=4", f"out_dir={tmp_path}",
             "runner.progress=false")
    assert r.returncode == 0, r.stderr
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    s = pd.read_csv(run_dir / "summary.csv")
    assert set(s["T"]) == {1, 2} and {"reliability", "locality", "edit_time_s"} <= set(s.metric)
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert json.loads((run_dir / "env.json").read_text())["torch"]


def test_cli_bad_data_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 0, "prompt": "p", "subject": "s", "target_new": "",
                                "ground_truth": "g", "rephrase_prompt": "r", "locality_prompt": "l",
                                "locality_ground_truth": "x"}]))
    r = _cli("model=tiny-llama", "data=cf", f"data.path={bad}", f"out_dir={tmp_path}")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() + r.stdout.splitlines() if "bad.json" in ln]
    assert len(lines) == 1 and "record 0" in lines[0] and "target_new" in lines[0]
    assert "Traceback" not in r.stderr


def test_report_gathers_runs_into_tables_and_plots(tmp_path, tiny_llama):
    for editor in ("none", "ft"):
        cfg = compose_cfg("model=tiny-llama", f"editor={editor}", "runner.steps=[1,2]", f"out_dir={tmp_path}",
                          "runner.progress=false")
        run(cfg, cases=toy_cases(4), lm=tiny_llama)
    md = build_report(tmp_path).read_text()
    assert "| editor | T=1 Rel | T=1 Gen | T=1 Loc | T=2 Rel |" in md
    assert "| none |" in md and "| ft[easyedit-prompt_last] |" in md  # a variant is named as such
    assert (tmp_path / "plot_tiny-llama_sample.png").stat().st_size > 1000
    # the report's numbers are the summaries' numbers
    rows = pd.read_csv(tmp_path / "report.csv")
    none_loc = rows[(rows.editor == "none") & (rows.metric == "locality")]["mean"]
    assert (none_loc == 1.0).all()
    line = next(ln for ln in md.splitlines() if ln.startswith("| ft[easyedit-prompt_last] |"))
    ft_rel_t1 = rows[(rows.editor == "ft[easyedit-prompt_last]") & (rows.metric == "reliability")
                     & (rows["T"] == 1)]["mean"].iloc[0]
    assert f"{ft_rel_t1:.3f}" == line.split("|")[2].strip()


def test_report_on_empty_folder_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "editbench.report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no summary.csv" in r.stderr


@pytest.mark.real
def test_ft_m_on_counterfact_reaches_reliability(tmp_path, smollm2):
    """The issue's acceptance run, in-process: FT-M, SmolLM2, 20 CounterFact cases, T=1."""
    from editbench.data import load_cases
    from tests.conftest import shared

    path = shared("counterfact", "counterfact-edit.json")
    cfg = compose_cfg("editor=ft", "editor.objective=target_new", "model=smollm2", "data=cf",
                      f"data.path={path}", "runner.steps=[1]", "runner.n_cases=20", f"out_dir={tmp_path}",
                      "runner.progress=false")
    out = run(cfg, cases=load_cases("cf", path), lm=smollm2)
    s = pd.read_csv(out / "summary.csv").set_index("metric")["mean"]
    assert s["reliability"] >= 0.9
    assert s["reliability"] > s["unedited/reliability"] + 0.5
    for m in ("generality", "locality", "edit_time_s", "infer_time_s", "cf_efficacy"):
        assert m in s.index
