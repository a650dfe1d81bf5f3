"""Why DAFNet's edits fade over a sequence: measurements on a trained checkpoint.

    python benchmarks/dafnet_fade.py data=cf data.split=val \
        'data.train_path=${data_root}/dafset/cf_train.json' +data.train_kind=dafset \
        [editor=dafnet editor.<key>=...] [bench.n=100] [bench.checkpoint=<final.safetensors>] \
        [bench.out=/tmp/runs20/fade] [bench.modes=attention,none]

Without ``bench.checkpoint`` the configured editor is prepared as a run prepares it (the cached
checkpoint, else a training). ``bench.n`` cases of the split (the runner's seeded selection) are
edited ONE BY ONE (``edit``: the lifelong protocol) and, at checkpoints k = 1, 2, 5, 10, 20, 50,
100, ... the requests and locality probes of the k edits so far are scored (token accuracy on
``prompt -> target_new``; argmax agreement with the unedited model on the locality answers).

For each mode in ``bench.modes`` (the network's ``update_scale`` set on the loaded checkpoint:
``attention`` = the official convex update scales, ``none`` = every edit at scale 1, past kept),
it records per edit the past scale, the new edit's own scale a_k, and from them the effective
weight of every earlier edit, ``w_i(k) = s_i * prod_{i<j<=k} past_j``; the norm of the
accumulated weight change; the retention of the first edit; and the reliability of each edit
as a function of its age. Also measured once: each case edited alone (T=1 after a reset), and
whether ``edit_batch`` of all n edits (one sequence through the network) gives the weights of
n one-by-one edits.

Writes ``<bench.out>/fade_steps.csv`` (per mode and edit), ``fade_checkpoints.csv`` (per mode
and checkpoint), ``fade_summary.json`` and ``fade.png``. Only the split named is read.

    python benchmarks/dafnet_fade.py bench.history=<history.csv>[,<history.csv>...] bench.out=<png>

draws the validation curves of DAFNet trainings (``history.csv`` of the training pipeline; one
column of panels per file) with the curriculum's ``seq_n`` beside them, and exits.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import compose_cfg, split_bench_args  # noqa: E402
from editbench import plan  # noqa: E402
from editbench.checkpoints import load_checkpoint  # noqa: E402
from editbench.data import evaluation_cases  # noqa: E402
from editbench.models import load_model  # noqa: E402
from editbench.scoring import PlainLogits, encode, teacher_forced  # noqa: E402
from editbench.session import build_editor, prepare_editor  # noqa: E402

import editors  # noqa: E402,F401  (registers the editors)

BENCH = {"n": 100, "checkpoint": "", "out": "/tmp/runs20/fade", "modes": "attention,none", "batch_check": True,
         "history": "", "labels": ""}


def checkpoints_up_to(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        for m in (1, 2, 5):
            if m * k <= n:
                out.append(m * k)
        k *= 10
    return sorted(set(out + [n]))


def score(source, encoded, pad_id, device):
    res, _ = teacher_forced(source, encoded, pad_id, batch_size=32, device=device)
    return res


def main(argv: list[str]) -> None:
    hydra_args, bench = split_bench_args(argv, BENCH)
    if bench["history"]:
        files = bench["history"].split(",")
        labels = bench["labels"].split(",") if bench["labels"] else [Path(f).parent.name for f in files]
        plot_histories(files, labels, Path(bench["out"]))
        return
    cfg = compose_cfg(["editor=dafnet", "model=smollm2", *hydra_args])
    out = Path(bench["out"])
    out.mkdir(parents=True, exist_ok=True)
    n = int(bench["n"])
    cases = plan.select_cases(evaluation_cases(cfg.data), n, cfg.runner.seed, cfg.runner.shuffle)
    n = len(cases)
    lm = load_model(cfg.model)
    editor = build_editor(cfg, lm)
    if bench["checkpoint"]:
        tensors, _ = load_checkpoint(Path(bench["checkpoint"]))
        editor.load_trained_state(tensors)
        source = bench["checkpoint"]
    else:
        prepare_editor(cfg, lm, editor)
        source = "prepared by the config"
    editor.hyper.eval()
    tok, device = lm.tokenizer, next(lm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rel_enc = [encode(tok, c.request.prompt, c.request.target_new) for c in cases]
    loc_probes = [(i, p) for i, c in enumerate(cases) for _, p in c.probes("locality")]
    loc_enc = [encode(tok, p.prompt, p.target) for _, p in loc_probes]
    base = PlainLogits(lm.model)
    ref_loc = [r.argmax for r in score(base, loc_enc, pad, device)]
    base_rel = [sum(a == t for a, t in zip(r.argmax, r.target_ids)) / len(r.target_ids)
                for r in score(base, rel_enc, pad, device)]

    def rel_of(res):
        return [sum(a == t for a, t in zip(r.argmax, r.target_ids)) / len(r.target_ids) for r in res]

    def loc_of(res, idx):
        return [sum(a == b for a, b in zip(res[j].argmax, ref_loc[idx[j]])) / len(ref_loc[idx[j]])
                for j in range(len(idx))]

    t0 = time.process_time()
    # each case edited alone (T = 1): the strength of one edit without any other
    alone_rel, alone_loc = [], []
    for i, c in enumerate(cases):
        editor.reset()
        editor.edit(c.request)
        alone_rel += rel_of(score(editor, [rel_enc[i]], pad, device))
        idx = [j for j, (ci, _) in enumerate(loc_probes) if ci == i]
        if idx:
            alone_loc += loc_of(score(editor, [loc_enc[j] for j in idx], pad, device), idx)
    editor.reset()

    steps_rows, ck_rows, summary = [], [], {"cases": n, "checkpoint": source, "split": str(cfg.data.split),
                                           "data": str(cfg.data.name),
                                           "unedited_reliability": sum(base_rel) / n,
                                           "alone_reliability": sum(alone_rel) / n,
                                           "alone_locality": sum(alone_loc) / max(1, len(alone_loc)), "modes": {}}
    marks = checkpoints_up_to(n)
    nets = list(editor.hyper.nets.values())
    for mode in [m for m in str(bench["modes"]).split(",") if m]:
        for net in nets:
            net.update_scale = mode
        editor.reset()
        w0 = {m.weight: lm.model.get_parameter(m.weight).detach().clone() for m in editor.modules}
        past, own = [], []
        retention = {}                     # (checkpoint k, age) -> reliability of the edits of that age
        first = []
        for k, c in enumerate(cases, 1):
            info = editor.edit(c.request)
            past.append(float(info["past_scale"]))
            own.append(float(info["edit_scale"]))
            norm = float(torch.stack([(lm.model.get_parameter(w) - w0[w]).float().norm() for w in w0]).norm())
            weights = [own[i] * float(torch.tensor(past[i + 1:k]).prod()) if i + 1 < k else own[i]
                       for i in range(k)]
            steps_rows.append({"mode": mode, "k": k, "past_scale": past[-1], "edit_scale": own[-1],
                               "first_edit_weight": weights[0], "mean_weight": sum(weights) / k,
                               "shift_norm": norm})
            if k in marks:
                rel = rel_of(score(editor, rel_enc[:k], pad, device))
                idx = [j for j, (ci, _) in enumerate(loc_probes) if ci < k]
                loc = loc_of(score(editor, [loc_enc[j] for j in idx], pad, device), idx)
                first.append((k, rel[0]))
                ck_rows.append({"mode": mode, "k": k, "reliability": sum(rel) / k,
                                "reliability_alone": sum(alone_rel[:k]) / k,
                                "locality": sum(loc) / max(1, len(loc)), "first_edit_reliability": rel[0],
                                "last_edit_reliability": rel[-1], "mean_weight": sum(weights) / k,
                                "min_weight": min(weights), "max_weight": max(weights),
                                "first_edit_weight": weights[0], "last_edit_weight": weights[-1],
                                "shift_norm": norm})
                for age_lo, age_hi in ((0, 0), (1, 9), (10, 49), (50, 10**9)):
                    sel = [rel[i] for i in range(k) if age_lo <= k - 1 - i <= age_hi]
                    if sel:
                        retention[f"k={k} age {age_lo}-{min(age_hi, k - 1)}"] = sum(sel) / len(sel)
                print(f"[{mode}] k={k:4d} rel {sum(rel) / k:.3f} (alone {sum(alone_rel[:k]) / k:.3f}) "
                      f"loc {sum(loc) / max(1, len(loc)):.3f} first-edit rel {rel[0]:.2f} weight {weights[0]:.4f} "
                      f"mean weight {sum(weights) / k:.4f} past {past[-1]:.4f} a {own[-1]:.4f} |dW| {norm:.3f}",
                      flush=True)
        summary["modes"][mode] = {"retention_by_age": retention, "first_edit": first,
                                  "a_times_k": [own[i] * (i + 1) for i in range(len(own))][:10]}
        editor.reset()
    for net in nets:
        net.update_scale = str(cfg.editor.get("update_scale", "attention"))

    if bench["batch_check"]:      # one sequence through the network == one-by-one edits
        w0 = {m.weight: lm.model.get_parameter(m.weight).detach().clone() for m in editor.modules}
        for c in cases:
            editor.edit(c.request)
        seq = {w: lm.model.get_parameter(w).detach().clone() for w in w0}
        editor.reset()
        editor.edit_batch([c.request for c in cases])
        batch = {w: lm.model.get_parameter(w).detach().clone() for w in w0}
        editor.reset()
        diff = max(float((seq[w] - batch[w]).abs().max()) for w in w0)
        size = max(float((seq[w] - w0[w]).abs().max()) for w in w0)
        summary["batch_vs_sequential_max_abs_diff"] = diff
        summary["sequential_max_abs_shift"] = size
        print(f"edit_batch of {n} vs {n} one-by-one edits: max |dW difference| {diff:.3g} (max |dW| {size:.3g})")
    summary["cpu_seconds"] = time.process_time() - t0

    import pandas as pd
    steps, cks = pd.DataFrame(steps_rows), pd.DataFrame(ck_rows)
    steps.to_csv(out / "fade_steps.csv", index=False)
    cks.to_csv(out / "fade_checkpoints.csv", index=False)
    (out / "fade_summary.json").write_text(json.dumps(summary, indent=1))
    plot(steps, cks, summary, out / "fade.png")
    print(cks.to_string(index=False))
    print(json.dumps(summary, indent=1))


def plot(steps, cks, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    for mode, g in steps.groupby("mode"):
        ax.plot(g["k"], g["edit_scale"], label=f"{mode}: new edit's own scale a_k")
        if (g["past_scale"] < 1).any():
            ax.plot(g["k"].iloc[1:], 1 - g["past_scale"].iloc[1:], ls="--", label=f"{mode}: 1 - past scale")
    k = steps["k"].drop_duplicates().sort_values()
    ax.plot(k, 1 / k, ls=":", c="grey", label="1/k")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("edit k")
    ax.set_title("update scales of edit k")
    ax.legend(fontsize=7)
    ax = axes[1]
    for mode, g in steps.groupby("mode"):
        ax.plot(g["k"], g["first_edit_weight"], label=f"{mode}: weight of edit 1 after k edits")
        ax.plot(g["k"], g["mean_weight"], ls="--", label=f"{mode}: mean weight of the k edits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("edits so far k")
    ax.set_title("effective weight of the edits")
    ax.legend(fontsize=7)
    ax = axes[2]
    for mode, g in cks.groupby("mode"):
        ax.plot(g["k"], g["reliability"], marker="o", label=f"{mode}: reliability")
        ax.plot(g["k"], g["locality"], marker="s", ls="--", label=f"{mode}: locality")
    g = cks.drop_duplicates("k")
    ax.plot(g["k"], g["reliability_alone"], marker="^", c="grey", label="each edit alone (T=1)")
    ax.axhline(summary["unedited_reliability"], c="k", ls=":", label="unedited")
    ax.set_xscale("log")
    ax.set_xlabel("edits so far k")
    ax.set_title(f"{summary['data']} {summary['split']}, {summary['cases']} cases")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_histories(files: list[str], labels: list[str], path: Path) -> None:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4), squeeze=False)
    for ax, f, label in zip(axes[0], files, labels):
        df = pd.read_csv(f)
        for col, style in (("val/reliability", "-o"), ("val/locality", "--o"), ("val/seq10_reliability", "-s"),
                           ("val/seq10_locality", "--s"), ("val/seq100_reliability", "-^"),
                           ("val/seq100_locality", "--^")):
            if col in df:
                sub = df[["step", col]].dropna()
                ax.plot(sub["step"], sub[col], style, label=col.replace("val/", ""), ms=4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        twin = ax.twinx()
        twin.plot(df["step"], df["train/seq_n"], c="grey", lw=1)
        twin.set_ylabel("curriculum seq_n (grey)")
        twin.set_ylim(0, max(1.0, float(df["train/seq_n"].max())) * 1.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
