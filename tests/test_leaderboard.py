"""The leaderboard (editbench/leaderboard.py): a real grid of real runs (child processes of
``python -m editbench`` on the tiny random model and the embedded sample data), its records,
resume from the committed records alone, the budget rule, and tables that equal the CSV.
The last test checks the committed leaderboard under results/leaderboard/ the same way."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from editbench import leaderboard as lb
from editbench.results import NONDETERMINISTIC_METRICS
from tests.conftest import ROOT

GRID = {
    "model": "tiny-llama", "split": "all", "seed": 0, "threads": 1, "jobs": 2, "budget_cpu_h": 2.0,
    "groups": {"small": {"n_cases": 4, "steps": [1, 2]},
               "large": {"n_cases": 8, "steps": [8], "estimate_from": "small"},
               "huge": {"n_cases": 100000, "steps": [100000], "estimate_from": "small"}},
    "common": [], "datasets": {"sample": []}, "editors": ["none", "ft"], "cell_overrides": {},
    "prior_s_per_case": {"default": 1.0},
}
NUMBER = re.compile(r"^-?\d+\.\d+†?$")


def _grid_file(tmp: Path, **changes) -> Path:
    spec = {**GRID, "out": str(tmp / "lb"), **changes}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of a page: (header, rows)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append((head, rows))
        else:
            i += 1
    return tables


SHORT_TO_METRIC = {"rel": "reliability", "gen": "generality", "loc": "locality", "s/edit": "edit_time_s",
                   "overhead": "infer_overhead", "CPU-s/case": "cpu_s_per_case", "failed": "failed_cases"}


def check_tables_equal_csv(out: Path, datasets) -> int:
    """Every number in the teacher-forced quality and cost tables of each <data>.md equals the
    corresponding mean of summary.csv (rounded as printed); every cell of cells.csv is a number
    or has its state named. Returns how many numbers were compared."""
    summary = pd.read_csv(out / "summary.csv") if (out / "summary.csv").stat().st_size > 1 else pd.DataFrame()
    cells = pd.read_csv(out / "cells.csv")
    compared = 0
    for data in datasets:
        text = (out / f"{data}.md").read_text(encoding="utf-8")
        sections = text.split("\n## ")
        for section in sections:
            title = section.splitlines()[0]
            if not (title.startswith("Reliability") or title.startswith("Cost")):
                continue
            digits = 2 if title.startswith("Cost") else 3
            for head, rows in _md_tables(section):
                for row in rows:
                    editor = row[0]
                    for col, text_value in zip(head[1:], row[1:]):
                        short, T = col.rsplit(" T=", 1)
                        cell = cells[(cells.editor == editor) & (cells.data == data) & (cells["T"] == int(T))]
                        assert len(cell) == 1, (data, editor, T)
                        status = cell.status.iloc[0]
                        if NUMBER.match(text_value):
                            assert status in ("done", "stale")
                            hit = summary[(summary.editor == editor) & (summary.data == data)
                                          & (summary["T"] == int(T)) & (summary.metric == SHORT_TO_METRIC[short])]
                            assert len(hit) == 1, (data, editor, T, short)
                            assert f"{hit['mean'].iloc[0]:.{digits}f}" == text_value.rstrip("†"), (data, editor, T, short)
                            compared += 1
                        else:
                            assert text_value in ("n/a", "not run", "failed", "pending", "partial", "-"), text_value
                            if text_value != "-":
                                assert status == {"n/a": "not applicable"}.get(text_value, text_value)
                            if status in ("not applicable", "not run", "failed"):
                                assert isinstance(cell.note.iloc[0], str) and cell.note.iloc[0]
    return compared


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    path = _grid_file(tmp)
    assert lb.main(["--grid", str(path)]) == 0
    return tmp, path


def test_the_grid_computes_every_cell_and_explains_the_rest(grid_run):
    tmp, path = grid_run
    out = tmp / "lb"
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 2 * 4  # 2 editors x T in {1, 2, 8, 100000}
    done = cells[cells["T"] < 100000]
    assert (done.status == "done").all() and (done.chunks_done == done.chunks_total).all()
    assert (done.cpu_s > 0).all()
    huge = cells[cells["T"] == 100000]
    assert (huge.status == "not applicable").all()
    assert huge.note.str.contains("records").all()
    # each cell names the command that computes it, which is a plain run of the harness
    assert cells.command.str.startswith("python -m editbench editor=").all()
    assert len(list((out / "records").glob("*.jsonl.gz"))) == 4
    assert check_tables_equal_csv(out, ["sample"]) > 0
    for f in ("README.md", "sample.md", "sample_metrics.png", "cost_quality.png", "summary.csv"):
        assert (out / f).is_file(), f


def test_a_rerun_computes_nothing_and_leaves_the_records_byte_identical(grid_run):
    tmp, path = grid_run
    out = tmp / "lb"
    packs = {p.name: p.read_bytes() for p in (out / "records").glob("*.jsonl.gz")}
    chunk_times = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("T*-c*.json")}
    starts = sum(p.read_text().count("\n### ") for p in (out / "runs" / "logs").glob("*.log"))
    survey = lb.run_grid(lb.load_grid([], path), progress=False)
    assert sum(p.read_text().count("\n### ") for p in (out / "runs" / "logs").glob("*.log")) == starts  # none started
    assert {p.name: p.read_bytes() for p in (out / "records").glob("*.jsonl.gz")} == packs
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("T*-c*.json")} == chunk_times
    assert all(s.pending() == 0 for s in survey.states.values() if all(s.planned.values()))


def test_a_fresh_clone_resumes_from_the_committed_records_alone(grid_run, tmp_path):
    tmp, path = grid_run
    clone = tmp_path / "clone"
    shutil.copytree(tmp / "lb", clone, ignore=shutil.ignore_patterns("runs"))
    before = pd.read_csv(clone / "summary.csv")
    grid = lb.load_grid([f"out={clone}"], path)
    survey = lb.Survey(grid)
    assert all(s.pending() == 0 for s in survey.states.values() if all(s.planned.values()))
    lb.run_grid(grid, progress=False)
    assert not (clone / "runs" / "logs").exists()  # nothing was computed
    after = pd.read_csv(clone / "summary.csv")
    quality = ~before.metric.isin(NONDETERMINISTIC_METRICS)
    pd.testing.assert_frame_equal(before[quality].reset_index(drop=True), after[quality].reset_index(drop=True))


def test_a_damaged_record_is_skipped_and_recomputed_not_read(grid_run, tmp_path):
    tmp, path = grid_run
    clone = tmp_path / "clone"
    shutil.copytree(tmp / "lb", clone, ignore=shutil.ignore_patterns("runs"))
    pack = next(p for p in sorted((clone / "records").glob("none_*.jsonl.gz")))
    lines = gzip.decompress(pack.read_bytes()).decode().splitlines()
    rec = json.loads(lines[0])
    rec["cases"][0]["metrics"]["reliability"] = 1.0 - rec["cases"][0]["metrics"]["reliability"]
    lines[0] = json.dumps(rec)
    pack.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    survey = lb.Survey(lb.load_grid([f"out={clone}"], path))
    state = next(s for s in survey.states.values() if s.run_id + ".jsonl.gz" == pack.name)
    assert state.pending() == 1


def test_a_cell_over_budget_is_not_run_and_says_what_it_would_cost(grid_run, tmp_path):
    tmp, _ = grid_run
    clone = tmp_path / "clone"
    shutil.copytree(tmp / "lb", clone, ignore=shutil.ignore_patterns("runs"))
    # drop the large group's records: its cells must now be estimated from the small group's T=2
    path = _grid_file(tmp_path, budget_cpu_h=0.0, out=str(clone))
    grid = lb.load_grid([], path)
    survey = lb.Survey(grid)
    for s in survey.states.values():
        if s.run.group == "large":
            lb.pack_path(clone, s.run_id).unlink()
    lb.write_report(lb.run_grid(grid, progress=False))
    cells = pd.read_csv(clone / "cells.csv")
    large = cells[cells["T"] == 8]
    assert (large.status == "not run").all()
    assert large.note.str.contains(r"CPU-s per case at T=2; est\. [0-9.]+ CPU-h > 0 CPU-h budget").all()
    assert (large.est_cpu_h > 0).all()
    assert check_tables_equal_csv(clone, ["sample"]) > 0


def test_through_the_joblib_launcher_the_grid_computes_the_same_numbers(grid_run, tmp_path):
    """``launcher=local``: the runs that differ in the editor only go into one Hydra multirun
    dispatched by the joblib launcher (two worker processes); the cells and their numbers are
    those of the process-per-run grid."""
    tmp, _ = grid_run
    path = _grid_file(tmp_path, out=str(tmp_path / "lb"), launcher="local", jobs=2,
                      groups={"small": GRID["groups"]["small"]})
    lb.write_report(lb.run_grid(lb.load_grid([], path), progress=False))
    logs = list((tmp_path / "lb" / "runs" / "logs").glob("sweep-*.log"))
    assert len(logs) == 1 and "hydra/launcher=local" in logs[0].read_text()   # one multirun for both editors
    got, want = (pd.read_csv(p / "summary.csv") for p in (tmp_path / "lb", tmp / "lb"))
    want = want[want["T"].isin([1, 2])]
    pick = lambda df: df[~df.metric.isin(NONDETERMINISTIC_METRICS)].sort_values(  # noqa: E731
        ["editor", "T", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pick(got), pick(want))


def test_computing_some_editors_keeps_every_editors_rows_in_the_tables(grid_run, tmp_path):
    """``editors=[none]`` restricts what is computed, not what the tables show: the other
    editors' finished cells stay in cells.csv, summary.csv and the Markdown table."""
    tmp, path = grid_run
    clone = tmp_path / "clone"
    shutil.copytree(tmp / "lb", clone, ignore=shutil.ignore_patterns("runs"))
    assert lb.main(["--grid", str(path), f"out={clone}", "editors=[none]"]) == 0
    cells = pd.read_csv(clone / "cells.csv")
    assert len(set(cells.editor)) == 2 and (cells[cells["T"] < 100000].status == "done").all()
    assert set(pd.read_csv(clone / "summary.csv").editor) == set(pd.read_csv(tmp / "lb" / "summary.csv").editor)
    assert lb.table_grid(["editors=[none]", "jobs=1"], path).editors == ["none", "ft"]
    assert lb.table_grid(["jobs=1"], path) is None
    assert check_tables_equal_csv(clone, ["sample"]) > 0


def test_failures_change_per_run_and_a_computed_run_loses_its_stale_failure(grid_run, tmp_path):
    """failures.json is changed one run at a time (re-read before each write), so a command does
    not bring back what another cleared; a report drops the failure of a run that is complete."""
    tmp, path = grid_run
    clone = tmp_path / "clone"
    shutil.copytree(tmp / "lb", clone, ignore=shutil.ignore_patterns("runs"))
    lb.write_failures(clone, {"none/sample/small": "exit 2: run folder in use", "ft/sample/huge": "exit 1: boom"})
    lb.record_failure(clone, "other/sample/small", "exit 1: from another command")
    assert set(lb.read_failures(clone)) == {"none/sample/small", "ft/sample/huge", "other/sample/small"}
    assert lb.main(["--grid", str(path), f"out={clone}", "--report"]) == 0
    left = lb.read_failures(clone)
    # none/small is complete and ft/huge has nothing to compute (fewer records than cases): both
    # stale failures are gone; a run this grid does not know keeps its entry
    assert set(left) == {"other/sample/small"}
    cells = pd.read_csv(clone / "cells.csv")
    assert (cells[(cells.editor == "none") & (cells["T"] < 100000)].status == "done").all()


def test_bad_grid_settings_fail_with_one_line(tmp_path):
    path = _grid_file(tmp_path)
    with pytest.raises(ValueError, match=r"jobs=0: must be a positive integer"):
        lb.load_grid(["jobs=0"], path)
    with pytest.raises(ValueError, match=r"bad override"):
        lb.load_grid(["no_such_key=1"], path)
    assert lb.main(["--grid", str(path), "jobs=0"]) == 2


COMMITTED = ROOT / "results" / "leaderboard"


@pytest.mark.skipif(not (COMMITTED / "cells.csv").is_file(), reason="no committed leaderboard (results/leaderboard/)")
def test_the_committed_leaderboard_has_every_cell_and_its_tables_equal_its_csv():
    grid = lb.load_grid()
    cells = pd.read_csv(COMMITTED / "cells.csv")
    for data in grid.datasets:
        for editor in grid.editors:
            for group in grid.groups.values():
                for T in group.steps:
                    hit = cells[(cells.editor_name == editor) & (cells.data == data) & (cells["T"] == T)]
                    assert len(hit) == 1, f"no cell {editor} x {data} x T={T} in cells.csv"
    assert check_tables_equal_csv(COMMITTED, list(grid.datasets)) >= 0


def _summary(values: dict[str, tuple[float, float]], data: str = "cf", T: int = 10) -> pd.DataFrame:
    return pd.DataFrame([{"editor": e, "data": data, "T": T, "metric": m, "mean": v}
                         for e, (rel, loc) in values.items() for m, v in (("reliability", rel), ("locality", loc))])


def test_rank_agreement_is_spearman_over_the_editors_both_computed(tmp_path, capsys):
    assert lb.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert lb.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert lb.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)       # 1 - 6*2/(3*8)
    assert lb.spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(0.8660254)  # average ranks for ties
    assert pd.isna(lb.spearman([1, 2], [1, 2])) and pd.isna(lb.spearman([1, 1, 1], [1, 2, 3]))
    ours = _summary({"none": (0.0, 1.0), "ft": (0.9, 0.3), "rome": (0.8, 0.9), "grace": (1.0, 0.95)})
    # other records: same reliability order, locality order of two editors swapped, an editor only there
    theirs = _summary({"none": (0.1, 1.0), "ft": (0.7, 0.95), "rome": (0.6, 0.9), "grace": (0.8, 0.2),
                       "extra": (0.5, 0.5)})
    table = lb.rank_agreement(ours, theirs).set_index("metric")
    assert table.loc["reliability", "editors"] == 4 and table.loc["reliability", "spearman"] == pytest.approx(1.0)
    assert table.loc["locality", "spearman"] == pytest.approx(lb.spearman([1.0, 0.3, 0.9, 0.95], [1.0, 0.95, 0.9, 0.2]))
    assert table.loc["reliability", "order_ours"] == "grace > ft > rome > none"
    # through the command line: this leaderboard's out folder against another summary.csv
    (tmp_path / "a").mkdir()
    ours.to_csv(tmp_path / "a" / "summary.csv", index=False)
    theirs.to_csv(tmp_path / "b.csv", index=False)
    assert lb.main([f"out={tmp_path / 'a'}", "--compare", str(tmp_path / "b.csv")]) == 0
    assert "grace > ft > rome > none" in capsys.readouterr().out
    assert lb.main([f"out={tmp_path / 'a'}", "--compare", str(tmp_path / "missing")]) == 2
