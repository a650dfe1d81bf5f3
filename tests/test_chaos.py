"""Chaos test of a grid: a real 2x2x2 Hydra sweep through the joblib launcher, killed with
SIGKILL (the whole process group: the launcher and its loky workers) at N moments drawn from
a seeded RNG, rerun with the same command after each kill, and finally compared with an
uninterrupted run of the same grid (docs/reliability.md, "Chaos test of a grid").

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
left in a run folder (mid-write), an edit logged for a chunk whose file is not there
(mid-chunk), no job past its start (start-up).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from hydra.experimental.callback import Callback

from editbench.models import load_model
from editbench.plan import edit_seed, run_id
from editbench.registry import EDITORS, register
from editbench.results import NONDETERMINISTIC_METRICS
from editbench.runner import run
from editors.ft import FT
from tests.conftest import ROOT, compose_cfg

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
AIMS = ["start-up"] * 3 + ["chunk"] * 4 + ["write:chunk", "write:table", "write:any"]
#: a write-aimed kill that has not seen its write fires anyway once the attempt wrote this many chunks
WRITE_FALLBACK_CHUNKS = 6


class ChaosFT(FT):
    """FT that appends ``<model_type> <objective> <seed of this edit>`` to $EDITBENCH_CHAOS_EDIT_LOG
    before each edit (one short O_APPEND write: the lines of the two workers do not interleave)."""

    def edit(self, request):
        path = os.environ.get(EDIT_LOG)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{self.model.config.model_type} {self.hp.objective} {torch.initial_seed()}\n")
        return super().edit(request)


if "chaos-ft" not in EDITORS:  # pytest and a job process may import this module under two names
    register("chaos-ft")(ChaosFT)


class RegisterChaosEditor(Callback):
    """Hydra callback: the launcher imports this module in each job process, registering ``chaos-ft``."""


# --------------------------------------------------------------------------- the grid's layout
def _cells() -> list[tuple[str, str, int]]:
    return [(m, o, s) for m in MODELS for o in OBJECTIVES for s in SEEDS]


def _cell_cfg(model: str, objective: str, seed: int, out: Path):
    return compose_cfg(f"model={model}", f"editor.objective={objective}", f"runner.seed={seed}", *COMMON,
                       f"out_dir={out}")


def _layout(out: Path) -> tuple[dict[str, list[str]], dict[tuple[str, str, int], tuple[str, str]]]:
    """{run folder: its chunk files}, and {(model_type, objective, edit seed): (run folder, chunk file)}."""
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
    with open(log, "w") as f:
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "editbench", "-m", *SWEEP, f"out_dir={out}"], cwd=ROOT,
                             env=_env(**{EDIT_LOG: str(edit_log)}), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    before = _n_chunks(out)
    fire_at, seen, planned_at, looked = None, None, None, 0.0
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
                elif aim.startswith("write:") and out.is_dir():
                    want = aim.split(":")[1]
                    hits = [q for q in _partials(out) if want == "any" or _kind(q) == want]
                    if hits or _n_chunks(out) - before >= WRITE_FALLBACK_CHUNKS:
                        fire_at, seen = now, hits
            if fire_at is not None and now >= fire_at:
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0 if aim and aim.startswith("write:") else 0.002)
    finally:
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
def test_grid_killed_at_random_moments_ends_as_an_uninterrupted_run_and_computes_no_chunk_twice(tmp_path):
    chunk_files, edits = _layout(tmp_path / "any")

    # the uninterrupted reference, in this process (one thread, as the subprocesses)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tmp_path / "reference"
        for model in MODELS:
            lm = load_model(compose_cfg(f"model={model}").model)
            for m, objective, seed in _cells():
                if m == model:
                    run(_cell_cfg(model, objective, seed, ref), lm=lm)
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.parent.name for p in ref.glob("*/summary.csv")) == sorted(chunk_files)

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
        got = _attempt(out, tmp_path / f"attempt{a}.log", tmp_path / f"edits{a}.log", aim, rng, startup_s)
        assert not re.search(r"Traceback|Error executing job|in use by another process", got["output"]), \
            f"attempt {a} ({aim}) failed on resume:\n{got['output'][-4000:]}"
        if aim is None:
            assert got["rc"] == 0, f"the final attempt exited {got['rc']}:\n{got['output'][-4000:]}"
        else:
            assert got["rc"] == -signal.SIGKILL, (
                f"attempt {a} ({aim}) ended by itself with {got['rc']} before its kill: the grid is too small "
                f"for {N_KILLS} kills or a rerun failed:\n{got['output'][-4000:]}")
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

        if aim is not None:   # where the kill landed
            partials = _partials(out) if out.is_dir() else []
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
    assert tally["mid-chunk"] >= 1 and tally["mid-write"] >= 1 and tally["start-up"] >= 1, landed
