"""The small general-ability data folder of the tests (tests/test_general.py, test_lm_eval.py):
CSQA, ANLI, MMLU and SQuAD 2.0 in the layout general.files expects."""
from __future__ import annotations

import csv
import json

CSQA_ANSWERS = "ABACDEBAAC"  # 4 of 10 answers are A
MMLU_ANSWERS = "ABCDAABC"    # 3 of 8 are A
ANLI_LABELS = "enccnenec"    # 3 of 9 are entailment


def write_fixture(root, headerless_mmlu: bool = False) -> None:
    """A small data folder in the layout general.files expects (default conf)."""
    (root / "csqa").mkdir(parents=True)
    with (root / "csqa" / "dev_rand_split.jsonl").open("w") as f:
        for i, key in enumerate(CSQA_ANSWERS):
            f.write(json.dumps({"id": str(i), "question": f"Where would you keep item number {i}?",
                                "choices": {"label": list("ABCDE"),
                                            "text": ["drawer", "garden", "sky", "ocean", "oven"]},
                                "answerKey": key}) + "\n")
    for r, labels in (("R1", ANLI_LABELS[:4]), ("R2", ANLI_LABELS[4:]), ("R3", "")):
        (root / "anli" / "anli_v1.0" / r).mkdir(parents=True)
        with (root / "anli" / "anli_v1.0" / r / "test.jsonl").open("w") as f:
            for i, lab in enumerate(labels):
                f.write(json.dumps({"uid": f"{r}{i}", "context": f"The cat number {i} sat on the mat.",
                                    "hypothesis": "A cat sat somewhere.", "label": lab}) + "\n")
    (root / "mmlu" / "test").mkdir(parents=True)
    for subject, answers in (("algebra", MMLU_ANSWERS[:5]), ("biology", MMLU_ANSWERS[5:])):
        with (root / "mmlu" / "test" / f"{subject}_test.csv").open("w", newline="") as f:
            w = csv.writer(f)
            if not headerless_mmlu:
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for i, a in enumerate(answers):
                w.writerow([f"What is {i} plus {i}, in {subject}?", str(2 * i), str(i), "7", "none of these",
                            a if headerless_mmlu else "ABCD".index(a)])
    (root / "squad_v2" / "cs224n_chrischute").mkdir(parents=True)
    ctx = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, in France."
    qas = [{"question": "In what country is Normandy located?", "id": "q1", "is_impossible": False,
            "answers": [{"text": "France", "answer_start": ctx.index("France")}]},
           {"question": "When were the Normans in Normandy?", "id": "q2", "is_impossible": False,
            "answers": [{"text": "10th and 11th centuries", "answer_start": ctx.index("10th")}]},
           {"question": "Who gave their name to Italy?", "id": "q3", "is_impossible": True, "answers": [],
            "plausible_answers": [{"text": "Normans", "answer_start": 4}]}]
    doc = {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [{"context": ctx, "qas": qas}]}]}
    (root / "squad_v2" / "cs224n_chrischute" / "dev-v2.0.json").write_text(json.dumps(doc))
