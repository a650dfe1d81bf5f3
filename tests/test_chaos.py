"""Chaos test of a grid: a real 2x2x2 Hydra sweep through the joblib launcher, killed with
SIGKILL (the whole process group: the launcher and its loky workers) at N moments drawn from
a seeded RNG, rerun with the same command after each kill, and finally compared with an
uninterrupted run of the same grid (docs/reliability.md, "Chaos test of a grid").

The grid: tiny-llama and tiny-gptj x FT-L and FT-M (``editor.objective``) x seeds 0 and 1, each
cell ``runner.steps=[1,2]`` on 3 cases (three T=1 chunks and one T=2 chunk, the third case
dropped): 8 run folders, 32 chunk files, two worker processes. N = 10 kills, aimed (in an order
the seeded RNG shuffles) 4 at start-up (a random fraction of the previous attempt's start-up),
3 after the 1st-3rd edit of the attempt (mid-chunk), and 3 at writes: the creation of an atomic
write's temporary file of a chunk record, of a table, or of any file (seen through Linux
inotify, so the kill lands between ``mkstemp`` and the rename).

What is checked, with nothing mocked:

* every run's summary.csv (and cases.csv) equals the uninterrupted reference's bit for bit,
  timing and memory rows aside (``results.NONDETERMINISTIC_METRICS``, the ``edit_time_s``
  column);
* no chunk is computed again once its file is written: a chunk file keeps its inode, mtime and
  contents from the first moment it is seen to the end, and no edit of a written chunk starts
  in a later attempt. Edits are counted by a real registered editor (FT that appends one line
  per edit to a log file before making it); the line holds the seed the runner set for that
  edit (``editbench.plan.edit_seed(seed, T, chunk, k)``, read back with
  ``torch.initial_seed()``), which names the run, T, chunk and position of the edit;
* no attempt crashes on resume (a killed attempt dies of SIGKILL, never of an error), the
  final one exits 0, and no temporary file is left.

Where each kill landed is read from evidence after it: a temporary file of an atomic write
left in a run folder by this kill (mid-write), an edit logged for a chunk whose file is not
there (mid-chunk), no job past its start (start-up). At least one kill must land in each. On a
loaded machine (CI runs two test workers) an attempt can finish its part of the grid before the
kill aimed at it fires: such a miss exits 0 and is tallied; at most 3 of the 10 may miss.

Cost (docs/reliability.md): the uninterrupted reference runs in this process, in a background
thread at nice 19, while the attempts run; the launcher process imports no torch (the Hydra
callback below is light and editbench.cli imports lazily), so most of an attempt is its two
workers' imports.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# Light imports only at module level: the sweep's launcher process imports this module for its
# Hydra callback, and must not pay for torch / transformers on each of the 11 attempts.
from hydra.experimental.callback import Callback

ROOT = Path(__file__).resolve().parents[1]

EDIT_LOG = "EDITBENCH_CHAOS_EDIT_LOG"
#: the number of kills that must land (the process still running when SIGKILL is sent)
N_KILLS = 10
SEED = 24
MODELS = {"tiny-llama": "llama", "tiny-gptj": "gptj"}   # config name -> model_type
OBJECTIVES = ("prompt_last", "target_new")              # two editors: FT-L and FT-M
SEEDS = (0, 1)
STEPS = (1, 2)
N_CASES = 3   # T=1: chunks 0-2; T=2: chunk 0 (the third case is dropped)
COMMON = ["editor=ft", "editor.name=chaos-ft", "editor.num_steps=3", f"runner.steps=[{','.join(map(str, STEPS))}]",
          f"runner.n_cases={N_CASES}", "runner.exact_match=false", "runner.progress=false"]
SWEEP = ["hydra/launcher=local", "hydra.launcher.n_jobs=2",
         "+hydra.callbacks.chaos._target_=tests.test_chaos.RegisterChaosEditor",
         f"model={','.join(MODELS)}", f"editor.objective={','.join(OBJECTIVES)}",
         f"runner.seed={','.join(map(str, SEEDS))}", *COMMON]
#: where a kill may be aimed (the RNG orders them); where it landed is read from evidence after it
AIMS = ["start-up"] * 4 + ["chunk"] * 3 + ["write:chunk", "write:table", "write:any"]
#: a write-aimed kill that has not seen its write fires anyway once the attempt wrote this many chunks
WRITE_FALLBACK_CHUNKS = 6


def register_chaos_editor() -> None:
    """Register ``chaos-ft``: FT that appends ``<model_type> <objective> <seed of this edit>`` to
    $EDITBENCH_CHAOS_EDIT_LOG before each edit (one short O_APPEND write: the lines of the two
    workers do not interleave)."""
    import torch

    from editbench.registry import EDITORS, register
    from editors.ft import FT

    if "chaos-ft" in EDITORS:   # pytest and a job process may import this module under two names
        return

    @register("chaos-ft")
    class ChaosFT(FT):
        def edit(self, request):
            path = os.environ.get(EDIT_LOG)
            if path:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(f"{self.model.config.model_type} {self.hp.objective} {torch.initial_seed()}\n")
            return super().edit(request)


class RegisterChaosEditor(Callback):
    """Hydra callback: registers ``chaos-ft`` in each job process when its job starts (the launcher
    process only instantiates it, without importing torch)."""

    def on_job_start(self, config, **kwargs) -> None:
        register_chaos_editor()


# --------------------------------------------------------------------------- the grid's layout
def _cells() -> list[tuple[str, str, int]]:
    return [(m, o, s) for m in MODELS for o in OBJECTIVES for s in SEEDS]


def _cell_cfg(model: str, objective: str, seed: int, out: Path):
    from tests.conftest import compose_cfg

    return compose_cfg(f"model={model}", f"editor.objective={objective}", f"runner.seed={seed}", *COMMON,
                       f"out_dir={out}")


def _layout(out: Path) -> tuple[dict[str, list[str]], dict[tuple[str, str, int], tuple[str, str]]]:
    """{run folder: its chunk files}, and {(model_type, objective, edit seed): (run folder, chunk file)}."""
    from editbench.plan import edit_seed, run_id

    chunks, edits = {}, {}
    for model, objective, seed in _cells():
        folder = run_id(_cell_cfg(model, objective, seed, out))
        chunks[folder] = []
        for T in STEPS:
            for idx in range(N_CASES // T):
                name = f"T{T}-c{idx}.json"
                chunks[folder].append(name)
                for k in range(T):
                    key = (MODELS[model], objective, edit_seed(seed, T, idx, k))
                    assert key not in edits, f"edit seeds collide: {key}"
                    edits[key] = (folder, name)
    return chunks, edits


def _logged_edits(path: Path, edits: dict) -> list[tuple[str, str]]:
    """The (run folder, chunk file) of every edit line in ``path``."""
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        family, objective, seed = line.split(" ")
        out.append(edits[(family, objective, int(seed))])
    return out


def _stamps(out: Path) -> dict[tuple[str, str], tuple[int, int, str]]:
    """(inode, mtime_ns, SHA-256) of every chunk file."""
    stamps = {}
    for p in out.glob("*/chunks/T*-c*.json"):
        st = p.stat()
        stamps[(p.parent.parent.name, p.name)] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return stamps


def _partials(out: Path) -> list[str]:
    """Temporary files of atomic writes (``.<name>.<random>``) in the run folders."""
    found = []
    for folder in [*out.glob("*/"), *out.glob("*/chunks/")]:
        if folder.name == "multirun":
            continue
        with os.scandir(folder) as it:
            found += [e.name for e in it if e.name.startswith(".") and e.name != ".lock" and e.is_file()]
    return found


def _kind(partial: str) -> str:
    name = partial[1:]
    if re.match(r"T\d+-c\d+\.json\.", name):
        return "chunk"
    if name.startswith(("cases.csv.", "summary.csv.")):
        return "table"
    if name.startswith("metrics.png."):
        return "figure"
    return "config"   # config.yaml, env.json


class _CreatedFiles:
    """Linux inotify on ``root`` and every folder created below it (run folders, ``chunks/``):
    the paths of files created or renamed into place, as they happen. A write-aimed kill fires on
    the creation of the atomic write's temporary file, so it lands between ``mkstemp`` and the
    rename (the write and its fsync still to come) without a polling loop taking a core."""

    IN_MOVED_TO, IN_CREATE, IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x80, 0x100, 0x40000000, 0o4000, 0o2000000

    def __init__(self, root: Path):
        import ctypes
        import ctypes.util

        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        self.pending: list[Path] = []
        self.add(root, new=False)

    def add(self, folder: Path, new: bool = True) -> None:
        """Watch ``folder`` and its subfolders; files already there count as created when the
        folder itself is ``new`` (created after the watch began), else they are old."""
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_CREATE | self.IN_MOVED_TO)
        if wd < 0 or wd in self.folders:
            return
        self.folders[wd] = folder
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.is_dir():
                        self.add(Path(entry.path), new)
                    elif new:
                        self.pending.append(Path(entry.path))
        except FileNotFoundError:   # removed again at once
            pass

    def created(self, timeout: float) -> list[Path]:
        import select
        import struct

        out, self.pending = self.pending, []
        if not out and not select.select([self.fd], [], [], timeout)[0]:
            return out
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return out
        i = 0
        while i < len(buf):
            wd, mask, _, size = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + size].rstrip(b"\0").decode()
            i += 16 + size
            path = self.folders.get(wd, Path("?")) / name
            if mask & self.IN_ISDIR:
                self.add(path)
            else:
                out.append(path)
        return out + self.pending

    def close(self) -> None:
        os.close(self.fd)


def _alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the process group ``pgid`` remains."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# --------------------------------------------------------------------------- one attempt
def _attempt(out: Path, log: Path, edit_log: Path, aim: str | None, rng: random.Random,
             startup_s: float) -> dict:
    """Run the sweep command; unless ``aim`` is None, SIGKILL its process group at a moment
    drawn from ``rng`` for that aim. Returns what happened."""
    # the moment, drawn before the start: the same sequence of draws whatever the machine's speed
    delay = rng.uniform(0.1, 0.9) * startup_s if aim == "start-up" else rng.uniform(0.0, 0.2)
    nth_edit = rng.randint(1, 3)
    out.mkdir(parents=True, exist_ok=True)   # watched from the start (write aims)
    with open(log, "w") as f:
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "editbench", "-m", *SWEEP, f"out_dir={out}"], cwd=ROOT,
                             env=_env(**{EDIT_LOG: str(edit_log)}), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    before = _n_chunks(out)
    fire_at, seen, planned_at, looked, counted = None, None, None, 0.0, 0.0
    watch = _CreatedFiles(out) if aim and aim.startswith("write:") else None
    try:
        while p.poll() is None:
            now = time.monotonic() - t0
            assert now < 240, f"the sweep did not finish in 240 s:\n{log.read_text()[-3000:]}"
            if planned_at is None and now - looked > 0.02:
                looked = now
                if "chunk(s) planned" in log.read_text():
                    planned_at = now
            if aim is not None and fire_at is None:
                if aim == "start-up":
                    fire_at = delay
                elif aim == "chunk" and _count_lines(edit_log) >= nth_edit:
                    fire_at = now + delay
                elif watch is not None:
                    want = aim.split(":")[1]
                    hits = [q.name for q in watch.created(0.002) if q.name.startswith(".") and q.name != ".lock"
                            and (want == "any" or _kind(q.name) == want)]
                    look = now - counted > 0.05
                    counted = now if look else counted
                    if hits or (look and _n_chunks(out) - before >= WRITE_FALLBACK_CHUNKS):
                        fire_at = now = time.monotonic() - t0
                        seen = hits
            if fire_at is not None and now >= fire_at:
                os.killpg(p.pid, signal.SIGKILL)
                break
            if watch is None:
                time.sleep(0.002)
    finally:
        if watch is not None:
            watch.close()
        if p.poll() is None and aim is None:
            os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait(timeout=60)
        deadline = time.monotonic() + 10
        while _alive(p.pid) and time.monotonic() < deadline:   # the loky workers die too
            time.sleep(0.01)
    return {"rc": rc, "killed_at": time.monotonic() - t0 if rc == -signal.SIGKILL else None,
            "planned_at": planned_at, "seen": seen, "output": log.read_text()}


def _n_chunks(out: Path) -> int:
    return len(list(out.glob("*/chunks/T*-c*.json")))


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- the test
def test_grid_killed_at_random_moments_ends_as_an_uninterrupted_run_and_computes_no_chunk_twice(tmp_path, monkeypatch):
    import pandas as pd
    import torch

    from editbench.models import load_model
    from editbench.results import NONDETERMINISTIC_METRICS
    from editbench.runner import run
    from tests.conftest import compose_cfg

    register_chaos_editor()
    chunk_files, edits = _layout(tmp_path / "any")

    # The uninterrupted reference, computed in this process with one torch thread (as the
    # subprocesses) in a background thread while the chaos attempts run: an attempt leaves a core
    # idle while its launcher starts. Its plots are skipped (only its tables are compared), and the
    # configs are composed here, before the thread starts (Hydra's compose is not thread-safe).
    ref = tmp_path / "reference"
    ref_jobs = [(compose_cfg(f"model={model}").model,
                 [_cell_cfg(m, objective, seed, ref) for m, objective, seed in _cells() if m == model])
                for model in MODELS]
    monkeypatch.setattr("editbench.report.plot_run", lambda *args, **kwargs: None)
    ref_errors: list[BaseException] = []

    def reference() -> None:
        try:
            try:   # Linux: this thread only uses the CPU time the attempts leave (nice 19)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            for model_cfg, cfgs in ref_jobs:
                lm = load_model(model_cfg)
                for cfg in cfgs:
                    run(cfg, lm=lm)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            ref_errors.append(err)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref_thread = threading.Thread(target=reference, name="chaos-reference", daemon=True)
    ref_thread.start()

    out = tmp_path / "chaos"
    rng = random.Random(SEED)
    aims = list(AIMS)
    rng.shuffle(aims)
    assert len(aims) == N_KILLS
    first_seen: dict[tuple[str, str], tuple[int, int, str]] = {}   # chunk -> its stamp when first seen
    written_in: dict[tuple[str, str], int] = {}                     # chunk -> the attempt that wrote it
    landed: list[dict] = []
    startup_s = 2.0   # until an attempt shows how long the start-up takes here
    for a, aim in enumerate(aims + [None]):
        left_before = set(_partials(out)) if out.is_dir() else set()   # by the previous kill, still there
        got = _attempt(out, tmp_path / f"attempt{a}.log", tmp_path / f"edits{a}.log", aim, rng, startup_s)
        assert not re.search(r"Traceback|Error executing job|in use by another process", got["output"]), \
            f"attempt {a} ({aim}) failed on resume:\n{got['output'][-4000:]}"
        if aim is None:
            assert got["rc"] == 0, f"the final attempt exited {got['rc']}:\n{got['output'][-4000:]}"
        else:   # killed; or, on a loaded machine, the attempt may finish its part of the grid before
            # the kill aimed at it fires (counted as missed below; too many misses fail the test)
            assert got["rc"] in (-signal.SIGKILL, 0), (
                f"attempt {a} ({aim}) exited {got['rc']}:\n{got['output'][-4000:]}")
        if got["planned_at"] is not None:
            startup_s = got["planned_at"]

        # no chunk written before this attempt was edited in it ...
        this = _logged_edits(tmp_path / f"edits{a}.log", edits)
        again = sorted({c for c in this if c in written_in})
        assert not again, f"attempt {a} recomputed chunk(s) written by an earlier attempt: {again}"
        # ... and every written chunk file is the one first seen (inode, mtime, contents)
        stamps = _stamps(out)
        changed = sorted(c for c in first_seen if stamps.get(c) != first_seen[c])
        assert not changed, f"chunk file(s) rewritten or removed after they were written: {changed}"
        for c, s in stamps.items():
            if c not in first_seen:
                first_seen[c], written_in[c] = s, a
                assert c in this, f"{c} was written in attempt {a} but none of its edits was logged in it"

        if aim is not None and got["rc"] == 0:
            landed.append({"aim": aim, "at": None, "where": ["missed (the attempt ended first)"],
                           "chunks_done": len(stamps)})
        elif aim is not None:   # where the kill landed
            partials = sorted(set(_partials(out)) - left_before)   # left by this kill
            in_progress = sorted({c for c in this if c not in stamps})
            where = []
            if "chunk(s) planned" not in got["output"]:
                where.append("start-up")
            elif not this and not partials:
                where.append("run set-up")
            if in_progress:
                where.append("mid-chunk")
            where += sorted({f"mid-write:{_kind(q)}" for q in partials})
            landed.append({"aim": aim, "at": round(got["killed_at"], 2), "where": where or ["between"],
                           "chunks_done": len(stamps)})
        else:   # the final attempt: exactly the chunks not yet written, each edited exactly T times
            missing = {c for c, w in written_in.items() if w == a}
            assert set(this) == missing and len(this) == sum(int(n[1:].split("-")[0]) for _, n in missing), this
            done_before = Counter(r for (r, _), w in written_in.items() if w < a)
            for run_dir, names in chunk_files.items():
                assert (f"{run_dir}: {len(names)} chunk(s) planned, {done_before[run_dir]} already done"
                        in got["output"]), got["output"][-3000:]

    ref_thread.join(timeout=240)
    torch.set_num_threads(threads)
    assert not ref_thread.is_alive(), "the reference run did not finish"
    if ref_errors:
        raise ref_errors[0]
    assert sorted(p.parent.name for p in ref.glob("*/summary.csv")) == sorted(chunk_files)

    # every chunk of the grid was written, once
    assert set(first_seen) == {(r, n) for r, names in chunk_files.items() for n in names}
    assert not _partials(out), f"temporary files left: {_partials(out)}"
    assert not list(out.glob("*/chunks/*/")), "chunks were set aside as invalid or rejected"

    # (a) every run's tables equal the uninterrupted run's, timings aside
    for run_dir in chunk_files:
        want, got = (pd.read_csv(p / run_dir / "summary.csv") for p in (ref, out))
        pick = lambda s: s[~s["metric"].isin(NONDETERMINISTIC_METRICS)].reset_index(drop=True)  # noqa: E731
        assert len(pick(want)) >= 2 * len(STEPS)
        pd.testing.assert_frame_equal(pick(got), pick(want), check_exact=True)
        want, got = (pd.read_csv(p / run_dir / "cases.csv").drop(columns="edit_time_s") for p in (ref, out))
        pd.testing.assert_frame_equal(got, want, check_exact=True)

    tally = Counter(w.split(":")[0] for k in landed for w in k["where"])
    print(f"\nchaos: {len(landed)} kills (seed {SEED}); landed: {dict(tally)}")
    for i, k in enumerate(landed):
        print(f"  kill {i}: aimed {k['aim']}, at {k['at']} s, landed {', '.join(k['where'])}, "
              f"{k['chunks_done']} of {sum(map(len, chunk_files.values()))} chunks written")
    assert len(landed) == N_KILLS
    assert tally["missed (the attempt ended first)"] <= 3, landed
    assert tally["mid-chunk"] >= 1 and tally["mid-write"] >= 1 and tally["start-up"] >= 1, landed
