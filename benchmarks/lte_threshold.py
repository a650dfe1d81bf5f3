"""Choose LTE's ``sim_threshold`` (``retrieval=threshold``, the named variant) on a split.

    python benchmarks/lte_threshold.py data=cf data.split=val [bench.n=100] [bench.thresholds=0.5,0.55,...]

Edits ``bench.n`` cases of the split (the seeded selection a run makes) into one LTE memory,
then, for every generality probe (a rephrase: should retrieve a fact) and every locality probe
(an unrelated neighbour: should retrieve none), takes the top-1 cosine similarity. For each
candidate threshold it prints the share of rephrases and of locality prompts that would get a
fact inserted, and picks the threshold with the largest difference (Youden's J; ties: the
higher threshold, which disturbs fewer unrelated prompts). Only the split named is read: run
it on ``val`` to choose, never on ``test``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compose_cfg, split_bench_args  # noqa: E402
from editbench import plan  # noqa: E402
from editbench.data import evaluation_cases  # noqa: E402
from editbench.models import load_model  # noqa: E402
from editbench.session import build_editor  # noqa: E402

import editors  # noqa: E402,F401  (registers the editors)


def main(argv: list[str]) -> None:
    hydra_args, bench = split_bench_args(argv, {"n": 100, "thresholds": "0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75"})
    cfg = compose_cfg(["editor=lte", "model=smollm2", *hydra_args])
    cases = plan.select_cases(evaluation_cases(cfg.data), int(bench["n"]), cfg.runner.seed, cfg.runner.shuffle)
    lm = load_model(cfg.model)
    editor = build_editor(cfg, lm)
    for c in cases:
        editor.edit(c.request)
    sims = {}
    for kind in ("generality", "locality"):
        texts = [p.prompt.strip() for c in cases for _, p in c.probes(kind)]
        s, _ = editor.search(texts)
        sims[kind] = s[:, 0].float()
    editor.reset()
    print(f"data={cfg.data.name} split={cfg.data.split} cases={len(cases)} encoder={cfg.editor.encoder} "
          f"rephrases={len(sims['generality'])} locality prompts={len(sims['locality'])}")
    print("threshold  rephrase_inserted  locality_inserted  J")
    best = None
    for t in sorted(float(x) for x in str(bench["thresholds"]).split(",")):
        g = float((sims["generality"] >= t).float().mean())
        l_ = float((sims["locality"] >= t).float().mean())
        j = g - l_
        print(f"{t:9.2f}  {g:17.3f}  {l_:17.3f}  {j:.3f}")
        if best is None or j >= best[1] - 1e-12:  # ascending: a tie goes to the higher threshold
            best = (t, j)
    print(f"chosen sim_threshold: {best[0]:.2f} (J = {best[1]:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
