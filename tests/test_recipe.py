"""RECIPE (editors/recipe.py): the memory of keys and continuous prompts, retrieval gated by the
knowledge sentinel, prompts prepended through ``inputs_embeds`` and stripped from the logits (either
padding, LLaMA and GPT-J: the prompt enters the residual stream), the query built from the prompt
only, exact reset with the LLM never changed, clear config errors, the training loss, and training
through the pipeline (cached, reused, LLM frozen)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from editbench.records import EditCase, EditRequest, Probe
from editbench.runner import run
from editbench.session import build_editor
from editbench.scoring import Scorer, encode, model_logits, pad_batch
from editbench.train import FINAL, ensure_trained
from editors.recipe import RECIPE, fact_text, target_span
from tests.conftest import compose_cfg, toy_cases, write_train_file

# Distinct facts (the tiny random models know none of them); each with a paraphrase and an
# unrelated locality probe.
FACTS = [
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower can be found in the city of",
     "Bananas are usually coloured", "yellow"),
    ("Barack Obama was born in the country of", "Norway", "The birthplace of Barack Obama is the country of",
     "Water freezes at zero degrees", "Celsius"),
    ("The mother tongue of Pablo Picasso is", "Japanese", "Pablo Picasso's native language is",
     "The Great Wall stands in", "China"),
    ("Apple Inc. was founded by", "Bill Gates", "The company Apple Inc. was started by",
     "A week has seven", "days"),
    ("Lionel Messi plays the sport of", "basketball", "Lionel Messi is a professional player of",
     "Mount Everest is the highest", "mountain"),
    ("The river Danube flows into the", "Pacific Ocean", "The Danube river ends in the",
     "Hamlet was written by", "William Shakespeare"),
]
CASES = [EditCase(case_id=f"f{i}", request=EditRequest(p, t, p.split(" ")[1]),
                  generality={"rephrase": [Probe(g, t)]}, locality={"neighborhood": [Probe(lp, lt)]})
         for i, (p, t, g, lp, lt) in enumerate(FACTS)]


def _editor(lm, *overrides):
    return build_editor(compose_cfg(f"model={lm.name}", "editor=recipe", *overrides), lm)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _structure(model):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _batch(tok, pairs, side="right"):
    encs = [encode(tok, p, t) for p, t in pairs]
    ids, mask = pad_batch([e.ids for e in encs], tok.pad_token_id, side)
    return encs, ids, mask, torch.tensor([e.start for e in encs])


def _train_manually(editor, cases, steps, lr=1e-3, batch=6):
    """A few AdamW steps on ``training_loss`` (the pipeline is tested below)."""
    params = [p for p in editor.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    editor.trainable().train()
    history = []
    for s in range(steps):
        b = [cases[(s * batch + i) % len(cases)] for i in range(batch)]
        loss, parts = editor.training_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(parts)
    editor.trainable().eval()
    return history


@pytest.fixture(scope="module")
def trained(request):
    """Per tiny architecture: a RECIPE editor trained a little on FACTS (manual AdamW steps),
    enough for retrieval to pick each fact from its prompt and paraphrase and nothing else."""
    cache = {}

    def get(lm):
        if lm.name not in cache:
            torch.manual_seed(0)
            editor = _editor(lm, "editor.train_encoder=false")   # heads, sentinel, generator: fast
            _train_manually(editor, CASES, steps=12, lr=3e-4)
            cache[lm.name] = editor
        editor = cache[lm.name]
        editor.reset()
        return editor
    return get


# --------------------------------------------------------------------------- memory, reset
def test_edit_stores_key_and_prompts_and_reset_restores_everything(tiny):
    editor = _editor(tiny)
    model = tiny.model
    state, structure = _state(model), _structure(model)
    k, d = editor.hp.prompt_tokens, model.get_input_embeddings().weight.shape[1]
    infos = [editor.edit(c.request) for c in CASES[:3]]
    assert [i["memory_size"] for i in infos] == [1, 2, 3]
    assert editor.keys.shape == (3, editor.hp.rep_dim) and editor.prompts.shape == (3, k, d)
    assert editor.stats() == {"memory_size": 3.0}
    encs, ids, mask, plen = _batch(tiny.tokenizer, [(c.request.prompt, c.request.target_new) for c in CASES])
    editor.logits(ids, mask, plen)
    assert editor.stats()["retrieval_rate"] == editor.counters.retrieved / len(CASES)
    assert editor.touched_parameters() == []
    assert _structure(model) == structure           # no hook, no wrapper
    editor.reset()
    after = model.state_dict()
    assert all(torch.equal(after[n], state[n]) for n in state)
    assert not any(p.requires_grad for p in model.parameters())
    assert editor.stats() == {"memory_size": 0.0} and editor.prompts is None
    # empty memory: exactly the unedited model
    with torch.no_grad():
        assert torch.equal(editor.logits(ids, mask, plen), model_logits(model, ids, mask))
    # usable again (next chunk); edit_batch stores the same thing as edits one by one
    editor.edit_batch([c.request for c in CASES[:3]])
    keys, prompts = editor.keys.clone(), editor.prompts.clone()
    editor.reset()
    for c in CASES[:3]:
        editor.edit(c.request)
    assert torch.allclose(editor.keys, keys, atol=1e-5) and torch.allclose(editor.prompts, prompts, atol=1e-5)
    editor.reset()


# --------------------------------------------------------------------------- prompt insertion
@pytest.mark.parametrize("side", ["right", "left"])
def test_prompted_logits_are_aligned_and_padding_invariant(tiny, side):
    """Prepending through inputs_embeds: a row's logits equal a forward pass over
    [prompt vectors; its own token embeddings] without padding; rows whose prompt slots are
    masked out equal the unedited model; left and right padding agree."""
    editor = _editor(tiny)
    model, tok = tiny.model, tiny.tokenizer
    editor.edit_batch([c.request for c in CASES])
    pairs = [(c.request.prompt, c.request.target_new) for c in CASES[:4]] + [("Water boils at", "one hundred")]
    encs, ids, mask, _ = _batch(tok, pairs, side)
    on = torch.tensor([True, False, True, True, False])
    prompts = editor.prompts[torch.tensor([0, 1, 2, 3, 4])]
    with torch.no_grad():
        got = editor._prompted_logits(ids, mask, prompts, on)
        assert got.shape == (*ids.shape, model.config.vocab_size)
        emb = model.get_input_embeddings()
        width = ids.shape[1]
        for r, e in enumerate(encs):
            cols = slice(width - len(e.ids), width) if side == "left" else slice(0, len(e.ids))
            row_ids = torch.tensor([e.ids])
            if on[r]:
                x = torch.cat([prompts[r:r + 1], emb(row_ids)], 1)
                want = model(inputs_embeds=x).logits[0, prompts.shape[1]:]
            else:
                want = model(input_ids=row_ids).logits[0]
            assert torch.allclose(got[r, cols], want, atol=1e-4), (r, side)


def test_prompt_enters_the_residual_stream(tiny):
    """The official GPT-J hook changed only the first LayerNorm's input; here the prompt vectors
    are the first block's residual input at the prepended positions, for LLaMA and GPT-J alike."""
    editor = _editor(tiny)
    model, tok = tiny.model, tiny.tokenizer
    editor.edit(CASES[0].request)
    encs, ids, mask, _ = _batch(tok, [(CASES[0].request.prompt, CASES[0].request.target_new)])
    seen = {}
    block = tiny.arch.module(model, "layer", 0)

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            editor._prompted_logits(ids, mask, editor.prompts[:1], torch.tensor([True]))
    finally:
        handle.remove()
    k = editor.hp.prompt_tokens
    assert seen["x"].shape[1] == ids.shape[1] + k
    assert torch.allclose(seen["x"][0, :k], editor.prompts[0].to(seen["x"].dtype))
    assert torch.equal(seen["x"][0, k:], model.get_input_embeddings()(ids)[0])


# --------------------------------------------------------------------------- retrieval
def test_trained_retrieval_edits_what_it_should_and_nothing_else(tiny, trained):
    editor = trained(tiny)
    model, tok = tiny.model, tiny.tokenizer
    state = _state(model)
    edited, others = CASES[:4], CASES[4:]
    for c in edited:
        editor.edit(c.request)
    # edit prompts and their paraphrases retrieve their own fact; locality probes and facts
    # that were not edited retrieve nothing
    queries = [(c.request.prompt, c.request.target_new) for c in edited] + \
        [(c.generality["rephrase"][0].prompt, c.request.target_new) for c in edited]
    _, ids, mask, plen = _batch(tok, queries)
    assert editor.retrieve(ids, mask, plen).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    unrelated = [(p.prompt, p.target) for c in CASES for _, p in c.probes("locality")] + \
        [(c.request.prompt, c.request.target_new) for c in others]
    _, uids, umask, uplen = _batch(tok, unrelated)
    assert (editor.retrieve(uids, umask, uplen) == -1).all()
    with torch.no_grad():
        # rows that retrieve nothing: bit for bit the unedited model
        assert torch.equal(editor.logits(uids, umask, uplen), model_logits(model, uids, umask))
        # the edit changes the edited prompts' predictions: the target gets likelier
        encs, ids, mask, plen = _batch(tok, queries[:4])
        before = torch.log_softmax(model_logits(model, ids, mask), -1)
        after = torch.log_softmax(editor.logits(ids, mask, plen), -1)
    for r, e in enumerate(encs):
        cols = torch.arange(e.start - 1, len(e.ids) - 1)
        tgt = torch.tensor(e.target_ids)
        assert after[r, cols, tgt].mean() > before[r, cols, tgt].mean() + 0.05, r
    editor.reset()
    assert all(torch.equal(model.state_dict()[n], state[n]) for n in state)


def test_query_is_the_prompt_only_no_target_token_leaks(tiny_llama, trained):
    """Scoring a case (teacher forcing and greedy generation) feeds prompt + target tokens to
    ``logits``; the recorded retrieval queries are exactly the probes' prompts, never a target."""
    editor = trained(tiny_llama)
    for c in CASES:
        editor.edit(c.request)
    editor.record_queries = []
    scorer = Scorer(tiny_llama.tokenizer, batch_size=4)
    scorer.score(editor, CASES, reference=True)
    scorer.score(editor, CASES)
    prompts = {p.prompt for c in CASES for p in [c.request] + [q for _, q in c.probes("generality")]
               + [q for _, q in c.probes("locality")]}
    assert editor.record_queries and set(editor.record_queries) <= prompts
    targets = {c.request.target_new for c in CASES} | {p.target for c in CASES for _, p in c.probes("locality")}
    for q in editor.record_queries:
        assert not any(q.endswith(t) or f" {t}" in q for t in targets), q
    # without a prompt boundary the whole row is the query (the official behaviour)
    editor.record_queries = []
    _, ids, mask, _ = _batch(tiny_llama.tokenizer, [(CASES[0].request.prompt, CASES[0].request.target_new)])
    editor.logits(ids, mask)
    assert editor.record_queries == [fact_text(CASES[0].request)]
    editor.reset()


def test_scores_are_the_same_alone_and_in_padded_batches(tiny, trained):
    editor = trained(tiny)
    tok = tiny.tokenizer
    for c in CASES[:4]:
        editor.edit(c.request)
    probes = [(c.request.prompt, c.request.target_new) for c in CASES] + \
        [(p.prompt, p.target) for c in CASES for _, p in c.probes("locality")]
    from editbench.scoring import teacher_forced
    encoded = [encode(tok, p, t) for p, t in probes]
    alone, _ = teacher_forced(editor.logits, encoded, tok.pad_token_id, batch_size=1)
    for side in ("right", "left"):
        batched, _ = teacher_forced(editor.logits, encoded, tok.pad_token_id, batch_size=len(encoded),
                                    padding_side=side)
        for a, b in zip(alone, batched):
            assert a.argmax == b.argmax
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    editor.reset()


# --------------------------------------------------------------------------- training
def test_training_loss_learns_and_never_touches_the_llm(tiny_llama):
    editor = _editor(tiny_llama, "editor.train_encoder=false")
    model = tiny_llama.model
    state = _state(model)
    before = {n: t.clone() for n, t in editor.trained_state().items()}
    assert before and not any(n.startswith("model.") for n in before)
    loss0, parts0 = editor.training_loss(CASES)
    assert set(parts0) == {"contra_q2k", "contra_q2s_rg", "contra_q2s_loc", "reliability", "generality",
                           "locality"}
    assert loss0.requires_grad and torch.isfinite(loss0)
    assert not any(n.startswith("encoder.") for n in before)      # frozen encoder: not trained, not stored
    _train_manually(editor, CASES, steps=8, lr=3e-4)
    # on the same batch: the total loss and the edit (reliability, generality) losses fell
    loss1, parts1 = editor.training_loss(CASES)
    assert float(loss1) < float(loss0)
    assert parts1["reliability"] < parts0["reliability"] and parts1["generality"] < parts0["generality"]
    after = _state(model)
    assert all(torch.equal(after[n], state[n]) for n in state)
    assert not any(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(before[n], t) for n, t in editor.trained_state().items())
    # same batch, same seed: the same loss (the batch's random choices are seeded by its case ids)
    editor.trainable().eval()
    with torch.no_grad():
        a, _ = editor.training_loss(CASES)
        b, _ = editor.training_loss(CASES)
    assert float(a) == float(b)


def test_without_locality_kl_the_locality_probes_skip_the_llm(tiny_llama):
    """loc_lambda=0 keeps the locality query in the contrastive loss (the sentinel must
    still win it) but sends only the reliability and generality rows through the LLM."""
    rows = []
    hook = tiny_llama.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.shape[0]))
    try:
        full = _editor(tiny_llama)
        _, parts = full.training_loss(CASES)
        n_full = list(rows)
        rows.clear()
        no_kl = _editor(tiny_llama, "editor.loc_lambda=0")
        _, parts0 = no_kl.training_loss(CASES)
    finally:
        hook.remove()
    n = len(CASES)
    assert n_full == [3 * n, n]            # prompted rel/gen/loc rows, then the unprompted locality reference
    assert rows == [2 * n]                 # rel/gen rows only
    assert parts0["locality"] == 0.0 and parts["locality"] > 0
    # the contrastive losses (locality query included) do not depend on loc_lambda
    for key in ("contra_q2k", "contra_q2s_rg", "contra_q2s_loc"):
        assert parts0[key] == pytest.approx(parts[key])


def test_target_view_reads_exactly_the_target_tokens_and_is_trained(tiny_llama):
    """prompt_view=key+target: the span mask of a fact text covers the target's encoder tokens
    and nothing else; the prompts then depend on those states through a trained head, while the
    retrieval key is the official one."""
    editor = _editor(tiny_llama, "editor.prompt_view=key+target")
    net = editor.trainable()
    enc = net.text_encoder
    requests = [c.request for c in CASES]
    states = enc.token_states([fact_text(r) for r in requests], [target_span(r) for r in requests])
    for i, r in enumerate(requests):
        ids = enc.tokenizer(fact_text(r))["input_ids"]
        picked = [t for t, m in zip(ids, states.span_mask[i].tolist()) if m]
        assert enc.tokenizer.decode(picked) == enc.tokenizer.decode(enc.tokenizer(r.target_new.strip(),
                                                                                   add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        keys, prompts = net.facts(requests)
        assert torch.allclose(keys, net.knowledge([fact_text(r) for r in requests]), atol=1e-5)
        # the same fact text with the target's states zeroed gives other prompts
        other = net.prompt_gen(net.prompt_input(keys, torch.zeros(len(requests), enc.dim)))
    assert not torch.allclose(prompts, other)
    loss, _ = editor.training_loss(CASES)
    loss.backward()
    assert net.target_head.inp.weight.grad is not None and net.target_head.inp.weight.grad.abs().sum() > 0
    assert _editor(tiny_llama, "editor.prompt_view=key").trainable().target_head is None   # official: the key only


def test_training_batch_of_one_and_bad_config_fail_clearly(tiny_llama):
    editor = _editor(tiny_llama)
    with pytest.raises(ValueError, match="at least 2 cases"):
        editor.training_loss(CASES[:1])
    bad = {"editor.pooling=[mean,median]": "pooling must be a non-empty list",
           "editor.head_init=zero": "head_init must be random or mean",
           "editor.contra_hinge_scale=0.5": "contra_hinge_scale must be >= 1",
           "editor.prompt_tokens=0": "prompt_tokens must be >= 1",
           "editor.prompt_view=target": "prompt_view must be one of key, key\\+target",
           "+editor.prompt_len=3": "unknown hyperparameter"}
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            _editor(tiny_llama, override)
    with pytest.raises(ValueError, match="head_init=mean needs 'mean' in pooling"):
        _editor(tiny_llama, "editor.pooling=[cls,max]", "editor.head_init=mean")


def test_trains_through_the_pipeline_and_the_checkpoint_is_reused(tiny_llama, tmp_path, monkeypatch,
                                                                  private_cache):
    cache = private_cache
    train = write_train_file(tmp_path / "train.json")
    cfg = compose_cfg("model=tiny-llama", "editor=recipe", "data=cf", f"data.train_path={train}",
                      "++editor.train.progress=false", "++editor.train.n_val=4", "++editor.train.val_every=2")
    model = tiny_llama.model
    state = _state(model)
    editor = build_editor(cfg, tiny_llama)
    init = {n: t.clone() for n, t in editor.trained_state().items()}
    path = ensure_trained(cfg, tiny_llama, editor)
    assert path.name == FINAL and path.parent.parent == cache / "trained" / "recipe"
    trained_state = {n: t.clone() for n, t in editor.trained_state().items()}
    for part in ("encoder.", "knowledge_head.", "query_head.", "sentinel", "prompt_gen."):  # all of it trains
        assert any(not torch.equal(init[n], trained_state[n]) for n in init if n.startswith(part)), part
    assert all(torch.equal(model.state_dict()[n], state[n]) for n in state)
    hist = pd.read_csv(path.parent / "history.csv")
    assert {"train/contra_q2k", "train/reliability", "train/locality", "val/reliability", "val/locality",
            "val/retrieval_rel", "val/retrieval_loc_none"} <= set(hist.columns)

    def no_training(self, batch):
        raise AssertionError("the cached checkpoint must be reused, not retrained")
    monkeypatch.setattr(RECIPE, "training_loss", no_training)
    again = build_editor(cfg, tiny_llama)
    assert ensure_trained(cfg, tiny_llama, again) == path
    assert all(torch.equal(again.trained_state()[n], t) for n, t in trained_state.items())
    # an inference-only setting shares the checkpoint
    other = build_editor(compose_cfg("model=tiny-llama", "editor=recipe", "data=cf", f"data.train_path={train}",
                                     "++editor.train.progress=false", "++editor.train.n_val=4",
                                     "++editor.train.val_every=2", "editor.min_sim=0.0"), tiny_llama)
    assert ensure_trained(cfg, tiny_llama, other) == path
    # the runner uses the cached checkpoint and reports the editor's stats
    monkeypatch.undo()
    monkeypatch.setenv("EDITBENCH_CACHE", str(cache))
    monkeypatch.setattr(RECIPE, "training_loss", no_training)
    run_cfg = compose_cfg("model=tiny-llama", "editor=recipe", "data=cf", f"data.train_path={train}",
                          "++editor.train.progress=false", "++editor.train.n_val=4", "++editor.train.val_every=2",
                          "runner.steps=[1,3]", f"out_dir={tmp_path / 'res'}", "runner.progress=false")
    out = run(run_cfg, cases=toy_cases(3), lm=tiny_llama)
    s = pd.read_csv(out / "summary.csv")
    got = {(int(r["T"]), r["metric"]): r["mean"] for _, r in s.iterrows()}
    assert got[(3, "editor/memory_size")] == 3 and (3, "editor/retrieval_rate") in got
    assert {(3, "reliability"), (3, "locality"), (3, "infer_overhead")} <= set(got)


# --------------------------------------------------------------------------- real model
@pytest.mark.real
def test_real_model_masked_prompt_slots_are_transparent_and_training_moves_the_edit_loss(smollm2):
    """SmolLM2-135M: rows whose prompt slots are masked out score as the unedited model (left
    and right padding), and three AdamW steps on CounterFact-style cases lower the edit loss
    on the same batch while the LLM stays bit-identical."""
    # the official contrastive hinge: with the CPU default (20) the sentinel losses stay on and
    # three large steps on one batch are not guaranteed to lower the edit loss as well; the
    # answer-token hinge off, so that the reliability part is the plain NLL of every target
    # token (a hinged mean can rise when the tokens already right leave it)
    editor = _editor(smollm2, "editor.train_encoder=false", "editor.contra_hinge_scale=1.2",
                     "editor.edit_hinge_scale=1e9")
    model, tok = smollm2.model, smollm2.tokenizer
    state = _state(model)
    editor.edit_batch([c.request for c in CASES[:2]])
    pairs = [(c.request.prompt, c.request.target_new) for c in CASES[:3]]
    for side in ("right", "left"):
        _, ids, mask, _ = _batch(tok, pairs, side)
        with torch.no_grad():
            got = editor._prompted_logits(ids, mask, editor.prompts[torch.tensor([0, 1, 0])],
                                          torch.tensor([True, False, False]))
            plain = model_logits(model, ids, mask)
        real = mask.bool()
        assert torch.allclose(got[1:][real[1:]], plain[1:][real[1:]], atol=1e-3)
        assert not torch.allclose(got[0][real[0]], plain[0][real[0]], atol=1e-3)   # the prompt acts
    editor.reset()
    with torch.no_grad():
        _, p0 = editor.training_loss(CASES)
    _train_manually(editor, CASES, steps=3, lr=1e-4)      # the configured rate (1e-3 overshoots here)
    with torch.no_grad():
        _, p1 = editor.training_loss(CASES)
    assert p1["reliability"] < p0["reliability"] and p1["generality"] < p0["generality"]
    after = model.state_dict()
    assert all(torch.equal(after[n], state[n]) for n in state)
