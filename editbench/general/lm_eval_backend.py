"""General ability through lm-evaluation-harness (``general.backend=lm_eval``; docs/general.md).

After a chunk's edits the edited model is wrapped as an lm-eval ``LM`` (:class:`EditorLM`)
whose every forward pass goes through the editor's own logits (``logits_at`` / ``logits``,
through :func:`editbench.scoring.selector`, exactly what the built-in tasks and the probes
score), so retrieval and memory editors are measured as they answer. It is evaluated with
``lm_eval.simple_evaluate`` on ``general.lm_eval_tasks`` (any task lm-eval knows, or task
YAMLs in the folder ``general.lm_eval_include``, e.g. tasks on local files), with
``general.lm_eval_limit`` examples per task (lm-eval's ``limit``: the first N documents) and
``general.lm_eval_num_fewshot``. The unedited model is evaluated once on the same tasks
(kept in memory for the process). Each metric of each task becomes a ``general/`` row:

``lm_eval/<task>/<metric>``            the edited model (``acc``, ``acc_norm``, ``exact_match``...)
``lm_eval/<task>/<metric>_unedited``   the unedited model

(a metric under an lm-eval filter other than ``none`` is named ``<metric>_<filter>``; the
standard errors are not kept).

Requests are scored the way lm-eval's HF model scores them: a context's trailing spaces
move to the continuation, the continuation's tokens are the tail of the encoded
``context + continuation`` after the encoded context (so a merge across the boundary goes
to the continuation), an empty context gets the end-of-sequence token, sequences longer than
``general.max_tokens`` lose tokens on the left; the tokenizer adds its special tokens as
everywhere in editbench. ``loglikelihood`` returns (sum of the continuation's log-probabilities,
whether every continuation token is the argmax), ``loglikelihood_rolling`` the log-likelihood
of the whole text in windows of ``max_tokens``, ``generate_until`` greedy text until a stop
string or ``max_gen_toks`` (editbench's greedy decoding, full input each step).

Needs ``pip install -e ".[lm_eval]"`` (lm-eval 0.4.13); without it the config check stops
with one line.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from editbench.general.tasks import budget_groups, clip_left
from editbench.scoring import Encoded, LogitsFn, PlainLogits, greedy_generate, teacher_forced

log = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "LmEvalSuite", "available", "editor_lm", "metric_rows"]

INSTALL_HINT = "pip install -e \".[lm_eval]\" (lm-eval==0.4.13)"
_UNEDITED: dict[str, dict[str, float]] = {}


def available() -> bool:
    """Whether lm-evaluation-harness is installed."""
    return importlib.util.find_spec("lm_eval") is not None


def _lm_base():
    if not available():
        raise ValueError(f"general.backend=lm_eval needs lm-evaluation-harness: {INSTALL_HINT}")
    from lm_eval.api.model import LM

    return LM


def editor_lm(logits_fn: LogitsFn, tok, *, device: torch.device | str = "cpu", max_tokens: int = 1024,
              batch_tokens: int = 4096, max_batch: int = 32, padding_side: str = "right"):
    """An lm-eval ``LM`` over ``logits_fn`` (an editor, or :class:`~editbench.scoring.PlainLogits`)."""
    base = _lm_base()

    class EditorLM(base):  # type: ignore[misc,valid-type]
        """lm-eval's model interface over editbench's logits path (see the module docstring)."""

        def __init__(self):
            super().__init__()
            self.source, self.tok = logits_fn, tok
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            self.prefix_id = tok.eos_token_id if tok.eos_token_id is not None else self.pad_id
            self.where = device
            self.kw = dict(batch_tokens=batch_tokens, max_batch=max_batch)
            self.padding_side, self.max_tokens = padding_side, max_tokens

        # ---------------------------------------------------------- encoding
        def encode_pair(self, context: str, continuation: str) -> Encoded:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = list(self.tok(context + continuation)["input_ids"])
            start = len(self.tok(context)["input_ids"]) if context else 0
            if start == 0:  # nothing before the continuation: lm-eval's prefix token
                whole, start = [self.prefix_id] + whole, 1
            if start >= len(whole):
                raise ValueError(f"lm-eval request: continuation {continuation!r} adds no token after its context")
            ids, start = clip_left(whole, start, self.max_tokens)
            return Encoded(ids, start)

        def _score(self, encoded: Sequence[Encoded]) -> list[tuple[float, bool]]:
            out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
            for group in budget_groups([len(e.ids) for e in encoded], self.kw["batch_tokens"], self.kw["max_batch"]):
                res, _ = teacher_forced(self.source, [encoded[i] for i in group], self.pad_id, len(group),
                                        self.padding_side, self.where)
                for i, r in zip(group, res):
                    out[i] = (float(sum(r.logprobs)), all(a == t for a, t in zip(r.argmax, r.target_ids)))
            return out

        # ---------------------------------------------------------- the LM interface
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self._score([self.encode_pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for r in requests:
                ids = [self.prefix_id] + list(self.tok(r.args[0])["input_ids"])
                windows, step = [], self.max_tokens - 1
                for begin in range(1, len(ids), step):  # each window predicts ids[begin:begin+step]
                    ctx_from = max(0, begin + step - self.max_tokens)
                    piece = ids[ctx_from:begin + step]
                    windows.append(Encoded(tuple(piece), begin - ctx_from))
                out.append(sum(lp for lp, _ in self._score(windows)))
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, gen_kwargs = r.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n_new = int(gen_kwargs.get("max_gen_toks", 256))
                prompt = list(self.tok(context)["input_ids"])[-max(1, self.max_tokens - n_new):]

                def stop(i, tokens, until=until):
                    text = self.tok.decode(tokens, skip_special_tokens=True)
                    return any(u in text for u in until) or (tokens and tokens[-1] == self.tok.eos_token_id)

                toks = greedy_generate(self.source, [prompt], [n_new], self.pad_id, 1, self.where, stop=stop)[0]
                text = self.tok.decode(toks, skip_special_tokens=True)
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    return EditorLM()


def metric_rows(results: Mapping[str, Mapping[str, Any]], suffix: str = "") -> dict[str, float]:
    """``lm_eval/<task>/<metric>[suffix]`` -> value from ``simple_evaluate(...)["results"]``."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            out[f"lm_eval/{task}/{name}{suffix}"] = float(value)
    return out


class LmEvalSuite:
    """The lm-eval tasks of a ``general`` config, the unedited scores, and :meth:`measure`."""

    def __init__(self, gcfg: Mapping[str, Any], lm, fingerprint: str, padding_side: str = "right",
                 unedited: bool = True):
        """``unedited=False`` skips the unedited evaluation (``self.unedited`` stays empty): for
        callers that only want :meth:`run` (benchmarks/lm_eval_mmlu.py)."""
        _lm_base()
        self.cfg = dict(gcfg)
        self.tasks = [str(t) for t in self.cfg.get("lm_eval_tasks") or []]
        if not self.tasks:
            raise ValueError("general.backend=lm_eval needs general.lm_eval_tasks (a list of lm-eval task names)")
        limit = self.cfg.get("lm_eval_limit")
        self.limit = None if limit is None else (float(limit) if isinstance(limit, float) else int(limit))
        fewshot = self.cfg.get("lm_eval_num_fewshot")
        self.num_fewshot = None if fewshot is None else int(fewshot)
        include = self.cfg.get("lm_eval_include")
        self.include = None if include in (None, "") else str(Path(str(include)).expanduser())
        if self.include is not None and not Path(self.include).is_dir():
            raise FileNotFoundError(f"general.lm_eval_include={include!r}: no such folder of lm-eval task YAMLs")
        self.seed = int(self.cfg.get("seed", 0))
        self.tok = lm.tokenizer
        model = lm.model
        max_tokens = int(self.cfg.get("max_tokens", 1024))
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.lm_kw = dict(max_tokens=min(max_tokens, int(positions)) if positions else max_tokens,
                          batch_tokens=int(self.cfg.get("batch_tokens", 4096)),
                          max_batch=int(self.cfg.get("batch_size") or 32), padding_side=padding_side)
        self._manager = None
        self.unedited: dict[str, float] = {}
        if not unedited:
            return
        key = repr((fingerprint, self.tasks, self.limit, self.num_fewshot, self.include, self.seed, self.lm_kw))
        if key not in _UNEDITED:
            t0 = time.perf_counter()
            device = next(model.parameters()).device
            _UNEDITED[key] = metric_rows(self.evaluate(PlainLogits(model), device), "_unedited")
            log.info("general/lm_eval: unedited %s (%.1f s)", _UNEDITED[key], time.perf_counter() - t0)
        self.unedited = _UNEDITED[key]

    def task_manager(self):
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include, verbosity="ERROR")
        return self._manager

    def evaluate(self, logits_fn: LogitsFn, device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
        """lm-eval's per-task results of ``logits_fn`` (``simple_evaluate(...)["results"]``)."""
        return {t: r for t, r in self.run(logits_fn, device)["results"].items()}

    def run(self, logits_fn: LogitsFn, device: torch.device | str = "cpu", log_samples: bool = False
            ) -> dict[str, Any]:
        """``lm_eval.simple_evaluate`` of ``logits_fn`` on the tasks, as configured; its whole
        output (``results``, and with ``log_samples`` the per-document ``samples``)."""
        import lm_eval

        model = editor_lm(logits_fn, self.tok, device=device, **self.lm_kw)
        try:
            res = lm_eval.simple_evaluate(model=model, tasks=list(self.tasks), limit=self.limit,
                                          num_fewshot=self.num_fewshot, task_manager=self.task_manager(),
                                          bootstrap_iters=0, log_samples=log_samples, random_seed=self.seed,
                                          numpy_random_seed=self.seed, torch_random_seed=self.seed,
                                          fewshot_random_seed=self.seed, verbosity="ERROR")
        except KeyError as err:  # an unknown task name
            raise ValueError(f"general.lm_eval_tasks={self.tasks}: lm-eval does not know {err} "
                             f"(general.lm_eval_include={self.include!r})") from None
        if res is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        return res

    def measure(self, logits_fn: LogitsFn, device: torch.device | str = "cpu") -> dict[str, float]:
        """The edited scores (through ``logits_fn``) beside the unedited ones."""
        out = metric_rows(self.evaluate(logits_fn, device))
        out.update(self.unedited)
        return out
