"""Prompts and scoring of the general-ability tasks, through any ``logits_fn``.

The protocol is the RECIPE code's (qizhou000/RECIPE, ``evaluation/llm_general_eval.py``),
reimplemented on editbench's scoring pieces:

* ``letter`` format (the default, RECIPE's): CSQA and MMLU list the options as
  ``(A) ...`` lines after an instruction and end with ``Answer: (``; ANLI asks for
  entailment/neutral/contradiction. The prediction is the argmax of the next-token
  logits at the last prompt position over the **first token** of each option label
  (``tok.encode(label, add_special_tokens=False)[0]``, as RECIPE does).
* ``cloze`` format: no option list; each option's text is scored as a continuation of a
  short prompt by teacher forcing (:func:`editbench.scoring.teacher_forced`), and the
  option with the highest log-likelihood wins (summed over its tokens, or per token with
  ``general.cloze_norm=mean``). ANLI uses the lm-evaluation-harness wording
  ``<premise>\\nQuestion: <hypothesis> True, False, or Neither?\\nAnswer:``.
* SQuAD 2.0 (both formats): 1 / perplexity of the first gold answer ("N/A" when the
  question has no answer) after RECIPE's instruction, title, context and question,
  ``exp(mean log p(answer tokens))``, averaged over questions.

Every sequence is at most ``max_tokens`` long (longer ones lose tokens on the left, so the
answer position stays); SQuAD contexts are first cut to a window of
``squad_context_tokens`` tokens that contains the gold answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from editbench.general.data import ANLI_LABELS, MCItem, NLIItem, QAItem
from editbench.scoring import Encoded, LogitsFn, encode, pad_batch, selector, teacher_forced

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Please select the correct answer for the following questions:\n"
ANLI_QUESTION = ("Please determine whether the logical relationship between the hypothesis and the premise "
                 "is entailment, neutral, or contradiction: ")
SQUAD_INSTRUCTION = "Please read the context and find the answer to the question. If there is no answer, reply N/A."
SQUAD_NO_ANSWER = "N/A"
ANLI_CLOZE_WORDS = ("True", "Neither", "False")  # entailment, neutral, contradiction


# --------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class LetterQuery:
    """Next-token choice: which of ``option_ids`` gets the highest logit after ``prompt_ids``."""

    prompt_ids: tuple[int, ...]
    option_ids: tuple[int, ...]
    answer: int


@dataclass(frozen=True)
class ContinuationQuery:
    """Teacher-forced continuations: the options of a cloze question (``answer`` indexes
    the correct one) or the single gold answer of a SQuAD question (``answer`` = 0)."""

    options: tuple[Encoded, ...]
    answer: int


Query = LetterQuery | ContinuationQuery


# --------------------------------------------------------------------------- prompts
def mc_letter_prompt(item: MCItem) -> str:
    lines = [f"({LETTERS[k]}) {opt}" for k, opt in enumerate(item.options)]
    return MC_INSTRUCTION + item.question + "\n" + "\n".join(lines) + "\nAnswer: ("


def anli_letter_prompt(item: NLIItem) -> str:
    return f"premise: {item.premise}\nhypothesis: {item.hypothesis}\n{ANLI_QUESTION}"


def mc_cloze_prompt(item: MCItem) -> str:
    return f"Question: {item.question}\nAnswer:"


def anli_cloze_prompt(item: NLIItem) -> str:
    return f"{item.premise}\nQuestion: {item.hypothesis} True, False, or Neither?\nAnswer:"


def squad2_prompt(item: QAItem, context: str) -> str:
    return f"{SQUAD_INSTRUCTION}\nTitle: {item.title}\nContext: {context}\nQuestion: {item.question}\nAnswer:"


def squad2_window(tok, item: QAItem, max_tokens: int) -> str:
    """The context cut to at most ``max_tokens`` tokens, keeping the gold answer inside.

    The window is centred on the answer when the context is too long (an unanswerable
    question keeps the first ``max_tokens`` tokens). Needs a fast tokenizer's offsets;
    with a slow one, whitespace words stand in for tokens.
    """
    ctx = item.context
    if getattr(tok, "is_fast", False):
        spans = [s for s in tok(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                 if s[1] > s[0]]
    else:
        spans, pos = [], 0
        for word in ctx.split():
            start = ctx.index(word, pos)
            spans.append((start, start + len(word)))
            pos = start + len(word)
    if len(spans) <= max_tokens:
        return ctx
    first = 0
    if item.answer_start >= 0:
        a_end = item.answer_start + len(item.answer)
        a0 = next((k for k, (s, e) in enumerate(spans) if e > item.answer_start), len(spans) - 1)
        a1 = next((k for k, (s, e) in enumerate(spans) if e >= a_end), len(spans) - 1)
        first = max(0, min(a0 - (max_tokens - (a1 - a0 + 1)) // 2, len(spans) - max_tokens))
    last = min(first + max_tokens, len(spans)) - 1
    return ctx[spans[first][0]:spans[last][1]]


def clip_left(ids: Sequence[int], keep_from: int, max_tokens: int) -> tuple[tuple[int, ...], int]:
    """Drop tokens on the left so that at most ``max_tokens`` remain; ``keep_from`` (the
    first scored position) shifts with them and must keep one token before it."""
    cut = max(0, len(ids) - max_tokens)
    if keep_from - cut < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no prompt token before the scored answer")
    return tuple(ids[cut:]), keep_from - cut


def _clipped(enc: Encoded, max_tokens: int) -> Encoded:
    ids, start = clip_left(enc.ids, enc.start, max_tokens)
    return Encoded(ids, start)


def _first_tokens(tok, labels: Sequence[str]) -> tuple[int, ...]:
    ids = tuple(tok.encode(lab, add_special_tokens=False)[0] for lab in labels)
    if len(set(ids)) != len(ids):
        raise ValueError(f"option labels {list(labels)} share a first token under this tokenizer; "
                         "use general.format=cloze")
    return ids


def letter_query(tok, prompt: str, labels: Sequence[str], answer: int, max_tokens: int) -> LetterQuery:
    ids = tok(prompt)["input_ids"][-max_tokens:]  # too long: lose tokens on the left
    return LetterQuery(tuple(ids), _first_tokens(tok, labels), answer)


def cloze_query(tok, prompt: str, options: Sequence[str], answer: int, max_tokens: int) -> ContinuationQuery:
    return ContinuationQuery(tuple(_clipped(encode(tok, prompt, opt), max_tokens) for opt in options), answer)


def build_queries(task: str, items: Sequence, tok, fmt: str = "letter", max_tokens: int = 1024,
                  squad_context_tokens: int = 256) -> list[Query]:
    """The queries of ``items`` for ``task`` in format ``fmt`` (letter | cloze)."""
    if fmt not in ("letter", "cloze"):
        raise ValueError(f"general.format must be letter or cloze, got '{fmt}'")
    out: list[Query] = []
    for it in items:
        if task in ("csqa", "mmlu"):
            if fmt == "letter":
                q = letter_query(tok, mc_letter_prompt(it), LETTERS[:len(it.options)], it.answer, max_tokens)
            else:
                q = cloze_query(tok, mc_cloze_prompt(it), [o if o.strip() else "None" for o in it.options],
                                it.answer, max_tokens)
        elif task == "anli":
            if fmt == "letter":
                q = letter_query(tok, anli_letter_prompt(it), ANLI_LABELS, it.label, max_tokens)
            else:
                q = cloze_query(tok, anli_cloze_prompt(it), ANLI_CLOZE_WORDS, it.label, max_tokens)
        elif task == "squad2":
            prompt = squad2_prompt(it, squad2_window(tok, it, squad_context_tokens))
            q = cloze_query(tok, prompt, [it.answer or SQUAD_NO_ANSWER], 0, max_tokens)
        else:
            raise ValueError(f"unknown general ability task '{task}'")
        out.append(q)
    return out


def chance_level(task: str, queries: Sequence[Query], vocab_size: int) -> float:
    """What a uniform guesser scores: mean 1/#options; for SQuAD, 1/ppl of a uniform
    next-token distribution, 1/vocab_size."""
    if task == "squad2":
        return 1.0 / vocab_size
    return sum(1.0 / len(q.option_ids if isinstance(q, LetterQuery) else q.options) for q in queries) / len(queries)


# --------------------------------------------------------------------------- scoring
def budget_groups(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), each at most ``max_batch``
    sequences and ``batch_tokens`` padded tokens (at least one sequence): the logits of
    a batch are batch x width x vocab floats, so the width bounds the batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < max_batch and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def option_logits(logits_fn: LogitsFn, queries: Sequence[LetterQuery], pad_id: int, batch_tokens: int = 4096,
                  max_batch: int = 32, padding_side: str = "right", device: torch.device | str = "cpu"
                  ) -> list[list[float]]:
    """The logits of each query's option tokens at its last prompt position.

    (:func:`~editbench.scoring.teacher_forced` scores one target per sequence; here one
    forward pass serves every option of a question.)
    """
    out: list[list[float]] = [[] for _ in queries]
    select = selector(logits_fn)
    for group in budget_groups([len(q.prompt_ids) for q in queries], batch_tokens, max_batch):
        ids, mask = pad_batch([queries[i].prompt_ids for i in group], pad_id, padding_side, device)
        last = mask.sum(-1) - 1 if padding_side == "right" else torch.full_like(mask[:, 0], ids.shape[1] - 1)
        logits = select(ids, mask, torch.arange(len(group), device=ids.device), last, prompt_len=mask.sum(-1))
        for row, i in enumerate(group):
            out[i] = logits[row, list(queries[i].option_ids)].float().tolist()
    return out


def continuation_logprobs(logits_fn: LogitsFn, encoded: Sequence[Encoded], pad_id: int, batch_tokens: int = 4096,
                          max_batch: int = 32, padding_side: str = "right", device: torch.device | str = "cpu"
                          ) -> list[list[float]]:
    """Per encoded continuation, the log-probability of each of its tokens (teacher forcing)."""
    out: list[list[float]] = [[] for _ in encoded]
    for group in budget_groups([len(e.ids) for e in encoded], batch_tokens, max_batch):
        res, _ = teacher_forced(logits_fn, [encoded[i] for i in group], pad_id, len(group), padding_side, device)
        for i, r in zip(group, res):
            out[i] = r.logprobs
    return out


@dataclass
class TaskScore:
    """Per-example values (1/0 correctness, or 1/ppl for SQuAD) and the chosen option
    (None for SQuAD); ``score`` is their mean."""

    values: list[float]
    preds: list[int] | None

    @property
    def score(self) -> float:
        return sum(self.values) / len(self.values)


def score_queries(task: str, queries: Sequence[Query], logits_fn: LogitsFn, pad_id: int, batch_tokens: int = 4096,
                  max_batch: int = 32, padding_side: str = "right", device: torch.device | str = "cpu",
                  cloze_norm: str = "sum") -> TaskScore:
    """Score ``task``'s queries under ``logits_fn`` (an editor's ``logits`` or the plain model)."""
    kw = dict(pad_id=pad_id, batch_tokens=batch_tokens, max_batch=max_batch, padding_side=padding_side, device=device)
    if queries and isinstance(queries[0], LetterQuery):
        scores = option_logits(logits_fn, queries, **kw)  # type: ignore[arg-type]
    else:
        flat = [e for q in queries for e in q.options]  # type: ignore[union-attr]
        lps = continuation_logprobs(logits_fn, flat, **kw)
        if task == "squad2":  # 1/ppl = exp(mean log p) of the single gold answer
            return TaskScore([math.exp(sum(lp) / len(lp)) for lp in lps], None)
        if cloze_norm not in ("sum", "mean"):
            raise ValueError(f"general.cloze_norm must be sum or mean, got '{cloze_norm}'")
        reduce: Callable[[list[float]], float] = sum if cloze_norm == "sum" else lambda lp: sum(lp) / len(lp)
        scores, pos = [], 0
        for q in queries:
            scores.append([reduce(lp) for lp in lps[pos:pos + len(q.options)]])  # type: ignore[union-attr]
            pos += len(q.options)  # type: ignore[union-attr]
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]  # first maximum on ties
    return TaskScore([float(p == q.answer) for p, q in zip(preds, queries)], preds)
