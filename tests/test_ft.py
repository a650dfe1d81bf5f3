"""FT: an edit changes what it should, and reset restores every parameter bit for bit."""
from __future__ import annotations

import pytest
import torch

from editbench.session import build_editor
from editbench.scoring import Scorer
from tests.conftest import compose_cfg, toy_cases


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_ft_edits_then_reset_restores_bit_for_bit(tiny, objective):
    cfg = compose_cfg(f"model={tiny.name}", "editor=ft", f"editor.objective={objective}")
    editor = build_editor(cfg, tiny)
    before = _state(tiny.model)
    cases = toy_cases(3)
    scorer = Scorer(tiny.tokenizer, exact_match=False)
    ref, _ = scorer.score(editor, cases, reference=True)
    for c in cases:
        info = editor.edit(c.request)
        assert info["steps"] >= 1
    edited, _ = scorer.score(editor, cases)
    changed = {n for n, p in tiny.model.state_dict().items() if not torch.equal(p, before[n])}
    expected = {f"{tiny.arch.name('mlp_out', layer)}.weight" for layer in cfg.editor.layers}
    assert changed == expected  # only the configured weights moved
    assert set(editor.touched_parameters()) == expected
    # the last edit is remembered better than before the edits
    last = cases[-1]
    if objective == "target_new":
        assert edited[last.case_id]["reliability"] > ref[last.case_id]["reliability"]
    editor.reset()
    after = tiny.model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert editor.touched_parameters() == []
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_ft_norm_constraint_bounds_the_change(tiny_llama):
    cfg = compose_cfg("model=tiny-llama", "editor=ft", "editor.norm_constraint=1e-4")
    editor = build_editor(cfg, tiny_llama)
    name = editor.weight_names[0]
    w0 = tiny_llama.model.get_parameter(name).detach().clone()
    editor.edit(toy_cases(1)[0].request)
    diff = (tiny_llama.model.get_parameter(name) - w0).abs().max().item()
    editor.reset()
    assert 0 < diff <= 1e-4 + 1e-7


def test_ft_rejects_unknown_objective(tiny_llama):
    cfg = compose_cfg("model=tiny-llama", "editor=ft", "editor.objective=everything")
    with pytest.raises(ValueError, match="objective must be prompt_last or target_new"):
        build_editor(cfg, tiny_llama)


def test_ft_is_labelled_as_easyedits_variant_unless_constrained(tiny_llama, caplog):
    """FT-L/FT-M as implemented are EasyEdit's (no L-inf constraint): every table says so."""
    from editbench.results import editor_label

    ftl = compose_cfg("model=tiny-llama", "editor=ft")
    ftm = compose_cfg("model=tiny-llama", "editor=ft", "editor.objective=target_new")
    assert editor_label(ftl.editor) == "ft[easyedit-prompt_last]"
    assert editor_label(ftm.editor) == "ft[easyedit-target_new]"
    with caplog.at_level("WARNING", logger="editors.ft"):
        build_editor(ftl, tiny_llama)                                   # variant is not a hyperparameter
        assert not caplog.records
        build_editor(compose_cfg("model=tiny-llama", "editor=ft", "editor.norm_constraint=5e-5"), tiny_llama)
        assert any("ROME paper's constrained FT+L" in r.getMessage() for r in caplog.records)
        caplog.clear()
        # the ROME paper's FT+L, labelled plain `ft`
        plus_l = compose_cfg("model=tiny-llama", "editor=ft", "editor.norm_constraint=5e-5", "editor.variant=null")
        build_editor(plus_l, tiny_llama)
        assert not caplog.records and editor_label(plus_l.editor) == "ft"
