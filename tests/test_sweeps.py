"""Sweeps: Hydra multiruns through real launcher plugins, resume, the report, the notebook.

The launchers run real processes (submitit's local executor, joblib's loky workers) on the
tiny random models; the kill test kills a real sweep with SIGKILL. Edits are counted by a
real registered editor (FT that logs each edit before making it), which a Hydra callback
makes available in the launchers' job processes.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback

from editbench import report
from editbench.registry import EDITORS, register
from editbench.results import RunDir
from editbench.runner import run
from editors.ft import FT
from tests.conftest import CONF, ROOT, compose_cfg, toy_cases

EDIT_LOG = "EDITBENCH_TEST_EDIT_LOG"
QUALITY = ["reliability", "generality", "locality"]


# --------------------------------------------------------------------------- counting edits
class CountingFT(FT):
    """FT that appends a line to the file named by $EDITBENCH_TEST_EDIT_LOG before each edit,
    so that a test counts the edits a process started (one short O_APPEND write: lines of
    parallel jobs do not interleave)."""

    def edit(self, request):
        path = os.environ.get(EDIT_LOG)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {request.subject}\n")
        return super().edit(request)


if "counting-ft" not in EDITORS:  # pytest and a job process may import this module under two names
    register("counting-ft")(CountingFT)


class RegisterCountingEditor(Callback):
    """Hydra callback (``+hydra.callbacks.count._target_=tests.test_sweeps.RegisterCountingEditor``):
    the launcher imports this module in each job process, which registers ``counting-ft``."""


def _edits(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _sweep(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editbench", "-m", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _write_cf(path: Path, n: int) -> Path:
    """A small CounterFact file (flat RECIPE/EasyEdit format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"case_id": i, "prompt": f"The mother tongue of Person{i} is",
                                 "subject": f"Person{i}", "target_new": "French", "ground_truth": "English",
                                 "rephrase_prompt": f"Person{i} speaks the language",
                                 "locality_prompt": f"The capital of Region{i} is",
                                 "locality_ground_truth": "Paris"} for i in range(n)]))
    return path


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/summary.csv"))


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/chunks/*.json")}


# --------------------------------------------------------------------------- launchers
def test_slurm_and_local_launcher_configs_compose():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                             "out_dir=/shared/results"], return_hydra_config=True).hydra
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra
    assert slurm.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert slurm.launcher.partition == "gpu" and slurm.launcher.gpus_per_node == 1
    assert slurm.launcher.max_num_timeout > 0  # requeue on timeout: the rerun resumes from chunks/
    # the sweep's folder and submitit's logs live under out_dir
    assert slurm.sweep.dir.startswith("/shared/results/multirun/")
    assert slurm.launcher.submitit_folder == f"{slurm.sweep.dir}/.submitit/%j"
    assert local.launcher._target_.endswith("JoblibLauncher") and local.launcher.backend == "loky"


def test_submitit_local_2x2_sweep_reports_4_cells_and_a_rerun_recomputes_nothing(tmp_path):
    """The acceptance sweep: editors none,ft x data sample,cf through submitit's local
    executor (the Slurm code path on one machine); then the same command again."""
    out = tmp_path / "results"
    _write_cf(tmp_path / "data" / "counterfact" / "counterfact-edit.json", 4)
    args = ["hydra/launcher=submitit_local", "model=tiny-llama", "editor=none,ft", "data=sample,cf",
            f"data_root={tmp_path / 'data'}", "runner.steps=[1,2]", "runner.n_cases=2", f"out_dir={out}",
            "runner.progress=false"]
    t0 = time.time()
    r = _sweep(*args)
    first_s = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    runs = _run_dirs(out)
    assert len(runs) == 4, [p.name for p in out.iterdir()]
    assert {p.name.rsplit("_", 1)[0] for p in runs} == {f"{e}_tiny-llama_{d}" for e in ("none", "ft")
                                                       for d in ("sample", "cf")}
    # each job ran in its own submitit process; its log is under out_dir/multirun/<date>/.submitit/
    logs = sorted(out.glob("multirun/*/.submitit/*/*_log.out"))
    assert len(logs) == 4
    assert all("3 chunk(s) planned, 0 already done" in p.read_text() for p in logs)
    summaries = {p.name: pd.read_csv(p / "summary.csv") for p in runs}
    stamps = _stamps(out)
    assert len(stamps) == 4 * 3

    # the report: one table per dataset, none and ft rows in each, the summaries' numbers
    md = report.build_report(out).read_text()
    agg = pd.read_csv(out / "report_agg.csv")
    assert set(map(tuple, agg[["data", "label"]].drop_duplicates().values)) == {
        (d, e) for d in ("sample", "cf") for e in ("none", "ft[easyedit-prompt_last]")}
    for data in ("sample", "cf"):
        section = re.split(rf"^## tiny-llama .*/ {data}\b.*$", md, flags=re.M)[1].split("\n## ")[0]
        assert re.search(r"^\| none \| ", section, re.M)
        assert re.search(r"^\| ft\[easyedit-prompt_last\] \| ", section, re.M)   # a variant is named as such
    for name, s in summaries.items():
        _, _, data = name.rsplit("_", 1)[0].split("_")
        editor = s["editor"].iloc[0]   # the table label: the editor, named as its variant where it is one
        cell = agg[(agg["label"] == editor) & (agg["data"] == data)].set_index(["T", "metric"])
        for row in s[s["metric"].isin(QUALITY)].itertuples():
            assert cell.loc[(row.T, row.metric), "mean"] == row.mean
            assert cell.loc[(row.T, row.metric), "n_seeds"] == 1

    # The same sweep again, here through Hydra's basic launcher (one process, cheaper than
    # four): runs are keyed by their config, not by the launcher, so every chunk is found,
    # none is recomputed, and the summaries are the same.
    t0 = time.time()
    r = _sweep(*[a for a in args if not a.startswith("hydra/launcher=")])
    rerun_s = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("3 chunk(s) planned, 3 already done") == 4
    assert "0 already done" not in r.stdout + r.stderr
    assert _stamps(out) == stamps
    for name, s in summaries.items():
        pd.testing.assert_frame_equal(pd.read_csv(out / name / "summary.csv"), s, check_exact=True)
    print(f"submitit 2x2 sweep: {first_s:.1f} s; rerun: {rerun_s:.1f} s")


def test_killed_joblib_sweep_resumes_without_recomputing_a_finished_chunk(tmp_path):
    """SIGKILL a parallel sweep (2 runs in joblib workers) mid-way; the same command
    again performs exactly the edits of the chunks that were not finished."""
    out = tmp_path / "results"
    n_cases = 6  # T=1: six one-edit chunks per run, two runs (seeds 0 and 1)
    args = ["hydra/launcher=local", "hydra.launcher.n_jobs=2", "model=tiny-llama", "editor=ft",
            "editor.name=counting-ft", "+hydra.callbacks.count._target_=tests.test_sweeps.RegisterCountingEditor",
            "runner.seed=0,1", "runner.steps=[1]", f"runner.n_cases={n_cases}", f"out_dir={out}",
            "runner.progress=false"]
    first_log = tmp_path / "edits-1.log"
    p = subprocess.Popen([sys.executable, "-m", "editbench", "-m", *args], cwd=ROOT,
                         env=_env(**{EDIT_LOG: str(first_log)}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 180
    try:
        while len(list(out.glob("*/chunks/T1-c*.json"))) < 3:
            assert p.poll() is None, p.communicate()[0]
            assert time.time() < deadline, "no chunk files appeared"
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers
        p.communicate(timeout=60)
    time.sleep(0.5)  # let the killed workers' file handles close
    done = _stamps(out)
    assert 3 <= len(done) < 2 * n_cases, "the sweep was not interrupted mid-way"
    assert _edits(first_log) >= len(done)

    second_log = tmp_path / "edits-2.log"
    r = _sweep(*args, env=_env(**{EDIT_LOG: str(second_log)}))
    assert r.returncode == 0, r.stdout + r.stderr
    # exactly the unfinished chunks were edited again (T=1: one edit per chunk) ...
    assert _edits(second_log) == 2 * n_cases - len(done)
    # ... and the finished ones were left as they were
    now = _stamps(out)
    assert {k: now[k] for k in done} == done and len(now) == 2 * n_cases
    for path in _run_dirs(out):
        s = pd.read_csv(path / "summary.csv")
        assert s.set_index("metric").loc["reliability", "n"] == n_cases
        assert not [q.name for q in path.rglob(".*") if q.name != ".lock"], "partial files left"


# --------------------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, tiny_llama):
    """A results folder: none (seed 0), ft (seeds 0 and 1), ft with another objective (seed 0)."""
    out = tmp_path_factory.mktemp("tiny_results")
    cases = toy_cases(8)
    for overrides in (["editor=none", "runner.seed=0"],
                      ["editor=ft", "editor.num_steps=5", "runner.seed=0"],
                      ["editor=ft", "editor.num_steps=5", "runner.seed=1"],
                      ["editor=ft", "editor.num_steps=5", "editor.objective=target_new", "runner.seed=0"]):
        cfg = compose_cfg("model=tiny-llama", *overrides, "runner.steps=[1,2]", "runner.n_cases=2",
                          "runner.exact_match=false", f"out_dir={out}", "runner.progress=false")
        run(cfg, cases=cases, lm=tiny_llama)
    return out


def test_report_numbers_are_the_summaries_numbers_with_mean_and_std_over_seeds(tiny_results, tmp_path):
    md = report.build_report(tiny_results, tmp_path).read_text()
    runs = {p.name: (pd.read_csv(p / "summary.csv"), report.read_config(p)) for p in _run_dirs(tiny_results)}
    assert len(runs) == 4

    def per_seed(editor: str, objective: str | None) -> list[pd.DataFrame]:
        return [s for s, c in runs.values() if c["editor.name"] == editor
                and (objective is None or c["editor.objective"] == objective)]

    agg = pd.read_csv(tmp_path / "report_agg.csv")
    quality = pd.read_csv(tmp_path / "tables" / "tiny-llama_sample_quality.csv").set_index("editor")
    ft_label, ftm_label = "ft[easyedit-prompt_last]", "ft[easyedit-target_new]"   # the variants' names
    assert set(quality.index) == {"none", ft_label, ftm_label}  # same editor, two configs: told apart
    quality_md = md.split("### Reliability, generality, locality")[1].split("### Cost")[0]
    lines = {ln.split(" | ")[0][2:]: ln for ln in quality_md.splitlines() if ln.startswith("| ")}
    checked = 0
    for label, frames in (("none", per_seed("none", None)), (ft_label, per_seed("ft", "prompt_last")),
                          (ftm_label, per_seed("ft", "target_new"))):
        for T in (1, 2):
            for metric, short in report.QUALITY:
                vals = [float(s[(s["T"] == T) & (s["metric"] == metric)]["mean"].iloc[0]) for s in frames]
                want_mean = float(np.mean(vals))
                want_std = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
                row = agg[(agg["label"] == label) & (agg["T"] == T) & (agg["metric"] == metric)].iloc[0]
                assert row["mean"] == pytest.approx(want_mean, abs=1e-12) and row["n_seeds"] == len(vals)
                assert (math.isnan(row["std"]) and math.isnan(want_std)) or row["std"] == pytest.approx(want_std)
                assert quality.loc[label, f"T={T} {short}"] == pytest.approx(want_mean, abs=1e-12)
                # the Markdown cell: "mean" with one seed, "mean ± std" with two
                want = f"{want_mean:.3f}" + (f" ± {want_std:.3f}" if len(vals) > 1 else "")
                col = 1 + [f"T={t} {m}" for t in (1, 2) for _, m in report.QUALITY].index(f"T={T} {short}")
                assert lines[label].split(" | ")[col].strip(" |") == want, (label, T, metric)
                checked += 1
    assert checked == 18
    assert "\\pm" in (tmp_path / "report.tex").read_text()
    assert (tmp_path / "report.tex").read_text().count("\\begin{tabular}") == 2
    for name in ("plot", "cost"):
        assert (tmp_path / f"{name}_tiny-llama_sample.png").stat().st_size > 1000
    assert not (tmp_path / "curve.csv").exists()  # no run used runner.curve


def _hand_run(root: Path, curves: dict[int, list[dict]]) -> Path:
    """A run folder written by hand: config.yaml (runner.curve=true), a summary and chunk
    records of T=10 with ``curve`` entries (the runner.curve record format)."""
    path = root / "ft_hand_cf_0000000000"
    (path / "chunks").mkdir(parents=True)
    (path / "config.yaml").write_text("editor:\n  name: ft\nmodel:\n  name: hand\ndata:\n  name: cf\n"
                                      "runner:\n  seed: 0\n  curve: true\n  steps: [10]\n")
    pd.DataFrame([{"editor": "ft", "model": "hand", "data": "cf", "T": 10, "metric": "reliability",
                   "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 20}]).to_csv(path / "summary.csv", index=False)
    for idx, curve in curves.items():
        RunDir(path).write_chunk(10, idx, {"T": 10, "chunk": idx, "cases": [], "curve": curve})
    return path


def _entry(k, age, rel, n):
    return {"after_edits": k, "age": age, "reliability": rel, "n": n}


def test_retention_curve_from_chunk_records(tmp_path):
    root = tmp_path / "results"
    path = _hand_run(root, {
        0: [_entry(1, 1, 1.0, 1), _entry(5, 1, 1.0, 1), _entry(5, 5, 0.5, 4),
            _entry(10, 1, 1.0, 1), _entry(10, 5, 0.75, 4), _entry(10, 10, 0.2, 5)],
        1: [_entry(10, 1, 0.0, 1), _entry(10, 5, 0.25, 4), _entry(10, 10, 0.6, 5)]})
    table = report.curve_table(RunDir(path).read_chunks())
    assert list(table.columns) == report.CURVE_COLUMNS and len(table) == 9
    assert report.write_curve(path) is not None
    assert (path / "curve.png").stat().st_size > 1000
    pd.testing.assert_frame_equal(pd.read_csv(path / "curve.csv"), table, check_dtype=False)

    curves = report.load_curves(root)
    assert set(curves["label"]) == {"ft"} and set(curves["seed"]) == {0}
    ret = report.retention(curves).set_index("age")  # after the 10th edit, pooled over both chunks
    assert ret.loc[1, "reliability"] == pytest.approx(0.5) and ret.loc[1, "n"] == 2
    assert ret.loc[5, "reliability"] == pytest.approx(0.5) and ret.loc[10, "reliability"] == pytest.approx(0.4)
    so_far = report.reliability_so_far(curves).set_index("after_edits")
    assert so_far.loc[5, "reliability"] == pytest.approx((1.0 + 4 * 0.5) / 5)
    assert so_far.loc[10, "reliability"] == pytest.approx((1.0 + 3.0 + 1.0 + 0.0 + 1.0 + 3.0) / 20)

    md = report.build_report(root, tmp_path / "report").read_text()
    assert "curve_hand_cf.png" in md and (tmp_path / "report" / "curve_hand_cf.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "report" / "curve.csv")) == 9


def test_a_malformed_curve_entry_is_a_clear_error(tmp_path):
    path = _hand_run(tmp_path, {0: [{"after_edits": 10, "age": 1, "n": 1}]})
    with pytest.raises(ValueError, match=r"T=10 c0: curve entry .* lacks \['reliability'\]"):
        report.curve_table(RunDir(path).read_chunks())


def test_the_analysis_notebook_runs_on_a_results_folder(tiny_results, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("EDITBENCH_RESULTS", str(tiny_results))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 run(s)" in text and "no retention curves" in text
    tables = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| none |" in tables and "ft[easyedit-target_new]" in tables and " ± " in tables
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # metrics and cost figures


def test_runner_curve_records_retention_without_changing_the_results(tmp_path, tiny_llama):
    """runner.curve=true (the runner side: the patch handed over in docs/sweeps.md, "Status";
    skipped until editbench/runner.py has it)."""
    from editbench import runner

    if not hasattr(runner, "curve_checkpoints"):
        pytest.skip("editbench/runner.py does not implement runner.curve yet")
    assert runner.curve_checkpoints(10) == [1, 2, 5, 10] and runner.curve_checkpoints(30) == [1, 2, 5, 10, 20, 30]
    assert [runner.age_bin(a) for a in (1, 2, 3, 5, 6, 10, 11, 21, 51)] == [1, 2, 5, 5, 10, 10, 20, 50, 100]
    paths = {}
    for curve in ("true", "false"):
        cfg = compose_cfg("model=tiny-llama", "editor=ft", "editor.objective=target_new", "editor.num_steps=5",
                          "runner.steps=[10]", "runner.n_cases=10", f"runner.curve={curve}",
                          "runner.exact_match=false", f"out_dir={tmp_path / curve}", "runner.progress=false")
        paths[curve] = run(cfg, cases=toy_cases(10), lm=tiny_llama)
    [rec] = RunDir(paths["true"]).read_chunks()
    table = report.curve_table([rec])
    assert sorted(set(table["after_edits"])) == [1, 2, 5, 10]
    # every edit made so far is scored once at each checkpoint, in its age bin
    assert table.groupby("after_edits")["n"].sum().to_dict() == {1: 1, 2: 2, 5: 5, 10: 10}
    assert set(table[table["after_edits"] == 10]["age"]) == {1, 2, 5, 10}
    # the last checkpoint is the chunk's final scoring
    last = table[table["after_edits"] == 10]
    final = np.mean([c["metrics"]["reliability"] for c in rec["cases"]])
    assert (last["reliability"] * last["n"]).sum() / 10 == pytest.approx(final)
    assert (paths["true"] / "curve.csv").is_file() and not (paths["false"] / "curve.csv").exists()
    # measuring the curve changes no other number
    a, b = (pd.read_csv(p / "cases.csv").drop(columns="edit_time_s") for p in (paths["true"], paths["false"]))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
