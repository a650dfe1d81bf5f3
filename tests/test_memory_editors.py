"""GRACE and T-Patcher: edit effect, lifelong growth, exact reset, GRACE's teacher-forced
decision (no target leakage, padding/batching invariance), T-Patcher's memory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from editbench.data import load_cases
from editbench.records import Probe
from editbench.plan import select_cases
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import encode, model_logits, pad_batch, teacher_forced
from editors.grace import GraceCodebook
from tests.conftest import compose_cfg, shared, toy_cases

UNRELATED = [("Water boils at", "one hundred degrees"), ("The Eiffel Tower stands in", "Paris"),
             ("A year has twelve", "months")]


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


def _assert_restored(model, state, structure):
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[n], state[n]) for n in state)
    assert _structure(model) == structure  # same module names and types, no hooks left
    assert not any(p.requires_grad for p in model.parameters())


def _target_nll(logits_fn, tok, prompt, target):
    e = encode(tok, prompt, target)
    ids = torch.tensor([e.ids])
    with torch.no_grad():
        logp = torch.log_softmax(logits_fn(ids, torch.ones_like(ids))[0].float(), -1)
    cols = torch.arange(e.start - 1, len(e.ids) - 1)
    return -logp[cols, torch.tensor(e.target_ids)].mean().item(), logp[e.start - 1].argmax().item() == e.target_ids[0]


def _module_input(editor, ids):
    """The wrapped module's input for ``ids`` (one row, no padding)."""
    book = editor.book
    book.record = True
    try:
        editor.logits(ids, torch.ones_like(ids))
    finally:
        book.record = False
    return book.last_input


# =========================================================================== GRACE
def test_grace_edits_only_the_edited_prompts_and_reset_is_exact(tiny):
    cfg = compose_cfg(f"model={tiny.name}", "editor=grace")
    editor = build_editor(cfg, tiny)
    model, tok = tiny.model, tiny.tokenizer
    state, structure = _state(model), _structure(model)
    original = model.get_submodule(editor.module_name)
    cases = toy_cases(3)
    before = {c.case_id: _target_nll(editor.logits, tok, c.request.prompt, c.request.target_new) for c in cases}
    unrelated = [encode(tok, p, t).ids for p, t in UNRELATED]
    ids, mask = pad_batch(unrelated, tok.pad_token_id, "right")
    with torch.no_grad():
        reference = model_logits(model, ids, mask)

    infos = [editor.edit(c.request) for c in cases]
    assert [i["codebook_size"] for i in infos] == [1, 2, 3]  # distinct prompts: one key each
    assert editor.stats() == {"codebook_size": 3.0}
    assert editor.touched_parameters() == []
    for c in cases:
        nll, first_ok = _target_nll(editor.logits, tok, c.request.prompt, c.request.target_new)
        assert nll < before[c.case_id][0] - 0.05 and first_ok, c.case_id
    with torch.no_grad():
        assert torch.equal(editor.logits(ids, mask), reference)  # unrelated prompts: bit for bit

    editor.reset()
    _assert_restored(model, state, structure)
    assert model.get_submodule(editor.module_name) is original
    assert editor.stats() == {"codebook_size": 0.0}
    # the editor is usable again after a reset (the next chunk)
    editor.edit(cases[0].request)
    assert editor.stats() == {"codebook_size": 1.0}
    editor.reset()
    _assert_restored(model, state, structure)


def test_grace_key_is_the_last_prompt_token_and_no_target_leaks(tiny):
    """Each position is its own query: the decisions at prompt positions are the same
    with and without the target appended, and the edit's key fires at the last prompt
    token only (with the tiny models' radius)."""
    editor = build_editor(compose_cfg(f"model={tiny.name}", "editor=grace"), tiny)
    tok = tiny.tokenizer
    cases = toy_cases(3)
    for c in cases:
        editor.edit(c.request)
    for slot, c in enumerate(cases):
        e = encode(tok, c.request.prompt, c.request.target_new)
        hit_full, slot_full = editor.book.lookup(_module_input(editor, torch.tensor([e.ids])))
        hit_prompt, slot_prompt = editor.book.lookup(_module_input(editor, torch.tensor([e.prompt_ids])))
        assert torch.equal(hit_full[0, :e.start], hit_prompt[0])
        assert hit_full[0].nonzero()[:, 0].tolist() == [e.start - 1]
        assert int(slot_full[0, e.start - 1]) == slot
    editor.reset()


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
def test_grace_scores_are_the_same_alone_and_in_padded_batches(tiny, replacement):
    editor = build_editor(compose_cfg(f"model={tiny.name}", "editor=grace",
                                      f"editor.replacement={replacement}"), tiny)
    tok = tiny.tokenizer
    cases = toy_cases(3)
    encoded = [encode(tok, p.prompt, p.target) for c in cases for p in
               [Probe(c.request.prompt, c.request.target_new)] + [q for _, q in c.probes("generality")]
               + [q for _, q in c.probes("locality")]]
    unedited, _ = teacher_forced(editor.logits, encoded, tok.pad_token_id, batch_size=1)
    for c in cases:
        editor.edit(c.request)
    alone, _ = teacher_forced(editor.logits, encoded, tok.pad_token_id, batch_size=1)
    for side in ("right", "left"):
        batched, _ = teacher_forced(editor.logits, encoded, tok.pad_token_id, batch_size=len(encoded),
                                    padding_side=side)
        for a, b in zip(alone, batched):
            assert a.argmax == b.argmax
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # the edits are what those scores see: every edited prompt's target became likelier
    for before, after in zip(unedited[::4], alone[::4]):
        assert after.mean_nll < before.mean_nll - 0.05
    editor.reset()


def test_grace_replace_all_covers_every_later_position_of_the_row():
    key = torch.tensor([1.0, 0.0])
    x = torch.tensor([[[0.0, 5.0], [1.0, 0.0], [0.0, 3.0], [0.0, 4.0]],
                      [[0.0, 5.0], [0.0, 6.0], [1.0, 0.0], [0.0, 4.0]]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    for replacement, expected in [("replace_last", [[0, 1, 0, 0], [0, 0, 1, 0]]),
                                  ("replace_all", [[0, 1, 1, 1], [0, 0, 1, 0]])]:
        book = GraceCodebook(torch.nn.Identity(), replacement)
        book.update(key, (7,), eps=0.5, new_value=torch.tensor([9.0, 9.0]), eps_expand="coverage")
        book.row_mask = mask
        hit, slot = book.lookup(x)
        assert hit.long().tolist() == expected
        out = book(x)
        assert torch.equal(out[hit], torch.full((int(hit.sum()), 2), 9.0))
        assert torch.equal(out[~hit], x[~hit])


def test_grace_codebook_rules_add_expand_split():
    book = GraceCodebook(torch.nn.Identity(), "replace_last")
    v = torch.zeros(2)
    assert book.update(torch.tensor([0.0, 0.0]), (1,), 1.0, v, "coverage")[:2] == (0, "add")
    # beyond eps + radius of the nearest key: a new key with radius eps
    assert book.update(torch.tensor([5.0, 0.0]), (1,), 1.0, v, "coverage")[:2] == (1, "add")
    # same label within eps + radius: the nearest key's radius grows to the distance, no new key
    assert book.update(torch.tensor([0.0, 1.5]), (1,), 1.0, v, "coverage")[:2] == (0, "expand")
    assert len(book) == 2 and book.radii[0].item() == pytest.approx(1.5)
    # same label inside the radius: nothing changes, the key's value is trained further
    assert book.update(torch.tensor([0.0, 1.0]), (1,), 1.0, v, "coverage")[:2] == (0, "covered")
    # another label within reach: a new key, and both radii become half the distance
    slot, action, d = book.update(torch.tensor([5.0, 1.2]), (2,), 1.0, v, "coverage")
    assert (slot, action) == (2, "split") and d == pytest.approx(1.2)
    assert book.radii[1].item() == pytest.approx(0.6 - 1e-5) and book.radii[2].item() == pytest.approx(0.6)
    # moving_average also moves the key halfway towards the query
    book.update(torch.tensor([0.0, -2.0]), (1,), 1.0, v, "moving_average")
    assert book.keys[0].tolist() == pytest.approx([0.0, -1.0]) and book.radii[0].item() == pytest.approx(2.0)


def test_grace_repeated_edit_reuses_its_key(tiny_llama):
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=grace"), tiny_llama)
    r = toy_cases(1)[0].request
    assert editor.edit(r)["action"] == "add"
    assert editor.edit(r)["action"] == "covered"
    assert editor.stats() == {"codebook_size": 1.0}
    editor.reset()


def test_grace_rejects_bad_hparams(tiny_llama):
    with pytest.raises(ValueError, match="replacement must be one of replace_last, replace_all"):
        build_editor(compose_cfg("model=tiny-llama", "editor=grace", "editor.replacement=replace_prompt"),
                     tiny_llama)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_editor(compose_cfg("model=tiny-llama", "editor=grace", "+editor.num_pert=8"), tiny_llama)


def test_grace_through_the_runner_passes_the_reset_check(tmp_path, tiny_llama):
    cfg = compose_cfg("model=tiny-llama", "editor=grace", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[3]")
    path = run(cfg, cases=toy_cases(6), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["editor/codebook_size", "mean"] == 3.0
    assert s.loc["locality", "mean"] == 1.0


# =========================================================================== T-Patcher
def _train_cases():
    return load_cases("sample", None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tpatcher_patches_mistakes_without_firing_on_memory_and_resets(tiny, cache):
    editor = build_editor(compose_cfg(f"model={tiny.name}", "editor=tpatcher"), tiny)
    model, tok = tiny.model, tiny.tokenizer
    editor.fit(_train_cases())
    base = len(editor.memory_base)
    # one memory vector per token of the training inputs (prompt + ground truth, locality probes)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in editor.memory_texts(_train_cases()))
    assert base == min(n_tokens, editor.hp.memory_size) and editor.memory_base.shape[1] == tiny.arch.hidden_size
    state, structure = _state(model), _structure(model)
    original = model.get_submodule(editor.module_name)
    cases = toy_cases(3)
    before = [_target_nll(editor.logits, tok, c.request.prompt, c.request.target_new)[0] for c in cases]
    texts = [encode(tok, c.request.prompt, c.request.ground_truth).ids for c in _train_cases()[:8]]
    ids, mask = pad_batch(texts, tok.pad_token_id, "right")
    with torch.no_grad():
        reference = model_logits(model, ids, mask)

    total = 0
    for c in cases:
        info = editor.edit(c.request)
        assert 1 <= info["neurons_added"] <= editor.hp.max_add_neuron_num
        total += info["neurons_added"]
        assert info["patch_neurons"] == total
    assert editor.stats() == {"patch_neurons": float(total)}
    assert editor.touched_parameters() == []
    for c, nll in zip(cases, before):
        assert _target_nll(editor.logits, tok, c.request.prompt, c.request.target_new)[0] < nll - 0.05
    # the memory loss keeps the patch silent on the memory (training-set inputs) ...
    pre = editor.ffn.pre_activations(editor.memory_base)
    assert (pre > 0).float().mean().item() < 0.01
    # ... so wherever no patch fires on a training input, its output is bit for bit the
    # unedited one (the patch sits in the last layer: it only acts at its own position)
    with torch.no_grad():
        silent = (editor.ffn.pre_activations(_ffn_input(editor, ids, mask)) <= 0).all(-1) & mask.bool()
        out = editor.logits(ids, mask)
    assert silent.float().sum() > 0.9 * mask.sum()
    assert torch.equal(out[silent], reference[silent])
    # the edits' own inputs joined the memory; reset drops them
    assert len(editor.memory) > base

    editor.reset()
    _assert_restored(model, state, structure)
    assert model.get_submodule(editor.module_name) is original
    assert editor.stats() == {"patch_neurons": 0.0}
    assert len(editor.memory) == base


def _ffn_input(editor, ids, mask):
    ffn = editor.ffn
    ffn.record = True
    try:
        editor.logits(ids, mask)
    finally:
        ffn.record = False
    return ffn.last_input


def test_tpatcher_adds_nothing_when_the_model_is_already_right(tiny_llama, cache):
    """One mistake, one neuron: an edit the (patched) model already gets right adds none."""
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher"), tiny_llama)
    editor.fit(_train_cases())
    request = toy_cases(1)[0].request
    first = editor.edit(request)
    assert first["success"] and first["neurons_added"] >= 1
    again = editor.edit(request)
    assert again["neurons_added"] == 0 and again["patch_neurons"] == first["patch_neurons"]
    editor.reset()


def test_tpatcher_memory_is_cached_and_required(tiny_llama, cache, monkeypatch):
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher"), tiny_llama)
    with pytest.raises(RuntimeError, match=r"no memory: call fit\(train_cases\) first"):
        editor.edit(toy_cases(1)[0].request)
    editor.reset()
    editor.fit(_train_cases())
    files = list((cache / "tpatcher").glob("memory-*.pt"))
    assert len(files) == 1
    again = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher"), tiny_llama)

    def no_recompute(*_):
        raise AssertionError("the cached memory was not reused")

    monkeypatch.setattr(again, "_collect_memory", no_recompute)
    again.fit(_train_cases())
    assert torch.equal(again.memory_base, editor.memory_base)
    # another memory size is another cache entry
    other = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher", "editor.memory_size=50"), tiny_llama)
    other.fit(_train_cases())
    assert len(other.memory_base) == 50 and len(list((cache / "tpatcher").glob("memory-*.pt"))) == 2


def test_tpatcher_activation_model_uses_the_ffn_activation(tiny_gptj, cache):
    """GPT-J's official setting: the patch neuron uses the FFN's own activation (gelu_new)."""
    editor = build_editor(compose_cfg("model=tiny-gptj", "editor=tpatcher", "editor.activation=model"), tiny_gptj)
    inner = tiny_gptj.model.get_submodule(editor.module_name)
    assert editor._swap.install().act is inner.act
    editor.reset()
    assert tiny_gptj.model.get_submodule(editor.module_name) is inner
    with pytest.raises(ValueError, match="activation must be relu, gelu or model"):
        build_editor(compose_cfg("model=tiny-gptj", "editor=tpatcher", "editor.activation=silu"), tiny_gptj)


def test_tpatcher_through_the_runner_passes_the_reset_check(tmp_path, tiny_llama, cache):
    train = Path(__file__).resolve().parents[1] / "editbench" / "data" / "sample_facts.json"
    cfg = compose_cfg("model=tiny-llama", "editor=tpatcher", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[2]", f"data.train_path={train}")
    path = run(cfg, cases=toy_cases(2), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["editor/patch_neurons", "mean"] >= 1


# =========================================================================== real model
def _zsre_cases(n, max_target_tokens=None, tok=None):
    cases = load_cases("zsre", shared("zsre", "zsre_mend_eval.head72.json"))
    cases = select_cases(cases, None, 0)
    if max_target_tokens is not None:
        cases = [c for c in cases if len(encode(tok, c.request.prompt, c.request.target_new).target_ids)
                 <= max_target_tokens]
    return cases[:n]


@pytest.mark.real
def test_grace_smollm2_zsre_ten_lifelong_edits(tmp_path, smollm2):
    cfg = compose_cfg("model=smollm2", "editor=grace", "data=zsre", f"out_dir={tmp_path}",
                      "runner.progress=false", "runner.steps=[10]", "runner.exact_match=false")
    path = run(cfg, cases=_zsre_cases(10), lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["reliability", "mean"] >= 0.9
    assert s.loc["locality", "mean"] >= 0.9
    assert s.loc["editor/codebook_size", "mean"] == 10


@pytest.mark.real
def test_tpatcher_smollm2_zsre_five_lifelong_edits(tmp_path, smollm2, cache):
    train = shared("zsre", "zsre_mend_train.1k.json")
    cfg = compose_cfg("model=smollm2", "editor=tpatcher", "data=zsre", f"data.train_path={train}",
                      "editor.memory_size=5000", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[5]", "runner.exact_match=false")
    path = run(cfg, cases=_zsre_cases(5, max_target_tokens=5, tok=smollm2.tokenizer), lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["reliability", "mean"] >= 0.9
    assert s.loc["locality", "mean"] >= 0.85
    assert s.loc["editor/patch_neurons", "mean"] >= 5
