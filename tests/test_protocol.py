"""The publishable protocol (docs/protocol.md): disjoint val/test parts, code-keyed reuse."""
from __future__ import annotations

import importlib.util
import itertools
import json
import sys

import pandas as pd
import pytest

from editbench.data import evaluation_cases, in_val, load_train_cases
from editbench.fingerprint import chunk_code
from editbench.registry import editor_class
from editbench.records import EditCase, EditRequest, Probe
from editbench.runner import run
from editbench.train import ensure_trained, train_key, train_settings
from tests.conftest import compose_cfg, shared, write_train_file


# --------------------------------------------------------------------------- splits
def _ids(cfg_data) -> set[str]:
    return {c.case_id for c in evaluation_cases(cfg_data)}


def test_val_and_test_parts_of_a_file_are_disjoint_and_cover_it(tmp_path):
    path = write_train_file(tmp_path / "cf.json", n=200)
    parts = {split: _ids(compose_cfg("data=cf", f"data.path={path}", f"data.split={split}").data)
             for split in ("val", "test", "all")}
    assert parts["val"] and parts["test"] and not parts["val"] & parts["test"]
    assert parts["val"] | parts["test"] == parts["all"] and len(parts["all"]) == 200
    assert 5 <= len(parts["val"]) <= 40   # a hashed 10%
    # deterministic, and a property of the case alone (stable under n_cases, seeds, other records)
    assert parts["val"] == _ids(compose_cfg("data=cf", f"data.path={path}", "data.split=val").data)
    assert all(in_val(cid, 0.1, "editbench-val-1") for cid in parts["val"])
    half = write_train_file(tmp_path / "half.json", n=100)
    assert _ids(compose_cfg("data=cf", f"data.path={half}", "data.split=val").data) == \
        {cid for cid in parts["val"] if int(cid) < 100}


def test_runs_on_val_and_test_never_share_a_case(tmp_path, tiny_llama):
    path = write_train_file(tmp_path / "cf.json", n=120)
    seen = {}
    for split, seed in itertools.product(("val", "test"), (0, 1)):
        cfg = compose_cfg("model=tiny-llama", "editor=none", "data=cf", f"data.path={path}", f"data.split={split}",
                          "runner.steps=[1]", "runner.n_cases=8", f"runner.seed={seed}", f"out_dir={tmp_path}",
                          "runner.progress=false", "runner.exact_match=false")
        folder = run(cfg, lm=tiny_llama)
        summary = pd.read_csv(folder / "summary.csv")
        assert set(summary["split"]) == {split}
        seen.setdefault(split, set()).update(pd.read_csv(folder / "cases.csv")["case_id"].astype(str))
    assert not seen["val"] & seen["test"]


def test_a_val_part_from_the_train_file_keeps_the_test_file_whole_and_is_never_trained_on(tmp_path):
    train = write_train_file(tmp_path / "train.json", n=100)
    evalf = write_train_file(tmp_path / "eval.json", n=30)
    over = ("data=cf", f"data.path={evalf}", f"data.train_path={train}", "data.val.from=train", "data.val.fraction=0.2")
    test = _ids(compose_cfg(*over, "data.split=test").data)
    val = _ids(compose_cfg(*over, "data.split=val").data)
    trained_on = {c.case_id for c in load_train_cases(compose_cfg(*over).data, "x")}
    assert len(test) == 30 and val and not val & trained_on and len(val | trained_on) == 100


def test_the_real_files_split_as_documented():
    cf = compose_cfg("data=cf", f"data.path={shared('counterfact', 'counterfact-edit.json')}")
    val, test = _ids(compose_cfg(*_over(cf), "data.split=val").data), _ids(compose_cfg(*_over(cf)).data)
    assert not val & test and len(val) + len(test) == 10000 and 900 <= len(val) <= 1100
    ke = compose_cfg("data=zsre_ke", f"data.path={shared('zsre', 'ZsRE-test.knowedit.1k.json')}",
                     f"data.train_path={shared('zsre', 'zsre_mend_train.1k.json')}")
    assert len(evaluation_cases(ke.data)) == 1000                     # the test file stays whole
    ke_val = evaluation_cases(compose_cfg(*_over(ke), "data.split=val").data)
    assert 150 <= len(ke_val) <= 250
    assert not {c.request.prompt for c in ke_val} & {c.request.prompt for c in evaluation_cases(ke.data)}


def _over(cfg) -> list[str]:
    return [f"data={cfg.data.name}", f"data.path={cfg.data.path}"] + \
        ([f"data.train_path={cfg.data.train_path}"] if cfg.data.get("train_path") else [])


def test_a_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="data.split must be one of val, test, all"):
        evaluation_cases(compose_cfg("data=sample", "data.split=train").data)
    with pytest.raises(ValueError, match="data.val.fraction"):
        evaluation_cases(compose_cfg("data=sample", "data.split=val", "data.val.fraction=1.5").data)


# --------------------------------------------------------------------------- code-keyed reuse
EDITOR_SOURCE = '''
import torch
from torch import nn
from editbench.editor import Editor
from editbench.registry import register


@register("{name}")
class Toy(Editor):
    training = "pipeline"

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        torch.manual_seed(0)
        self.head = nn.Linear(arch.hidden_size, 1)

    def edit(self, request):
        return None

    def trainable(self):
        return self.head

    def training_loss(self, batch):
        loss = self.head.weight.square().sum()
        return loss, {{"l2": float(loss.detach())}}
'''


def _toy_editor(tmp_path, name: str):
    """A trained editor defined in a module file of its own (so the test can change its source)."""
    path = tmp_path / f"{name}.py"
    path.write_text(EDITOR_SOURCE.format(name=name))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return path


def _case(i: int) -> EditCase:
    return EditCase(f"c{i}", EditRequest(f"Fact {i} is", f"T{i}", f"S{i}", "x"), {},
                    {"loc": [Probe(f"Other {i} is", "y")]})


def test_changed_editor_source_recomputes_chunks_and_checkpoints_unless_reuse_stale(tmp_path, tiny_llama,
                                                                                   private_cache):
    name = f"toy_reuse_{tmp_path.name[-8:].replace('-', '_')}"
    source = _toy_editor(tmp_path, name)
    train = write_train_file(tmp_path / "train.json")
    over = ["model=tiny-llama", "editor=none", f"editor.name={name}", "data=cf", f"data.train_path={train}",
            "runner.steps=[2]", "runner.progress=false", "runner.exact_match=false", f"out_dir={tmp_path / 'out'}",
            "++editor.train={steps: 2, batch_size: 2, n_val: 0, progress: false}"]
    cases = [_case(i) for i in range(4)]
    folder = run(compose_cfg(*over), cases=cases, lm=tiny_llama)
    first = {p.name: json.loads(p.read_text()) for p in (folder / "chunks").glob("*.json")}
    checkpoints = sorted(private_cache.glob(f"trained/{name}/*/final.safetensors"))
    assert len(checkpoints) == 1

    # the same code: everything is reused
    run(compose_cfg(*over), cases=cases, lm=tiny_llama)
    assert {p.name: json.loads(p.read_text()) for p in (folder / "chunks").glob("*.json")} == first

    # a comment or docstring does not change what runs: the fingerprint stays
    code = chunk_code(editor_class(name))
    source.write_text('"""A docstring."""\n' + source.read_text() + "\n# a comment\n")
    assert chunk_code(editor_class(name)) == code

    # changed source: reused only with runner.reuse_stale=true, and then marked stale
    source.write_text(source.read_text() + "\nCHANGED = 1\n")
    run(compose_cfg(*over, "runner.reuse_stale=true"), cases=cases, lm=tiny_llama)
    summary = pd.read_csv(folder / "summary.csv").set_index("metric")
    assert summary.loc["stale_chunks", "mean"] == 2
    assert len(sorted(private_cache.glob(f"trained/{name}/*/final.safetensors"))) == 1   # not retrained

    run(compose_cfg(*over), cases=cases, lm=tiny_llama)
    records = [json.loads(p.read_text()) for p in (folder / "chunks").glob("*.json")]
    assert all(r["code"] != first[f"T2-c{r['chunk']}.json"]["code"] and not r.get("stale") for r in records)
    assert "stale_chunks" not in set(pd.read_csv(folder / "summary.csv").metric)
    assert len(sorted(private_cache.glob(f"trained/{name}/*/final.safetensors"))) == 2   # retrained


def test_the_training_key_depends_on_the_code_and_on_a_held_out_val_part(tmp_path, tiny_llama, private_cache):
    from editbench.session import build_editor

    name = f"toy_key_{tmp_path.name[-8:].replace('-', '_')}"
    source = _toy_editor(tmp_path, name)
    train = write_train_file(tmp_path / "train.json")
    quick = "++editor.train={steps: 2, batch_size: 2, n_val: 0, progress: false}"
    cfg = compose_cfg("model=tiny-llama", "editor=none", f"editor.name={name}", "data=cf", f"data.train_path={train}",
                      quick)
    editor = build_editor(cfg, tiny_llama)
    key = train_key(cfg, editor, train_settings(editor))[0]
    source.write_text(source.read_text() + "\nCHANGED = 1\n")
    assert train_key(cfg, editor, train_settings(editor))[0] != key
    held = compose_cfg("model=tiny-llama", "editor=none", f"editor.name={name}", "data=cf",
                       f"data.train_path={train}", "data.val.from=train", quick)
    assert train_key(held, editor, train_settings(editor))[0] != train_key(cfg, editor, train_settings(editor))[0]
    path = ensure_trained(held, tiny_llama, editor)
    assert path.is_file()



# --------------------------------------------------------------------------- one folder per config
RESULT_KEYS = ["runner.seed=1", "runner.n_cases=7", "runner.shuffle=false", "runner.batch_size=8",
               "runner.padding_side=left", "runner.exact_match=false", "runner.batch_edit=false", "runner.curve=true",
               "data.split=val", "data.val.fraction=0.2", "data.val.salt=other", "data.cf_metrics=false",
               "model.dtype=bfloat16", "editor.lr=0.5", "editor.layers=[1]", "editor.variant=mine",
               "general.tasks=[csqa]", "general.n=5"]
NOT_RESULT_KEYS = ["runner.progress=false", "runner.steps=[1]", "runner.reuse_stale=true", "out_dir=elsewhere"]


@pytest.mark.parametrize("override", RESULT_KEYS)
def test_a_setting_that_changes_results_gets_its_own_run_folder(override):
    from editbench.plan import run_id

    base = ["model=tiny-llama", "editor=ft", "data=cf"]
    assert run_id(compose_cfg(*base, override)) != run_id(compose_cfg(*base))


@pytest.mark.parametrize("override", NOT_RESULT_KEYS)
def test_a_setting_that_does_not_change_results_keeps_the_run_folder(override):
    from editbench.plan import run_id

    base = ["model=tiny-llama", "editor=ft", "data=cf"]
    assert run_id(compose_cfg(*base, override)) == run_id(compose_cfg(*base))
