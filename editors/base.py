"""The Editor interface every method implements (see DESIGN.md, "Core objects").

An editor is built with (model, tokenizer, arch spec, editor cfg). The runner calls
``edit`` once per request (lifelong: each edit lands on top of the previous ones),
scores through ``logits``, then calls ``reset``. Editors that train call ``fit`` first.

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
from editbench.scoring import model_logits


class Editor:
    #: registry name (``editor=<name>``); set by :func:`editbench.registry.register`
    name: ClassVar[str] = ""
    #: architecture families the method supports (None: any family with an ArchSpec)
    supported_families: ClassVar[tuple[str, ...] | None] = None
    #: True for editors that must be trained with ``fit`` before editing
    needs_training: ClassVar[bool] = False
    #: True for editors that implement ``edit_batch``
    supports_batch: ClassVar[bool] = False

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

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the edited model, aligned with ``input_ids``.

        Parameter editors use the model as it is; editors with memories or hooks
        override this and strip any positions they prepend.
        """
        return model_logits(self.model, input_ids, attention_mask)

    def reset(self) -> None:
        """Return the model and the editor's memory to the pre-edit state."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self.model.get_parameter(name).copy_(original)
        self._originals.clear()

    def fit(self, train_cases: Sequence[EditCase]) -> None:
        """Train what the method learns (only where ``needs_training``)."""

    def stats(self) -> dict[str, float]:
        """Growth figures after the current edits (codebook size, patch neurons...)."""
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

    ``name`` and keys starting with ``_`` are config bookkeeping and are ignored.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in cfg.items() if k != "name" and not k.startswith("_")}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"editor '{editor}': unknown hyperparameter(s) {unknown}; valid: {sorted(fields)}")
    return cls(**given)
