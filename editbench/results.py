"""Run folders, resumable chunk records, and the tidy CSV tables built from them.

A run folder ``out_dir/<run_id>/`` holds:

* ``config.yaml`` (resolved config) and ``env.json`` (versions, device, git commit);
* ``chunks/T<T>-c<idx>.json``: one file per finished (T, chunk), written atomically.
  These are the source of truth: a rerun skips every chunk whose file exists;
* ``cases.csv``: one row per case x T x metric (probe family), rebuilt from the chunks;
* ``summary.csv``: one row per editor x model x data x T x metric with the mean, a 95%
  bootstrap confidence interval and n (DESIGN.md, "Stable interface"); the ``split`` and
  ``edit_batch_size`` columns say which cases and how many edits per editor call.
* ``.lock``: held (``flock``) by the process running the folder, so that two processes
  never compute the same chunks; the kernel releases it when the process dies.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``); a temporary file left by a killed process is removed by the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ["editor", "model", "data", "split", "edit_batch_size", "T", "metric", "mean", "ci_low", "ci_high",
                   "n"]
CASE_COLUMNS = ["editor", "model", "data", "split", "edit_batch_size", "T", "chunk", "case_id", "metric", "value"]


def editor_label(editor_cfg) -> str:
    """The editor as every table names it: ``<name>``, or ``<name>[<variant>]`` for a configured
    variant that differs from the paper's method (``editor.variant``)."""
    variant = editor_cfg.get("variant")
    return f"{editor_cfg.name}[{variant}]" if variant else str(editor_cfg.name)


def run_meta(cfg) -> dict[str, str]:
    """The identifying columns of a run's tables: editor label, model, data set and split."""
    return {"editor": editor_label(cfg.editor), "model": str(cfg.model.name), "data": str(cfg.data.name),
            "split": str(cfg.data.get("split") or "all")}
#: summary metrics that measure time or memory: they differ between two runs of the same
#: config; every other metric is reproducible (docs/reliability.md, "Determinism")
NONDETERMINISTIC_METRICS = ("edit_time_s", "infer_time_s", "infer_overhead", "peak_mem_mb", "cpu_s_per_case",
                            "wild_infer_time_s")

log = logging.getLogger(__name__)
#: names of the temporary files atomic_write_text creates for the files of a run folder
_PARTIAL = re.compile(
    r"^\.(config\.yaml|env\.json|cases\.csv|summary\.csv|generations\.jsonl|curve\.csv|metrics\.png|curve\.png|T\d+-c\d+\.json)"
    r"\.[^.]+(\.png)?$")


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_figure(fig, path: Path, **savefig_kw) -> None:
    """``fig.savefig(path)`` through a temporary file in the same folder (never a half-written PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig_kw)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (0644 typically)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


class RunDir:
    """One run's folder and its chunk records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.chunks = self.path / "chunks"

    def chunk_file(self, T: int, idx: int) -> Path:
        return self.chunks / f"T{T}-c{idx}.json"

    def has_chunk(self, T: int, idx: int) -> bool:
        return self.chunk_file(T, idx).is_file()

    def write_chunk(self, T: int, idx: int, record: dict[str, Any]) -> None:
        """Write a finished chunk's record atomically, with a checksum of its contents."""
        record = {k: v for k, v in record.items() if k != "checksum"}
        record["checksum"] = record_checksum(record)
        atomic_write_text(self.chunk_file(T, idx), json.dumps(record, indent=1, sort_keys=True))

    def read_chunk(self, T: int, idx: int) -> dict[str, Any]:
        """The record of a finished chunk; a file that is not one is a clear error."""
        return _read_record(self.chunk_file(T, idx))

    def read_chunks(self) -> list[dict[str, Any]]:
        if not self.chunks.is_dir():
            return []
        return [_read_record(p) for p in sorted(self.chunks.glob("T*-c*.json"))]

    def set_aside_invalid(self) -> list[Path]:
        """Move every chunk file that is not a valid record (truncated, not JSON, edited by hand:
        its checksum does not match) to ``chunks/invalid/``, with a warning naming it, so that it
        is recomputed and never read as results; then the same for a ``summary.csv`` or
        ``cases.csv`` that does not match the valid records (:meth:`tables_mismatch`), moved to
        ``invalid/`` (the run rebuilds both from the records). Call under the lock."""
        moved = []
        if self.chunks.is_dir():
            for path in sorted(self.chunks.glob("T*-c*.json")):
                try:
                    _read_record(path)
                except ValueError as err:
                    target = self.chunks / "invalid" / f"{path.name}.{int(time.time())}"
                    target.parent.mkdir(exist_ok=True)
                    os.replace(path, target)
                    log.warning("%s; moved to %s, the chunk is recomputed", err, target)
                    moved.append(target)
        for name, why in self.tables_mismatch().items():
            target = self.path / "invalid" / f"{name}.{int(time.time())}"
            target.parent.mkdir(exist_ok=True)
            os.replace(self.path / name, target)
            log.warning("%s does not match the chunk records (%s: edited or damaged, or left by an interrupted "
                        "run); moved to %s, it is rebuilt from the records", self.path / name, why, target)
            moved.append(target)
        return moved

    def tables_mismatch(self) -> dict[str, str]:
        """``summary.csv`` / ``cases.csv`` (those present) that differ from what the valid chunk
        records give (:func:`summary_table`, :func:`cases_table`, with the identifying columns of
        the file's own first row), each with the first difference. ``stale_chunks`` rows are
        left out: they depend on the code of the run that wrote them, not on the records."""
        chunks = []
        if self.chunks.is_dir():
            for path in sorted(self.chunks.glob("T*-c*.json")):
                try:
                    chunks.append(_read_record(path))
                except ValueError:
                    pass
        out = {}
        for name, build in (("summary.csv", lambda meta: with_judge(summary_table(chunks, meta), chunks)),
                            ("cases.csv", lambda meta: cases_table(chunks, meta))):
            path = self.path / name
            if not path.is_file():
                continue
            why = _table_difference(path, build)
            if why:
                out[name] = why
        return out

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for the duration; fail at once if another process holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                raise RunFolderBusy(f"run folder {self.path} is in use by another process (pid {holder}); "
                                    "wait for it or use another out_dir") from None
            except OSError as err:  # e.g. a file system without locks
                log.warning("cannot lock %s (%s); not guarding against a second process", self.path, err)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def remove_partial_files(self) -> list[Path]:
        """Delete the temporary files a killed process left behind (call under the lock)."""
        removed = []
        for folder in (self.path, self.chunks):
            if folder.is_dir():
                for p in folder.iterdir():
                    if _PARTIAL.match(p.name) and p.is_file():
                        p.unlink()
                        removed.append(p)
        if removed:
            log.info("removed %d partial file(s) left by an interrupted run in %s", len(removed), self.path)
        return removed

    def write_env(self, device: str, extra: dict[str, Any] | None = None) -> None:
        """``env.json``: the software, the machine, and ``extra`` (the model's description, what
        the editor was built from: :meth:`editbench.editor.Editor.provenance`)."""
        import torch
        import transformers

        env = {"python": platform.python_version(), "platform": platform.platform(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "device": device, "git_commit": _git_commit(),
               "cpu_threads": torch.get_num_threads()}
        if device.startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
        env.update(extra or {})
        atomic_write_text(self.path / "env.json", json.dumps(env, indent=1, default=str))


def record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of a chunk record's canonical JSON (without its ``checksum`` field)."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("cases"), list):
            raise ValueError("no 'cases' list")
        if "checksum" in record and record["checksum"] != record_checksum(record):
            raise ValueError("its checksum does not match its contents: edited or damaged")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid chunk record ({err}); delete it to recompute that chunk") from None
    return record


def _table_difference(path: Path, build) -> str | None:
    """How the CSV table at ``path`` differs from ``build(meta)`` (None: it does not)."""
    import io

    try:
        have = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - unreadable is a difference
        return f"unreadable: {type(err).__name__}"
    meta_cols = ["editor", "model", "data", "split"]
    if have.empty or not set(meta_cols) <= set(have.columns):
        meta = {c: "" for c in meta_cols}
    else:
        meta = {c: str(have[c].iloc[0]) for c in meta_cols}
    want = pd.read_csv(io.StringIO(build(meta).to_csv(index=False)))
    if "metric" in have.columns and "metric" in want.columns and path.name == "summary.csv":
        have = have[have["metric"] != "stale_chunks"].reset_index(drop=True)
        want = want[want["metric"] != "stale_chunks"].reset_index(drop=True)
    if list(have.columns) != list(want.columns):
        return f"columns {list(have.columns)} instead of {list(want.columns)}"
    if len(have) != len(want):
        return f"{len(have)} rows instead of {len(want)}"
    for col in have.columns:
        a, b = have[col], want[col]
        same = (a == b) | (a.isna() & b.isna())
        if not same.all():
            row = int((~same).to_numpy().nonzero()[0][0])
            got, wanted = (getattr(x, "item", lambda x=x: x)() for x in (a.iloc[row], b.iloc[row]))
            return f"line {row + 2}, column {col!r}: {got!r} instead of {wanted!r}"
    return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- statistics
def bootstrap_ci(values: Iterable[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of ``values``."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


# --------------------------------------------------------------------------- tables
def cases_table(chunks: list[dict[str, Any]], meta: dict[str, str]) -> pd.DataFrame:
    """One row per case x T x metric, plus per-case edit time and status."""
    rows = []
    for ch in chunks:
        for c in ch["cases"]:
            base = {**meta, "T": ch["T"], "chunk": ch["chunk"], "case_id": c["case_id"],
                    "status": c.get("status", "ok"), "error": c.get("error", ""),
                    "edit_time_s": c.get("edit_time_s"),
                    "info": json.dumps(c.get("info") or {}, sort_keys=True)}
            for metric, value in sorted(c.get("metrics", {}).items()):
                rows.append({**base, "metric": metric, "value": value})
            if not c.get("metrics"):
                rows.append({**base, "metric": "", "value": np.nan})
    cols = CASE_COLUMNS + ["status", "error", "edit_time_s", "info"]
    return with_edit_batch_size(pd.DataFrame(rows, columns=cols), chunks)


def summary_table(chunks: list[dict[str, Any]], meta: dict[str, str], n_boot: int = 1000,
                  code: str | None = None) -> pd.DataFrame:
    """Aggregate chunk records into the summary rows of DESIGN.md.

    Case metrics: mean over cases (each case already averaged over its probes) with a
    bootstrap CI over cases. Edit time: over edits. Inference time: seconds per scored
    query, bootstrap over chunks. infer_overhead: a chunk's seconds per query after
    its edits over the same queries' seconds before them. Every case counts in the quality
    metrics (a failed edit is scored on the rolled-back model); ``failed_cases`` counts the
    failed ones; ``stale_chunks`` counts chunks reused from other code (``runner.reuse_stale``).
    """
    rows = []
    for T in sorted({ch["T"] for ch in chunks}):
        chs = [ch for ch in chunks if ch["T"] == T]
        cases = [c for ch in chs for c in ch["cases"]]
        scored = [c for c in cases if c.get("metrics")]
        metrics = sorted({m for c in scored for m in c["metrics"]}, key=_metric_order)

        def add(metric: str, values: list[float]) -> None:
            values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
            if values:
                mean, lo, hi = bootstrap_ci(values, n_boot=n_boot)
                rows.append({**meta, "T": T, "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                             "n": len(values)})

        for metric in metrics:
            add(metric, [c["metrics"][metric] for c in scored if metric in c["metrics"]])
        add("edit_time_s", [c["edit_time_s"] for c in cases if c.get("edit_time_s") is not None])
        add("infer_time_s", [ch["timing"]["seconds"] / ch["timing"]["queries"] for ch in chs
                             if ch.get("timing", {}).get("queries")])
        add("infer_overhead", [(ch["timing"]["seconds"] / ch["timing"]["queries"])
                               / (ch["reference_timing"]["seconds"] / ch["reference_timing"]["queries"])
                               for ch in chs if ch.get("reference_timing", {}).get("queries")
                               and ch["reference_timing"]["seconds"] > 0
                               and ch.get("timing", {}).get("queries")])  # 0 when every edit failed
        # WILD generation after the edits, seconds per generated answer (eval.mode wild / both)
        add("wild_infer_time_s", [ch["wild"]["timing"]["seconds"] / ch["wild"]["timing"]["queries"] for ch in chs
                                  if (ch.get("wild") or {}).get("timing", {}).get("queries")])
        # the whole chunk (scoring, edits, reset) in process CPU seconds per case of the chunk
        add("cpu_s_per_case", [ch["cpu_s"] / T for ch in chs if ch.get("cpu_s") is not None])
        mems = [ch["peak_mem_mb"] for ch in chs if ch.get("peak_mem_mb") is not None]
        if mems:
            rows.append({**meta, "T": T, "metric": "peak_mem_mb", "mean": max(mems), "ci_low": max(mems),
                         "ci_high": max(mems), "n": len(mems)})
        for key in sorted({k for ch in chs for k in ch.get("editor_stats", {})}):
            add(f"editor/{key}", [ch["editor_stats"][key] for ch in chs if key in ch.get("editor_stats", {})])
        for key in sorted({k for ch in chs for k in ch.get("general", {})}):
            add(f"general/{key}", [ch["general"][key] for ch in chs if key in ch.get("general", {})])
        n_failed = float(sum(c.get("status", "ok") != "ok" for c in cases))
        rows.append({**meta, "T": T, "metric": "failed_cases", "mean": n_failed, "ci_low": n_failed,
                     "ci_high": n_failed, "n": len(cases)})
        n_stale = float(sum(bool(ch.get("stale")) or (code is not None and ch.get("code") != code) for ch in chs))
        if n_stale:
            rows.append({**meta, "T": T, "metric": "stale_chunks", "mean": n_stale, "ci_low": n_stale,
                         "ci_high": n_stale, "n": len(chs)})
    return with_edit_batch_size(pd.DataFrame(rows, columns=SUMMARY_COLUMNS), chunks)


def with_edit_batch_size(df: pd.DataFrame, chunks: list[dict[str, Any]]) -> pd.DataFrame:
    """Fill the ``edit_batch_size`` column: per T, the most edits one editor call applied in
    its chunks (1: sequential ``edit``; T: one ``edit_batch`` per chunk; B:
    ``runner.edit_batch_size=B``), from the chunk records (empty for records written before
    they held it)."""
    sizes: dict[int, int] = {}
    for ch in chunks:
        if ch.get("edit_batch_size") is not None:
            sizes[ch["T"]] = max(sizes.get(ch["T"], 0), int(ch["edit_batch_size"]))
    df["edit_batch_size"] = df["T"].map(sizes).astype("Int64")
    return df


def with_judge(df: pd.DataFrame, chunks: list[dict[str, Any]]) -> pd.DataFrame:
    """Add a ``judge`` column when WILD was scored: the judge named on each ``wild_*`` row of
    the judged metrics (reliability, generality; locality compares two answers by normalised
    exact match, F1 is token F1), empty elsewhere; chunks judged differently are listed."""
    judges: dict[int, set[str]] = {}
    for ch in chunks:
        if ch.get("wild"):
            judges.setdefault(ch["T"], set()).add(str(ch["wild"].get("judge", "")))
    if not judges:
        return df
    judged = df["metric"].str.match(r"^wild_(reliability|generality)")
    df["judge"] = [",".join(sorted(judges.get(t, ()))) if j else "" for t, j in zip(df["T"], judged)]
    return df


def generations_jsonl(chunks: list[dict[str, Any]], meta: dict[str, str]) -> str:
    """One JSON line per WILD query of every case: the run's columns, T, chunk, case, status
    and the chunk record's entry (query, prompt, target, aliases, generation, raw, score, f1,
    unedited for locality), so that answers can be read and re-judged offline."""
    lines = []
    for ch in sorted(chunks, key=lambda c: (c["T"], c["chunk"])):
        for c in ch["cases"]:
            for g in c.get("generations") or []:
                row = {**meta, "T": ch["T"], "chunk": ch["chunk"], "case_id": c["case_id"],
                       "status": c.get("status", "ok"), "context": (ch.get("wild") or {}).get("context"),
                       "judge": (ch.get("wild") or {}).get("judge"), **g}
                lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
    return "".join(line + "\n" for line in lines)


_ORDER = ["reliability", "generality", "locality", "gen_exact_match", "cf_efficacy", "cf_paraphrase",
          "cf_neighborhood", "unedited",
          "wild_reliability", "wild_generality", "wild_locality", "wild_f1_reliability", "wild_f1_generality",
          "wild_f1_locality"]


def _metric_order(metric: str) -> tuple[int, str]:
    head = metric.split("/")[0]
    return (_ORDER.index(head) if head in _ORDER else len(_ORDER), metric)


def write_tables(run: RunDir, meta: dict[str, str], code: str | None = None) -> pd.DataFrame:
    """Rebuild cases.csv and summary.csv from the chunk records; return the summary. With the
    current ``code`` fingerprint, chunks from other code are counted as ``stale_chunks``."""
    chunks = run.read_chunks()
    atomic_write_csv(run.path / "cases.csv", cases_table(chunks, meta))
    summary = with_judge(summary_table(chunks, meta, code=code), chunks)
    atomic_write_csv(run.path / "summary.csv", summary)
    if any("generations" in c for ch in chunks for c in ch["cases"]):
        atomic_write_text(run.path / "generations.jsonl", generations_jsonl(chunks, meta))
    return summary
