"""Cost of WILD scoring beside teacher forcing: one scoring pass, ``eval.mode=teacher_forced``
vs ``eval.mode=both``, on the same cases and the same (unedited) model.

    python benchmarks/wild_cost.py [Hydra overrides] [--n-cases N] [--repeat R]
    OMP_NUM_THREADS=1 python benchmarks/wild_cost.py model=smollm2 data=cf --n-cases 50

The scorers are built by ``editbench.session.make_scorer`` from the composed config (what a run
computes), through the editor the config names (``editor=none`` by default: the figures are
those of the model's own forward; an editor with ``custom_logits`` would generate without the
KV cache). Each mode runs its reference pass once (the unedited locality answers), then the
post-edit pass ``--repeat`` times; the repeat with the least process CPU time is printed (CPU
seconds, since the machine may be shared; wall seconds beside them), with the ratio
``both / teacher_forced`` (the issue's budget: at most 2) and the WILD part alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from editbench.models import load_model  # noqa: E402
from editbench.plan import select_cases  # noqa: E402
from editbench.session import build_editor, make_scorer  # noqa: E402
from editbench.validate import validate_config  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--n-cases", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    overrides = ["editor=none", *args.overrides]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfgs = {mode: compose("config", overrides=[*overrides, f"eval.mode={mode}"])
                for mode in ("teacher_forced", "both")}
    for cfg in cfgs.values():
        validate_config(cfg)
    cfg = cfgs["both"]
    from editbench.data import evaluation_cases

    cases = select_cases(evaluation_cases(cfg.data), args.n_cases, cfg.runner.seed, cfg.runner.shuffle)
    lm = load_model(cfg.model)
    editor = build_editor(cfg, lm)
    lm.model.eval()
    fig: dict[str, float] = {}
    for mode, mcfg in cfgs.items():
        scorer = make_scorer(mcfg, lm)
        c0 = time.process_time()
        scorer.score(editor, cases, reference=True)
        fig[f"{mode}_reference_cpu_s"] = time.process_time() - c0
        best, wall, wild = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            scorer.score(editor, cases)
            cpu, elapsed = time.process_time() - c0, time.perf_counter() - t0
            if cpu < best:
                best, wall, wild = cpu, elapsed, scorer.wild_timing.seconds
        fig[f"{mode}_pass_cpu_s"] = best
        fig[f"{mode}_pass_wall_s"] = wall
        if mode == "both":
            fig["wild_generation_wall_s"] = wild
            fig["wild_queries"] = scorer.wild_timing.queries
            gens = [g for c in cases for g in scorer.generations.get(c.case_id, [])]
            fig["wild_mean_answer_chars"] = sum(len(g["raw"]) for g in gens) / max(1, len(gens))
    fig["ratio_both_over_tf_cpu"] = fig["both_pass_cpu_s"] / fig["teacher_forced_pass_cpu_s"]
    fig["ratio_reference_both_over_tf_cpu"] = fig["both_reference_cpu_s"] / fig["teacher_forced_reference_cpu_s"]
    print(f"cases={len(cases)} model={cfg.model.name} data={cfg.data.name} batch_size={cfg.runner.batch_size} "
          f"wild_batch_size={cfg.eval.wild_batch_size} context={cfg.eval.wild_context} budget=min({cfg.eval.wild_max_new_tokens}, "
          f"ceil({cfg.eval.wild_budget_factor}*n)+{cfg.eval.wild_budget_extra})")
    for k, v in fig.items():
        print(f"{k:32s} {v:10.3f}")
    return fig


if __name__ == "__main__":
    main()
