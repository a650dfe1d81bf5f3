"""The lifelong runner: protocol, reset verification, resume, result files."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from editbench.registry import register
from editbench.results import NONDETERMINISTIC_METRICS
from editbench.guard import WeightGuard
from editbench.plan import chunks_of, select_cases
from editbench.runner import run
from editbench.session import build_editor, check_compatible
from editors.ft import FT
from tests.conftest import compose_cfg, toy_cases


def _cfg(tmp_path, *overrides):
    return compose_cfg("model=tiny-llama", f"out_dir={tmp_path}", "runner.progress=false", *overrides)


def test_select_cases_is_seeded_and_chunks_drop_the_remainder():
    cases = toy_cases(7)
    a = select_cases(cases, 5, seed=3)
    assert [c.case_id for c in a] == [c.case_id for c in select_cases(cases, 5, seed=3)]
    assert [c.case_id for c in a] != [c.case_id for c in select_cases(cases, 5, seed=4)]
    assert [c.case_id for c in select_cases(cases, None, 0, shuffle=False)] == [c.case_id for c in cases]
    chunks, dropped = chunks_of(cases, 3)
    assert [len(c) for c in chunks] == [3, 3] and dropped == 1


def test_none_editor_has_locality_exactly_one(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, "editor=none", "runner.steps=[1,2,4]")
    path = run(cfg, cases=toy_cases(8), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv")
    loc = s[s.metric == "locality"]
    assert sorted(loc["T"]) == [1, 2, 4]
    assert (loc["mean"] == 1.0).all()
    rel = s[s.metric == "reliability"].set_index("T")["mean"]
    base = s[s.metric == "unedited/reliability"].set_index("T")["mean"]
    assert (rel == base).all()
    assert set(pd.read_csv(path / "cases.csv")["case_id"]) == {f"toy{i}" for i in range(8)}
    assert (path / "metrics.png").stat().st_size > 0
    assert {"config.yaml", "env.json"} <= {p.name for p in path.iterdir()}


def test_summary_columns_and_metrics(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, "editor=ft", "editor.objective=target_new", "runner.steps=[1,3]")
    path = run(cfg, cases=toy_cases(6), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv")
    assert list(s.columns) == ["editor", "model", "data", "split", "edit_batch_size", "T", "metric", "mean", "ci_low",
                               "ci_high", "n"]
    for m in ["reliability", "generality", "locality", "edit_time_s", "infer_time_s", "infer_overhead",
              "peak_mem_mb", "gen_exact_match", "locality/neighborhood"]:
        assert m in set(s.metric), m
    assert (s["ci_low"] <= s["mean"] + 1e-12).all() and (s["mean"] <= s["ci_high"] + 1e-12).all()
    rel = s[(s.metric == "reliability") & (s["T"] == 1)].iloc[0]
    assert rel["n"] == 6 and rel["mean"] > 0.8  # FT-M memorises a random model's target


def test_resume_recomputes_only_missing_chunks(tmp_path, tiny_llama, monkeypatch):
    calls = []
    original_edit = FT.edit
    monkeypatch.setattr(FT, "edit", lambda self, r: calls.append(r) or original_edit(self, r))
    cfg = _cfg(tmp_path, "editor=ft", "runner.steps=[1,2]")
    path = run(cfg, cases=toy_cases(4), lm=tiny_llama)
    assert len(calls) == 8
    first = pd.read_csv(path / "summary.csv")
    calls.clear()
    run(cfg, cases=toy_cases(4), lm=tiny_llama)
    assert calls == []  # everything was done
    (path / "chunks" / "T2-c1.json").unlink()
    run(cfg, cases=toy_cases(4), lm=tiny_llama)
    assert len(calls) == 2  # only the missing chunk
    again = pd.read_csv(path / "summary.csv")
    quality = ~first.metric.isin(NONDETERMINISTIC_METRICS)
    pd.testing.assert_frame_equal(first[quality].reset_index(drop=True), again[quality].reset_index(drop=True))


def test_reset_verification_catches_an_editor_that_does_not_restore(tiny_llama):
    @register("leaky-test")
    class Leaky(FT):
        def reset(self):  # forgets to restore the weights
            self._originals.clear()

    cfg = compose_cfg("model=tiny-llama", "editor=ft").editor
    editor = Leaky(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch, cfg)
    guard = WeightGuard(tiny_llama.model)
    editor.edit(toy_cases(1)[0].request)
    touched = editor.touched_parameters()
    backup = {n: editor._originals[n].clone() for n in touched}
    editor.reset()
    with pytest.raises(RuntimeError, match="leaky-test.*bit for bit"):
        guard.verify(touched, editor.name)
    with torch.no_grad():
        for n, t in backup.items():
            tiny_llama.model.get_parameter(n).copy_(t)
    guard.verify(touched, editor.name)


def test_reset_verification_catches_a_left_hook(tiny_llama):
    guard = WeightGuard(tiny_llama.model)
    handle = tiny_llama.model.get_submodule(tiny_llama.arch.name("mlp", 1)).register_forward_hook(
        lambda m, i, o: o)
    try:
        with pytest.raises(RuntimeError, match="hooked"):
            guard.verify([], "hooky")
    finally:
        handle.remove()
    guard.verify([], "hooky")


def test_unknown_editor_lists_valid_names():
    cfg = compose_cfg("model=tiny-llama")
    cfg.editor.name = "nope"
    with pytest.raises(ValueError, match="unknown editor 'nope'; valid editors: .*ft.*none"):
        check_compatible(cfg)


def test_unsupported_family_fails_before_loading(monkeypatch):
    cfg = compose_cfg("model=gptj", "editor=ft")
    monkeypatch.setattr(FT, "supported_families", ("llama",))
    with pytest.raises(ValueError, match="does not support the gptj architecture"):
        check_compatible(cfg)


def test_batch_edit_requires_support():
    cfg = compose_cfg("model=tiny-llama", "editor=ft", "runner.batch_edit=true")
    with pytest.raises(ValueError, match="no batched edit"):
        check_compatible(cfg)


def test_batch_mode_runs_for_editors_that_support_it(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, "editor=none", "runner.batch_edit=true", "runner.steps=[3]")
    path = run(cfg, cases=toy_cases(3), lm=tiny_llama)
    rec = json.loads((path / "chunks" / "T3-c0.json").read_text())
    assert len(rec["cases"]) == 3


def test_build_editor_rejects_unknown_hyperparameter(tiny_llama):
    cfg = compose_cfg("model=tiny-llama", "editor=ft", "+editor.lrr=1")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lrr'\]"):
        build_editor(cfg, tiny_llama)


# --------------------------------------------------------------------------- runner.edit_batch_size
from editbench.plan import edit_schedule, run_id  # noqa: E402
from editbench.records import EditFailed  # noqa: E402
from editbench.registry import EDITORS  # noqa: E402
from editors.none import NoEdit  # noqa: E402
from tests.test_locate import stats_env  # noqa: E402,F401 - the fixture


class BatchRecorder(NoEdit):
    """No-op edits that record the size of every editor call; a batch holding Country2 fails."""

    calls: list[tuple[str, int]] = []

    def edit(self, request):
        BatchRecorder.calls.append(("edit", 1))

    def edit_batch(self, requests):
        BatchRecorder.calls.append(("edit_batch", len(requests)))
        if any(r.subject == "Country2" for r in requests):
            raise EditFailed("the batch did not converge")
        return {"batch_of": len(requests)}


if "test-batch-recorder" not in EDITORS:
    register("test-batch-recorder")(BatchRecorder)


def test_edit_batch_size_applies_consecutive_batches_and_a_failed_batch_fails_only_its_cases(tmp_path, tiny_llama):
    BatchRecorder.calls.clear()
    cfg = _cfg(tmp_path, "editor=none", "editor.name=test-batch-recorder", "runner.shuffle=false",
               "runner.steps=[5]", "runner.edit_batch_size=2")
    path = run(cfg, cases=toy_cases(5), lm=tiny_llama)
    # [0,1] ok; [2,3] fails -> reset, replay [0,1]; then [4] (the last batch is shorter)
    assert BatchRecorder.calls == [("edit_batch", 2), ("edit_batch", 2), ("edit_batch", 2), ("edit_batch", 1)]
    rec = json.loads((path / "chunks" / "T5-c0.json").read_text())
    status = {c["case_id"]: c["status"] for c in rec["cases"]}
    assert status == {"toy0": "ok", "toy1": "ok", "toy2": "failed", "toy3": "failed", "toy4": "ok"}
    assert [c["info"] for c in rec["cases"]][4] == {"batch_of": 1} and rec["edit_batch_size"] == 2
    s = pd.read_csv(path / "summary.csv")
    assert set(s["edit_batch_size"]) == {2}
    assert s.set_index("metric").loc["failed_cases", "mean"] == 2
    assert set(pd.read_csv(path / "cases.csv")["edit_batch_size"]) == {2}


def test_edit_schedule():
    cfg = compose_cfg("editor=memit", "runner.edit_batch_size=4")
    groups, batched = edit_schedule(cfg, 10, True)
    assert [list(g) for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and batched
    assert edit_schedule(compose_cfg("editor=ft", "runner.edit_batch_size=1"), 3, False) == \
        ([range(0, 1), range(1, 2), range(2, 3)], False)
    assert edit_schedule(compose_cfg("editor=memit", "runner.batch_edit=true"), 3, True) == ([range(0, 3)], True)
    assert edit_schedule(compose_cfg("editor=memit"), 2, True) == ([range(0, 1), range(1, 2)], False)
    # B overrides an editor's own batch protocol (MALMEN: editor.batch_edit=true)
    assert edit_schedule(compose_cfg("editor=malmen", "runner.edit_batch_size=2"), 4, True) == \
        ([range(0, 2), range(2, 4)], True)


def test_edit_batch_size_above_one_needs_batch_support_and_is_in_the_run_id():
    with pytest.raises(ValueError, match=r"runner.edit_batch_size=2 but editor 'ft' has no batched edit"):
        check_compatible(compose_cfg("model=tiny-llama", "editor=ft", "runner.edit_batch_size=2"))
    check_compatible(compose_cfg("model=tiny-llama", "editor=ft", "runner.edit_batch_size=1"))   # plain edit()
    base = compose_cfg("editor=memit")
    assert run_id(compose_cfg("editor=memit", "runner.edit_batch_size=10")) != run_id(base)
    assert run_id(compose_cfg("editor=memit", "runner.edit_batch_size=10")) != \
        run_id(compose_cfg("editor=memit", "runner.edit_batch_size=100"))
    # unset, the id is that of a config without the key (runs made before it existed resume)
    from omegaconf import OmegaConf, open_dict

    without = OmegaConf.create(OmegaConf.to_container(base))
    with open_dict(without):
        del without.runner["edit_batch_size"]
    assert run_id(without) == run_id(base)


def _case_metrics(path) -> dict:
    return {c["case_id"]: (c["status"], c["metrics"]) for rec in [json.loads(p.read_text())
                                                                  for p in sorted((path / "chunks").glob("*.json"))]
            for c in rec["cases"]}


def test_edit_batch_size_T_is_batch_edit_and_1_is_sequential(tmp_path, tiny_llama, stats_env):
    """On AlphaEdit (whose batch of one is its edit): B = T gives the numbers of
    runner.batch_edit=true, B = 1 those of sequential edits; summary.csv says B."""
    cases = toy_cases(3)
    common = ("editor=alphaedit", "runner.steps=[3]", "runner.exact_match=false", *stats_env)
    runs = {name: run(_cfg(tmp_path / name, *common, *extra), cases=cases, lm=tiny_llama)
            for name, extra in [("B3", ["runner.edit_batch_size=3"]), ("batch", ["runner.batch_edit=true"]),
                                ("B1", ["runner.edit_batch_size=1"]), ("seq", [])]}
    assert _case_metrics(runs["B3"]) == _case_metrics(runs["batch"])
    assert _case_metrics(runs["B1"]) == _case_metrics(runs["seq"])
    assert _case_metrics(runs["B1"]) != _case_metrics(runs["B3"])   # the two protocols differ on this model
    sizes = {name: set(pd.read_csv(p / "summary.csv")["edit_batch_size"]) for name, p in runs.items()}
    assert sizes == {"B3": {3}, "batch": {3}, "B1": {1}, "seq": {1}}
    assert len({p.name for p in runs.values()}) == 4   # four run ids
