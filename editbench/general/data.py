"""Loading the general-ability datasets: CommonsenseQA, ANLI, MMLU, SQuAD 2.0.

Two sources (``general.source``):

* ``local`` (default): files under ``general.path`` (``general.files.<task>`` is the
  location of each task relative to it; an absolute path wins);
* ``hf``: the Hugging Face datasets ``tau/commonsense_qa`` (validation), ``facebook/anli``
  (``test_r1..3``), ``cais/mmlu`` (``all``, test) and ``squad_v2`` (validation), for users
  with internet access.

Both sources go through the same record converters, so every format a converter knows
is accepted from either source:

* CSQA: the flattened form (``question``, ``choices{label,text}``, ``answerKey``: the
  HF dataset and ``dev_rand_split.jsonl`` in ../shared) and the original release
  (``question{stem, choices[{label,text}]}``, ``answerKey``).
* ANLI: the original release (``context``, ``hypothesis``, ``label`` in e/n/c) and the HF
  form (``premise``, ``hypothesis``, ``label`` in 0/1/2); rounds R1..R3 of one split.
* MMLU: ``<subject>_<split>.csv`` files, either with the header
  ``question,choice0,choice1,choice2,choice3,answer`` and an integer answer, or headerless
  (the original release: question, four choices, a letter answer A-D); HF rows
  (``question``, ``choices``, ``answer`` 0-3).
* SQuAD 2.0: the official JSON layout (``data[].title``, ``paragraphs[].context``,
  ``qas[].question/answers/is_impossible``); HF rows (``title``, ``context``,
  ``question``, ``answers{text, answer_start}``). No answer means "N/A".

A missing file raises :class:`FileNotFoundError` naming the path and what was expected;
a malformed record raises :class:`~editbench.records.DataError` (file, record, field).
Both are one line, which ``python -m editbench`` prints without a stack trace.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from editbench.records import DataError

TASKS = ("csqa", "anli", "mmlu", "squad2")
ANLI_LABELS = ("entailment", "neutral", "contradiction")


# --------------------------------------------------------------------------- items
@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question (CSQA, MMLU): ``options[answer]`` is correct."""

    question: str
    options: tuple[str, ...]
    answer: int
    source: str = ""


@dataclass(frozen=True)
class NLIItem:
    """A premise/hypothesis pair; ``label`` indexes :data:`ANLI_LABELS`."""

    premise: str
    hypothesis: str
    label: int
    source: str = ""


@dataclass(frozen=True)
class QAItem:
    """A reading-comprehension question; ``answer`` is "" when unanswerable
    (``answer_start`` is then -1)."""

    title: str
    context: str
    question: str
    answer: str
    answer_start: int
    source: str = ""


# --------------------------------------------------------------------------- record converters
def _field(rec: Mapping[str, Any], path: str, i: int, *names: str) -> Any:
    for name in names:
        if name in rec and rec[name] is not None:
            return rec[name]
    raise DataError(path, i, names[0], f"missing (expected one of {', '.join(names)})")


def csqa_item(rec: Mapping[str, Any], path: str, i: int) -> MCItem:
    q = _field(rec, path, i, "question")
    if isinstance(q, Mapping):  # original release: question{stem, choices[{label, text}]}
        stem, choices = _field(q, path, i, "stem"), _field(q, path, i, "choices")
        labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
    else:
        stem, choices = q, _field(rec, path, i, "choices")
        labels, texts = list(choices["label"]), list(choices["text"])
    key = _field(rec, path, i, "answerKey")
    if key not in labels:
        raise DataError(path, i, "answerKey", f"{key!r} is not one of the choice labels {labels}")
    if labels != list("ABCDE"[:len(labels)]):
        raise DataError(path, i, "choices", f"labels {labels} are not A, B, C, ... in order")
    return MCItem(str(stem), tuple(str(t) for t in texts), labels.index(key), f"{path}#{i}")


_ANLI_LABEL = {"e": 0, "n": 1, "c": 2, 0: 0, 1: 1, 2: 2, "0": 0, "1": 1, "2": 2,
               "entailment": 0, "neutral": 1, "contradiction": 2}


def anli_item(rec: Mapping[str, Any], path: str, i: int) -> NLIItem:
    label = _field(rec, path, i, "label")
    if label not in _ANLI_LABEL:
        raise DataError(path, i, "label", f"{label!r} is not e/n/c or 0/1/2")
    return NLIItem(str(_field(rec, path, i, "context", "premise")), str(_field(rec, path, i, "hypothesis")),
                   _ANLI_LABEL[label], f"{path}#{i}")


def mmlu_item(rec: Mapping[str, Any], path: str, i: int) -> MCItem:
    """An HF-style row (``question``, ``choices``, ``answer``) or a parsed CSV row
    (``question``, ``choice0..3``, ``answer``); the answer is an index or a letter."""
    if "choices" in rec:
        options = [str(c) for c in rec["choices"]]
    else:
        options = [str(_field(rec, path, i, f"choice{k}")) for k in range(4)]
    ans = _field(rec, path, i, "answer")
    text = str(ans).strip()
    if text.isdigit() and int(text) < len(options):
        answer = int(text)
    elif len(text) == 1 and text.upper() in "ABCDEFGHIJ"[:len(options)]:
        answer = ord(text.upper()) - ord("A")
    else:
        raise DataError(path, i, "answer", f"{ans!r} is neither an option index nor a letter for "
                                           f"{len(options)} options")
    return MCItem(str(_field(rec, path, i, "question")), tuple(options), answer, f"{path}#{i}")


def squad2_item(rec: Mapping[str, Any], path: str, i: int) -> QAItem:
    answers = _field(rec, path, i, "answers")
    if isinstance(answers, Mapping):  # HF: {text: [...], answer_start: [...]}
        texts, starts = list(answers.get("text", [])), list(answers.get("answer_start", []))
    else:  # official JSON: [{text, answer_start}]
        texts, starts = [a["text"] for a in answers], [a["answer_start"] for a in answers]
    if rec.get("is_impossible"):
        texts, starts = [], []
    return QAItem(str(rec.get("title", "")), str(_field(rec, path, i, "context")),
                  str(_field(rec, path, i, "question")), texts[0] if texts else "",
                  int(starts[0]) if texts else -1, f"{path}#{i}")


# --------------------------------------------------------------------------- local files
EXPECTED = {
    "csqa": "the CommonsenseQA validation jsonl (dev_rand_split.jsonl: question, choices{label,text}, answerKey)",
    "anli": "the ANLI release folder with R1/, R2/, R3/ each holding <split>.jsonl",
    "mmlu": "a folder of MMLU <subject>_<split>.csv files",
    "squad2": "a SQuAD 2.0 JSON file in the official layout (dev-v2.0.json)",
}


def _missing(task: str, path: Path, hint: str = "") -> FileNotFoundError:
    return FileNotFoundError(f"general ability task '{task}': {path} not found; expected {EXPECTED[task]}"
                             f"{hint}. Set general.path=<dir> (or general.files.{task}=<path>), "
                             f"or general.source=hf to download it")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(str(path), i, None, f"not valid JSON ({err.msg})") from None
    return rows


def load_csqa_local(path: Path) -> list[MCItem]:
    if path.is_dir():
        path = path / "dev_rand_split.jsonl"
    if not path.is_file():
        raise _missing("csqa", path)
    return [csqa_item(r, str(path), i) for i, r in enumerate(_read_jsonl(path))]


def load_anli_local(path: Path, split: str = "test") -> list[NLIItem]:
    files = [path / r / f"{split}.jsonl" for r in ("R1", "R2", "R3")]
    present = [f for f in files if f.is_file()]
    if not present:
        raise _missing("anli", path, f" (no R1/{split}.jsonl, R2/{split}.jsonl or R3/{split}.jsonl there)")
    return [anli_item(r, str(f), i) for f in present for i, r in enumerate(_read_jsonl(f))]


MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def read_mmlu_csv(path: Path) -> list[MCItem]:
    """One MMLU subject file, with the ``question,choice0..3,answer`` header or headerless."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip() for c in rows[0]] == MMLU_HEADER:
        rows = rows[1:]
    items = []
    for i, row in enumerate(rows):
        if len(row) != 6:
            raise DataError(str(path), i, None, f"expected 6 columns (question, 4 choices, answer), got {len(row)}")
        items.append(mmlu_item(dict(zip(MMLU_HEADER, row)), str(path), i))
    return items


def load_mmlu_local(path: Path, split: str = "test") -> list[MCItem]:
    folder = path / split if (path / split).is_dir() else path
    files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
    if not files:
        raise _missing("mmlu", folder, f" (no *_{split}.csv there)")
    return [item for f in files for item in read_mmlu_csv(f)]


def load_squad2_local(path: Path) -> list[QAItem]:
    if not path.is_file():
        raise _missing("squad2", path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(str(path), None, None, f"not valid JSON ({err.msg})") from None
    if not isinstance(doc, Mapping) or "data" not in doc:
        raise DataError(str(path), None, "data", "missing: not the official SQuAD layout")
    items, i = [], 0
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                items.append(squad2_item({**qa, "title": article.get("title", ""), "context": para["context"]},
                                         str(path), i))
                i += 1
    return items


# --------------------------------------------------------------------------- Hugging Face
def _hf(name: str, config: str | None, split: str):
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("general.source=hf needs the datasets package: pip install datasets") from None
    return load_dataset(name, config, split=split)


def load_hf(task: str, split: str | None = None) -> list:
    if task == "csqa":
        return [csqa_item(r, "tau/commonsense_qa", i) for i, r in enumerate(_hf("tau/commonsense_qa", None,
                                                                                 split or "validation"))]
    if task == "anli":
        split = split or "test"
        return [anli_item(r, f"facebook/anli:{split}_r{k}", i) for k in (1, 2, 3)
                for i, r in enumerate(_hf("facebook/anli", None, f"{split}_r{k}"))]
    if task == "mmlu":
        return [mmlu_item(r, "cais/mmlu", i) for i, r in enumerate(_hf("cais/mmlu", "all", split or "test"))]
    if task == "squad2":
        return [squad2_item(r, "squad_v2", i) for i, r in enumerate(_hf("squad_v2", None, split or "validation"))]
    raise ValueError(f"unknown general ability task '{task}'; known: {', '.join(TASKS)}")


# --------------------------------------------------------------------------- entry point
_LOCAL: dict[str, Callable[..., list]] = {
    "csqa": lambda p, split: load_csqa_local(p),
    "anli": load_anli_local,
    "mmlu": load_mmlu_local,
    "squad2": lambda p, split: load_squad2_local(p),
}


def load_items(task: str, cfg: Mapping[str, Any]) -> list:
    """Every item of ``task`` as configured by the ``general`` config section."""
    if task not in TASKS:
        raise ValueError(f"unknown general ability task '{task}'; known: {', '.join(TASKS)}")
    source = cfg.get("source", "local")
    split = (cfg.get("splits") or {}).get(task)
    if source == "hf":
        return load_hf(task, split)
    if source != "local":
        raise ValueError(f"general.source must be local or hf, got '{source}'")
    rel = (cfg.get("files") or {}).get(task) or task
    path = Path(str(cfg.get("path") or ".")) / str(rel)
    items = _LOCAL[task](path, split or ("test" if task in ("anli", "mmlu") else None))
    if not items:
        raise DataError(str(path), None, None, f"no {task} items found")
    return items


def select(items: Sequence, n: int | None, seed: int) -> list:
    """The seeded selection of ``n`` items (all when ``n`` is None), in permuted order."""
    order = np.random.default_rng(seed).permutation(len(items))
    if n is not None:
        order = order[:n]
    return [items[int(i)] for i in order]

