"""Optional experiment tracking: TensorBoard event files of a run's metrics and a training's curves.

Off by default; ``tracking.tensorboard=true`` switches it on (``pip install -e ".[tracking]"``
installs the ``tensorboard`` package; without it the config check stops with one line):

* a run (``python -m editbench``): when it ends, every metric of summary.csv is logged as a
  scalar ``<metric>`` (the mean) with ``<metric>/ci_low`` and ``<metric>/ci_high``, the step
  being T, under ``<run folder>/tensorboard``;
* a training (``python -m editbench.train``, or the first run of an editor that learns):
  each row of history.csv (loss, ``train/*``, ``val/*``, lr, grad_norm) is logged at its step
  under ``<checkpoint folder>/tensorboard``, rewritten with history.csv at each checkpoint.

``tracking.dir`` puts the event files under ``<dir>/<run or checkpoint folder name>`` instead.
``tensorboard --logdir results`` (or the ``tracking.dir``) then shows every run side by side.

Both commands read ``tracking.*`` through a Hydra callback (:class:`TrackingCallback`,
registered in conf/config.yaml) that calls :func:`configure` when the job starts; code that
calls the runner directly may call :func:`configure` itself. Each write replaces the event
files editbench wrote before in that folder (a resumed run or training logs each step once).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.experimental.callback import Callback

log = logging.getLogger("editbench")

__all__ = ["TrackingCallback", "available", "configure", "enabled", "log_history", "log_run", "log_summary",
           "settings", "tensorboard_dir"]

INSTALL_HINT = "pip install -e \".[tracking]\" (or pip install tensorboard)"
_SETTINGS: dict[str, Any] = {"tensorboard": False, "dir": None}


def available() -> bool:
    """Whether the ``tensorboard`` package (which torch's SummaryWriter writes through) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def configure(tracking_cfg: Mapping[str, Any] | None) -> None:
    """Set the process's tracking settings from a ``tracking`` config section (None: off).
    Anything but a mapping counts as off here: the config check refuses it with its key."""
    if not isinstance(tracking_cfg, Mapping):
        tracking_cfg = {}
    _SETTINGS["tensorboard"] = bool(tracking_cfg.get("tensorboard", False))
    _SETTINGS["dir"] = tracking_cfg.get("dir")


def enabled() -> bool:
    """Whether TensorBoard logging is on for this process (:func:`configure`)."""
    return bool(_SETTINGS["tensorboard"])


def settings() -> dict[str, Any]:
    """A copy of the process's tracking settings (``tensorboard``, ``dir``)."""
    return dict(_SETTINGS)


def tensorboard_dir(folder: str | Path, root: str | Path | None = None) -> Path:
    """Where the event files of ``folder`` (a run or checkpoint folder) go: ``<folder>/tensorboard``,
    or ``<root>/<folder name>`` when a ``tracking.dir`` root is given."""
    folder = Path(folder)
    return Path(root) / folder.name if root else folder / "tensorboard"


def _writer(logdir: Path):
    if not available():
        raise ValueError(f"tracking.tensorboard=true needs the tensorboard package: {INSTALL_HINT}")
    from torch.utils.tensorboard import SummaryWriter

    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.glob("events.out.tfevents.*"):   # ours: rewrite, never append twice
        old.unlink()
    return SummaryWriter(log_dir=str(logdir))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def log_summary(summary, logdir: str | Path) -> Path:
    """Log a summary table (the rows of summary.csv) to ``logdir``: per metric, the mean and
    its CI bounds at step T. Returns ``logdir``."""
    logdir = Path(logdir)
    writer = _writer(logdir)
    try:
        for row in summary.to_dict("records"):
            T, metric = int(row["T"]), str(row["metric"])
            for tag, key in ((metric, "mean"), (f"{metric}/ci_low", "ci_low"), (f"{metric}/ci_high", "ci_high")):
                if _finite(row.get(key)):
                    writer.add_scalar(tag, float(row[key]), global_step=T)
        if len(summary):
            first = summary.iloc[0]
            writer.add_text("run", f"editor {first['editor']}, model {first['model']}, data {first['data']}, "
                                   f"split {first['split']}")
    finally:
        writer.close()
    return logdir


def log_history(history: Sequence[Mapping[str, Any]], logdir: str | Path) -> Path:
    """Log a training's history (one mapping per step, as history.csv) to ``logdir``."""
    logdir = Path(logdir)
    writer = _writer(logdir)
    try:
        for row in history:
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "seconds") and _finite(value):
                    writer.add_scalar(key, float(value), global_step=step)
    finally:
        writer.close()
    return logdir


def log_run(cfg, run_path: str | Path) -> Path | None:
    """After a run: log its summary.csv when ``cfg.tracking.tensorboard`` is true; the folder or None."""
    tracking_cfg = cfg.get("tracking") or {}
    if not tracking_cfg.get("tensorboard"):
        return None
    import pandas as pd

    summary_csv = Path(run_path) / "summary.csv"
    if not summary_csv.is_file():
        return None
    logdir = log_summary(pd.read_csv(summary_csv), tensorboard_dir(run_path, tracking_cfg.get("dir")))
    log.info("tensorboard: %s", logdir)
    return logdir


class TrackingCallback(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks.tracking``): :func:`configure` from the
    job's ``tracking`` section when a job starts, so that a training's curves are logged too."""

    def on_job_start(self, config, **kwargs) -> None:
        configure(config.get("tracking"))
