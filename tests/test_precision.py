"""Float32 masters of the edited weights in half-precision models (editors/lib/precision.py).

LLaMA-2 and GPT-J load in bfloat16. The weight editors keep a float32 master of every weight
they change, apply each update to it, and write it rounded into the model. These tests use
the tiny models in bfloat16 and compare an edit with the same edit of the same weights in
float32 (the float32 "twin" of the bfloat16 model):

* the change in the target's NLL must match float32 within a stated tolerance, and the same
  edit WITHOUT masters (the code before them: the update rounded to bfloat16 and added in
  bfloat16) must miss that tolerance, so the tests fail if the masters are bypassed;
* reset restores the bfloat16 weights bit for bit and drops the masters.

The NLLs are evaluated in float32 on a copy of the model that receives the edited weights
(the bfloat16 values exactly): what is compared is the weights an edit leaves, not bfloat16's
rounding of the logits, which is the same for every way of editing. The edits themselves run
in the bfloat16 model, gradients and forward passes included.
"""
from __future__ import annotations

import copy

import pytest
import torch

from editbench.models import LoadedModel, arch_spec, load_model
from editbench.session import build_editor
from editors.lib.locate import add_to_weight
from editors.lib.precision import Float32Masters, wants_master
from tests.conftest import compose_cfg, target_nll, toy_cases
from tests.test_locate import stats_env  # noqa: F401  (the statistics fixture ROME needs)

#: |ΔNLL(bfloat16 with masters) - ΔNLL(float32)| must be within this fraction of |ΔNLL(float32)|
#: (the largest over the probed targets); the same edit without masters must miss it
TOLERANCE = 0.10


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gptj"])
def bf16(request):
    """(the tiny model in bfloat16, its float32 twin with the same weights, a float32 evaluator)."""
    lm = load_model(compose_cfg(f"model={request.param}", "model.dtype=bfloat16").model)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    twin = copy.deepcopy(lm.model).float()
    evaluator = copy.deepcopy(lm.model).float()
    return lm, LoadedModel(model=twin, tokenizer=lm.tokenizer, arch=arch_spec(twin), name=lm.name), evaluator


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _float32_nlls(evaluator, lm, names, probes):
    """Target NLLs in float32 with ``lm``'s current values of the parameters ``names``."""
    saved = {n: evaluator.get_parameter(n).detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            evaluator.get_parameter(n).copy_(lm.model.get_parameter(n))
    try:
        return [target_nll(evaluator, lm.tokenizer, r.prompt, r.target_new) for r in probes]
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                evaluator.get_parameter(n).copy_(v)


def _nll_moves(lm, evaluator, cfg, sequence, probes, masters=True):
    """Change of each probe's target NLL after editing ``lm`` with ``sequence`` (lifelong)."""
    editor = build_editor(cfg, lm)
    if not masters:
        # the code before masters: add_to_weight / Adam in the model's own dtype
        editor.masters.master = lambda name, param: None
    before = _float32_nlls(evaluator, lm, [], probes)
    for r in sequence:
        editor.edit(r)
    after = _float32_nlls(evaluator, lm, editor.touched_parameters(), probes)
    editor.reset()
    return [a - b for a, b in zip(after, before)]


def _compare(bf16, cfg, sequence, probes, label):
    lm, twin, evaluator = bf16
    moves = {"float32": _nll_moves(twin, evaluator, cfg, sequence, probes),
             "masters": _nll_moves(lm, evaluator, cfg, sequence, probes),
             "plain": _nll_moves(lm, evaluator, cfg, sequence, probes, masters=False)}
    ref = max(abs(x) for x in moves["float32"])
    err = {k: max(abs(a - b) for a, b in zip(moves[k], moves["float32"])) for k in ("masters", "plain")}
    print(f"\n{label} {lm.name}: dNLL float32 {[round(x, 5) for x in moves['float32']]}, "
          f"masters {[round(x, 5) for x in moves['masters']]}, plain {[round(x, 5) for x in moves['plain']]}; "
          f"error masters {err['masters'] / ref:.1%}, plain {err['plain'] / ref:.1%} of |dNLL| {ref:.5f}")
    assert ref > 1e-3, moves                      # the float32 edit moved its target materially
    assert err["masters"] <= TOLERANCE * ref, (err, ref, moves)
    assert err["plain"] > TOLERANCE * ref, (err, ref, moves)   # without masters the test fails
    return moves


# --------------------------------------------------------------------------- outcome vs float32
def test_ft_in_bfloat16_moves_the_target_as_in_float32(bf16):
    """FT at LLaMA-2's lr 4e-5 (conf/editor_model/ft/llama2.yaml), three lifelong edits: in plain
    bfloat16 every Adam step smaller than half a unit in the last place of a weight is lost."""
    lm = bf16[0]
    cfg = compose_cfg(f"model={lm.name}", "editor=ft", "editor.lr=4e-5")
    reqs = [c.request for c in toy_cases(3)]
    _compare(bf16, cfg, reqs, reqs, "FT")


def test_rome_in_bfloat16_moves_the_target_as_in_float32(bf16, stats_env):  # noqa: F811
    """ROME, a lifelong sequence of 20 small updates (each below bfloat16's resolution of most
    weights: clamp 0.01 x |W k*|) of the same fact: without masters each one is rounded into
    the weight and most of it is lost; with masters they accumulate as in float32.

    Without C^-1 (as EasyEdit's LLaMA config): with it, the tiny models' covariance from a
    60-paragraph corpus is ill-conditioned and amplifies bfloat16's forward-pass noise in
    the keys, which masters do not (and cannot) remove."""
    lm = bf16[0]
    cfg = compose_cfg(f"model={lm.name}", "editor=rome", *stats_env, "editor.mom2_adjustment=false",
                      "editor.clamp_norm_factor=0.01", "editor.v_num_grad_steps=5")
    req = toy_cases(1)[0].request
    _compare(bf16, cfg, [req] * 20, [req], "ROME")


# --------------------------------------------------------------------------- the mechanism
def test_rome_weight_is_the_float32_sum_of_its_updates_rounded_once(bf16, stats_env):  # noqa: F811
    lm = bf16[0]
    editor = build_editor(compose_cfg(f"model={lm.name}", "editor=rome", *stats_env), lm)
    before = _state(lm.model)
    expected = plain = None
    for c in toy_cases(3):
        editor.edit(c.request)
        (up,) = editor.last_updates
        param = lm.model.get_parameter(up.weight)
        if expected is None:
            expected, plain = before[up.weight].float(), before[up.weight].clone()
        lm.arch.weight_out_in(expected).add_(up.delta())
        lm.arch.weight_out_in(plain).add_(up.delta().to(plain.dtype))   # the update rounded, added in bf16
        assert param.dtype == torch.bfloat16
        assert torch.equal(editor.masters.master(up.weight, param), expected)
        assert torch.equal(param, expected.to(torch.bfloat16))
    differs = (plain != param).float().mean().item()
    assert differs > 0.01, differs     # rounding after every edit would have left other weights
    editor.reset()
    assert len(editor.masters) == 0
    assert all(torch.equal(lm.model.state_dict()[n], before[n]) for n in before)


@pytest.mark.parametrize("name", ["ft", "rome", "memit", "wilke", "rrome"])
def test_bfloat16_edits_keep_masters_and_reset_restores_bit_for_bit(bf16, stats_env, name):  # noqa: F811
    lm = bf16[0]
    if name == "wilke" and lm.name != "tiny-llama":
        pytest.skip("one architecture is enough for WilKE (ROME's apply)")
    extra = [] if name == "ft" else list(stats_env)
    if name == "rrome":
        extra.append("editor.layers=[1,2]")   # two layers: the first is changed while the second is computed
    editor = build_editor(compose_cfg(f"model={lm.name}", f"editor={name}", *extra), lm)
    before = _state(lm.model)
    for c in toy_cases(2):
        editor.edit(c.request)
    if name == "rrome":
        assert editor.touched_parameters() == []
        assert all(torch.equal(lm.model.state_dict()[n], before[n]) for n in before)  # restored after each edit
    else:
        touched = editor.touched_parameters()
        assert touched and sorted(editor.masters.names()) == sorted(touched)
        for n in touched:
            param = lm.model.get_parameter(n)
            master = editor.masters.master(n, param)
            assert master.dtype == torch.float32 and torch.equal(param, master.to(param.dtype))
            assert not torch.equal(param, before[n])
    editor.reset()
    assert len(editor.masters) == 0 and editor.touched_parameters() == []
    after = lm.model.state_dict()
    assert all(after[n].dtype == before[n].dtype and torch.equal(after[n], before[n]) for n in before)
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_ft_norm_constraint_clamps_the_master_in_bfloat16(bf16):
    lm = bf16[0]
    eps = 1e-3
    editor = build_editor(compose_cfg(f"model={lm.name}", "editor=ft", f"editor.norm_constraint={eps}"), lm)
    name = editor.weight_names[0]
    w0 = lm.model.get_parameter(name).detach().clone()
    editor.edit(toy_cases(1)[0].request)
    param = lm.model.get_parameter(name)
    master = editor.masters.master(name, param)
    moved = (master - w0.float()).abs().max().item()
    editor.reset()
    assert 0 < moved <= eps + 1e-7     # float32 rounding of w0 ± eps
    assert torch.equal(lm.model.get_parameter(name), w0)


# --------------------------------------------------------------------------- Float32Masters itself
def test_masters_accumulate_updates_that_bfloat16_rounds_away(tiny_llama):
    arch = tiny_llama.arch
    w = torch.full((4, 4), 0.02, dtype=torch.bfloat16)
    plain = w.clone()
    originals = {"w": w.clone()}
    masters = Float32Masters(originals)
    expected = originals["w"].float()
    for _ in range(100):
        add_to_weight(w, torch.full((4, 4), 1e-5), arch, masters.master("w", w))
        add_to_weight(plain, torch.full((4, 4), 1e-5), arch)
        expected += 1e-5
    assert torch.equal(plain, originals["w"])                     # bf16(0.02 + 1e-5) == 0.02, a hundred times
    assert torch.equal(masters.master("w", w), expected)          # float32: 0.02 + 100 x 1e-5
    assert torch.equal(w, expected.to(torch.bfloat16)) and not torch.equal(w, plain)
    assert abs(w[0, 0].item() - 0.021) < 1e-4
    # float32 parameters get no master: add_to_weight adds in place as it always did
    f = torch.zeros(2, 2)
    assert not wants_master(f) and masters.master("f", f) is None
    # a master whose original was replaced (reset + remember again) is made afresh
    originals["w"] = torch.full((4, 4), 0.5, dtype=torch.bfloat16)
    assert torch.equal(masters.master("w", w), torch.full((4, 4), 0.5))
    with pytest.raises(KeyError, match="remember"):
        masters.master("unknown", w)


# --------------------------------------------------------------------------- bf16 autocast of the optimisation loops
def test_low_precision_linears_put_back_the_same_float32_tensors(tiny_llama):
    from editors.lib.precision import low_precision_linears

    model = tiny_llama.model
    before = {n: (p.data.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    lin = tiny_llama.arch.module(model, "mlp_out", 1)
    with low_precision_linears([tiny_llama.arch.module(model, "layer", 1)], "bfloat16", keep=[lin.weight]):
        assert lin.weight.dtype == torch.float32                       # kept: trained weights stay float32
        q = tiny_llama.arch.module(model, "layer", 1).self_attn.q_proj.weight
        assert q.dtype == torch.bfloat16
        assert torch.equal(q, before[f"{tiny_llama.arch.name('layer', 1)}.self_attn.q_proj.weight"][1].bfloat16())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


@pytest.mark.parametrize("editor,extra", [("ft", ("editor.objective=target_new",)), ("rome", ()), ("grace", ()),
                                          ("tpatcher", ())])
def test_bfloat16_autocast_edits_like_float32_and_resets_bit_for_bit(tiny_llama, stats_env, editor, extra):  # noqa: F811
    """The same edit with ``editor.autocast=bfloat16`` moves the target like the float32 edit
    (within TOLERANCE of the float32 NLL change), leaves every weight float32, and reset restores
    the model bit for bit."""
    from editbench.scoring import encode

    req = toy_cases(1)[0].request
    e = encode(tiny_llama.tokenizer, req.prompt, req.target_new)
    ids, cols = torch.tensor([e.ids]), torch.arange(e.start - 1, len(e.ids) - 1)

    def nll(source) -> float:   # the target's mean NLL through the editor's own logits
        with torch.no_grad():
            logp = torch.log_softmax(source.logits(ids, torch.ones_like(ids))[0].float(), -1)
        return -logp[cols, torch.tensor(e.target_ids)].mean().item()

    state = _state(tiny_llama.model)
    nll0 = target_nll(tiny_llama.model, tiny_llama.tokenizer, req.prompt, req.target_new)
    moved = {}
    for ac in ("null", "bfloat16"):
        ed = build_editor(compose_cfg("model=tiny-llama", f"editor={editor}", f"editor.autocast={ac}", *extra),
                          tiny_llama)
        if editor == "tpatcher":
            ed.fit(toy_cases(6)[1:])
        torch.manual_seed(0)
        ed.edit(req)
        assert all(p.dtype == torch.float32 for p in tiny_llama.model.parameters())
        moved[ac] = nll(ed) - nll0
        ed.reset()
        after = tiny_llama.model.state_dict()
        assert all(torch.equal(after[n], state[n]) for n in state)
    assert moved["null"] < -0.1, moved
    assert abs(moved["bfloat16"] - moved["null"]) <= TOLERANCE * abs(moved["null"]), moved
