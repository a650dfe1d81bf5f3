"""MMLU through lm-evaluation-harness vs. the built-in MMLU task, on the same examples.

    OMP_NUM_THREADS=1 python benchmarks/lm_eval_mmlu.py --n 400            # SmolLM2-135M-Instruct
    python benchmarks/lm_eval_mmlu.py --model tiny-llama --n 20            # a smoke run

Takes the N questions the built-in task selects (``general.tasks=[mmlu] general.n=N
general.seed=0``: the local MMLU test files under ``general.path``, seeded permutation, first
N), writes them to a JSONL file, and evaluates the model on them twice more through
lm-evaluation-harness (``editbench.general.lm_eval_backend.LmEvalSuite``, the path of
``general.backend=lm_eval``), with two lm-eval task configs on that local file:

* ``mmlu_editbench`` — the built-in task's protocol written as an lm-eval ``multiple_choice``
  task: RECIPE's prompt ("Please select the correct answer ... Answer: ("), the choices
  ``A``..``D`` with an empty target delimiter, lm-eval's ``acc`` (argmax of the choices'
  log-likelihoods). This must agree with the built-in accuracy (the acceptance bound is 0.02);
* ``mmlu_lmeval_prompt`` — lm-eval's own MMLU prompt ("<question>\\nA. ...\\nAnswer:", choices
  `` A``..`` D``), without the subject header: a different prompt, shown for scale only.

Prints the three accuracies, the differences and the share of questions on which the built-in
task and each lm-eval task choose the same option, and the seconds each took. Only the
unedited model is evaluated (the after-edit path is the same code with the editor's logits).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

LETTER_TASK = """task: mmlu_editbench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Please select the correct answer for the following questions:\\n{{{{question}}}}\\n(A) {{{{choices[0]}}}}\\n(B) {{{{choices[1]}}}}\\n(C) {{{{choices[2]}}}}\\n(D) {{{{choices[3]}}}}\\nAnswer: ("
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

LMEVAL_TASK = """task: mmlu_lmeval_prompt
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a conf/model name (default smollm2)")
    ap.add_argument("--n", type=int, default=400, help="MMLU test questions (the built-in task's seeded selection)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="mmlu_editbench,mmlu_lmeval_prompt",
                    help="which lm-eval task configs to run (comma-separated; default both)")
    args = ap.parse_args()

    import torch

    from editbench.general.data import load_items, select
    from editbench.general.lm_eval_backend import LmEvalSuite, metric_rows
    from editbench.general.tasks import build_queries, score_queries
    from editbench.models import load_model, model_fingerprint
    from editbench.scoring import PlainLogits

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "general.tasks=[mmlu]", f"general.n={args.n}",
                                           f"general.seed={args.seed}", "general.cache=false"])
    lm = load_model(cfg.model)
    tok, model = lm.tokenizer, lm.model
    model.eval()
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gcfg = dict(cfg.general)

    # the built-in task, exactly as general.tasks=[mmlu] computes the unedited score
    items = select(load_items("mmlu", gcfg), args.n, args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        builtin = score_queries("mmlu", build_queries("mmlu", items, tok, "letter", int(gcfg["max_tokens"])),
                                PlainLogits(model), pad, device=device, batch_tokens=int(gcfg["batch_tokens"]),
                                max_batch=int(gcfg["batch_size"]), padding_side="right")
    t_builtin = time.perf_counter() - t0
    acc_builtin = sum(builtin.values) / len(builtin.values)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "mmlu_selected.jsonl"
        data.write_text("".join(json.dumps({"question": it.question, "choices": list(it.options),
                                            "answer": it.answer}) + "\n" for it in items), encoding="utf-8")
        (folder / "mmlu_editbench.yaml").write_text(LETTER_TASK.format(data=data), encoding="utf-8")
        (folder / "mmlu_lmeval_prompt.yaml").write_text(LMEVAL_TASK.format(data=data), encoding="utf-8")
        results, seconds, picks = {}, {}, {}
        for task in args.tasks.split(","):
            t0 = time.perf_counter()
            suite = LmEvalSuite({**gcfg, "backend": "lm_eval", "lm_eval_tasks": [task], "lm_eval_include": str(folder),
                                 "lm_eval_limit": None, "lm_eval_num_fewshot": 0},
                                lm, model_fingerprint(cfg.model), unedited=False)
            with torch.no_grad():   # the unedited evaluation of general.backend=lm_eval, with its samples
                out = suite.run(PlainLogits(model), device, log_samples=True)
            seconds[task] = time.perf_counter() - t0
            results[task] = metric_rows(out["results"])[f"lm_eval/{task}/acc"]
            by_doc = {s["doc_id"]: s for s in out["samples"][task]}
            picks[task] = [_choice(by_doc[k]) for k in range(len(items))]

    agree = {t: sum(a == b for a, b in zip(builtin.preds, picks[t])) / len(items) for t in picks}
    print(f"model {cfg.model.name}, MMLU test, n={len(items)} (general.seed={args.seed}), torch threads: "
          f"{torch.get_num_threads()}")
    print(f"{'path':<34}{'accuracy':>9}{'- builtin':>11}{'same choice':>13}{'seconds':>9}")
    print(f"{'built-in general.tasks=[mmlu]':<34}{acc_builtin:>9.4f}{'':>11}{'':>13}{t_builtin:>9.1f}")
    for task, label in (("mmlu_editbench", "lm-eval, built-in prompt"), ("mmlu_lmeval_prompt", "lm-eval, lm-eval's prompt")):
        if task not in results:
            continue
        print(f"{label:<34}{results[task]:>9.4f}{results[task] - acc_builtin:>+11.4f}{agree[task]:>13.3f}"
              f"{seconds[task]:>9.1f}")


def _choice(sample: dict) -> int:
    """The option lm-eval's ``acc`` picks for a logged document: the argmax of its choices'
    log-likelihoods (``filtered_resps``: one (log-likelihood, is-greedy) pair per choice)."""
    lls = [float(r[0]) for r in sample["filtered_resps"]]
    return max(range(len(lls)), key=lls.__getitem__)


if __name__ == "__main__":
    main()
