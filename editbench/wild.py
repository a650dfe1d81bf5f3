"""WILD evaluation: the text side (contexts, stopping, normalisation, judges).

"The Mirage of Model Editing: Revisiting Evaluation in the Wild" (ACL 2025, QAEdit;
WanliYoung/Revisit-Editing-Evaluation) scores an edit by what the model *says*: greedy
generation from the query alone, cut at a natural end, judged as a whole answer. The
generation itself runs through :func:`editbench.scoring.greedy_generate` (the one decoding
path, batched and length-sorted, with a KV cache where scoring reads the model's own
forward); this module holds what is text:

* :data:`CONTEXTS` and :func:`context_ids`: ``question-only`` (the prompt as is),
  ``qa_inst`` (the paper's QA instruction ``Please answer the question:\\n\\nQ: ...\\nA:``),
  ``chat_temp`` (the tokenizer's own chat template, one user turn and the generation prompt);
* :func:`budget`: the token budget of a query, ``min(max_new_tokens, ceil(factor * n) + extra)``
  with ``n`` the gold answer's token count (the official code uses a fixed 50 with the same
  stop strings: ``factor=0 extra=50``);
* :func:`cut`: the answer is the decoded text up to the first stop string (the official
  code's ``"."`` and ``"\\n"`` by default), stripped;
* :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1`: SQuAD-style normalisation
  (lower case, no punctuation, no articles, single spaces), exact match and token F1, each the
  best over the target and its aliases;
* :func:`load_judge`: ``eval.judge``, a dotted path to ``judge(question, target, generation)
  -> bool | float`` (an LLM-as-judge, say); the default is :func:`exact_match_judge`.
"""
from __future__ import annotations

import importlib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

#: eval.wild_context values
CONTEXTS = ("question-only", "qa_inst", "chat_temp")
#: eval.mode values
MODES = ("teacher_forced", "wild", "both")
#: eval.when values
WHEN = ("after_chunk", "after_each")
#: the paper's QA instruction (context type qa_inst)
QA_INSTRUCTION = "Please answer the question:\n\nQ: {question}\nA:"
#: the name recorded for the default judge
DEFAULT_JUDGE = "exact_match"

Judge = Callable[[str, str, str], Any]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(generation: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised generation equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(generation)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(generation: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 of the normalised words, the best over the gold answers (two empty
    answers agree: 1.0)."""
    pred = normalize_answer(generation).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def exact_match_judge(question: str, target: str, generation: str) -> bool:
    """The default judge: normalised exact match against ``target``."""
    return bool(exact_match(generation, [target]))


def load_judge(path: str | None) -> tuple[str, Judge]:
    """(name, callable) of ``eval.judge``: None is the default exact match; otherwise a dotted
    path ``package.module.function`` (or ``package.module:function``) to a callable
    ``(question, target, generation) -> bool | float``."""
    if not path:
        return DEFAULT_JUDGE, exact_match_judge
    mod_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod_name), attr) if mod_name else None
    except ImportError as err:
        raise ValueError(f"eval.judge={path!r}: cannot import {mod_name!r} ({err})") from None
    except AttributeError:
        fn = None
    if not callable(fn):
        raise ValueError(f"eval.judge={path!r}: must be a dotted path to a callable "
                         "judge(question, target, generation) -> bool | float")
    return path, fn


def judge_score(judge: Judge, question: str, golds: Sequence[str], generation: str, name: str = "judge") -> float:
    """The judge's verdict, the best over the gold answers, as a float in [0, 1]."""
    best = 0.0
    for gold in golds:
        verdict = judge(question, gold, generation)
        if not isinstance(verdict, (bool, int, float)) or not 0 <= float(verdict) <= 1:
            raise ValueError(f"eval.judge={name!r} returned {verdict!r} for question {question!r}: "
                             "a judge returns a bool or a number in [0, 1]")
        best = max(best, float(verdict))
    return best


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def context_text(tok, question: str, context: str) -> str:
    """The text the model is asked: the question in context type ``context``."""
    question = question.rstrip()
    if context == "question-only":
        return question
    if context == "qa_inst":
        return QA_INSTRUCTION.format(question=question)
    if context == "chat_temp":
        if not has_chat_template(tok):
            raise ValueError("eval.wild_context='chat_temp': the model's tokenizer has no chat template; "
                             "use question-only or qa_inst")
        return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
    raise ValueError(f"eval.wild_context={context!r}: must be one of {', '.join(CONTEXTS)}")


def context_ids(tok, question: str, context: str) -> list[int]:
    """Token ids of the question in context type ``context`` (a chat template's own special
    tokens are not doubled)."""
    text = context_text(tok, question, context)
    ids = tok(text, add_special_tokens=context != "chat_temp")["input_ids"]
    if not ids:
        raise ValueError(f"empty WILD query for question {question!r}")
    return list(ids)


def budget(n_target: int, factor: float, extra: int, max_new_tokens: int) -> int:
    """New tokens allowed for an answer whose gold has ``n_target`` tokens."""
    return max(1, min(int(max_new_tokens), math.ceil(factor * n_target) + int(extra)))


def cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string, stripped."""
    end = len(text)
    for s in stops:
        if s:
            at = text.find(s)
            if at >= 0:
                end = min(end, at)
    return text[:end].strip()


def stopped(text: str, stops: Sequence[str]) -> bool:
    """Whether generated ``text`` holds a stop string after its first non-blank character
    (a stop string before any answer, e.g. a leading newline, also ends it: the official
    code stops there too)."""
    return any(s and s in text for s in stops)


@dataclass(frozen=True)
class WildSettings:
    """The ``eval.wild_*`` and ``eval.judge`` keys (conf/config.yaml, ``eval:``)."""

    context: str = "question-only"
    budget_factor: float = 1.0
    budget_extra: int = 3
    max_new_tokens: int = 50
    stop: tuple[str, ...] = ("\n", ".")
    judge: str | None = None
    #: prompts per generation batch (each step reads every weight once, so wide batches are cheap)
    batch_size: int = 128

    @classmethod
    def from_cfg(cls, ev) -> "WildSettings":
        ev = ev or {}
        stop = ev.get("wild_stop", cls.stop)
        return cls(context=str(ev.get("wild_context", cls.context)),
                   budget_factor=float(ev.get("wild_budget_factor", cls.budget_factor)),
                   budget_extra=int(ev.get("wild_budget_extra", cls.budget_extra)),
                   max_new_tokens=int(ev.get("wild_max_new_tokens", cls.max_new_tokens)),
                   stop=tuple(str(s) for s in (stop or ())), judge=ev.get("judge") or None,
                   batch_size=int(ev.get("wild_batch_size", cls.batch_size)))


def aliases_of(obj: Any, attr: str = "aliases") -> tuple[str, ...]:
    """Extra accepted answers carried by a probe or request (``aliases``; a request's
    ``target_aliases``), when the records hold them; () otherwise."""
    vals = getattr(obj, attr, None) or ()
    return tuple(str(v) for v in vals if str(v).strip())
