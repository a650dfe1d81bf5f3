"""The result table a run prints in the terminal when it ends (``python -m editbench``).

:func:`result_table` turns a run's ``summary.csv`` into plain text: one block per editor
(with model, data set and split), one row per metric, one column per T, each cell
``mean [ci_low, ci_high] n=<n>``. It shows the protocol's quality metrics (reliability,
generality, locality, exact match, the CounterFact metrics), the cost metrics (edit time,
inference overhead) and the failed cases, and the general-ability scores beside their
unedited reference (``general/<task>`` and ``general/<task>_unedited``); the per-family
breakdowns (``generality/rephrase``...), the ``unedited/*`` reference rows and the other
bookkeeping rows stay in summary.csv. :func:`print_run` prints the table and the paths of
summary.csv and metrics.png; the command calls it once, after the run (never inside the
protocol loop).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

__all__ = ["SHOWN", "print_run", "result_table", "shown_metric"]

#: summary metrics the terminal table shows, in this order (then general/*)
SHOWN = ("reliability", "generality", "locality", "gen_exact_match", "cf_efficacy", "cf_paraphrase",
         "cf_neighborhood", "wild_reliability", "wild_generality", "wild_locality", "edit_time_s",
         "infer_overhead", "failed_cases")


def shown_metric(metric: str) -> bool:
    """Whether the terminal table shows ``metric`` (a summary.csv metric name)."""
    if metric in SHOWN:
        return True
    if metric.startswith("general/"):
        task = metric.split("/", 1)[1]
        return not task.endswith(("_chance", "_agree")) and task != "seconds"
    return False


def _order(metric: str) -> tuple[int, str]:
    return (SHOWN.index(metric) if metric in SHOWN else len(SHOWN), metric)


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"


def _cell(row) -> str:
    return f"{_num(row['mean'])} [{_num(row['ci_low'])}, {_num(row['ci_high'])}] n={int(row['n'])}"


def result_table(summary: pd.DataFrame) -> str:
    """The summary as plain text: per editor (model, data, split) a metric x T grid."""
    if summary.empty:
        return "(no finished chunk: the summary is empty)"
    blocks = []
    keys = ["editor", "model", "data", "split"]
    for (editor, model, data, split), df in summary.groupby(keys, sort=False):
        df = df[df["metric"].map(shown_metric)]
        steps = sorted(int(t) for t in df["T"].unique())
        metrics = sorted(df["metric"].unique(), key=_order)
        cells = {(r["metric"], int(r["T"])): _cell(r) for _, r in df.iterrows()}
        header = ["metric"] + [f"T={t}" for t in steps]
        rows = [[m] + [cells.get((m, t), "-") for t in steps] for m in metrics]
        widths = [max(len(str(r[k])) for r in [header] + rows) for k in range(len(header))]
        lines = [f"{editor} on {model}, data {data} (split {split}); mean [95% CI] n"]
        for r in [header] + rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def print_run(run_path: str | Path) -> None:
    """Print the result table of the run folder ``run_path`` and where its files are."""
    run_path = Path(run_path)
    summary_csv = run_path / "summary.csv"
    summary = pd.read_csv(summary_csv) if summary_csv.is_file() else pd.DataFrame()
    print(result_table(summary))
    print(f"summary: {summary_csv}")
    plot = run_path / "metrics.png"
    if plot.is_file():
        print(f"plot: {plot}")
