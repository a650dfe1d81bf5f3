"""Batched teacher-forced scoring and greedy generation, through ``editor.logits``.

One definition for every editor (DESIGN.md, "Metrics"):

* A query is a :class:`~editbench.records.Probe` (prompt, target). It is tokenised as
  ``tok(prompt + " " + target)``; the target tokens are those whose character span
  starts at or after the end of the prompt (offset mapping of a fast tokenizer; a slow
  tokenizer falls back to the length of ``tok(prompt)``). The token before each target
  token predicts it (teacher forcing).
* :func:`teacher_forced` returns, per query, the argmax token and the log-probability
  of the target token at every target position. Every metric is computed from those.
* Batches are sorted by length so that little padding is computed; results come back
  in the caller's order. Right and left padding give the same numbers as one query at
  a time because position ids are derived from the attention mask
  (:func:`model_logits`).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from editbench import wild as wildlib
from editbench.records import Probe
from editbench.wild import WildSettings, aliases_of

#: What scoring reads logits from: an editor, or anything else with the editor's ``logits_at``
#: (:class:`PlainLogits` for the unedited model); or a plain callable
#: ``logits_fn(input_ids, attention_mask, prompt_len=None)`` returning logits aligned with the
#: input, which is run in full and indexed. ``prompt_len`` (LongTensor, one per row) counts the
#: row's real tokens that belong to the user's prompt; the real tokens after them are the answer
#: being scored or generated. Retrieval editors build their query from the prompt part only, so
#: no target token can leak into the retrieval.
LogitsFn = Callable[..., torch.Tensor]


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain forward pass with position ids taken from the mask (padding-side agnostic)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False)
    return out.logits


#: per model object: whether the head-only path reproduced the full logits on its first use
_HEAD_ONLY_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def model_logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``model_logits(...)[rows, cols]`` without computing the LM head anywhere else.

    Scoring reads the logits of a few positions per sequence (the target tokens, the last
    prompt token); the head (vocabulary x hidden) over every position costs about a fifth
    of a small model's forward pass and a (batch x length x vocabulary) tensor. The body
    (``model.base_model``, final norm included) runs as in :func:`model_logits`; the head is
    applied to the selected hidden states only. On its first use for a model object the
    result is compared with the full forward pass and the plain path is used for good if
    they differ (an architecture with logit scaling or soft-capping, a hook on the top-level
    module); so is any model whose top-level module carries hooks.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    usable = (head is not None and base is not None and base is not model and _HEAD_ONLY_OK.get(model, True)
              and not (model._forward_hooks or model._forward_pre_hooks))
    if not usable:
        return model_logits(model, input_ids, attention_mask)[rows, cols]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    out = head(hidden[rows, cols])
    if model not in _HEAD_ONLY_OK:
        full = model_logits(model, input_ids, attention_mask)[rows, cols]
        ok = full.shape == out.shape and torch.allclose(full.float(), out.float(), rtol=1e-4, atol=1e-4)
        _HEAD_ONLY_OK[model] = bool(ok)
        if not ok:
            return full
    return out


class PlainLogits:
    """The unedited model as a logits source (``logits`` / ``logits_at``, like an editor)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        return model_logits(self.model, input_ids, attention_mask)

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        return model_logits_at(self.model, input_ids, attention_mask, rows, cols)


def selector(source: LogitsFn) -> Callable[..., torch.Tensor]:
    """``select(ids, mask, rows, cols, prompt_len) -> (N, vocab)``: the logits scoring reads.

    For an editor (or :class:`PlainLogits`) this is its ``logits_at``, which parameter editors
    compute with the head applied to those positions only; an object with ``logits`` only, or a
    plain callable, is run in full and indexed.
    """
    at = getattr(source, "logits_at", None)
    if at is not None:
        return at
    source = getattr(source, "logits", source)   # an object with logits() only

    def select(ids, mask, rows, cols, prompt_len=None):
        logits = source(ids, mask, prompt_len=prompt_len)
        if logits.shape[:2] != ids.shape:
            raise RuntimeError(f"logits shape {tuple(logits.shape)} does not align with input {tuple(ids.shape)}")
        return logits[rows, cols]
    return select


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so that a wall clock reading means something."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Encoded:
    """Token ids of ``prompt + " " + target``; ``ids[start:]`` are the target tokens."""

    ids: tuple[int, ...]
    start: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.start:]

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.ids[:self.start]


def encode(tok, prompt: str, target: str) -> Encoded:
    """Tokenise a (prompt, target) pair and find where the target tokens start."""
    prompt, target = prompt.rstrip(), target.strip()
    if not target:
        raise ValueError(f"empty target for prompt {prompt!r}")
    text = f"{prompt} {target}" if prompt else target
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # special tokens have (0, 0) spans; the first target token's span starts at the space
        start = next(i for i, (s, e) in enumerate(offsets) if e > s and s >= len(prompt))
    else:
        ids = tok(text)["input_ids"]
        start = len(tok(prompt)["input_ids"]) if prompt else 0
    if start < 1:
        raise ValueError(f"prompt {prompt!r} yields no token before the target {target!r}")
    return Encoded(tuple(ids), start)


def encode_probes(tok, probes: Sequence[Probe]) -> list[Encoded]:
    return [encode(tok, p.prompt, p.target) for p in probes]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into (input_ids, attention_mask) on ``side``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if side == "right":
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        else:
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def length_batches(lengths: Sequence[int], batch_size: int, min_fill: float | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), at most ``batch_size``
    each; with ``min_fill``, a batch also ends before a sequence shorter than ``min_fill``
    times the batch's longest (so padding stays under ``1 - min_fill`` of a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if min_fill is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) >= batch_size or lengths[i] < min_fill * lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(i)
    return batches


# --------------------------------------------------------------------------- teacher forcing
@dataclass
class TFResult:
    """Per target token: the argmax prediction and the target's log-probability."""

    argmax: list[int]
    logprobs: list[float]
    target_ids: list[int]
    #: False when a logit at one of the target positions was NaN or infinite (that position's
    #: argmax is then -1, matching no token, and its log-probability -inf; the runner marks
    #: the case failed)
    finite: bool = True

    @property
    def accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)


@dataclass
class Timing:
    """Seconds spent inside the logits function and the number of queries it served."""

    seconds: float = 0.0
    queries: int = 0

    def add(self, other: "Timing") -> None:
        self.seconds += other.seconds
        self.queries += other.queries


@torch.no_grad()
def teacher_forced(logits_fn: LogitsFn, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 32,
                   padding_side: str = "right", device: torch.device | str = "cpu"
                   ) -> tuple[list[TFResult], Timing]:
    """Score every encoded query by teacher forcing; results follow the input order."""
    results: list[TFResult | None] = [None] * len(encoded)
    timing = Timing()
    select = selector(logits_fn)
    for batch in length_batches([len(e.ids) for e in encoded], batch_size):
        seqs = [encoded[i].ids for i in batch]
        ids, mask = pad_batch(seqs, pad_id, padding_side, device)
        prompt_len = torch.tensor([encoded[i].start for i in batch], device=ids.device)
        width = ids.shape[1]
        rows, cols, targets = [], [], []
        for row, i in enumerate(batch):
            e = encoded[i]
            shift = width - len(e.ids) if padding_side == "left" else 0
            n_t = len(e.ids) - e.start
            rows += [row] * n_t
            cols += [shift + e.start - 1 + k for k in range(n_t)]
            targets += e.target_ids
        sync(device)
        t0 = time.perf_counter()
        sel = select(ids, mask, torch.tensor(rows, device=ids.device), torch.tensor(cols, device=ids.device),
                     prompt_len=prompt_len).float()
        sync(device)
        timing.seconds += time.perf_counter() - t0
        timing.queries += len(batch)
        tgt = torch.tensor(targets, device=sel.device)
        ok = torch.isfinite(sel).all(-1)
        # a non-finite position predicts nothing: its argmax matches no token and the target's
        # log-probability is -inf, so such a case scores as wrong wherever it is counted
        argmax = torch.where(ok, sel.argmax(-1), -1).tolist()
        logp = torch.where(ok, torch.log_softmax(sel, -1).gather(-1, tgt[:, None])[:, 0], -math.inf).tolist()
        finite = ok.tolist()
        pos = 0
        for i in batch:
            n_t = len(encoded[i].ids) - encoded[i].start
            results[i] = TFResult(argmax[pos:pos + n_t], logp[pos:pos + n_t], list(encoded[i].target_ids),
                                  finite=all(finite[pos:pos + n_t]))
            pos += n_t
    return results, timing  # type: ignore[return-value]


def reads_model_forward(source) -> nn.Module | None:
    """The model whose own forward pass gives ``source``'s logits, or None.

    That is :class:`PlainLogits` and any editor that keeps the base ``logits`` / ``logits_at``
    (``custom_logits = False``: parameter editors, and editors whose added modules act on each
    position, e.g. T-Patcher's patched FFN). Greedy generation may then reuse the model's KV
    cache. Editors with ``custom_logits`` (memories, retrieval, prepended prompts) and plain
    callables answer through their ``logits`` on the full input at every step.
    """
    model = getattr(source, "model", None)
    if not isinstance(model, nn.Module) or getattr(source, "custom_logits", False):
        return None
    at = getattr(type(source), "logits_at", None)
    if getattr(at, "__qualname__", "") not in ("Editor.logits_at", "PlainLogits.logits_at"):
        return None   # an object that reads the logits some other way
    return model


#: stop(index, generated token ids) -> True once that prompt's answer is complete
StopFn = Callable[[int, list[int]], bool]


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], n_new: Sequence[int], pad_id: int,
                    batch_size: int = 32, device: torch.device | str = "cpu",
                    nonfinite: set[int] | None = None, stop: StopFn | None = None,
                    kv_cache: bool = False) -> list[list[int]]:
    """Greedy decoding of at most ``n_new[i]`` tokens after ``prompts[i]``, through ``logits_fn``.

    Prompts are batched by length (:func:`length_batches`); ``stop(i, tokens)``, when given,
    ends prompt ``i`` early (its last token is kept; the caller cuts the text). Without
    ``kv_cache`` every step recomputes the full input through ``logits_fn`` (editors with hooks
    or prepended prompts see every step's full input, exactly as in scoring; this is the path
    of ``gen_exact_match``). With ``kv_cache`` and a source whose logits are the model's own
    forward (:func:`reads_model_forward`), the batch is left-padded, the prompt is run once and
    each step feeds one token against the cache; other sources fall back to recomputing. The
    index of every prompt whose next-token logits held a NaN or an infinity at some step is
    added to ``nonfinite`` when it is given.
    """
    model = reads_model_forward(logits_fn) if kv_cache else None
    if model is not None:
        return _generate_cached(model, prompts, n_new, pad_id, batch_size, device, nonfinite, stop)
    out: list[list[int]] = [[] for _ in prompts]
    select = selector(logits_fn)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        seqs = {i: list(prompts[i]) for i in batch}
        done: set[int] = set()
        for step in range(max(n_new[i] for i in batch)):
            live = [i for i in batch if step < n_new[i] and i not in done]
            if not live:
                break
            ids, mask = pad_batch([seqs[i] for i in live], pad_id, "right", device)
            prompt_len = torch.tensor([len(prompts[i]) for i in live], device=ids.device)
            last = mask.sum(-1) - 1
            step_logits = select(ids, mask, torch.arange(len(live), device=ids.device), last, prompt_len=prompt_len)
            nxt = step_logits.argmax(-1).tolist()
            if nonfinite is not None:
                nonfinite.update(i for i, ok in zip(live, torch.isfinite(step_logits).all(-1).tolist()) if not ok)
            for i, t in zip(live, nxt):
                seqs[i].append(t)
                out[i].append(t)
                if stop is not None and stop(i, out[i]):
                    done.add(i)
    return out


def _generate_cached(model: nn.Module, prompts, n_new, pad_id, batch_size, device, nonfinite, stop):
    """:func:`greedy_generate` with the model's KV cache: left padding, positions from the
    mask, one token per step. A row whose answer is complete (a stop) keeps its place until its
    budget ``n_new[i]`` is spent, and a row whose budget is spent leaves the batch (its cache
    rows are dropped): the batch's shapes depend on the budgets alone, never on the answers."""
    out: list[list[int]] = [[] for _ in prompts]
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"   # transformers 5 renamed it
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # prompts of a batch at least half as long as its longest: the prompt pass pads to the
    # longest, while every step after it reads all the weights whatever the batch size
    for batch in length_batches([len(p) for p in prompts], batch_size, min_fill=0.5):
        batch = [i for i in batch if n_new[i] >= 1]
        if not batch:
            continue
        ids, mask = pad_batch([prompts[i] for i in batch], pad_id, "left", device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, logits = _prompt_pass(model, ids, mask, pos, cache_arg, keep)
        last = pos[:, -1]
        stopped: set[int] = set()
        for step in range(max(n_new[i] for i in batch)):
            nxt = logits.float().argmax(-1)
            ok = torch.isfinite(logits).all(-1).tolist()
            for row, (i, t) in enumerate(zip(batch, nxt.tolist())):
                if i in stopped:
                    continue
                if nonfinite is not None and not ok[row]:
                    nonfinite.add(i)
                out[i].append(t)
                if stop is not None and stop(i, out[i]):
                    stopped.add(i)
            live = [row for row, i in enumerate(batch) if n_new[i] > step + 1]
            if not live or all(batch[row] in stopped for row in live):
                break
            if len(live) < len(batch):   # budgets spent: those rows leave the batch and its cache
                index = torch.tensor(live, device=nxt.device)
                cache.batch_select_indices(index)
                batch = [batch[row] for row in live]
                mask, last, nxt = mask[index], last[index], nxt[index]
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
            last = last + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                        use_cache=True, **keep, **{cache_arg: cache})
            cache, logits = _cache_of(res), res.logits[:, -1]
    return out


def _prompt_pass(model: nn.Module, ids, mask, pos, cache_arg: str, keep: dict):
    """(the KV cache, the next-token logits) of a left-padded batch of prompts: the body once,
    the head on the last position only (transformers' own ``logits_to_keep`` slice runs the
    head as a batched matmul over a broadcast weight, seconds for a 49k vocabulary); the full
    forward where the head-only path is not known to agree (:func:`model_logits_at`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    usable = (head is not None and base is not None and base is not model and _HEAD_ONLY_OK.get(model, True)
              and not (model._forward_hooks or model._forward_pre_hooks))
    if usable and model in _HEAD_ONLY_OK:
        res = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return _cache_of(res), head(res.last_hidden_state[:, -1].contiguous())
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    if usable:   # first use for this model: check the head-only path once, as model_logits_at does
        rows = torch.arange(ids.shape[0], device=ids.device)
        model_logits_at(model, ids, mask, rows, torch.full_like(rows, ids.shape[1] - 1))
    return _cache_of(res), res.logits[:, -1]


def _cache_of(res):
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


# --------------------------------------------------------------------------- per-case metrics
@dataclass(frozen=True)
class CaseQuery:
    """One teacher-forced query of a case: what the metric code calls it (``kind``:
    rel, gen, loc, cf_true, cf_para_true, cf_nb_new; ``family``) and where it comes from in
    the case (``field``, e.g. ``generality.rephrase[0]``, for error messages)."""

    kind: str
    family: str
    field: str
    prompt: str
    target: str
    #: further accepted answers (WILD judges against the target and these), when the records
    #: carry them (:func:`editbench.wild.aliases_of`)
    aliases: tuple[str, ...] = ()


def case_queries(case, cf_metrics: bool = False) -> list[CaseQuery]:
    """Every teacher-forced query of ``case`` in scoring order: the request, its generality
    and locality probes, and with ``cf_metrics`` (and a ground truth) the probability
    comparisons' counterparts."""
    r = case.request

    def probes(kind: str) -> list[tuple[str, int, Probe]]:
        return [(fam, j, p) for fam, ps in getattr(case, kind).items() for j, p in enumerate(ps)]

    q = [CaseQuery("rel", "", "request", r.prompt, r.target_new, aliases_of(r, "target_aliases"))]
    q += [CaseQuery("gen", fam, f"generality.{fam}[{j}]", p.prompt, p.target, aliases_of(p))
          for fam, j, p in probes("generality")]
    q += [CaseQuery("loc", fam, f"locality.{fam}[{j}]", p.prompt, p.target, aliases_of(p))
          for fam, j, p in probes("locality")]
    if cf_metrics and r.ground_truth:
        q += [CaseQuery("cf_true", "", "request.ground_truth", r.prompt, r.ground_truth)]
        q += [CaseQuery("cf_para_true", "", f"generality.{fam}[{j}] with ground_truth", p.prompt, r.ground_truth)
              for fam, j, p in probes("generality")]
        q += [CaseQuery("cf_nb_new", "", f"locality.{fam}[{j}] with target_new", p.prompt, r.target_new)
              for fam, j, p in probes("locality")]
    return q


class Scorer:
    """Builds every query of a set of cases, scores them in one batched pass, and turns
    the token-level results into per-case metrics.

    Metrics per case (absent when a case has no probe for them):
      reliability          token accuracy on (request.prompt, target_new)
      generality           mean token accuracy over all generality probes
      generality/<family>  the same per probe family
      locality             mean over locality probes of the fraction of answer positions
                           where the argmax equals the unedited model's argmax
      locality/<family>    the same per family
      gen_exact_match      greedy decode of len(target_new tokens) tokens == target_new
                           (decoded text compared after stripping whitespace)
      cf_efficacy          [if cf_metrics and ground_truth] P(new) > P(true) on the prompt
      cf_paraphrase        the same on each generality prompt, averaged
      cf_neighborhood      P(true) > P(new) on each locality prompt, averaged
    P(.) compares mean per-token negative log-likelihood, as ROME's evaluation does.

    ``mode`` (``eval.mode``): ``teacher_forced`` (the metrics above), ``wild`` (the WILD metrics
    only) or ``both``. WILD metrics (docs/protocol.md, "Teacher forcing and WILD"): each query is
    answered by greedy generation from the question alone in ``wild.context``, cut at a stop
    string, an end-of-sequence token or the budget (:mod:`editbench.wild`), and judged whole:
      wild_reliability, wild_generality[/<family>]   the judge's verdict (default: normalised
                           exact match against the target and its aliases)
      wild_locality[/<family>]   the edited answer equals the unedited answer (normalised)
      wild_f1_<the same>   token F1 of the answer against the target (locality: against the
                           unedited answer)
    After each :meth:`score`, :attr:`generations` holds what the model said per case.
    """

    def __init__(self, tok, batch_size: int = 32, padding_side: str = "right", cf_metrics: bool = False,
                 exact_match: bool = True, device: torch.device | str = "cpu", mode: str = "teacher_forced",
                 wild: WildSettings | None = None):
        if mode not in wildlib.MODES:
            raise ValueError(f"eval.mode={mode!r}: must be one of {', '.join(wildlib.MODES)}")
        self.mode = mode
        self.wild = wild or WildSettings()
        self.judge_name, self.judge = wildlib.load_judge(self.wild.judge) if mode != "teacher_forced" else ("", None)
        if mode != "teacher_forced" and self.wild.context == "chat_temp" and not wildlib.has_chat_template(tok):
            raise ValueError("eval.wild_context='chat_temp': the model's tokenizer has no chat template; "
                             "use question-only or qa_inst")
        self.tok = tok
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.cf_metrics = cf_metrics
        self.exact_match = exact_match
        self.device = device
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._enc: dict[tuple[str, str], Encoded] = {}
        #: after each :meth:`score`: case_id -> the queries whose logits held NaN/Inf
        #: (``reliability``, ``generality/<family>``, ``locality/<family>``, ``generation``...)
        self.nonfinite: dict[str, list[str]] = {}
        #: the unedited model's argmax on each locality probe: case_id -> [tokens per probe]
        self.locality_reference: dict[str, list[list[int]]] = {}
        #: WILD: the unedited model's answer to each locality probe: case_id -> [text per probe]
        self.wild_reference: dict[str, list[str]] = {}
        #: after each WILD :meth:`score`: case_id -> one entry per query (what was asked, the
        #: answer, its verdict and F1; for locality the unedited answer)
        self.generations: dict[str, list[dict]] = {}
        #: seconds spent in WILD generation by the last :meth:`score`
        self.wild_timing = Timing()
        self._wild_ids: dict[str, list[int]] = {}
        self._special = set(getattr(tok, "all_special_ids", None) or [])
        if tok.eos_token_id is not None:
            self._special.add(tok.eos_token_id)

    def settings(self) -> dict:
        """Every setting that changes what a scoring pass computes (the reference cache's key)."""
        return {"batch_size": self.batch_size, "padding_side": self.padding_side, "cf_metrics": self.cf_metrics,
                "exact_match": self.exact_match, "mode": self.mode,
                "wild": None if self.mode == "teacher_forced" else dataclasses.asdict(self.wild),
                "tokenizer": getattr(self.tok, "name_or_path", type(self.tok).__name__), "pad_id": self.pad_id}

    def reference_state(self, cases) -> dict[str, dict]:
        """What a ``reference=True`` pass left for ``cases`` (the locality references,
        teacher-forced and WILD), in a JSON-able form for :meth:`load_reference_state`."""
        ids = [c.case_id for c in cases]
        return {"locality": {i: self.locality_reference[i] for i in ids if i in self.locality_reference},
                "wild": {i: self.wild_reference[i] for i in ids if i in self.wild_reference}}

    def load_reference_state(self, state: dict[str, dict]) -> None:
        """Install references saved by :meth:`reference_state` (editbench.reference)."""
        self.locality_reference.update({k: [list(t) for t in v] for k, v in state["locality"].items()})
        self.wild_reference.update({k: list(v) for k, v in state["wild"].items()})
        self.nonfinite = {}

    def encode(self, prompt: str, target: str) -> Encoded:
        key = (prompt, target)
        if key not in self._enc:
            self._enc[key] = encode(self.tok, prompt, target)
        return self._enc[key]

    def queries(self, case) -> list[CaseQuery]:
        """Every teacher-forced query this scorer asks of ``case`` (:func:`case_queries`)."""
        return case_queries(case, self.cf_metrics)

    def _queries(self, case) -> list[tuple[str, str, Encoded]]:
        """(kind, family, encoded) for every teacher-forced query of a case."""
        return [(q.kind, q.family, self.encode(q.prompt, q.target)) for q in self.queries(case)]

    def score(self, logits_fn: LogitsFn, cases, reference: bool = False) -> tuple[dict[str, dict[str, float]], Timing]:
        """Per-case metrics of ``cases`` under ``logits_fn`` and the time spent in it.

        With ``reference=True`` the locality argmax of this pass becomes the unedited
        reference (call it before the first edit); its locality is 1.0 by definition. Under
        WILD the reference pass generates the locality answers only.
        """
        self.nonfinite = {}
        timing = Timing()
        out: dict[str, dict[str, float]] = {c.case_id: {} for c in cases}
        if self.mode != "wild":
            out, timing = self._score_teacher_forced(logits_fn, cases, reference)
        if self.mode != "teacher_forced":
            self._score_wild(logits_fn, cases, reference, out)
        return out, timing

    def _score_teacher_forced(self, logits_fn: LogitsFn, cases, reference: bool):
        per_case = [self._queries(c) for c in cases]
        flat = [e for qs in per_case for (_, _, e) in qs]
        results, timing = teacher_forced(logits_fn, flat, self.pad_id, self.batch_size, self.padding_side,
                                         self.device)
        out: dict[str, dict[str, float]] = {}
        self.nonfinite = {}
        pos = 0
        for case, qs in zip(cases, per_case):
            res = results[pos:pos + len(qs)]
            pos += len(qs)
            bad = [_query_name(kind, fam) for (kind, fam, _), r in zip(qs, res) if not r.finite]
            if bad:
                self.nonfinite[case.case_id] = bad
            if reference:
                self.locality_reference[case.case_id] = [t.argmax for (k, _, _), t in zip(qs, res) if k == "loc"]
            out[case.case_id] = self._case_metrics(case, qs, res)
        if self.exact_match and not reference:
            gen_bad: set[int] = set()
            gen = greedy_generate(logits_fn, [self.encode(c.request.prompt, c.request.target_new).prompt_ids
                                              for c in cases],
                                  [len(self.encode(c.request.prompt, c.request.target_new).target_ids)
                                   for c in cases], self.pad_id, self.batch_size, self.device, nonfinite=gen_bad)
            for i in sorted(gen_bad):
                self.nonfinite.setdefault(cases[i].case_id, []).append("generation")
            for case, toks in zip(cases, gen):
                text = self.tok.decode(toks, skip_special_tokens=True).strip()
                out[case.case_id]["gen_exact_match"] = float(text == case.request.target_new.strip())
        return out, timing

    # ------------------------------------------------------------------ WILD
    def wild_ids(self, question: str) -> list[int]:
        """Token ids of ``question`` in the configured WILD context type."""
        if question not in self._wild_ids:
            self._wild_ids[question] = wildlib.context_ids(self.tok, question, self.wild.context)
        return self._wild_ids[question]

    def _generate(self, logits_fn: LogitsFn, qs: Sequence[CaseQuery]) -> tuple[list[str], list[str], set[int]]:
        """(answers, raw decoded texts, indices with NaN/Inf logits) of WILD queries ``qs``."""
        w = self.wild
        prompts = [self.wild_ids(q.prompt) for q in qs]
        budgets = [wildlib.budget(max(len(self.encode(q.prompt, g).target_ids) for g in (q.target, *q.aliases)),
                                  w.budget_factor, w.budget_extra, w.max_new_tokens) for q in qs]

        def stop(i: int, toks: list[int]) -> bool:
            return toks[-1] in self._special or wildlib.stopped(self.tok.decode(toks, skip_special_tokens=True),
                                                                w.stop)
        bad: set[int] = set()
        sync(self.device)
        t0 = time.perf_counter()
        gen = greedy_generate(logits_fn, prompts, budgets, self.pad_id, w.batch_size, self.device,
                              nonfinite=bad, stop=stop, kv_cache=True)
        sync(self.device)
        self.wild_timing.seconds += time.perf_counter() - t0
        self.wild_timing.queries += len(qs)
        raw = [self.tok.decode(t, skip_special_tokens=True) for t in gen]
        return [wildlib.cut(r, w.stop) for r in raw], raw, bad

    def _score_wild(self, logits_fn: LogitsFn, cases, reference: bool, out: dict[str, dict[str, float]]) -> None:
        self.generations = {}
        self.wild_timing = Timing()
        per_case = [[q for q in self.queries(c) if q.kind in ("rel", "gen", "loc")] for c in cases]
        # locality probes are generated in a pass of their own, in the reference pass and after
        # the edits alike, so both see the same batches (an unchanged model answers identically)
        groups = [[(ci, q) for ci, qs in enumerate(per_case) for q in qs if q.kind == "loc"]]
        if not reference:
            groups.insert(0, [(ci, q) for ci, qs in enumerate(per_case) for q in qs if q.kind != "loc"])
        answers: dict[tuple[int, str], tuple[str, str]] = {}
        for group in groups:
            if not group:
                continue
            texts, raw, bad = self._generate(logits_fn, [q for _, q in group])
            for k, ((ci, q), a, r) in enumerate(zip(group, texts, raw)):
                answers[(ci, q.field)] = (a, r)
                if k in bad:
                    self.nonfinite.setdefault(cases[ci].case_id, []).append(f"wild/{_query_name(q.kind, q.family)}")
        for ci, (case, qs) in enumerate(zip(cases, per_case)):
            if reference:
                self.wild_reference[case.case_id] = [answers[(ci, q.field)][0] for q in qs if q.kind == "loc"]
                continue
            ref = iter(self._wild_locality_reference(case, qs))
            scored: dict[str, list[tuple[str, float]]] = {}
            entries = []
            for q in qs:
                answer, raw = answers[(ci, q.field)]
                entry = {"query": q.field, "kind": q.kind, "family": q.family, "prompt": q.prompt,
                         "target": q.target, "generation": answer, "raw": raw}
                if q.aliases:
                    entry["aliases"] = list(q.aliases)
                if q.kind == "loc":
                    before = next(ref)
                    verdict, f1 = wildlib.exact_match(answer, [before]), wildlib.token_f1(answer, [before])
                    entry["unedited"] = before
                else:
                    golds = (q.target, *q.aliases)
                    verdict = wildlib.judge_score(self.judge, q.prompt, golds, answer, self.judge_name)
                    f1 = wildlib.token_f1(answer, golds)
                entry.update(score=verdict, f1=f1)
                entries.append(entry)
                name = _QUERY_NAMES[q.kind]
                scored.setdefault(f"wild_{name}", []).append((q.family, verdict))
                scored.setdefault(f"wild_f1_{name}", []).append((q.family, f1))
            m = out[case.case_id]
            for name, vals in scored.items():
                if name.endswith("reliability"):
                    m[name] = vals[0][1]
                else:
                    _pooled(m, name, vals)
            self.generations[case.case_id] = entries

    def _wild_locality_reference(self, case, qs: Sequence[CaseQuery]) -> list[str]:
        n_loc = sum(q.kind == "loc" for q in qs)
        ref = self.wild_reference.get(case.case_id)
        if n_loc and (ref is None or len(ref) != n_loc):
            raise RuntimeError(f"case {case.case_id}: no unedited WILD locality reference; score it with "
                               "reference=True before editing")
        return ref or []

    def _case_metrics(self, case, qs, res: list[TFResult]) -> dict[str, float]:
        m: dict[str, float] = {}
        by_kind: dict[str, list[tuple[str, TFResult]]] = {}
        for (kind, fam, _), r in zip(qs, res):
            by_kind.setdefault(kind, []).append((fam, r))
        rel = by_kind["rel"][0][1]
        m["reliability"] = rel.accuracy
        _pooled(m, "generality", [(fam, r.accuracy) for fam, r in by_kind.get("gen", [])])
        if "loc" in by_kind:
            ref = self.locality_reference.get(case.case_id)
            if ref is None:
                raise RuntimeError(f"case {case.case_id}: no unedited locality reference; score it with "
                                   "reference=True before editing")
            _pooled(m, "locality", [(fam, sum(a == b for a, b in zip(r.argmax, ref_t)) / len(ref_t))
                                    for (fam, r), ref_t in zip(by_kind["loc"], ref)])
        if "cf_true" in by_kind:
            m["cf_efficacy"] = float(rel.mean_nll < by_kind["cf_true"][0][1].mean_nll)
            if "gen" in by_kind:
                m["cf_paraphrase"] = _mean([float(g.mean_nll < t.mean_nll) for (_, g), (_, t)
                                            in zip(by_kind["gen"], by_kind["cf_para_true"])])
            if "loc" in by_kind:
                m["cf_neighborhood"] = _mean([float(t.mean_nll < n.mean_nll) for (_, t), (_, n)
                                              in zip(by_kind["loc"], by_kind["cf_nb_new"])])
        return m


_QUERY_NAMES = {"rel": "reliability", "gen": "generality", "loc": "locality"}


def _query_name(kind: str, family: str) -> str:
    name = _QUERY_NAMES.get(kind, kind)
    return f"{name}/{family}" if family else name


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _pooled(m: dict[str, float], name: str, scored: Sequence[tuple[str, float]]) -> None:
    """Write the pooled mean under ``name`` and the per-family means under ``name/<family>``."""
    if not scored:
        return
    m[name] = _mean([v for _, v in scored])
    fams: dict[str, list[float]] = {}
    for fam, v in scored:
        fams.setdefault(fam, []).append(v)
    for fam, vs in fams.items():
        m[f"{name}/{fam}"] = _mean(vs)
