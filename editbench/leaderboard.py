"""The leaderboard: every editor x dataset x T of ``conf/leaderboard.yaml`` in one table.

    python -m editbench.leaderboard                 # compute what is missing, then write the tables
    python -m editbench.leaderboard jobs=2          # two cells at once (one process each)
    python -m editbench.leaderboard --report        # only rebuild tables and plots from the records
    python -m editbench.leaderboard --list          # the cells, their state and their commands

Arguments of the form ``key=value`` override ``conf/leaderboard.yaml`` (``editors=[none,rome]``,
``budget_cpu_h=inf``, ``out=/tmp/lb``). A *run* is one ``python -m editbench`` run folder per
(editor, dataset, group): the small group chunks the same seeded 100 cases into T = 1, 10 and
100, the large group 1,000 cases into T = 1000. A *cell* is (editor, dataset, T). Every cell is
an ordinary run of the harness: the exact command is in ``cells.csv`` and the run folder is the
one that command writes (its run id hashes the composed config), so the runner's resume,
staleness and checksum rules apply unchanged.

What is committed (``out``, default ``results/leaderboard/``): ``records/<run id>.jsonl.gz``
(every finished chunk record of a run, gzip with a fixed mtime so an unchanged run is
byte-identical), ``failures.json``, ``summary.csv`` (every complete cell's summary rows with
95% CIs), ``cells.csv`` (the state, cost and command of every cell), ``<data>.md`` tables,
``README.md`` (the headline and an index) and the plots. ``runs/`` is the work area (the run
folders and each run's log) and is not committed: before a run starts its records are unpacked
there, so a fresh clone resumes from the committed records.

Cells at T = 1000 are computed when their estimate (the small group's measured seconds per case
at T = 100, times 1,000 cases, times the thread count) is at most ``budget_cpu_h``; otherwise
the table says "not run" with the measured cost and the estimate. A dataset with fewer test
records than a group's cases says so ("n/a"). A run that fails is recorded with its log's last
line. Nothing is left out silently.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from editbench import plan
from editbench.results import (RunDir, atomic_save_figure, atomic_write_csv,
                               atomic_write_text, record_checksum, run_meta, summary_table)

log = logging.getLogger("editbench.leaderboard")

ROOT = Path(__file__).resolve().parents[1]
GRID_FILE = ROOT / "conf" / "leaderboard.yaml"
QUALITY = ("reliability", "generality", "locality")
WILD = ("wild_reliability", "wild_generality", "wild_locality")
COST = ("edit_time_s", "infer_overhead", "cpu_s_per_case", "failed_cases")
GENERAL_TASKS = ("csqa", "anli", "mmlu", "squad2")
DONE, STALE, NA = "done", "stale", "not applicable"  # NA: too few records (shown as "n/a")
README_START, README_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


# =========================================================================== the grid
def load_grid(overrides: Sequence[str] = (), path: Path = GRID_FILE) -> DictConfig:
    """``conf/leaderboard.yaml`` with ``key=value`` overrides; unknown keys are an error."""
    grid = OmegaConf.load(path)
    OmegaConf.set_struct(grid, True)
    try:
        grid = OmegaConf.merge(grid, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # noqa: BLE001 - one line for the user
        raise ValueError(f"{path}: bad override in {list(overrides)}: {' '.join(str(err).split())}") from None
    for key in ("jobs", "threads"):
        if not isinstance(grid[key], int) or grid[key] < 1:
            raise ValueError(f"{key}={grid[key]!r}: must be a positive integer")
    if float(grid.budget_cpu_h) < 0:
        raise ValueError(f"budget_cpu_h={grid.budget_cpu_h!r}: must be >= 0 (inf: no limit)")
    for e in grid.editors:
        if e not in grid.prior_s_per_case and "default" not in grid.prior_s_per_case:
            raise ValueError(f"prior_s_per_case has no entry for editor {e!r} and no 'default'")
    return grid


def table_grid(overrides: Sequence[str], path: Path = GRID_FILE) -> DictConfig | None:
    """The grid the tables show when ``editors=`` restricts what a command computes: the grid
    file with every other override, so that computing (or packing) some editors never drops
    the other editors' rows from the tables; None when nothing restricts the editors."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "editors"]
    return None if len(kept) == len(overrides) else load_grid(kept, path)


@dataclass(frozen=True)
class Run:
    """One run folder of the grid: (editor, data, group)."""

    editor: str
    data: str
    group: str
    n_cases: int
    steps: tuple[int, ...]
    overrides: tuple[str, ...]
    estimate_from: str | None = None

    @property
    def key(self) -> str:
        return f"{self.editor}/{self.data}/{self.group}"

    def command(self) -> str:
        return "python -m editbench " + " ".join(_quote(o) for o in self.overrides)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(ch in arg for ch in "[]${}* ") else arg


def grid_runs(grid: DictConfig) -> list[Run]:
    """Every run of the grid, small groups first."""
    out = Path(str(grid.out))
    runs = []
    for gname, group in grid.groups.items():
        for data, data_over in grid.datasets.items():
            for editor in grid.editors:
                cell_over = list((grid.cell_overrides.get(editor) or {}).get(data) or [])
                steps = tuple(int(t) for t in group.steps)
                overrides = [f"editor={editor}", f"model={grid.model}", f"data={data}", f"data.split={grid.split}",
                             f"runner.seed={grid.seed}", f"runner.n_cases={group.n_cases}",
                             f"runner.steps=[{','.join(map(str, steps))}]", "runner.progress=false",
                             f"out_dir={out / 'runs'}", *list(grid.common), *list(data_over or []), *cell_over]
                runs.append(Run(editor, str(data), str(gname), int(group.n_cases), steps, tuple(overrides),
                                group.get("estimate_from")))
    return runs


def compose(overrides: Sequence[str]) -> DictConfig:
    """The config ``python -m editbench <overrides>`` runs with."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# =========================================================================== records
def pack_path(out: Path, run_id: str) -> Path:
    return out / "records" / f"{run_id}.jsonl.gz"


def read_pack(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The chunk records of a pack whose checksum holds (a damaged one is skipped, with a warning)."""
    records: dict[tuple[int, int], dict[str, Any]] = {}
    if not path.is_file():
        return records
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d: not JSON; skipped (the chunk will be recomputed)", path, n)
                continue
            if rec.get("checksum") != record_checksum(rec):
                log.warning("%s line %d (T=%s chunk %s): checksum does not match; skipped", path, n,
                            rec.get("T"), rec.get("chunk"))
                continue
            records[(int(rec["T"]), int(rec["chunk"]))] = rec
    return records


def folder_records(run: RunDir) -> dict[tuple[int, int], dict[str, Any]]:
    """The valid chunk records of a run folder (what its runner wrote)."""
    records = {}
    for f in sorted(run.chunks.glob("T*-c*.json")) if run.chunks.is_dir() else []:
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("checksum") == record_checksum(rec):
            records[(int(rec["T"]), int(rec["chunk"]))] = rec
    return records


def write_pack(path: Path, records: dict[tuple[int, int], dict[str, Any]]) -> None:
    """Every record, sorted, gzip with mtime 0 (unchanged records give identical bytes)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        for key in sorted(records):
            gz.write((json.dumps(records[key], sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def unpack(records: dict[tuple[int, int], dict[str, Any]], run: RunDir) -> int:
    """Write the records a run folder lacks (so its runner skips them); returns how many."""
    n = 0
    for (T, i), rec in records.items():
        if not run.has_chunk(T, i):
            run.write_chunk(T, i, rec)
            n += 1
    return n


# =========================================================================== state
@dataclass
class RunState:
    """What the records of a run hold, against the plan of its current config."""

    run: Run
    run_id: str
    label: str
    meta: dict[str, str]
    code: str
    n_available: int
    planned: dict[int, int]                     # T -> chunks planned (0: too few cases)
    records: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    def chunks(self, T: int) -> list[dict[str, Any]]:
        return [r for (t, i), r in sorted(self.records.items()) if t == T and i < self.planned.get(T, 0)]

    def status(self, T: int) -> str:
        """done | stale (complete, some chunk by other code) | partial | pending | not applicable."""
        total = self.planned.get(T, 0)
        if total == 0:
            return NA
        have = self.chunks(T)
        if len(have) < total:
            return "partial" if have else "pending"
        return STALE if any(plan.is_stale(r, self.code) for r in have) else DONE

    def pending(self) -> int:
        """Chunks still to compute (missing or computed by other code)."""
        return sum(max(0, n - sum(not plan.is_stale(r, self.code) for r in self.chunks(T)))
                   for T, n in self.planned.items())

    def seconds_per_case(self, T: int) -> float | None:
        """Measured process CPU seconds per case at T (the chunks' own ``cpu_s``: every thread,
        the edits and the scoring), if any."""
        recs = [r for r in self.chunks(T) if r.get("cpu_s") is not None]
        return sum(r["cpu_s"] for r in recs) / (T * len(recs)) if recs else None

    def cpu_seconds(self, T: int) -> float | None:
        recs = [r for r in self.chunks(T) if r.get("cpu_s") is not None]
        return sum(r["cpu_s"] for r in recs) if recs else None


class Survey:
    """The state of every run of a grid (configs composed once, data loaded once per dataset)."""

    def __init__(self, grid: DictConfig):
        import editors  # noqa: F401 - registers the editor classes (their code fingerprints)
        from editbench.data import evaluation_cases
        from editbench.fingerprint import chunk_code
        from editbench.registry import editor_class

        self.grid, self.out = grid, Path(str(grid.out))
        self.states: dict[str, RunState] = {}
        data_cache: dict[str, Any] = {}
        for run in grid_runs(grid):
            cfg = compose(run.overrides)
            dkey = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
            if dkey not in data_cache:
                data_cache[dkey] = evaluation_cases(cfg.data)
            cases = data_cache[dkey]
            selected = plan.select_cases(cases, run.n_cases, int(cfg.runner.seed), bool(cfg.runner.shuffle))
            planned = {T: (len(selected) // T if len(cases) >= run.n_cases else 0) for T in run.steps}
            rid = plan.run_id(cfg)
            state = RunState(run, rid, run_meta(cfg)["editor"], run_meta(cfg), chunk_code(editor_class(cfg.editor.name)),
                             len(cases), planned)
            state.records = {**read_pack(pack_path(self.out, rid)), **folder_records(self.run_dir(state))}
            self.states[run.key] = state

    def run_dir(self, state: RunState) -> RunDir:
        return RunDir(self.out / "runs" / state.run_id)

    def refresh(self, state: RunState) -> None:
        """Re-read a run folder after its runner wrote chunks, and repack the run. The config is
        composed again: if conf/ changed meanwhile, the run id did too, and only the records of
        the new run folder count."""
        rid = plan.run_id(compose(state.run.overrides))
        if rid != state.run_id:
            log.warning("%s: the composed config changed while the grid ran (run id %s -> %s)", state.run.key,
                        state.run_id, rid)
            state.run_id, state.records = rid, read_pack(pack_path(self.out, rid))
        state.records.update(folder_records(self.run_dir(state)))
        write_pack(pack_path(self.out, state.run_id), state.records)

    def source(self, state: RunState) -> RunState | None:
        """The run a large group's estimate comes from (same editor and data)."""
        src = state.run.estimate_from
        return self.states.get(f"{state.run.editor}/{state.run.data}/{src}") if src else None

    def estimate_s(self, state: RunState) -> float | None:
        """Estimated CPU-seconds of a run's pending work: measured CPU-seconds per case (its own
        chunks, else the largest T of its estimate source) x pending cases, else ``None``. A lower
        bound for editors whose cost per edit grows with T (memories, retrieval)."""
        per_case = None
        for T in sorted(state.run.steps, reverse=True):
            per_case = per_case or state.seconds_per_case(T)
        src = self.source(state)
        if per_case is None and src is not None:
            per_case = src.seconds_per_case(max(src.run.steps))
        if per_case is None:
            return None
        cases = sum(max(0, n - sum(not plan.is_stale(r, state.code) for r in state.chunks(T))) * T
                    for T, n in state.planned.items())
        return per_case * cases

    def prior_s(self, state: RunState) -> float:
        """For the time-left display only: the prior seconds per case x pending cases."""
        priors = self.grid.prior_s_per_case
        per_case = float(priors.get(state.run.editor, priors.get("default", 10)))
        return per_case * sum(n * T for T, n in state.planned.items()) * (state.pending() / max(1, sum(state.planned.values())))


# =========================================================================== running
def failures_path(out: Path) -> Path:
    return out / "failures.json"


def read_failures(out: Path) -> dict[str, str]:
    p = failures_path(out)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def write_failures(out: Path, failures: dict[str, str]) -> None:
    atomic_write_text(failures_path(out), json.dumps(dict(sorted(failures.items())), indent=1) + "\n")


def record_failure(out: Path, key: str, message: str | None) -> None:
    """Set (or, with ``None``, clear) one run's failure in ``failures.json``, re-reading the file
    first: two leaderboard commands computing different editors side by side each change only
    their own runs' entries (a whole-file write from a copy read at start would bring back an
    entry that the other command cleared meanwhile)."""
    failures = read_failures(out)
    if message is None:
        if failures.pop(key, None) is None:
            return
    else:
        failures[key] = message
    write_failures(out, failures)


def _run_logged(survey: Survey, args: list[str], log_file: Path, title: str) -> tuple[int, str]:
    """Run ``python <args>`` from the project root with ``grid.threads`` threads, appending its
    output to ``log_file``; (exit status, the log's last line)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    threads = str(survey.grid.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, *args], cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
    lines = [ln for ln in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else "") + f" (log: {log_file})"


def run_one(survey: Survey, state: RunState) -> tuple[int, str]:
    """Compute a run's pending chunks in a child process (``python -m editbench``)."""
    folder = survey.run_dir(state)
    folder.path.mkdir(parents=True, exist_ok=True)
    unpack(state.records, folder)
    return _run_logged(survey, ["-m", "editbench", *state.run.overrides],
                       survey.out / "runs" / "logs" / f"{state.run_id}.log", state.run.command())


def sweep_args(grid: DictConfig, states: Sequence[RunState]) -> list[str]:
    """The Hydra multirun that computes ``states`` (runs that differ in the editor only) through
    ``grid.launcher``: ``-m editor=a,b,... <their other overrides> hydra/launcher=<launcher>``."""
    rest = [o for o in states[0].run.overrides if not o.startswith("editor=")]
    launcher = [f"hydra/launcher={grid.launcher}"]
    if str(grid.launcher) in ("local", "joblib"):
        launcher.append(f"hydra.launcher.n_jobs={int(grid.jobs)}")
    return ["-m", "editbench", "-m", "editor=" + ",".join(s.run.editor for s in states), *rest, *launcher,
            f"hydra.sweep.dir={Path(str(grid.out)).resolve() / 'runs' / 'multirun' / time.strftime('%Y%m%d-%H%M%S')}"]


def run_sweep(survey: Survey, states: Sequence[RunState]) -> tuple[int, str]:
    """Compute the pending chunks of ``states`` as one Hydra multirun (:func:`sweep_args`)."""
    for state in states:
        folder = survey.run_dir(state)
        folder.path.mkdir(parents=True, exist_ok=True)
        unpack(state.records, folder)
    args = sweep_args(survey.grid, states)
    title = "python " + " ".join(_quote(a) for a in args)
    return _run_logged(survey, args, survey.out / "runs" / "logs" / f"sweep-{states[0].run_id}.log", title)


def _sweep_key(state: RunState) -> tuple[str, ...]:
    """Runs with equal keys differ in the editor only, so one multirun computes them."""
    return tuple(o for o in state.run.overrides if not o.startswith("editor="))


def affordable(survey: Survey, state: RunState) -> tuple[bool, float | None]:
    """Whether a run whose group is estimated from another may run within ``budget_cpu_h``."""
    if state.run.estimate_from is None:
        return True, None
    est = survey.estimate_s(state)
    if est is None:
        return False, None
    return est <= float(survey.grid.budget_cpu_h) * 3600, est


def run_grid(grid: DictConfig, progress: bool = True) -> Survey:
    """Compute every pending run of the grid (small groups first, then affordable large ones)
    and pack each run's records as soon as it ends.

    Without ``grid.launcher`` each run is one ``python -m editbench`` process, ``grid.jobs`` at
    a time. With a Hydra launcher (``local``/``joblib``, ``submitit_local``, ``slurm``) the runs
    that differ in the editor only go together into one ``python -m editbench -m`` multirun that
    the launcher dispatches (``grid.jobs`` workers for joblib), one multirun at a time."""
    survey = Survey(grid)
    launcher = grid.get("launcher")
    todo = [s for s in survey.states.values() if s.pending() and all(n for n in s.planned.values())]
    waiting = [s for s in todo if s.run.estimate_from is not None]
    ready = [s for s in todo if s.run.estimate_from is None]
    ready.sort(key=survey.prior_s)
    total_cells = sum(1 for s in todo for T, n in s.planned.items() if n and s.status(T) != DONE)
    bar = tqdm(total=total_cells, desc="leaderboard cells", unit="cell", disable=not progress, dynamic_ncols=True)
    running: dict[Future, list[RunState]] = {}
    shown: dict[str, int] = {}   # run key -> cells counted done on the bar

    def in_flight() -> list[RunState]:
        return [s for unit in running.values() for s in unit]

    def left_s() -> float:
        queued = in_flight() + ready + waiting
        return sum(survey.estimate_s(s) or survey.prior_s(s) for s in queued) / int(grid.jobs)

    def count(s: RunState) -> None:   # cells of a run now done that the bar has not counted
        done = sum(1 for T in s.planned if s.status(T) == DONE)
        bar.update(max(0, done - shown.get(s.run.key, 0)))
        shown[s.run.key] = max(done, shown.get(s.run.key, 0))

    def show() -> None:
        names = ", ".join(f"{s.label} on {s.run.data}/{s.run.group}" for s in in_flight())
        bar.set_postfix_str(f"running: {names or '-'}; est. left {left_s() / 3600:.1f} h")

    for s in todo:
        shown[s.run.key] = sum(1 for T in s.planned if s.status(T) == DONE)
    try:
        with ThreadPoolExecutor(max_workers=1 if launcher else int(grid.jobs)) as pool:
            while True:
                # a group estimated from another starts once that one has ended (now or earlier)
                busy = in_flight() + ready
                for w in [w for w in waiting if not any(survey.source(w) is b for b in busy)]:
                    waiting.remove(w)
                    ok, est = affordable(survey, w)
                    if ok:
                        ready.append(w)
                    else:
                        bar.update(sum(1 for T, n in w.planned.items() if n))  # explained, not computed
                        log.info("not run %s: estimate %s CPU-h, budget %s CPU-h", w.run.key,
                                 "unknown" if est is None else f"{est / 3600:.2f}", grid.budget_cpu_h)
                while ready and len(running) < (1 if launcher else int(grid.jobs)):
                    unit = [s for s in ready if _sweep_key(s) == _sweep_key(ready[0])] if launcher else [ready[0]]
                    for s in unit:
                        ready.remove(s)
                        log.info("start %s: %s", s.run.key, s.run.command())
                    running[pool.submit(run_sweep, survey, unit) if launcher else
                            pool.submit(run_one, survey, unit[0])] = unit
                show()
                if not running:
                    break
                done, _ = wait(list(running), timeout=30, return_when=FIRST_COMPLETED)
                for s in in_flight():   # chunks written meanwhile move the bar
                    s.records.update(folder_records(survey.run_dir(s)))
                    count(s)
                for fut in done:
                    unit = running.pop(fut)
                    rc, last = fut.result()
                    for s in unit:
                        survey.refresh(s)
                        count(s)
                        if rc == 0 or not s.pending():
                            record_failure(survey.out, s.run.key, None)
                        else:
                            record_failure(survey.out, s.run.key, f"exit {rc}: {last}")
                            log.warning("%s failed (exit %d): %s", s.run.key, rc, last)
    finally:
        bar.close()
        pack_records(survey)
    return survey


def pack_records(survey: Survey) -> None:
    """Write every run's records (the committed pack and its work folder's chunks) into its pack,
    so that chunks written by a run started by hand or by an earlier, interrupted grid are kept."""
    for s in survey.states.values():
        if s.records:
            write_pack(pack_path(survey.out, s.run_id), s.records)


# =========================================================================== tables
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cell_rows(survey: Survey) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells: one row per editor x data x T with state, cost and command; summary: the summary
    rows of every complete cell)."""
    failures = read_failures(survey.out)
    cells, summaries = [], []
    budget = float(survey.grid.budget_cpu_h)
    for key, s in survey.states.items():
        for T, n in s.planned.items():
            status, note, est = s.status(T), "", None
            if status == NA:
                note = f"only {s.n_available} {survey.grid.split} records (< {s.run.n_cases} cases)"
            elif status in ("pending", "partial") and key in failures:
                status, note = "failed", failures[key]
            elif status in ("pending", "partial") and s.run.estimate_from is not None:
                est = survey.estimate_s(s)
                src = survey.source(s)
                per_case = src.seconds_per_case(max(src.run.steps)) if src else None
                if est is not None and est > budget * 3600:
                    status = "not run"
                    note = (f"{per_case:.2f} CPU-s per case at T={max(src.run.steps)}; "
                            f"est. {est / 3600:.1f} CPU-h > {budget:g} CPU-h budget")
            chunks = s.chunks(T)
            cpu = s.cpu_seconds(T)
            if status in (DONE, STALE):
                sm = summary_table(chunks, s.meta)
                sm.insert(0, "group", s.run.group)
                sm["status"] = status
                summaries.append(sm)
            cells.append({"editor": s.label, "editor_name": s.run.editor, "data": s.run.data, "T": T,
                          "status": status, "n_cases": n * T, "chunks_done": len(chunks), "chunks_total": n,
                          "cpu_s": cpu, "cpu_s_per_case": (cpu / (len(chunks) * T)) if cpu and chunks else None,
                          "est_cpu_h": None if est is None else est / 3600, "note": note, "run_id": s.run_id,
                          "command": s.run.command()})
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    return pd.DataFrame(cells), summary


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _value(summary: pd.DataFrame, editor: str, data: str, T: int, metric: str) -> float | None:
    if summary.empty:
        return None
    hit = summary[(summary.editor == editor) & (summary.data == data) & (summary["T"] == T) & (summary.metric == metric)]
    return float(hit["mean"].iloc[0]) if len(hit) else None


def _cell_text(cells: pd.DataFrame, summary: pd.DataFrame, editor: str, data: str, T: int, metric: str,
               digits: int = 3) -> str:
    c = cells[(cells.editor == editor) & (cells.data == data) & (cells["T"] == T)]
    if c.empty:
        return "-"
    status = c.status.iloc[0]
    if status in (DONE, STALE):
        v = _value(summary, editor, data, T, metric)
        return _fmt(v, digits) + ("†" if status == STALE and v is not None else "")
    return {NA: "n/a", "not run": "not run", "failed": "failed"}.get(status, status)


def metric_families(summary: pd.DataFrame, data: str) -> list[str]:
    """The probe families of a dataset (``generality/<family>``, ``locality/<family>``)."""
    if summary.empty:
        return []
    ms = summary[summary.data == data].metric.unique()
    return sorted(m for m in ms if m.split("/")[0] in ("generality", "locality") and "/" in m)


def markdown_table(cells: pd.DataFrame, summary: pd.DataFrame, data: str, metrics: Sequence[str],
                   Ts: Sequence[int], digits: int = 3, short: dict[str, str] | None = None) -> str:
    short = short or {}
    editors = list(dict.fromkeys(cells[cells.data == data].editor))
    head = ["editor"] + [f"{short.get(m, m)} T={T}" for T in Ts for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in editors:
        row = [e] + [_cell_text(cells, summary, e, data, T, m, digits) for T in Ts for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def notes_table(cells: pd.DataFrame, data: str) -> str:
    c = cells[(cells.data == data) & cells.status.isin(["not run", NA, "failed", "pending", "partial"])]
    if c.empty:
        return "Every cell of this dataset is computed."
    lines = ["| editor | T | state | chunks | note |", "|---|---|---|---|---|"]
    for r in c.itertuples():
        lines.append(f"| {r.editor} | {r.T} | {r.status} | {r.chunks_done}/{r.chunks_total} | {r.note} |")
    return "\n".join(lines)


SHORT = {"reliability": "rel", "generality": "gen", "locality": "loc", "wild_reliability": "rel",
         "wild_generality": "gen", "wild_locality": "loc", "edit_time_s": "s/edit", "infer_overhead": "overhead",
         "cpu_s_per_case": "CPU-s/case", "failed_cases": "failed"}


def dataset_page(survey: Survey, cells: pd.DataFrame, summary: pd.DataFrame, data: str, header: str) -> str:
    Ts = sorted(cells[cells.data == data]["T"].unique())
    parts = [f"# Leaderboard: {data}", "", header, "",
             "## Reliability / generality / locality (teacher forcing)", "",
             markdown_table(cells, summary, data, QUALITY, Ts, short=SHORT), ""]
    if not summary.empty and summary[(summary.data == data) & summary.metric.isin(WILD)].shape[0]:
        parts += ["## WILD (greedy generation, whole answer; docs/protocol.md)", "",
                  markdown_table(cells, summary, data, WILD, Ts, short=SHORT), ""]
    fams = metric_families(summary, data)
    if fams:
        parts += ["## Probe families (generality / portability and locality families)", ""]
        for T in Ts:
            parts += [f"T={T}:", "", markdown_table(cells, summary, data, fams, [T]), ""]
    parts += ["## Cost and failed cases", "",
              "`s/edit`: wall seconds per edit; `overhead`: inference seconds per query after the edits over "
              "before them; `CPU-s/case`: process CPU seconds of the whole chunk (scoring included) per case; "
              "`failed`: failed edits (scored as not edited).", "",
              markdown_table(cells, summary, data, COST, Ts, digits=2, short=SHORT), ""]
    gen = [m for m in summary.metric.unique() if m.startswith("general/")] if not summary.empty else []
    tasks = [t for t in GENERAL_TASKS if f"general/{t}" in gen]
    if tasks:
        gT = sorted(summary[(summary.data == data) & summary.metric.isin([f"general/{t}" for t in tasks])]["T"].unique())
        cols = [f"general/{t}" for t in tasks]
        parts += ["## General ability after the edits (unedited in the first row)", ""]
        editors = list(dict.fromkeys(cells[cells.data == data].editor))
        head = ["editor"] + [f"{t} T={T}" for T in gT for t in tasks]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        unedited = ["unedited model"] + [_fmt(_value(summary, editors[0], data, T, f"general/{t}_unedited"))
                                         for T in gT for t in tasks]
        lines.append("| " + " | ".join(unedited) + " |")
        for e in editors:
            lines.append("| " + " | ".join([e] + [_cell_text(cells, summary, e, data, T, c) for T in gT for c in cols])
                         + " |")
        parts += ["\n".join(lines), ""]
    parts += ["## Cells not computed", "", notes_table(cells, data), "",
              "† computed by other code than the current commit's (a rerun recomputes it).", ""]
    return "\n".join(parts)


def header_text(survey: Survey, cells: pd.DataFrame) -> str:
    cfg = compose(next(iter(survey.states.values())).run.overrides)
    cpu_h = cells.cpu_s.fillna(0).sum() / 3600
    return (f"Model: **{cfg.model.get('description') or cfg.model.name}** (`model={survey.grid.model}`); split "
            f"`{survey.grid.split}`; seed {survey.grid.seed}; "
            + "; ".join(f"the same seeded {g.n_cases} cases at T = {', '.join(map(str, g.steps))}"
                        for g in survey.grid.groups.values())
            + f". Commit `{_git_commit()}`; command "
            f"`python -m editbench.leaderboard` (conf/leaderboard.yaml; each cell's own command in cells.csv); "
            f"machine: {machine()}; {survey.grid.threads} thread(s) per cell; CPU time of the computed cells "
            f"{cpu_h:.1f} CPU-h (per cell in cells.csv). Means over every case (failed edits count as not "
            f"edited); 95% bootstrap CIs in summary.csv.")


def plot_dataset(cells: pd.DataFrame, summary: pd.DataFrame, data: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    Ts = sorted(cells[cells.data == data]["T"].unique())
    for ax, metric in zip(axes, QUALITY):
        for e in dict.fromkeys(cells[cells.data == data].editor):
            xs = [T for T in Ts if _cell_text(cells, summary, e, data, T, metric)[:1].isdigit()]
            ys = [_value(summary, e, data, T, metric) for T in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=e)
        ax.set_xscale("log")
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.set_title(f"{data}: {metric}")
        ax.set_xlabel("T (sequential edits)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_cost_quality(cells: pd.DataFrame, summary: pd.DataFrame, path: Path, T: int = 100) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(sorted(cells.data.unique()), "osD^v"))
    for data in sorted(cells.data.unique()):
        for e in dict.fromkeys(cells[cells.data == data].editor):
            rel, loc = (_value(summary, e, data, T, m) for m in ("reliability", "locality"))
            cost = _value(summary, e, data, T, "cpu_s_per_case")
            if rel is None or loc is None or not cost:
                continue
            ax.scatter(cost, rel * loc, marker=markers[data], s=40)
            ax.annotate(e, (cost, rel * loc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for data, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=data)
    ax.set_xscale("log")
    ax.set_xlabel(f"CPU-seconds per case at T={T} (edits and scoring)")
    ax.set_ylabel(f"reliability x locality at T={T}")
    ax.set_title(f"Edit cost against edit quality (T={T})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def headline(cells: pd.DataFrame, summary: pd.DataFrame, datasets: Iterable[str]) -> str:
    """zsRE and CounterFact at the largest T computed for every editor (else the largest computed)."""
    parts = []
    for data in datasets:
        c = cells[cells.data == data]
        if c.empty:
            continue
        done = c[c.status.isin([DONE, STALE])]
        if done.empty:
            parts.append(f"**{data}**: no cell computed yet.")
            continue
        Ts = sorted(done["T"].unique())
        full = [T for T in Ts if len(done[done["T"] == T]) == c.editor.nunique()]
        T = max(full) if full else max(Ts)
        parts += [f"**{data}, T = {T}** (reliability / generality / locality):", "",
                  markdown_table(cells, summary, data, QUALITY, [T], short=SHORT), ""]
    return "\n".join(parts)


def write_report(survey: Survey) -> Path:
    """summary.csv, cells.csv, <data>.md, README.md and the plots under ``grid.out``."""
    out = survey.out
    for key, state in survey.states.items():   # a failure that a later command computed past
        if not state.pending():
            record_failure(out, key, None)
    cells, summary = cell_rows(survey)
    atomic_write_csv(out / "cells.csv", cells)
    atomic_write_csv(out / "summary.csv", summary)
    header = header_text(survey, cells)
    datasets = list(survey.grid.datasets)
    for data in datasets:
        atomic_write_text(out / f"{data}.md", dataset_page(survey, cells, summary, data, header))
        plot_dataset(cells, summary, data, out / f"{data}_metrics.png")
    plot_cost_quality(cells, summary, out / "cost_quality.png")
    counts = cells.status.value_counts().to_dict()
    index = ["# Leaderboard", "", header, "", headline(cells, summary, [d for d in ("zsre_ke", "cf") if d in datasets]),
             "Cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" (of {len(cells)}).", "",
             "Per dataset: " + ", ".join(f"[{d}]({d}.md)" for d in datasets) + "; plots: "
             + ", ".join(f"[{d}]({d}_metrics.png)" for d in datasets) + ", [cost vs quality](cost_quality.png); "
             "raw rows with CIs: [summary.csv](summary.csv); every cell's state, cost and command: "
             "[cells.csv](cells.csv). How to read it: docs/leaderboard.md.", ""]
    atomic_write_text(out / "README.md", "\n".join(index))
    return out


def update_readme(survey: Survey, readme: Path = ROOT / "README.md") -> bool:
    """Replace the block between the leaderboard markers of the project README by the headline."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    cells, summary = cell_rows(survey)
    block = (f"{README_START}\n{headline(cells, summary, [d for d in ('zsre_ke', 'cf') if d in survey.grid.datasets])}"
             f"\nModel {compose(next(iter(survey.states.values())).run.overrides).model.get('description')}; "
             f"the whole grid, its cost and the cells not computed: [results/leaderboard/](results/leaderboard/README.md)."
             f"\n{README_END}")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, head + block + tail)
    return True


# =========================================================================== rank agreement
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs or when
    either side is constant."""
    x, y = pd.Series(list(a), dtype=float).rank(), pd.Series(list(b), dtype=float).rank()
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan")
    return float(x.corr(y))


def rank_agreement(ours: pd.DataFrame, theirs: pd.DataFrame, steps: Sequence[int] = (10,),
                   metrics: Sequence[str] = ("reliability", "locality")) -> pd.DataFrame:
    """How well a leaderboard computed on other records (``theirs``, its summary.csv) ranks the
    editors as ``ours`` does: per dataset, T and metric, Spearman's rho over the editors that both
    computed (teacher-forced means; a WILD metric by its name, e.g. ``wild_reliability``)."""
    def means(s: pd.DataFrame, data: str, T: int, metric: str) -> pd.Series:
        sel = s[(s["data"] == data) & (s["T"] == T) & (s["metric"] == metric)]
        return sel.groupby("editor")["mean"].first()

    rows = []
    for data in sorted(set(ours["data"]) & set(theirs["data"])):
        for T in steps:
            for metric in metrics:
                a, b = means(ours, data, T, metric), means(theirs, data, T, metric)
                common = sorted(set(a.index) & set(b.index))
                rows.append({"data": data, "T": T, "metric": metric, "editors": len(common),
                             "spearman": spearman(a[common], b[common]), "order_ours": " > ".join(a[common].sort_values(ascending=False).index),
                             "order_theirs": " > ".join(b[common].sort_values(ascending=False).index)})
    return pd.DataFrame(rows, columns=["data", "T", "metric", "editors", "spearman", "order_ours", "order_theirs"])


# =========================================================================== command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editbench.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of conf/leaderboard.yaml")
    parser.add_argument("--report", action="store_true", help="compute nothing: pack the finished chunks of every run folder into records/ and rebuild the tables and plots")
    parser.add_argument("--list", action="store_true", help="print every cell's state and command; compute nothing")
    parser.add_argument("--readme", action="store_true", help="also put the headline into README.md")
    parser.add_argument("--grid", type=Path, default=GRID_FILE, help="the grid file (default conf/leaderboard.yaml)")
    parser.add_argument("--compare", type=Path, metavar="OTHER",
                        help="compute nothing: Spearman rank agreement of the editors at T=10 (reliability, locality) "
                             "between this leaderboard and OTHER (another leaderboard's out folder or summary.csv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("editbench.data", "editbench.plan"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        grid = load_grid(args.overrides, args.grid)
        if args.compare is not None:
            paths = [Path(grid.out) / "summary.csv", args.compare / "summary.csv" if args.compare.is_dir() else args.compare]
            for path in paths:
                if not path.is_file():
                    raise ValueError(f"{path}: no leaderboard summary.csv there")
            table = rank_agreement(*(pd.read_csv(p) for p in paths))
            with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 120):
                print(table.to_string(index=False))
            return 0
        if args.list:
            cells, _ = cell_rows(Survey(grid))
            with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
                print(cells[["editor", "data", "T", "status", "chunks_done", "chunks_total", "est_cpu_h", "note"]])
            return 0
        if args.report:
            survey = Survey(grid)
            pack_records(survey)
        else:
            survey = run_grid(grid)
        tables = table_grid(args.overrides, args.grid)
        if tables is not None:
            survey = Survey(tables)
        out = write_report(survey)
        if args.readme and update_readme(survey):
            print("README.md: headline updated")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks are kept in the records; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(f"leaderboard: {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
