"""A training's record: ``history.csv`` (one row per step) and ``loss.png`` (loss curves,
validation figures), rewritten at each checkpoint and at the end; with
``tracking.tensorboard=true`` also TensorBoard event files of the same rows
(:mod:`editbench.tracking`, under ``<checkpoint folder>/tensorboard``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from editbench import tracking
from editbench.results import atomic_save_figure, atomic_write_text

log = logging.getLogger("editbench.train")


def write_history(folder: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv`` (one row per step) and ``loss.png`` (loss curves, validation figures)."""
    import pandas as pd

    if not history:
        return
    df = pd.DataFrame(history)
    first = ["step", "loss"]
    cols = first + sorted(c for c in df.columns if c.startswith("train/")) + \
        sorted(c for c in df.columns if c.startswith("val/")) + \
        [c for c in ("lr", "grad_norm", "seconds") if c in df.columns]
    atomic_write_text(folder / "history.csv", df[cols].to_csv(index=False))
    if tracking.enabled():  # tracking.tensorboard=true: the same rows as TensorBoard scalars
        tracking.log_history(history, tracking.tensorboard_dir(folder, tracking.settings().get("dir")))
    try:
        _plot_history(df, folder / "loss.png")
    except Exception as err:  # noqa: BLE001 - a plot must never fail a training
        log.warning("could not draw %s: %s", folder / "loss.png", err)


def _plot_history(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_cols = [c for c in df.columns if c.startswith("val/")]
    fig, axes = plt.subplots(1, 2 if val_cols else 1, figsize=(11 if val_cols else 6, 4), squeeze=False)
    ax = axes[0][0]
    window = max(1, len(df) // 50)
    for col in ["loss"] + sorted(c for c in df.columns if c.startswith("train/")):
        ax.plot(df["step"], df[col].rolling(window, min_periods=1).mean(), label=col)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {window})")
    ax.legend(fontsize=8)
    if val_cols:
        ax = axes[0][1]
        for col in val_cols:
            sub = df[["step", col]].dropna()
            ax.plot(sub["step"], sub[col], marker="o", label=col)
        ax.set_xlabel("step")
        ax.set_ylabel("validation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
