"""Hugging Face datasets as data.path (editbench/data/hub.py): a dataset saved in the hub layout is
read by the same loaders as the file; offline, the error says what to download and where."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from editbench.data import evaluation_cases, load_cases
from editbench.validate import validate_config
from tests.conftest import compose_cfg

datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install -e \".[hub]\")")

ROOT = Path(__file__).resolve().parents[1]


def _records(n: int = 6) -> list[dict]:
    """Flat CounterFact records (the layout of azhx/counterfact's rows), one a list-valued field."""
    return [{"case_id": f"hub{i}", "prompt": f"The mother tongue of person {i} is", "subject": f"person {i}",
             "target_new": "French", "ground_truth": "English",
             "rephrase_prompt": f"Person {i} grew up speaking",
             "locality_prompt": [f"The capital of country {i} is"], "locality_ground_truth": [f"City {i}"]}
            for i in range(n)]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_dataset_saved_to_disk_is_read_through_data_path_like_the_same_records_in_a_file(tmp_path, cache):
    saved = tmp_path / "counterfact_hub"
    datasets.Dataset.from_list(_records()).save_to_disk(str(saved))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(_records()))

    cfg = compose_cfg("data=cf", f"data.path={saved}", "data.split=all")
    validate_config(cfg)
    cases = evaluation_cases(cfg.data)
    want = load_cases("cf", plain)
    assert [c.case_id for c in cases] == [f"hub{i}" for i in range(6)]
    assert [(c.request, c.generality, c.locality) for c in cases] == [(c.request, c.generality, c.locality)
                                                                      for c in want]
    assert len(list((cache / "hub").glob("counterfact_hub-train-*.json"))) == 1
    # the split of a DatasetDict is data.hub_split; the val/test split of editbench applies on top
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(2)),
                          "test": datasets.Dataset.from_list(_records(5))}).save_to_disk(str(dd))
    test = evaluation_cases(compose_cfg("data=cf", f"data.path={dd}", "+data.hub_split=test", "data.split=all").data)
    assert len(test) == 5
    with pytest.raises(ValueError, match=r"data.hub_split='dev': .* holds the splits train, test"):
        evaluation_cases(compose_cfg("data=cf", f"data.path={dd}", "+data.hub_split=dev").data)


def test_a_folder_of_data_files_in_the_hub_layout_with_a_data_files_pattern(tmp_path, cache):
    repo = tmp_path / "KnowEdit"          # like a clone of zjunlp/KnowEdit: benchmark/<name>/<file>
    (repo / "benchmark" / "cf").mkdir(parents=True)
    (repo / "benchmark" / "cf" / "test_cf.json").write_text(json.dumps(_records(4)))
    (repo / "benchmark" / "cf" / "train_cf.json").write_text(json.dumps(_records(3)))
    cfg = compose_cfg("data=cf", f"data.path={repo}", "data.split=all", "+data.data_files=benchmark/cf/test_*.json")
    validate_config(cfg)
    assert [c.case_id for c in evaluation_cases(cfg.data)] == [f"hub{i}" for i in range(4)]


def test_a_bad_record_in_a_hub_dataset_names_the_record_and_the_field(tmp_path, cache):
    rows = _records(3)
    rows[1]["target_new"] = ""
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(Exception, match=r"record 1, field 'target_new'"):
        evaluation_cases(compose_cfg("data=cf", f"data.path={tmp_path / 'bad'}", "data.split=all").data)


def test_offline_a_hub_id_is_one_line_saying_what_to_download_and_where(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "EDITBENCH_CACHE": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "editbench", "data=cf", "data.path=azhx/counterfact", "editor=none",
                        "model=tiny-llama", f"out_dir={tmp_path}/out"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "azhx/counterfact" in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "datasets.load_dataset('azhx/counterfact', split='train').save_to_disk('<dir>')" in lines[0]
    assert "set data.path=<dir>" in lines[0]
