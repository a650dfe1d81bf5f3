"""ROME, MEMIT, WilKE, R-ROME and their shared pieces (editors/lib/locate.py, layer_stats.py).

Tiny random models exercise every code path in seconds (they know no facts, so the tests
check the mechanics: the target's loss goes down, W k* = v*, bit-exact reset, the cache);
the real SmolLM2 test checks that ROME actually edits facts.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from editbench.records import EditRequest
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import Scorer, encode, model_logits
from editors.lib import layer_stats
from editors.lib.layer_stats import StatsConfig, second_moments
from editors.lib.locate import (build_edit_rows, capture_layers, optimize_value, subject_last_token)
from editors.rrome import rase_decision
from tests.conftest import compose_cfg, shared, toy_cases

CORPUS = [f"Paragraph {i}: the river number {i} flows through the valley of town {i % 7}, "
          f"where {i * 3} people live and trade grain, wool and stories." for i in range(60)]


@pytest.fixture
def stats_env(tmp_path, monkeypatch):
    """A private statistics cache and a small corpus; returns the editor overrides."""
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    return [f"editor.mom2_dataset={corpus}", "editor.mom2_n_samples=40", "editor.mom2_max_length=32"]


def _editor(lm, name, stats_env, *overrides):
    cfg = compose_cfg(f"model={lm.name}", f"editor={name}", *stats_env, *overrides)
    return build_editor(cfg, lm), cfg


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _target_nll(logits_fn, tok, request):
    enc = encode(tok, request.prompt, request.target_new)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = torch.log_softmax(logits_fn(ids, torch.ones_like(ids))[0].float(), -1)
    return -sum(logp[enc.start - 1 + k, t].item() for k, t in enumerate(enc.target_ids)) / len(enc.target_ids)


# --------------------------------------------------------------------------- every editor
@pytest.mark.parametrize("name,model", [("rome", "tiny_llama"), ("rome", "tiny_gptj"), ("memit", "tiny_llama"),
                                        ("memit", "tiny_gptj"), ("wilke", "tiny_llama"), ("rrome", "tiny_llama")])
def test_edit_lowers_target_loss_and_reset_restores_bit_for_bit(name, model, request, stats_env):
    lm = request.getfixturevalue(model)
    editor, cfg = _editor(lm, name, stats_env)
    before, hooks = _state(lm.model), _hooks(lm.model)
    reqs = [c.request for c in toy_cases(2)]
    nll0 = [_target_nll(editor.logits, lm.tokenizer, r) for r in reqs]
    infos = [editor.edit(r) for r in reqs]
    nll1 = [_target_nll(editor.logits, lm.tokenizer, r) for r in reqs]
    assert nll1[-1] < nll0[-1] - 1e-3, (nll0, nll1)  # the last edit moved its target's loss down
    changed = {n for n, p in lm.model.state_dict().items() if not torch.equal(p, before[n])}
    if name == "rrome":
        assert changed == set() and editor.touched_parameters() == []  # never edits weights in place
        assert editor.stats()["memory_size"] == 2
    else:
        layers = {i["layer"] for i in infos} if name == "wilke" else set(cfg.editor.layers)
        expected = {f"{lm.arch.name('mlp_out', layer)}.weight" for layer in layers}
        assert changed == expected and set(editor.touched_parameters()) == expected
    assert _hooks(lm.model) == hooks  # nothing left hooked after edits and scoring
    editor.reset()
    after = lm.model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert editor.touched_parameters() == [] and _hooks(lm.model) == hooks
    assert not any(p.requires_grad for p in lm.model.parameters())
    if name == "rrome":
        assert editor.stats()["memory_size"] == 0 and editor.patches == []
        assert _target_nll(editor.logits, lm.tokenizer, reqs[-1]) == pytest.approx(nll0[-1], abs=1e-6)


# --------------------------------------------------------------------------- ROME
def test_rome_update_maps_new_key_to_new_value(tiny, stats_env):
    editor, _ = _editor(tiny, "rome", stats_env)
    req = toy_cases(1)[0].request
    editor.edit(req)
    (up,) = editor.last_updates
    # Recompute k* and the projection's output at the subject token on the EDITED model.
    rows = build_edit_rows(tiny.tokenizer, [req], editor.templates)
    cap = capture_layers(tiny.model, tiny.arch, rows, [up.layer])[up.layer]
    bare = int(rows.bare_rows[0])
    assert torch.allclose(cap.keys[bare], up.key, atol=1e-5)  # keys at L do not depend on W_L
    out = cap.values[bare]
    assert torch.allclose(out, up.value, atol=1e-4 * up.value.norm().item() + 1e-6)
    module = tiny.arch.module(tiny.model, "mlp_out", up.layer)
    with torch.no_grad():
        assert torch.allclose(module(up.key[None])[0], up.value, atol=1e-4 * up.value.norm().item() + 1e-6)
    # and the value is not what the old weight produced
    editor.reset()
    with torch.no_grad():
        assert (module(up.key[None])[0] - up.value).norm() > 1e-3 * up.value.norm()


def test_rome_without_covariance_uses_the_normalised_key(tiny_llama, stats_env):
    editor, _ = _editor(tiny_llama, "rome", stats_env, "editor.mom2_adjustment=false")
    assert editor.cov == {}
    editor.edit(toy_cases(1)[0].request)
    up = editor.last_updates[0]
    rows = build_edit_rows(tiny_llama.tokenizer, [toy_cases(1)[0].request], editor.templates)
    cap = capture_layers(tiny_llama.model, tiny_llama.arch, rows, [up.layer])[up.layer]
    k = cap.keys[rows.groups[0][0]].float().mean(0)
    assert torch.allclose(up.left, k / k.norm(), atol=1e-5)
    editor.reset()


def test_subject_not_in_prompt_falls_back_to_the_prompt_last_token(tiny_llama, stats_env):
    tok = tiny_llama.tokenizer
    text = "The capital of Country0 is"
    idx = subject_last_token(tok, text, "Country0")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids[:idx + 1]).endswith("Country0") and not tok.decode(ids[:idx]).endswith("Country0")
    assert subject_last_token(tok, text, "Atlantis") is None
    req = EditRequest("The capital of Country0 is", "City0", subject="Atlantis")
    rows = build_edit_rows(tok, [req], [[""]])
    assert rows.subject_found == [False]
    bare = int(rows.bare_rows[0])
    prompt_ids = encode(tok, req.prompt, req.target_new).prompt_ids
    assert rows.input_ids[bare, rows.lookup[bare]].item() == prompt_ids[-1]
    editor, _ = _editor(tiny_llama, "rome", stats_env)
    info = editor.edit(req)
    assert info["subject_found"] is False
    editor.reset()
    assert editor.edit(toy_cases(1)[0].request)["subject_found"] is True
    editor.reset()


def test_edit_rows_align_lookup_and_match_unpadded_logits(tiny, stats_env):
    editor, _ = _editor(tiny, "rome", stats_env, "editor.mom2_adjustment=false")
    reqs = [c.request for c in toy_cases(2)]
    rows = build_edit_rows(tiny.tokenizer, reqs, editor.templates)
    assert (rows.lookup == rows.prefix_len).all()
    with torch.no_grad():
        batched = model_logits(tiny.model, rows.input_ids, rows.attention_mask)
        for r in range(rows.input_ids.shape[0]):
            m = rows.attention_mask[r].bool()
            ids = rows.input_ids[r][m][None]
            assert torch.allclose(model_logits(tiny.model, ids, torch.ones_like(ids))[0], batched[r][m], atol=1e-4)
    # the shortcut through the upper layers equals a full forward pass with the delta hooked in
    layer = editor.edit_layers[0]
    cap = capture_layers(tiny.model, tiny.arch, rows, [layer])[layer]
    delta = torch.randn(rows.input_ids.shape[0], tiny.arch.hidden_size)
    pr, pc = rows.target_rows, rows.target_cols
    with torch.no_grad():
        fast = editor.tail._fast(layer, cap.hidden, delta, rows.stream_batch(), pr, pc)
        full = editor.tail._full(layer, delta, rows.stream_batch(), pr, pc)
    assert torch.allclose(fast, full, atol=1e-4)


# --------------------------------------------------------------------------- MEMIT
def test_memit_batch_equals_independent_optimisation_and_edits_all(tiny_llama, stats_env):
    editor, cfg = _editor(tiny_llama, "memit", stats_env)
    reqs = [c.request for c in toy_cases(3)]
    hp, layer = editor.hp, editor.edit_layers[-1]
    # batched value optimisation == each request optimised alone
    rows = build_edit_rows(tiny_llama.tokenizer, reqs, editor.templates)
    cap = capture_layers(tiny_llama.model, tiny_llama.arch, rows, [layer])[layer]
    z = cap.hidden[rows.bare_rows, rows.lookup[rows.bare_rows]]
    together = optimize_value(editor.tail, rows, layer, cap, z.norm(dim=-1), hp).delta
    for i, r in enumerate(reqs):
        one = build_edit_rows(tiny_llama.tokenizer, [r], editor.templates)
        c1 = capture_layers(tiny_llama.model, tiny_llama.arch, one, [layer])[layer]
        z1 = c1.hidden[one.bare_rows, one.lookup[one.bare_rows]]
        alone = optimize_value(editor.tail, one, layer, c1, z1.norm(dim=-1), hp).delta[0]
        assert torch.allclose(together[i], alone, atol=2e-3 * alone.norm().item() + 1e-5)
    # a batch of one is exactly edit(); a batch of 3 lowers every target's loss like 3 sequential edits
    nll0 = [_target_nll(editor.logits, tiny_llama.tokenizer, r) for r in reqs]
    editor.edit_batch(reqs)
    batch = [_target_nll(editor.logits, tiny_llama.tokenizer, r) for r in reqs]
    editor.reset()
    for r in reqs:
        editor.edit(r)
    seq = [_target_nll(editor.logits, tiny_llama.tokenizer, r) for r in reqs]
    editor.reset()
    assert all(b < n for b, n in zip(batch, nll0)) and all(s < n for s, n in zip(seq, nll0))
    w = f"{tiny_llama.arch.name('mlp_out', layer)}.weight"
    editor.edit(reqs[0])
    single = tiny_llama.model.get_parameter(w).detach().clone()
    editor.reset()
    editor.edit_batch(reqs[:1])
    assert torch.equal(tiny_llama.model.get_parameter(w), single)
    editor.reset()


def test_missing_statistics_fail_clearly_unless_auto(tiny_llama, tmp_path):
    absent = f"editor.mom2_dataset={tmp_path / 'absent.txt'}"
    with pytest.raises(FileNotFoundError, match="covariance corpus .* not found"):
        build_editor(compose_cfg("model=tiny-llama", "editor=memit", absent), tiny_llama)
    with pytest.raises(FileNotFoundError, match="mom2_adjustment=false"):
        build_editor(compose_cfg("model=tiny-llama", "editor=rome", absent), tiny_llama)
    editor = build_editor(compose_cfg("model=tiny-llama", "editor=rome", absent, "editor.mom2_adjustment=auto"),
                          tiny_llama)
    assert editor.cov == {}


# --------------------------------------------------------------------------- WilKE
def test_wilke_picks_the_smallest_change_within_range_and_records_it(tmp_path, tiny_llama, stats_env):
    editor, cfg = _editor(tiny_llama, "wilke", stats_env)
    before = _state(tiny_llama.model)
    info = editor.edit(toy_cases(1)[0].request)
    assert sorted(editor.last_scan) == list(range(cfg.editor.scanning_ceiling))
    assert info["layer"] == min(editor.last_scan, key=editor.last_scan.get)
    name = f"{tiny_llama.arch.name('mlp_out', info['layer'])}.weight"
    w0, w1 = before[name], tiny_llama.model.get_parameter(name).detach()
    assert ((w1 - w0).norm() / w0.norm()).item() == pytest.approx(info["la"], rel=1e-3)
    editor.reset()
    run_cfg = compose_cfg("model=tiny-llama", "editor=wilke", *stats_env, f"out_dir={tmp_path / 'runs'}",
                          "runner.progress=false", "runner.steps=[1]", "runner.exact_match=false")
    path = run(run_cfg, cases=toy_cases(2), lm=tiny_llama)
    infos = [json.loads(s) for s in pd.read_csv(path / "cases.csv")["info"].dropna().unique()]
    assert infos and all(0 <= i["layer"] < cfg.editor.scanning_ceiling for i in infos)
    # env.json says what the covariance statistics used (40 of the corpus's 60 texts)
    cov = json.loads((path / "env.json").read_text())["editor"]["covariance"]
    assert cov["used"] and cov["texts"] == 40 and cov["requested_samples"] == 40 and cov["corpus_texts"] == 60
    assert cov["layers"] == list(range(cfg.editor.scanning_ceiling))


# --------------------------------------------------------------------------- R-ROME
def test_rase_decision_rule():
    sims = torch.tensor([[0.95, 0.94, 0.93, 0.2, 0.1, 0.1, 0.0],    # above the absolute threshold
                         [0.80, 0.50, 0.45, 0.40, 0.30, 0.20, 0.1],  # clear gap and spread
                         [0.80, 0.78, 0.77, 0.76, 0.75, 0.74, 0.7],  # no gap
                         [0.30, 0.10, 0.09, 0.08, 0.07, 0.06, 0.0]])  # gap from a low base also fires (RASE)
    fires, best = rase_decision(sims, 6, 0.9, 0.15, 0.05)
    assert fires.tolist() == [True, True, False, True] and best.tolist() == [0, 0, 0, 0]
    one = rase_decision(torch.tensor([[0.85], [0.95]]), 6, 0.9, 0.15, 0.05)[0]
    assert one.tolist() == [False, True]  # one stored fact: only the absolute threshold


def test_rrome_patches_only_rows_that_retrieve(tiny_llama, stats_env):
    editor, _ = _editor(tiny_llama, "rrome", stats_env)
    req = toy_cases(1)[0].request
    texts = [f"{req.prompt} {req.target_new}", "Water boils at one hundred degrees"]
    enc = [tiny_llama.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        base = model_logits(tiny_llama.model, ids, mask)
        editor.edit(req)
        assert editor.retrieve(ids, mask).tolist() == [0, -1]
        out = editor.logits(ids, mask)
    m1 = mask[1].bool()
    assert torch.equal(out[1][m1], base[1][m1])              # the unrelated row is untouched
    assert not torch.allclose(out[0], base[0])                # the edited fact's row is patched
    editor.reset()


def test_rrome_retrieval_query_is_the_prompt_without_target_tokens(tiny_llama, stats_env):
    """Scoring and generation pass ``prompt_len``: the retriever sees prompts, never answers."""
    editor, _ = _editor(tiny_llama, "rrome", stats_env)
    case = toy_cases(1)[0]
    scorer = Scorer(tiny_llama.tokenizer, exact_match=True)
    scorer.score(editor, [case], reference=True)
    editor.edit(case.request)
    seen: list[str] = []
    encode_texts = editor.encoder.encode
    editor.encoder.encode = lambda texts, *a, **k: (seen.extend(texts), encode_texts(texts, *a, **k))[1]
    scorer.score(editor, [case])
    prompts = {case.request.prompt} | {p.prompt for _, p in case.probes("generality")} | \
        {p.prompt for _, p in case.probes("locality")}
    assert seen and set(seen) <= {p.strip() for p in prompts}
    assert not any(case.request.target_new in q for q in seen)
    editor.reset()


def test_unknown_hyperparameter_and_empty_target_fail_clearly(tiny_llama, stats_env):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        _editor(tiny_llama, "rome", stats_env, "+editor.layer=3")
    editor, _ = _editor(tiny_llama, "rome", stats_env)
    with pytest.raises(ValueError, match="empty target"):
        editor.edit(EditRequest("The capital of Country0 is", " ", "Country0"))


def test_sentence_encoder_is_normalised_and_semantic():
    from editors.lib.encoder import SentenceEncoder

    enc = SentenceEncoder("minilm")
    v = enc.encode(["The capital of France is Paris", "Paris is the capital city of France",
                    "Water boils at one hundred degrees"])
    assert v.shape == (3, 384) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (v[0] @ v[1]) > 0.8 > (v[0] @ v[2])


# --------------------------------------------------------------------------- statistics
def test_stats_one_pass_for_all_layers_then_cached(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS[:10]) + "\n")
    cfg = StatsConfig(dataset=str(corpus), n_samples=10, max_length=16, batch_size=4, progress=False)
    model, tok, arch = tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch
    calls = []
    handle = arch.module(model, "embed").register_forward_hook(lambda *a: calls.append(1))
    try:
        first = second_moments(model, tok, arch, [1, 2], cfg)
        assert len(calls) == 3                      # 10 texts / 4 per batch: one pass for both layers
        second = second_moments(model, tok, arch, [2, 1], cfg)
        assert len(calls) == 3                      # loaded from the cache: no forward pass
        only_one = second_moments(model, tok, arch, [1], cfg)
        assert len(calls) == 3
    finally:
        handle.remove()
    for layer in (1, 2):
        assert torch.equal(first[layer], second[layer])
    assert torch.equal(only_one[1], first[1])
    files = list((tmp_path / "cache" / "stats").rglob("*"))
    assert sum(f.suffix == ".pt" for f in files) == 2 and not any(f.name.endswith(".tmp") for f in files)
    # the statistic is E[k k^T] over every real token of the texts
    feats = []
    h = arch.module(model, "mlp_out", 1).register_forward_hook(lambda m, a, o: feats.append(a[0][0]))
    try:
        with torch.no_grad():
            for text in layer_stats.corpus_texts(cfg):
                ids = tok(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
                model(ids)
    finally:
        h.remove()
    x = torch.cat(feats)
    assert torch.allclose(first[1], x.T @ x / x.shape[0], atol=1e-5)


def test_statistics_provenance_counts_the_texts_and_tokens_used(tiny_llama, tmp_path, monkeypatch, caplog):
    """Provenance (Editor.provenance, the cache files) holds the corpus's actual counts, and
    each editor warns once when the corpus has fewer texts than requested."""
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(CORPUS[:25]) + "\n\n   \n")         # blank lines are not texts
    tok = tiny_llama.tokenizer
    tokens = sum(len(tok(t, truncation=True, max_length=16)["input_ids"]) for t in CORPUS[:25])
    stats = [f"editor.mom2_dataset={corpus}", "editor.mom2_n_samples=100", "editor.mom2_max_length=16"]

    def fewer_warnings():
        return [r for r in caplog.records if r.levelname == "WARNING" and "fewer than the 100 requested" in r.getMessage()]

    with caplog.at_level("WARNING"):
        rome = build_editor(compose_cfg("model=tiny-llama", "editor=rome", *stats), tiny_llama)
    cov = rome.provenance()["covariance"]
    assert cov["used"] is True and cov["corpus"] == str(corpus) and cov["corpus_texts"] == 25
    assert cov["requested_samples"] == 100 and cov["texts"] == 25 and cov["tokens"] == tokens
    assert cov["layers"] == [1] and cov["max_length"] == 16
    assert len(fewer_warnings()) == 1
    (file,) = (tmp_path / "cache" / "stats").rglob("*.pt")
    saved = torch.load(file, weights_only=True)
    assert saved["texts"] == 25 and saved["tokens"] == tokens and saved["requested_samples"] == 100
    # MEMIT: layer 1 from the cache, layer 2 computed; the same counts, one warning for the editor
    caplog.clear()
    with caplog.at_level("WARNING"):
        memit = build_editor(compose_cfg("model=tiny-llama", "editor=memit", *stats), tiny_llama)
    mcov = memit.provenance()["covariance"]
    assert (mcov["texts"], mcov["tokens"], mcov["layers"]) == (25, tokens, [1, 2])
    assert len(fewer_warnings()) == 1
    # enough texts: the first 10 of the shuffle, no warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        ten = build_editor(compose_cfg("model=tiny-llama", "editor=rome", *stats, "editor.mom2_n_samples=10"),
                           tiny_llama)
    texts = layer_stats.corpus_texts(StatsConfig(dataset=str(corpus), n_samples=10, max_length=16))
    assert ten.provenance()["covariance"]["texts"] == 10 == len(texts)
    assert ten.provenance()["covariance"]["tokens"] == sum(
        len(tok(t, truncation=True, max_length=16)["input_ids"]) for t in texts)
    assert not [r for r in caplog.records if "requested" in r.getMessage()]
    # without C^-1 there are no statistics, and provenance says so
    off = build_editor(compose_cfg("model=tiny-llama", "editor=rome", *stats, "editor.mom2_adjustment=false"),
                       tiny_llama)
    assert off.provenance() == {"covariance": {"used": False, "reason": "mom2_adjustment=false"}}


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_rome_edits_counterfact_facts_on_smollm2(tmp_path, smollm2):
    from editbench.data import load_cases

    cases = load_cases("cf", shared("counterfact", "counterfact-edit.json"))
    cfg = compose_cfg("model=smollm2", "editor=rome", "data=cf", f"out_dir={tmp_path}", "runner.progress=false",
                      "runner.steps=[1]", "runner.n_cases=5", "runner.exact_match=false",
                      f"editor.mom2_dataset={shared('corpus', 'wiki_paragraphs.txt')}",
                      "editor.mom2_n_samples=200", "editor.mom2_max_length=128", "editor.mom2_progress=false",
                      "editor.context_template_length_params=[[5,5]]")
    path = run(cfg, cases=cases, lm=smollm2)
    s = pd.read_csv(path / "summary.csv").set_index("metric")["mean"]
    assert s["reliability"] >= 0.8 and s["locality"] >= 0.8, s
