"""Gather run folders into paper-style tables and plots.

    python -m editbench.report results/            # writes results/report.md, report.csv, *.png

Tables (per model x dataset): editors as rows; for each T, Rel / Gen / Loc columns
(mean over cases, from each run's summary.csv). A second table gives edit time, inference
time and overhead. Plots: each metric against T (log scale), one line per editor.
Several runs of the same (editor, model, data) are averaged (mean over runs; the
per-run values stay in report.csv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from editbench.results import atomic_write_csv, atomic_write_text  # noqa: E402

QUALITY = [("reliability", "Rel"), ("generality", "Gen"), ("locality", "Loc")]
COST = [("edit_time_s", "edit s"), ("infer_time_s", "infer s/query"), ("infer_overhead", "overhead")]


def load_summaries(root: str | Path) -> pd.DataFrame:
    """Every ``summary.csv`` under ``root``, with the run folder as a column."""
    frames = []
    for path in sorted(Path(root).rglob("summary.csv")):
        df = pd.read_csv(path)
        if not df.empty:
            df["run"] = path.parent.name
            frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no summary.csv under {root}")
    return pd.concat(frames, ignore_index=True)


def wide_table(summary: pd.DataFrame, metrics: list[tuple[str, str]]) -> pd.DataFrame:
    """Editors as rows, (T, metric) as columns, averaged over runs that repeat a cell."""
    df = summary[summary["metric"].isin([m for m, _ in metrics])]
    if df.empty:
        return pd.DataFrame()
    short = dict(metrics)
    table = df.groupby(["editor", "T", "metric"])["mean"].mean().unstack(["T", "metric"])
    cols = [(T, m) for T in sorted({t for t, _ in table.columns}) for m, _ in metrics if (T, m) in table.columns]
    table = table[cols]
    table.columns = [f"T={T} {short[m]}" for T, m in cols]
    return table


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    if table.empty:
        return "(no rows)\n"
    head = "| editor | " + " | ".join(table.columns) + " |"
    sep = "|---|" + "---:|" * len(table.columns)
    lines = [head, sep]
    for editor, row in table.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.{digits}g}" if v != 0 and abs(v) < 1e-2 else f"{v:.{digits}f}" for v in row]
        lines.append(f"| {editor} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(summary: pd.DataFrame, path: Path, metrics=("reliability", "generality", "locality"),
                 title: str = "") -> None:
    """One panel per metric: mean (with CI band) against T on a log axis, a line per editor."""
    present = [m for m in metrics if m in set(summary["metric"])]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], present):
        df = summary[summary["metric"] == metric]
        for editor, g in df.groupby("editor"):
            g = g.groupby("T")[["mean", "ci_low", "ci_high"]].mean().sort_index()
            ax.plot(g.index, g["mean"], marker="o", label=editor)
            ax.fill_between(g.index, g["ci_low"], g["ci_high"], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("number of sequential edits T")
        ax.set_title(metric)
        if metric in ("reliability", "generality", "locality"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(summary: pd.DataFrame, path: Path) -> None:
    """The plot written into each run folder."""
    if not summary.empty:
        row = summary.iloc[0]
        plot_metrics(summary, path, title=f"{row['editor']} / {row['model']} / {row['data']}")


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.csv (per-run long rows) and one plot per model x dataset."""
    root = Path(root)
    out = Path(out) if out else root
    summary = load_summaries(root)
    parts = ["# editbench report\n"]
    for (model, data), df in summary.groupby(["model", "data"]):
        parts.append(f"\n## {model} / {data}\n\n### Reliability, generality, locality\n\n")
        parts.append(to_markdown(wide_table(df, QUALITY)))
        parts.append("\n### Cost\n\n")
        parts.append(to_markdown(wide_table(df, COST)))
        png = out / f"plot_{model}_{data}.png"
        plot_metrics(df, png, title=f"{model} / {data}")
        parts.append(f"\n![{model} {data}]({png.name})\n")
    atomic_write_text(out / "report.md", "".join(parts))
    atomic_write_csv(out / "report.csv", summary)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m editbench.report", description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default="results", help="folder holding run folders (default results/)")
    ap.add_argument("--out", default=None, help="where to write the report (default: the root folder)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.root, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
