"""Seconds per edit of ROME, MEMIT, WilKE and R-ROME, the covariance statistics cost
(first call vs cached second call), and MEMIT batched vs sequential editing.

    python benchmarks/locate_edit_time.py                       # SmolLM2, CounterFact, CPU
    python benchmarks/locate_edit_time.py --edits 3 --batch 10 --editors rome memit
    python benchmarks/locate_edit_time.py --model tiny-llama --data sample   # seconds, no ../shared

Every editor uses its configured defaults (conf/editor/<name>.yaml plus the per-model
file); cases are the first ones of the runner's seeded shuffle. Statistics are computed
once (one pass for the union of every editor's layers) and then loaded from the cache
by each editor: the script prints both timings. Figures are printed, not saved.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from editbench.models import load_model  # noqa: E402
from editbench.plan import select_cases  # noqa: E402
from editbench.session import build_editor  # noqa: E402
from editbench.scoring import Scorer  # noqa: E402
from editors.lib.layer_stats import (corpus_id, n_texts_used, second_moments, stats_path,  # noqa: E402
                                     weights_fingerprint)
from editors.lib.locate import LocateParams  # noqa: E402


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def load(data: str, n: int):
    from editbench.data import load_cases

    cfg = compose_cfg(f"data={data}")
    return select_cases(load_cases(cfg.data.kind, cfg.data.get("path")), n, 0)


def stats_layers(cfg) -> list[int]:
    ed = cfg.editor
    if ed.name == "wilke":
        return list(range(ed.get("scanning_floor", 0), ed.scanning_ceiling))
    return list(ed.layers)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="cf")
    ap.add_argument("--editors", nargs="+", default=["rome", "memit", "wilke", "rrome"])
    ap.add_argument("--edits", type=int, default=3, help="timed edits per editor (after one warm-up edit)")
    ap.add_argument("--batch", type=int, default=10, help="MEMIT batch vs sequential size (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--fresh-stats", action="store_true",
                    help="delete the cached statistics of these layers first, to time their computation")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every editor (editor.x=...)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(compose_cfg(f"model={args.model}").model)
    n_needed = max(args.edits + 1, args.batch)
    cases = load(args.data, n_needed)
    print(f"model={args.model} data={args.data} threads={torch.get_num_threads()} cases={len(cases)}")

    # ---- statistics: one pass for the union of all editors' layers, then the cached call
    cfgs = {name: compose_cfg(f"model={args.model}", f"editor={name}", *args.overrides) for name in args.editors}
    union = sorted({layer for c in cfgs.values() for layer in stats_layers(c)})
    any_cfg = OmegaConf.to_container(next(iter(cfgs.values())).editor, resolve=True)
    hp = LocateParams(mom2_dataset=any_cfg["mom2_dataset"], mom2_n_samples=any_cfg["mom2_n_samples"],
                      mom2_max_length=any_cfg["mom2_max_length"], mom2_dtype=any_cfg["mom2_dtype"],
                      mom2_batch_size=any_cfg["mom2_batch_size"])
    scfg = hp.stats_config()
    fp, corpus, n_texts = weights_fingerprint(lm.model), corpus_id(scfg), n_texts_used(scfg)
    files = [stats_path(fp, lm.arch.name("mlp_out", layer), scfg, n_texts, corpus) for layer in union]
    if args.fresh_stats:
        for f in files:
            f.unlink(missing_ok=True)
    cached = sum(f.is_file() for f in files)
    _, t1 = timed(second_moments, lm.model, lm.tokenizer, lm.arch, union, scfg)
    _, t2 = timed(second_moments, lm.model, lm.tokenizer, lm.arch, union, scfg)
    how = "all loaded from an earlier run's cache" if cached == len(files) else \
        f"{len(files) - cached} layer(s) computed in one pass, {cached} loaded"
    print(f"\ncovariance statistics, layers {union}, {n_texts} texts: first call {t1:.1f} s ({how}), "
          f"second call {t2:.2f} s (cache)")

    # ---- seconds per edit
    print(f"\n{'editor':8s} {'build_s':>8s} {'s/edit':>8s} {'min':>7s} {'max':>7s}  info of the last edit")
    for name, cfg in cfgs.items():
        editor, t_build = timed(build_editor, cfg, lm)
        editor.edit(cases[0].request)  # warm-up (first-use checks)
        times, info = [], None
        for case in cases[1:args.edits + 1]:
            info, t = timed(editor.edit, case.request)
            times.append(t)
        editor.reset()
        print(f"{name:8s} {t_build:8.1f} {statistics.mean(times):8.2f} {min(times):7.2f} {max(times):7.2f}  {info}")
        del editor

    # ---- MEMIT: one edit_batch of N vs N sequential edits
    if args.batch and "memit" in cfgs:
        editor = build_editor(cfgs["memit"], lm)
        batch = cases[:args.batch]
        scorer = Scorer(lm.tokenizer, exact_match=False, cf_metrics=args.data == "cf")
        scorer.score(editor, batch, reference=True)
        rows = []
        for mode in ("sequential", "batch"):
            t0 = time.perf_counter()
            if mode == "batch":
                editor.edit_batch([c.request for c in batch])
            else:
                for c in batch:
                    editor.edit(c.request)
            seconds = time.perf_counter() - t0
            per_case, _ = scorer.score(editor, batch)
            editor.reset()
            m = {k: statistics.mean(v[k] for v in per_case.values() if k in v)
                 for k in ("reliability", "generality", "locality", "cf_efficacy") if any(k in v for v in per_case.values())}
            rows.append((mode, seconds, m))
        print(f"\nMEMIT, {len(batch)} edits: sequential edit() x{len(batch)} vs one edit_batch()")
        print(f"{'mode':11s} {'total_s':>8s} {'s/edit':>7s}  " + "  ".join(f"{k:>11s}" for k in rows[0][2]))
        for mode, seconds, m in rows:
            print(f"{mode:11s} {seconds:8.1f} {seconds / len(batch):7.2f}  " + "  ".join(f"{v:11.3f}" for v in m.values()))
        print(f"speed-up of the batch: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
