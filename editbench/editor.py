"""The Editor interface the harness owns and every method implements (DESIGN.md, "Core objects").

An editor is built with (model, tokenizer, arch spec, editor cfg). The runner calls
``edit`` once per request (lifelong: each edit lands on top of the previous ones),
scores through ``logits_at`` / ``logits``, then calls ``reset``.

Capabilities are declared, never detected (the harness reads these class attributes):

* ``training``: ``None`` (nothing to learn), ``"fit"`` (``fit(train_cases)`` builds something
  from the train data, e.g. T-Patcher's memory) or ``"pipeline"`` (trained by gradient steps
  in ``editbench.train`` through ``trainable`` / ``training_loss``). An instance may narrow it
  in ``__init__`` (LTE trains only with ``align=true``).
* ``supports_batch``: ``edit_batch`` is implemented.
* ``custom_logits``: the editor overrides ``logits`` (memories, prompts, hooks); scoring then
  runs it in full and indexes it. Without it, ``logits_at`` applies the LM head only where
  scoring reads.

A subclass whose declarations contradict its methods (``logits`` overridden without
``custom_logits``, ``training = "pipeline"`` without ``trainable``) is a ``TypeError`` when the
class is defined, so a forgotten declaration cannot silently change numbers.

Weight bookkeeping is shared here: an editor calls :meth:`Editor.remember` before it
changes a parameter in place; :meth:`Editor.reset` copies every remembered tensor back
(bit for bit) and :meth:`Editor.touched_parameters` tells the runner which tensors to
verify. Editors that add modules or hooks undo them in their own ``reset`` and call
``super().reset()``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from editbench.models import ArchSpec
from editbench.records import EditCase, EditRequest
from editbench.scoring import model_logits, model_logits_at


#: editor config keys that are not hyperparameters: the registry name, the name of a variant
#: that differs from the paper's method (shown as ``<name>[<variant>]`` in every table), and
#: the editor's evaluation protocol (``batch_edit``: its rows apply a chunk in one
#: ``edit_batch``, e.g. MALMEN; ``runner.batch_edit`` overrides it)
CONFIG_BOOKKEEPING = ("name", "variant", "batch_edit")

#: the values of :attr:`Editor.training`
TRAINING_KINDS = (None, "fit", "pipeline")


class Editor:
    #: registry name (``editor=<name>``); set by :func:`editbench.registry.register`
    name: ClassVar[str] = ""
    #: architecture families the method supports (None: any family with an ArchSpec)
    supported_families: ClassVar[tuple[str, ...] | None] = None
    #: None | "fit" | "pipeline" (see the module docstring); an instance may set it in __init__
    training: str | None = None
    #: True for editors that implement ``edit_batch``
    supports_batch: ClassVar[bool] = False
    #: True for editors that override ``logits``
    custom_logits: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "logits" in vars(cls) and not cls.custom_logits:
            raise TypeError(f"{cls.__qualname__} overrides logits() but does not declare custom_logits = True")
        if cls.training not in TRAINING_KINDS:
            raise TypeError(f"{cls.__qualname__}.training must be one of {TRAINING_KINDS}, got {cls.training!r}")
        if cls.training == "pipeline" and cls.trainable is Editor.trainable:
            raise TypeError(f"{cls.__qualname__} declares training = 'pipeline' but has no trainable()")

    def __init__(self, model: nn.Module, tokenizer: Any, arch: ArchSpec, cfg: Mapping[str, Any]):
        self.model = model
        self.tok = tokenizer
        self.arch = arch
        self.cfg = dict(cfg)
        self._originals: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ protocol
    def edit(self, request: EditRequest) -> dict[str, Any] | None:
        """Apply one edit on top of all previous ones. May return per-edit info
        (e.g. the layer chosen) that the runner records in cases.csv."""
        raise NotImplementedError

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any] | None:
        """Apply several edits at once (only where ``supports_batch``)."""
        raise NotImplementedError(f"editor '{self.name}' has no batched edit")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of the edited model, aligned with ``input_ids``.

        Parameter editors use the model as it is; editors with memories or hooks
        override this and strip any positions they prepend. ``prompt_len`` (one per row, or
        None) counts the real tokens of each row that are the user's prompt; retrieval
        editors build their query from those only (``editors.lib.memory.prompt_token_rows``).
        """
        return model_logits(self.model, input_ids, attention_mask)

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        """``logits(...)[rows, cols]``: the (N, vocab) logits scoring actually reads.

        Editors that keep the base ``logits`` get the head applied at those positions only
        (``editbench.scoring.model_logits_at``); an editor that overrides ``logits`` is run
        in full and indexed, so it needs nothing more.
        """
        if not self.custom_logits:
            return model_logits_at(self.model, input_ids, attention_mask, rows, cols)
        logits = self.logits(input_ids, attention_mask, prompt_len=prompt_len)
        if logits.shape[:2] != input_ids.shape:
            raise RuntimeError(f"editor '{self.name}': logits shape {tuple(logits.shape)} does not align with "
                               f"input {tuple(input_ids.shape)}")
        return logits[rows, cols]

    def reset(self) -> None:
        """Return the model and the editor's memory to the pre-edit state."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self.model.get_parameter(name).copy_(original)
        self._originals.clear()

    def fit(self, train_cases: Sequence[EditCase]) -> None:
        """Build what the method takes from the train data (only where ``training == "fit"``)."""

    # ------------------------------------------------------------------ training protocol
    # Editors with ``training = "pipeline"`` are trained by the one pipeline in editbench/train/,
    # which owns the loop, data order, optimiser, validation, checkpoints and the cache.
    # An editor supplies only what is specific to its method:
    def trainable(self) -> nn.Module:
        """The module whose parameters (those with ``requires_grad``) training updates:
        a hypernetwork, retriever heads, prompt generators, LoRA adapters. The base model's
        own weights stay frozen."""
        raise NotImplementedError(f"editor '{self.name}' has nothing to train")

    def training_loss(self, batch: Sequence[EditCase]) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's training loss on a batch of training cases, and its named parts
        (reliability, generality, locality, retrieval...) for the logs."""
        raise NotImplementedError(f"editor '{self.name}' has no training loss")

    def validation_metrics(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Held-out figures logged during training (retrieval accuracy, edit success...)."""
        return {}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the trainable parameters (and buffers an editor adds)."""
        return {n: p.detach() for n, p in self.trainable().named_parameters() if p.requires_grad}

    def load_trained_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`trained_state` from a checkpoint (strict: names and shapes must match)."""
        params = {n: p for n, p in self.trainable().named_parameters() if p.requires_grad}
        if set(params) != set(state):
            raise ValueError(f"editor '{self.name}': checkpoint tensors {sorted(set(state) ^ set(params))[:5]} "
                             f"do not match the trainable parameters")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def stats(self) -> dict[str, float]:
        """Growth figures after the current edits (codebook size, patch neurons...)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """What the editor was built from, for the run's env.json: e.g. the texts and tokens its
        covariance statistics actually used. Called once after the editor is prepared."""
        return {}

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def remember(self, param_names: Sequence[str]) -> list[nn.Parameter]:
        """Keep an exact copy of each named parameter before its first change; return them."""
        params = []
        for name in param_names:
            p = self.model.get_parameter(name)
            if name not in self._originals:
                self._originals[name] = p.detach().clone()
            params.append(p)
        return params

    def touched_parameters(self) -> list[str]:
        """Names of the parameters changed since the last reset."""
        return list(self._originals)


def hparams_from_cfg(cls: type, cfg: Mapping[str, Any], editor: str):
    """Build a hyperparameter dataclass from an editor config, rejecting unknown keys.

    ``name``, ``variant`` and keys starting with ``_`` are config bookkeeping and are ignored.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in cfg.items() if k not in CONFIG_BOOKKEEPING and not k.startswith("_")}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"editor '{editor}': unknown hyperparameter(s) {unknown}; valid: {sorted(fields)}")
    return cls(**given)
