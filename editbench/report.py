"""Gather run folders into paper-style tables and plots.

    python -m editbench.report results/            # writes into results/ (or --out DIR)

Every run folder under the root (any depth) that holds a ``summary.csv`` is read, with
its ``config.yaml``. Runs whose configs differ only in ``runner.seed`` (and in keys that
do not change results: ``out_dir``, ``run_id``, ``runner.steps``, ``runner.progress``,
``data_root``) are one *cell*: its number is the mean over seeds of the runs' means, shown
as ``mean ± std`` (sample std over seeds) when two or more seeds are present. When one
(model, data) pair holds several configs of the same editor, their rows are labelled
with the config keys that tell them apart (``ft (editor.objective=target_new)``).

Outputs (in the output folder):

* ``report.md``: per model x dataset, table 1 (editors as rows; for each T, Rel / Gen /
  Loc) and table 2 (for each T: edit seconds, inference seconds per query, inference
  overhead, and ``general/<task>`` accuracy when the runs measured it), then the plots;
* ``report.tex``: the same tables as LaTeX (booktabs) tables;
* ``tables/<model>_<data>_{quality,cost}.csv``: the same tables as CSV (mean, std and
  number of seeds per cell);
* ``report_agg.csv``: every metric of every cell, long form (mean, std, n_seeds, ...);
* ``report.csv``: the per-run rows the cells were computed from (with run and seed);
* ``curve.csv``: the retention curves of runs made with ``runner.curve=true``;
* plots per model x dataset: ``plot_<model>_<data>.png`` (each quality metric against T,
  log scale, a line per editor), ``cost_<model>_<data>.png`` (edit time and inference
  overhead against T), ``curve_<model>_<data>.png`` (retention: reliability against
  edit age; only with curve data).

The functions below are also the notebook API (notebooks/analysis.ipynb): each plot
function returns a matplotlib Figure (and saves it when given a path). Plotting uses the
object-oriented API (no pyplot, no global backend change), so it is safe in threads and
in Jupyter alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from editbench.results import RunDir, atomic_save_figure, atomic_write_csv, atomic_write_text

QUALITY = [("reliability", "Rel"), ("generality", "Gen"), ("locality", "Loc")]
COST = [("edit_time_s", "edit s"), ("infer_time_s", "infer s/query"), ("infer_overhead", "overhead")]
#: config keys that do not change a run's results: ignored when grouping runs into cells
NOT_RESULT_KEYS = ("out_dir", "run_id", "runner.steps", "runner.progress", "runner.reuse_stale", "data_root",
                   "model.description")
SEED_KEY = "runner.seed"
CURVE_COLUMNS = ["T", "chunk", "after_edits", "age", "reliability", "n"]
CELL = ["model", "data", "label"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def read_config(run_path: Path) -> dict[str, Any] | None:
    """A run folder's resolved config, flattened to dotted keys (None without config.yaml)."""
    path = Path(run_path) / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001 - any parse error: name the file
        raise ValueError(f"{path} is not a readable config ({type(err).__name__}: {err})") from None
    return _flatten(cfg if isinstance(cfg, dict) else {})


def model_descriptions(root: str | Path) -> dict[str, str]:
    """model name -> the exact model a run used (``model.description`` of its config), for the
    tables' headings ("SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32")."""
    out = {}
    for path in sorted(Path(root).rglob("summary.csv")):
        cfg = read_config(path.parent) or {}
        if cfg.get("model.name") and cfg.get("model.description"):
            out.setdefault(str(cfg["model.name"]), str(cfg["model.description"]))
    return out


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root`` (a folder holding ``summary.csv``): run
    (its path relative to root), path, editor, model, data, seed, curve (runner.curve)
    and group (the config without its seed and the keys that do not change results, as
    JSON: runs with the same group are one cell)."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("summary.csv")):
        run_path = path.parent
        cfg = read_config(run_path)
        rows.append({"run": run_path.relative_to(root).as_posix() if run_path != root else run_path.name,
                     "path": str(run_path), "config": cfg})
    if not rows:
        raise FileNotFoundError(f"no summary.csv under {root}")
    for r in rows:
        cfg = r.pop("config")
        if cfg is None:  # no config: the run is a cell of its own
            r.update(seed=None, curve=False, group=json.dumps({"run": r["run"]}), _keyed={})
            continue
        keyed = {k: v for k, v in cfg.items() if k != SEED_KEY and k not in NOT_RESULT_KEYS
                 and not any(k.startswith(p + ".") for p in NOT_RESULT_KEYS)}
        r.update(seed=cfg.get(SEED_KEY), curve=bool(cfg.get("runner.curve", False)),
                 group=json.dumps(keyed, sort_keys=True, default=str), _keyed=keyed,
                 editor=cfg.get("editor.name"), model=cfg.get("model.name"), data=cfg.get("data.name"))
    return pd.DataFrame(rows)


def _labels(runs: pd.DataFrame, summary: pd.DataFrame) -> dict[str, str]:
    """group -> row label: the editor name, plus the config keys that differ between
    groups of the same editor on the same model and data."""
    first = summary.drop_duplicates("run").set_index("run")[["editor", "model", "data"]]
    info = runs.drop(columns=[c for c in ("editor", "model", "data") if c in runs]).join(first, on="run")
    labels: dict[str, str] = {}
    for _, df in info.groupby(["editor", "model", "data"], dropna=False):
        groups = df.drop_duplicates("group")
        if len(groups) == 1:
            labels[groups["group"].iloc[0]] = str(groups["editor"].iloc[0])
            continue
        keyed = list(groups["_keyed"])
        keys = sorted({k for d in keyed for k in d})
        differ = [k for k in keys if len({json.dumps(d.get(k), default=str) for d in keyed}) > 1]
        for (_, g), d in zip(groups.iterrows(), keyed):
            if not d:  # no config.yaml: name the folder
                labels[g["group"]] = f"{g['editor']} ({g['run']})"
            else:
                labels[g["group"]] = f"{g['editor']} (" + ", ".join(f"{k}={d.get(k)}" for k in differ) + ")"
    return labels


def load_summaries(root: str | Path) -> pd.DataFrame:
    """Every ``summary.csv`` under ``root``: its rows plus run (folder, relative to root),
    path, seed, group (config without seed) and label (the row label in the tables)."""
    runs = load_runs(root)
    seeded = runs["seed"].notna()
    dup = seeded & runs.duplicated(["group", "seed"])
    for r in runs[dup].itertuples():  # e.g. a copy of a run folder: count each seed once
        first = runs[seeded & (runs["group"] == r.group) & (runs["seed"] == r.seed)]["run"].iloc[0]
        log.warning("%s repeats the config and seed of %s; left out", r.run, first)
    runs = runs[~dup]
    frames = []
    for r in runs.itertuples():
        df = pd.read_csv(Path(r.path) / "summary.csv")
        if not df.empty:
            df["run"] = r.run
            frames.append(df)
    if not frames:
        raise FileNotFoundError(f"every summary.csv under {root} is empty")
    summary = pd.concat(frames, ignore_index=True)
    labels = _labels(runs[runs["run"].isin(summary["run"])], summary)
    meta = runs.set_index("run")[["path", "seed", "group"]]
    summary = summary.join(meta, on="run")
    summary["label"] = summary["group"].map(labels)
    return summary


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (model, data, label) x T x metric: mean over runs (seeds) of the
    runs' means, std over seeds (NaN with one seed), n_seeds, the seeds, n (cases summed
    over seeds) and, with a single seed, that run's bootstrap CI (NaN otherwise: a mean of
    CIs is not a CI)."""
    df = summary.copy()
    if "label" not in df:
        df["label"] = df["editor"]
    if "run" not in df:
        df["run"] = "run"
    if "seed" not in df:
        df["seed"] = None
    keys = [*CELL, "T", "metric"]
    rows = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        vals = g["mean"].astype(float)
        n_seeds = int(g["run"].nunique())
        rows.append({**dict(zip(keys, key)), "editor": g["editor"].iloc[0],
                     "mean": float(vals.mean()),
                     "std": float(vals.std(ddof=1)) if n_seeds >= 2 else float("nan"),
                     "n_seeds": n_seeds,
                     "seeds": _seeds(g["seed"]),
                     "ci_low": float(g["ci_low"].iloc[0]) if n_seeds == 1 else float("nan"),
                     "ci_high": float(g["ci_high"].iloc[0]) if n_seeds == 1 else float("nan"),
                     "n": int(g["n"].sum())})
    cols = ["model", "data", "label", "editor", "T", "metric", "mean", "std", "n_seeds", "seeds", "ci_low",
            "ci_high", "n"]
    return pd.DataFrame(rows, columns=cols)


def _seeds(values: Iterable[Any]) -> str:
    """"0,1,2": the seeds of a cell, sorted (integers printed as integers)."""
    seeds = {int(v) if isinstance(v, float) and v.is_integer() else v for v in values
             if v is not None and not (isinstance(v, float) and math.isnan(v))}
    try:
        return ",".join(str(v) for v in sorted(seeds))
    except TypeError:  # mixed types
        return ",".join(sorted(map(str, seeds)))


# --------------------------------------------------------------------------- tables
@dataclass
class Table:
    """A paper table: rows = editor labels, columns = (T, metric); mean, std, n_seeds."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n_seeds: pd.DataFrame
    names: dict[str, str]  # metric -> short column name

    @property
    def empty(self) -> bool:
        return self.mean.empty

    def column_names(self) -> list[str]:
        return [f"T={T} {self.names[m]}" for T, m in self.mean.columns]

    def cell(self, row: str, col: tuple[int, str], digits: int = 3, latex: bool = False) -> str:
        """``mean`` or ``mean ± std`` (two or more seeds); empty when the cell has no value."""
        v = self.mean.loc[row, col]
        if pd.isna(v):
            return ""
        fmt = _fmt_tex if latex else _fmt
        s, k = self.std.loc[row, col], self.n_seeds.loc[row, col]
        if k >= 2 and not pd.isna(s):
            pm = " \\pm " if latex else " ± "
            return f"{fmt(v, digits)}{pm}{fmt(s, digits)}"
        return fmt(v, digits)

    def to_markdown(self, digits: int = 3) -> str:
        if self.empty:
            return "(no rows)\n"
        lines = ["| editor | " + " | ".join(self.column_names()) + " |", "|---|" + "---:|" * self.mean.shape[1]]
        for row in self.mean.index:
            label = str(row).replace("|", "\\|")
            lines.append(f"| {label} | " + " | ".join(self.cell(row, c, digits) for c in self.mean.columns) + " |")
        return "\n".join(lines) + "\n"

    def to_frame(self) -> pd.DataFrame:
        """The CSV form: editor, then per column its mean, std and number of seeds."""
        out = pd.DataFrame(index=self.mean.index)
        for col, name in zip(self.mean.columns, self.column_names()):
            out[name] = self.mean[col]
            out[f"{name} std"] = self.std[col]
            out[f"{name} seeds"] = self.n_seeds[col].astype("Int64")
        return out.rename_axis("editor").reset_index()

    def to_latex(self, caption: str = "", label: str = "", digits: int = 3) -> str:
        """A booktabs table: one column group per T, one sub-column per metric."""
        if self.empty:
            return ""
        Ts = list(dict.fromkeys(T for T, _ in self.mean.columns))
        per_T = {T: [m for t, m in self.mean.columns if t == T] for T in Ts}
        spec = "l" + "".join("r" * len(per_T[T]) for T in Ts)
        head1, rules, start = ["Editor"], [], 2
        for T in Ts:
            w = len(per_T[T])
            head1.append(f"\\multicolumn{{{w}}}{{c}}{{$T={T}$}}")
            rules.append(f"\\cmidrule(lr){{{start}-{start + w - 1}}}")
            start += w
        head2 = [""] + [_tex(self.names[m]) for T in Ts for m in per_T[T]]
        lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(head1) + " \\\\", "".join(rules), " & ".join(head2) + " \\\\", "\\midrule"]
        for row in self.mean.index:
            cells = [self.cell(row, c, digits, latex=True) for c in self.mean.columns]
            lines.append(" & ".join([_tex(row)] + [f"${c}$" if c else "--" for c in cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if caption:
            lines.append(f"\\caption{{{_tex(caption)}}}")
        if label:
            lines.append(f"\\label{{{label}}}")
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if v != 0 and abs(v) < 1e-2 else f"{v:.{digits}f}"


def _fmt_tex(v: float, digits: int = 3) -> str:
    """_fmt for LaTeX math mode: 5.72e-06 becomes 5.72\\times10^{-6}."""
    text = _fmt(v, digits)
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}\\times10^{{{int(exp)}}}"
    return text


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def make_table(agg: pd.DataFrame, metrics: list[tuple[str, str]]) -> Table:
    """A Table of the aggregated rows ``agg`` (one model x dataset) for ``metrics``."""
    if "std" not in agg:
        agg = aggregate(agg)
    names = dict(metrics)
    df = agg[agg["metric"].isin(names)]
    if df.empty:
        e = pd.DataFrame()
        return Table(e, e, e, names)
    if df.duplicated(["label", "T", "metric"]).any():
        raise ValueError("make_table needs the rows of one model x dataset; group by model and data first")
    wide = {v: df.pivot(index="label", columns=["T", "metric"], values=v) for v in ("mean", "std", "n_seeds")}
    cols = [(T, m) for T in sorted({t for t, _ in wide["mean"].columns}) for m, _ in metrics
            if (T, m) in wide["mean"].columns]
    order = sorted(wide["mean"].index, key=str)
    mean, std, n = (wide[v].reindex(index=order, columns=pd.MultiIndex.from_tuples(cols, names=["T", "metric"]))
                    for v in ("mean", "std", "n_seeds"))
    return Table(mean, std, n.fillna(0).astype(int), names)


def cost_metrics(agg: pd.DataFrame) -> list[tuple[str, str]]:
    """COST plus every ``general/<task>`` metric present (short name: the task)."""
    general = sorted({m for m in agg["metric"] if str(m).startswith("general/")})
    return COST + [(m, m.split("/", 1)[1]) for m in general]


def quality_table(agg: pd.DataFrame) -> Table:
    return make_table(agg, QUALITY)


def cost_table(agg: pd.DataFrame) -> Table:
    return make_table(agg, cost_metrics(agg))


def wide_table(summary: pd.DataFrame, metrics: list[tuple[str, str]]) -> pd.DataFrame:
    """The means of ``make_table`` with flat column names ("T=1 Rel", ...)."""
    t = make_table(summary, metrics)
    if t.empty:
        return pd.DataFrame()
    out = t.mean.copy()
    out.columns = t.column_names()
    return out


def to_markdown(table: pd.DataFrame | Table, digits: int = 3) -> str:
    if isinstance(table, Table):
        return table.to_markdown(digits)
    if table.empty:
        return "(no rows)\n"
    lines = ["| editor | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for editor, row in table.iterrows():
        lines.append(f"| {editor} | " + " | ".join("" if pd.isna(v) else _fmt(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- retention curves
def curve_table(chunks: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The ``curve`` entries of chunk records (runner.curve=true), one row each:
    T, chunk, after_edits (k: edits made so far), age (edit age bin: k - position of the
    case's edit in the chunk, 1 = the latest edit; grouped in the bins 1, 2, 5, 10, 20,
    ...), reliability (mean over the n cases of that bin) and n."""
    rows = []
    for ch in chunks:
        for e in ch.get("curve") or []:
            missing = [k for k in ("after_edits", "age", "reliability", "n") if k not in e]
            if missing:
                raise ValueError(f"chunk T={ch.get('T')} c{ch.get('chunk')}: curve entry {e} lacks {missing}")
            rows.append({"T": int(ch["T"]), "chunk": int(ch["chunk"]), "after_edits": int(e["after_edits"]),
                         "age": int(e["age"]), "reliability": float(e["reliability"]), "n": int(e["n"])})
    df = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    return df.sort_values(["T", "chunk", "after_edits", "age"], ignore_index=True)


def write_curve(run_path: str | Path) -> pd.DataFrame | None:
    """``curve.csv`` and ``curve.png`` in a run folder from its chunk records, when they
    hold curves (called by the runner after the summary); returns the curve rows."""
    run = RunDir(run_path)
    curve = curve_table(run.read_chunks())
    if curve.empty:
        return None
    atomic_write_csv(run.path / "curve.csv", curve)
    tmp = run.path / f".curve.png.{os.getpid()}.png"
    try:
        plot_curve(curve.assign(label=_run_editor(run.path)), tmp)
        tmp.replace(run.path / "curve.png")
    finally:
        tmp.unlink(missing_ok=True)
    return curve


def _run_editor(path: Path) -> str:
    cfg = read_config(path) or {}
    return str(cfg.get("editor.name") or path.name)


def load_curves(root: str | Path, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """The curve rows of every run under ``root`` made with runner.curve=true (its
    curve.csv, else its chunk records), with the run's model, data, label, run and seed."""
    runs = load_runs(root)
    summary = load_summaries(root) if summary is None else summary
    meta = summary.drop_duplicates("run").set_index("run")[["model", "data", "label", "seed"]]
    frames = []
    for r in runs.itertuples():
        csv = Path(r.path) / "curve.csv"
        if csv.is_file():
            df = pd.read_csv(csv)
        elif r.curve:
            df = curve_table(RunDir(r.path).read_chunks())
        else:
            continue
        if not df.empty and r.run in meta.index:
            frames.append(df.assign(run=r.run, **meta.loc[r.run].to_dict()))
    cols = ["model", "data", "label", "run", "seed", *CURVE_COLUMNS]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def retention(curves: pd.DataFrame) -> pd.DataFrame:
    """Reliability against edit age after a chunk's last edit (after_edits == T), for the
    largest T with curve data per label: pooled over chunks and seeds (weighted by n)."""
    df = _with_label(curves)
    df = df[df["after_edits"] == df["T"]]
    df = df[df["T"] == df.groupby("label")["T"].transform("max")]
    return _pooled(df, ["label", "T", "age"])


def reliability_so_far(curves: pd.DataFrame) -> pd.DataFrame:
    """Reliability of every case edited so far against the number of edits k made, for the
    largest T per label: pooled over ages, chunks and seeds (weighted by n)."""
    df = _with_label(curves)
    df = df[df["T"] == df.groupby("label")["T"].transform("max")]
    return _pooled(df, ["label", "T", "after_edits"])


def _with_label(curves: pd.DataFrame) -> pd.DataFrame:
    return curves if "label" in curves else curves.assign(label="run")


def _pooled(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=[*keys, "reliability", "n"])
    g = df.assign(w=df["reliability"] * df["n"]).groupby(keys, as_index=False)[["w", "n"]].sum()
    return g.assign(reliability=g["w"] / g["n"]).drop(columns="w")


# --------------------------------------------------------------------------- plots
def _figure(n_panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(4 * n_panels, 3.2))
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig: Figure, axes: list, path: str | Path | None, title: str) -> Figure:
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        atomic_save_figure(fig, Path(path), dpi=120, format="png")
    return fig


def _lines(ax, agg: pd.DataFrame, metric: str) -> None:
    """A line per label of ``metric`` against T; band: ± std over seeds, else the CI."""
    df = agg[agg["metric"] == metric]
    for label, g in df.groupby("label", sort=True):
        g = g.sort_values("T")
        ax.plot(g["T"], g["mean"], marker="o", label=label)
        multi = g["n_seeds"] >= 2
        lo = np.where(multi, g["mean"] - g["std"].fillna(0), g["ci_low"])
        hi = np.where(multi, g["mean"] + g["std"].fillna(0), g["ci_high"])
        ax.fill_between(g["T"], lo, hi, alpha=0.15)
    _log_ticks(ax, sorted(set(df["T"])))
    ax.set_xlabel("number of sequential edits T")
    ax.grid(alpha=0.3)


def _log_ticks(ax, values: list) -> None:
    """A log x axis ticked at the values plotted (1, 10, 100, 1000 or whatever was run)."""
    ax.set_xscale("log")
    if values:
        ax.set_xticks([float(v) for v in values], [str(int(v)) for v in values])
        ax.minorticks_off()


def plot_metrics(summary: pd.DataFrame, path: str | Path | None = None, metrics: Iterable[str] | None = None,
                 title: str = "") -> Figure | None:
    """One panel per metric (default: reliability, generality, locality and any
    ``general/<task>``): mean against T on a log axis, a line per editor, with a band of
    ± std over seeds (or the bootstrap CI with one seed). ``summary`` is summary rows or
    :func:`aggregate` rows of one model x dataset. Returns the Figure (None: no metric)."""
    agg = summary if "std" in summary else aggregate(summary)
    present_metrics = set(agg["metric"])
    if metrics is None:
        metrics = [m for m, _ in QUALITY] + sorted(m for m in present_metrics if str(m).startswith("general/"))
    present = [m for m in metrics if m in present_metrics]
    if not present:
        return None
    fig, axes = _figure(len(present))
    for ax, metric in zip(axes, present):
        _lines(ax, agg, metric)
        ax.set_title(metric)
        if metric in ("reliability", "generality", "locality") or metric.startswith("general/"):
            ax.set_ylim(-0.02, 1.02)
    return _finish(fig, axes, path, title)


def plot_cost(summary: pd.DataFrame, path: str | Path | None = None, title: str = "") -> Figure | None:
    """Edit time per editor (seconds per edit, log scale) and inference overhead against T."""
    agg = summary if "std" in summary else aggregate(summary)
    present = [m for m in ("edit_time_s", "infer_overhead") if m in set(agg["metric"])]
    if not present:
        return None
    fig, axes = _figure(len(present))
    for ax, metric in zip(axes, present):
        _lines(ax, agg, metric)
        if metric == "edit_time_s":
            ax.set_yscale("log")
            ax.set_title("edit time (s per edit)")
        else:
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_title("inference overhead (x unedited)")
    return _finish(fig, axes, path, title)


def plot_curve(curves: pd.DataFrame, path: str | Path | None = None, title: str = "") -> Figure | None:
    """Retention: (left) reliability against edit age after a chunk's last edit, (right)
    reliability of all cases edited so far against the number of edits made, a line per
    editor (the largest T with curve data). Returns None when there are no curves."""
    if curves.empty:
        return None
    fig, axes = _figure(2)
    for ax, df, x in ((axes[0], retention(curves), "age"), (axes[1], reliability_so_far(curves), "after_edits")):
        for label, g in df.groupby("label", sort=True):
            ax.plot(g[x], g["reliability"], marker="o", label=f"{label} (T={int(g['T'].iloc[0])})")
        _log_ticks(ax, sorted(set(df[x])))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("edit age (edits since; 1 = the latest)")
    axes[0].set_title("reliability vs edit age, after T edits")
    axes[1].set_xlabel("edits made so far k")
    axes[1].set_title("reliability of the k edits so far")
    return _finish(fig, axes, path, title)


def plot_run(summary: pd.DataFrame, path: Path) -> None:
    """The plot written into each run folder."""
    if not summary.empty:
        row = summary.iloc[0]
        plot_metrics(summary, path, title=f"{row['editor']} / {row['model']} / {row['data']}")


# --------------------------------------------------------------------------- the report
def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(s))


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write every table and plot of the runs under ``root`` into ``out`` (default: root);
    return the path of report.md."""
    root = Path(root)
    out = Path(out) if out else root
    summary = load_summaries(root)
    agg = aggregate(summary)
    curves = load_curves(root, summary)
    md = ["# editbench report\n", f"\n{summary['run'].nunique()} run(s) under `{root}`; cells with several seeds "
          "show mean ± std over seeds.\n"]
    tex = ["% editbench report: \\usepackage{booktabs}\n"]
    described = model_descriptions(root)
    for (model, data), df in agg.groupby(["model", "data"], sort=True):
        slug = f"{_slug(model)}_{_slug(data)}"
        quality, cost = quality_table(df), cost_table(df)
        splits = sorted(set(summary.loc[(summary["model"] == model) & (summary["data"] == data), "split"].dropna())) \
            if "split" in summary else []
        heading = f"{model} ({described[model]})" if described.get(model) else model
        heading += f" / {data}" + (f" (split: {', '.join(map(str, splits))})" if splits else "")
        md += [f"\n## {heading}\n\n### Reliability, generality, locality\n\n", quality.to_markdown(),
               "\n### Cost and general ability\n\n", cost.to_markdown()]
        for name, table, what in (("quality", quality, "reliability, generality, locality"),
                                  ("cost", cost, "edit time (s), inference time (s/query), inference overhead"
                                                 " and general ability")):
            if not table.empty:
                atomic_write_csv(out / "tables" / f"{slug}_{name}.csv", table.to_frame())
                tex.append("\n" + table.to_latex(caption=f"{model} / {data}: {what}", label=f"tab:{slug}_{name}"))
        plots = [(f"plot_{slug}.png", plot_metrics(df, out / f"plot_{slug}.png", title=f"{model} / {data}")),
                 (f"cost_{slug}.png", plot_cost(df, out / f"cost_{slug}.png", title=f"{model} / {data}: cost"))]
        c = curves[(curves["model"] == model) & (curves["data"] == data)]
        if not c.empty:
            plots.append((f"curve_{slug}.png", plot_curve(c, out / f"curve_{slug}.png",
                                                          title=f"{model} / {data}: retention")))
        md.append("\n" + "".join(f"![{name}]({name})\n" for name, fig in plots if fig is not None))
    atomic_write_text(out / "report.md", "".join(md))
    atomic_write_text(out / "report.tex", "".join(tex))
    atomic_write_csv(out / "report.csv", summary.drop(columns=["path", "group"]))
    atomic_write_csv(out / "report_agg.csv", agg)
    if not curves.empty:
        atomic_write_csv(out / "curve.csv", curves)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m editbench.report", description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default="results", help="folder holding run folders (default results/)")
    ap.add_argument("--out", default=None, help="where to write the report (default: the root folder)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.root, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
