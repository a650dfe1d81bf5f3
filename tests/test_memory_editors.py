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
from editors.tpatcher import memory_loss, stopped_improving, topk_mean
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
    base, val_base = len(editor.memory_base), len(editor.val_memory_base)
    # one memory vector per token of the training inputs (prompt + ground truth, locality
    # probes); use_val=1 (default) holds every 5th training case out for the validation memory
    cases, val_cases = editor.split_memory_cases(_train_cases())
    assert editor.hp.use_val == 1 and len(val_cases) == len(_train_cases()) // 5
    assert {c.case_id for c in cases}.isdisjoint(c.case_id for c in val_cases)
    for part, n in ((cases, base), (val_cases, val_base)):
        n_tokens = sum(len(tok(t)["input_ids"]) for t in editor.memory_texts(part))
        assert n == min(n_tokens, editor.hp.memory_size)
    assert editor.memory_base.shape[1] == editor.val_memory_base.shape[1] == tiny.arch.hidden_size
    memory_base, val_memory_base = editor.memory_base.clone(), editor.val_memory_base.clone()
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
    # the edits' own inputs joined both memories, once per copy in the batch; reset drops them
    added = editor.hp.example_repeat * sum(len(encode(tok, c.request.prompt, c.request.target_new).ids) - 1
                                           for c in cases)
    assert len(editor.memory) == base + added and len(editor.val_memory) == val_base + added

    editor.reset()
    _assert_restored(model, state, structure)
    assert model.get_submodule(editor.module_name) is original
    assert editor.stats() == {"patch_neurons": 0.0}
    assert torch.equal(editor.memory, memory_base) and torch.equal(editor.val_memory, val_memory_base)


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
    assert len(files) == 2     # the memory and the validation memory (use_val=1)
    again = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher"), tiny_llama)

    def no_recompute(*_):
        raise AssertionError("the cached memory was not reused")

    monkeypatch.setattr(again, "_collect_memory", no_recompute)
    again.fit(_train_cases())
    assert torch.equal(again.memory_base, editor.memory_base)
    assert torch.equal(again.val_memory_base, editor.val_memory_base)
    # another memory size is another cache entry
    other = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher", "editor.memory_size=50"), tiny_llama)
    other.fit(_train_cases())
    assert len(other.memory_base) == len(other.val_memory_base) == 50
    assert len(list((cache / "tpatcher").glob("memory-*.pt"))) == 4
    # use_val=0 uses every training case for the memory and has no validation memory
    fast = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher_fast"), tiny_llama)
    fast.fit(_train_cases())
    assert fast.val_memory_base is None and len(fast.memory_base) > len(editor.memory_base)


def test_tpatcher_activation_model_uses_the_ffn_activation(tiny_gptj, cache):
    """GPT-J's official setting: the patch neuron uses the FFN's own activation (gelu_new)."""
    editor = build_editor(compose_cfg("model=tiny-gptj", "editor=tpatcher", "editor.activation=model"), tiny_gptj)
    inner = tiny_gptj.model.get_submodule(editor.module_name)
    assert editor._swap.install().act is inner.act
    editor.reset()
    assert tiny_gptj.model.get_submodule(editor.module_name) is inner
    with pytest.raises(ValueError, match="activation must be relu, gelu or model"):
        build_editor(compose_cfg("model=tiny-gptj", "editor=tpatcher", "editor.activation=silu"), tiny_gptj)


@pytest.mark.parametrize("editor, label", [("tpatcher", "tpatcher"), ("tpatcher_fast", "tpatcher[fast]")])
def test_tpatcher_through_the_runner_passes_the_reset_check(tmp_path, tiny_llama, cache, editor, label):
    train = Path(__file__).resolve().parents[1] / "editbench" / "data" / "sample_facts.json"
    cfg = compose_cfg("model=tiny-llama", f"editor={editor}", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[2]", f"data.train_path={train}")
    path = run(cfg, cases=toy_cases(2), lm=tiny_llama)
    s = pd.read_csv(path / "summary.csv")
    assert set(s["editor"]) == {label}   # the variant is named in every table
    assert s.set_index("metric").loc["editor/patch_neurons", "mean"] >= 1


# --------------------------------------------------------------------------- T-Patcher's schedule
SCHEDULE = ("use_val", "start_val_step", "example_repeat", "max_steps")


def test_tpatcher_fast_variant_composes_with_its_name_and_values(tiny_llama, cache):
    """tpatcher_fast = tpatcher with today's faster schedule, per model too (its own
    conf/editor_model/tpatcher_fast/ files include tpatcher's)."""
    expected_max_steps = {"smollm2": 500, "tiny-llama": 60, "tiny-gptj": 60, "llama2": 2000, "gptj": 2000}
    for model, max_steps in expected_max_steps.items():
        official = compose_cfg(f"model={model}", "editor=tpatcher").editor
        fast = compose_cfg(f"model={model}", "editor=tpatcher_fast").editor
        assert official.name == fast.name == "tpatcher" and "variant" not in official and fast.variant == "fast"
        assert [fast[k] for k in SCHEDULE] == [0, 0, 1, max_steps], model
        assert official.use_val == 1 and official.example_repeat == 8
        # everything else is tpatcher's for that model
        same = lambda c: {k: v for k, v in c.items() if k not in SCHEDULE + ("variant",)}  # noqa: E731
        assert same(fast) == same(official), model
    official = compose_cfg("model=smollm2", "editor=tpatcher").editor
    assert (official.max_steps, official.check_every, official.start_val_step) == (2000, 25, 100)
    # `variant` is no hyperparameter: the editor builds, with the fast schedule
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher_fast"), tiny_llama)
    assert [getattr(editor.hp, k) for k in SCHEDULE] == [0, 0, 1, 60]


def _explicit_memory_loss(memory, key, bias, act, k, m1, m2):
    """The official computation: the memory's pre-activations stacked once per batch row."""
    his = memory @ key + bias
    h = torch.stack([his for _ in range(act.shape[0])]).transpose(0, 1)     # (m, rows, n)
    return topk_mean(torch.exp(h - act + m1), k) + topk_mean(torch.exp(h - m2), k)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_tpatcher_memory_loss_equals_the_official_batch_computation(rows):
    g = torch.Generator().manual_seed(rows)
    memory = torch.randn(500, 16, generator=g)
    key = (0.3 * torch.randn(16, 3, generator=g)).requires_grad_()
    bias = torch.randn(3, generator=g).requires_grad_()
    act = (1 + torch.randn(rows, 3, generator=g)).requires_grad_()   # rows that differ, too
    for k in (10, 1000, 5000):
        ours = memory_loss(memory, key, bias, act, k, 3.0, -3.0)
        ref = _explicit_memory_loss(memory, key, bias, act, k, 3.0, -3.0)
        assert torch.allclose(ours, ref, rtol=1e-5), k
        for a, b in zip(torch.autograd.grad(ours, [key, bias, act]), torch.autograd.grad(ref, [key, bias, act])):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k


def test_tpatcher_identical_copies_change_the_top_k_losses():
    """8 copies of the edit give the one-copy edit loss, but not the same top-k losses:
    every value fills 8 of the k slots (docs/editors-memory.md)."""
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2000, 16, generator=g)
    key, bias = 0.3 * torch.randn(16, 3, generator=g), torch.zeros(3)
    act = torch.tensor([[0.5, 1.0, 2.0]])
    one = memory_loss(memory, key, bias, act, 1000, 3.0, -3.0)
    eight = memory_loss(memory, key, bias, act.expand(8, -1), 1000, 3.0, -3.0)
    his = memory @ key + bias
    top125 = topk_mean(torch.exp(his - act + 3.0), 125) + topk_mean(torch.exp(his + 3.0), 125)
    assert torch.allclose(eight, top125) and eight > 1.2 * one
    # activation loss (top 5): the mean over the 3 neurons vs the worst neuron only
    assert torch.isclose(topk_mean(torch.exp(-act), 5), torch.exp(-act).mean())
    assert torch.isclose(topk_mean(torch.exp(-act.expand(8, -1)), 5), torch.exp(-act.min()))


def test_tpatcher_validation_memory_loss_early_stop_rule():
    """Official early_stop_editing(mode='min', thd=0.001, patience=1)."""
    assert not stopped_improving([1.0], 0.001, 1)            # one successful check never stops
    assert not stopped_improving([1.0, 0.9], 0.001, 1)       # still improving
    assert stopped_improving([1.0, 0.9995], 0.001, 1)        # improved by less than the threshold
    assert stopped_improving([1.0, 0.9, 0.95], 0.001, 1)
    assert not stopped_improving([1.0, 0.9, 0.95], 0.001, 2)


def _spy_stop(editor, monkeypatch):
    """Record (step, validation losses so far, stop) of every counted check where the edit succeeds."""
    calls, real = [], editor._stop

    def spy(step, val_losses, *args):
        stop = real(step, val_losses, *args)
        calls.append((step, list(val_losses), stop))
        return stop

    monkeypatch.setattr(editor, "_stop", spy)
    return calls


def test_tpatcher_default_schedule_stops_when_the_validation_memory_loss_stops_improving(
        tiny_llama, cache, monkeypatch):
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher"), tiny_llama)
    hp = editor.hp
    assert (hp.use_val, hp.example_repeat, hp.check_every, hp.start_val_step, hp.max_steps) == (1, 8, 10, 20, 200)
    editor.fit(_train_cases())
    try:
        for case in toy_cases(3):
            calls = _spy_stop(editor, monkeypatch)
            torch.manual_seed(0)
            info = editor.edit(case.request)
            steps = [c[0] for c in calls]
            assert info["success"] and len(calls) >= 2, info
            # counted checks: after start_val_step, every check_every steps
            assert all(s > hp.start_val_step and s % hp.check_every == 0 for s in steps)
            # stop at the first successful check whose validation memory loss stopped improving
            assert [c[2] for c in calls] == [False] * (len(calls) - 1) + [True]
            assert stopped_improving(calls[-1][1], hp.val_threshold, hp.val_patience)
            # (the stopping check may be the one at max_steps itself: it still stopped through _stop)
            assert info["steps"] == steps[-1] <= hp.max_steps and info["val_checks"] == len(calls)
            assert info["val_memory_loss"] == calls[-1][1][-1]
    finally:
        editor.reset()


def test_tpatcher_use_val_0_stops_at_the_first_counted_success(tiny_llama, cache, monkeypatch):
    request = toy_cases(1)[0].request
    steps = {}
    for start in (0, 40):
        editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher", "editor.use_val=0",
                                          f"editor.start_val_step={start}"), tiny_llama)
        editor.fit(_train_cases())
        calls = _spy_stop(editor, monkeypatch)
        torch.manual_seed(0)
        try:
            info = editor.edit(request)
        finally:
            editor.reset()
        assert info["success"] and "val_checks" not in info
        assert len(calls) == 1 and calls[0][2] and info["steps"] == calls[0][0], calls
        steps[start] = info["steps"]
    # the same edit (same seed) succeeds early; from step 40 on it is checked only after it
    assert steps[0] <= 40 < steps[40] and steps[40] % 10 == 0


@pytest.mark.parametrize("copies", [1, 3])
def test_tpatcher_example_repeat_puts_copies_of_the_edit_in_the_batch(tiny_llama, cache, monkeypatch, copies):
    import editors.tpatcher as tp

    editor = build_editor(compose_cfg("model=tiny-llama", "editor=tpatcher", f"editor.example_repeat={copies}"),
                          tiny_llama)
    editor.fit(_train_cases())
    batches, acts = [], []
    capture, loss = tp.UpperStack.capture, tp.memory_loss

    def spy_capture(model, arch, layer, ids, mask, **kw):
        batches.append(ids)
        return capture(model, arch, layer, ids, mask, **kw)

    def spy_loss(memory, key, bias, act, *args):
        acts.append(act.detach())
        return loss(memory, key, bias, act, *args)

    monkeypatch.setattr(tp.UpperStack, "capture", spy_capture)
    monkeypatch.setattr(tp, "memory_loss", spy_loss)
    request = toy_cases(1)[0].request
    ids = encode(tiny_llama.tokenizer, request.prompt, request.target_new).ids
    before = len(editor.memory)
    try:
        info = editor.edit(request)
        added = len(editor.memory) - before
    finally:
        editor.reset()
    assert info["neurons_added"] >= 1 and len(batches) == 1
    assert batches[0].tolist() == [list(ids)] * copies
    # the new neurons' activations on every copy (identical rows: no dropout)
    assert acts and all(a.shape == (copies, info["neurons_added"]) for a in acts)
    assert all(torch.allclose(a, a[:1].expand_as(a)) for a in acts)
    # the whole batch's FFN inputs join the memory (official update_memory)
    assert added == copies * (len(ids) - 1)


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
def test_tpatcher_smollm2_zsre_three_lifelong_edits(tmp_path, smollm2, cache):
    """The official schedule on the real model (each edit trains >= 125 steps: ~35 CPU-s, so three
    edits keep CI in budget)."""
    train = shared("zsre", "zsre_mend_train.1k.json")
    cfg = compose_cfg("model=smollm2", "editor=tpatcher", "data=zsre", f"data.train_path={train}",
                      "editor.memory_size=2000", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[3]", "runner.exact_match=false")
    path = run(cfg, cases=_zsre_cases(3, max_target_tokens=5, tok=smollm2.tokenizer), lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")
    assert s.loc["reliability", "mean"] >= 0.9
    assert s.loc["locality", "mean"] >= 0.85
    assert s.loc["editor/patch_neurons", "mean"] >= 3
