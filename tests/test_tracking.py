"""TensorBoard tracking (editbench/tracking.py): a run's metrics per T and a training's curves,
read back from the event files with tensorboard's EventAccumulator."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from editbench import tracking
from editbench.models import cache_dir
from editbench.train.history import write_history
from editbench.validate import validate_config
from tests.conftest import ROOT, compose_cfg, write_train_file

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e \".[tracking]\")")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _env(tmp_path) -> dict[str, str]:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    models = cache_dir("models")
    if models.is_dir() and not (cache / "models").exists():
        (cache / "models").symlink_to(models)
    return {**os.environ, "EDITBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_a_run_logs_every_summary_metric_per_T_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "editbench", "model=tiny-llama", "editor=ft", "editor.num_steps=3",
                        "runner.steps=[1,2]", "runner.n_cases=2", "runner.progress=false", f"out_dir={out}",
                        "tracking.tensorboard=true"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    summary = pd.read_csv(run / "summary.csv")
    scalars = _scalars(run / "tensorboard")
    for row in summary.itertuples():
        assert (row.T, pytest.approx(row.mean, rel=1e-5)) in scalars[row.metric], row.metric
        assert (row.T, pytest.approx(row.ci_low, rel=1e-5)) in scalars[f"{row.metric}/ci_low"]
    assert [t for t, _ in scalars["reliability"]] == [1, 2]
    # the result table was printed with the plot's path
    assert "reliability" in r.stdout and "T=1" in r.stdout and "T=2" in r.stdout
    assert f"plot: {run / 'metrics.png'}" in r.stdout


def test_the_switch_is_off_by_default_and_a_rerun_logs_each_step_once(tmp_path):
    assert compose_cfg().tracking.tensorboard is False
    summary = pd.DataFrame([{"editor": "e", "model": "m", "data": "d", "split": "all", "T": t, "metric": "reliability",
                             "mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 4} for t, v in ((1, 0.9), (10, 0.5))])
    logdir = tmp_path / "tb"
    tracking.log_summary(summary, logdir)
    tracking.log_summary(summary, logdir)   # a resumed run rewrites, never duplicates
    assert _scalars(logdir)["reliability"] == [(1, pytest.approx(0.9)), (10, pytest.approx(0.5))]
    assert tracking.tensorboard_dir(tmp_path / "run_a", "/tb") == tmp_path.__class__("/tb/run_a")


def test_a_trainings_history_is_logged_at_each_step(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "train/edit": 0.5 / s, "val/reliability": (0.1 * s if s % 2 == 0 else None),
                "lr": 1e-3, "grad_norm": float("nan"), "seconds": 0.1 * s} for s in range(1, 6)]
    tracking.configure({"tensorboard": True})
    try:
        write_history(tmp_path, history)
    finally:
        tracking.configure(None)
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert [s for s, _ in scalars["val/reliability"]] == [2, 4]
    assert "grad_norm" not in scalars and "seconds" not in scalars  # non-finite values and wall time are not curves
    assert (tmp_path / "history.csv").is_file()
    write_history(tmp_path / "off", history)                       # off: no event files
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_the_train_command_logs_the_curves_through_the_hydra_callback(tmp_path):
    train = write_train_file(tmp_path / "train.json")
    r = subprocess.run([sys.executable, "-m", "editbench.train", "editor=lte", "model=tiny-llama", "data=cf",
                        "editor.align=true", "editor.train.steps=4", "editor.train.batch_size=2",
                        "editor.train.progress=false", f"data.train_path={train}", "tracking.tensorboard=true"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (folder,) = (tmp_path / "cache" / "trained" / "lte").iterdir()
    history = pd.read_csv(folder / "history.csv")
    assert _scalars(folder / "tensorboard")["loss"] == [(int(s), pytest.approx(v, rel=1e-5))
                                                        for s, v in zip(history["step"], history["loss"])]


def test_without_the_package_the_switch_is_one_line(monkeypatch):
    monkeypatch.setattr("editbench.validate.tracking_available", lambda: False)
    with pytest.raises(ValueError, match=r"tracking.tensorboard=True: .*needs the tensorboard package: pip install"):
        validate_config(compose_cfg("tracking.tensorboard=true"))
    with pytest.raises(ValueError, match=r"tracking.wandb=True: is not a tracking setting"):
        validate_config(compose_cfg("+tracking.wandb=true"))
