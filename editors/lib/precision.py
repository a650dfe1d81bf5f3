"""Float32 master copies of the weights a weight editor changes in a half-precision model.

LLaMA-2-7B and GPT-J-6B load in bfloat16 (conf/model/*.yaml ``dtype``). bfloat16 keeps 8
significant bits, so an update smaller than half a unit in the last place of a weight is
lost when it is added in bfloat16: ``bf16(0.02 + 4e-5) == 0.02``, i.e. FT's Adam steps at lr
4e-5 vanish for every weight with ``|w| > ~0.016``, and a sequence of ROME/MEMIT/WilKE edits
rounds after every edit (small entries of a rank-one update are dropped again and again).
The official codes run in float32.

:class:`Float32Masters` keeps, for each edited parameter of a half-precision model, a
float32 master created at the parameter's first change from the editor's exact original
(:meth:`editbench.editor.Editor.remember`). Every update is applied to the master in float32
(and so accumulates over the lifelong sequence), and the model gets ``master.to(param.dtype)``
after each update (:func:`write_rounded`). The model's weights stay in their own dtype, so
scoring and the forward passes of the edit itself run exactly as the model is loaded.

Float32 (and float64) parameters get no master (:meth:`Float32Masters.master` returns None):
their editors run the code they always ran, bit for bit.

Users: FT (Adam steps the masters; the gradients come from the half-precision model) and
the callers of :func:`editors.lib.locate.add_to_weight` (ROME, WilKE, MEMIT; R-ROME for the
weights it changes only while it computes the next layer's update). The editor drops its
masters in ``reset()``; the originals restore the weights bit for bit as before.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from editbench.models import AUTOCAST_DTYPES, ArchSpec, autocast_context


def wants_master(param: torch.Tensor) -> bool:
    """True for floating-point parameters narrower than float32 (bfloat16, float16)."""
    return param.is_floating_point() and torch.finfo(param.dtype).bits < 32


@torch.no_grad()
def write_rounded(param: torch.Tensor, master: torch.Tensor) -> None:
    """Write a master into its parameter, rounded to the parameter's dtype (round to nearest even)."""
    param.copy_(master.to(param.dtype))


class Float32Masters:
    """The float32 masters of the parameters an editor changes (see the module docstring).

    ``originals`` maps a parameter name to an exact copy of the parameter before its first
    change (the editor's ``_originals``, filled by ``remember``); a master is made from it on
    first use. A master whose original has since been replaced (the editor was reset and
    remembered the parameter again) is made afresh, so a stale master is never used.
    """

    def __init__(self, originals: Mapping[str, torch.Tensor]):
        self._originals = originals
        #: name -> (the original it was made from, the float32 master)
        self._masters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def master(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """The float32 master of parameter ``name`` (made from its original on first use), or
        None when ``param`` is float32 or wider (it is then updated in place as it is)."""
        if not wants_master(param):
            return None
        original = self._originals.get(name)
        if original is None:
            raise KeyError(f"parameter '{name}' has no original: call Editor.remember before changing it")
        held = self._masters.get(name)
        if held is None or held[0] is not original:
            held = self._masters[name] = (original, original.detach().to(torch.float32, copy=True))
        return held[1]

    def write(self, name: str, param: torch.Tensor) -> None:
        """Write the master of ``name`` into ``param``, rounded to its dtype."""
        write_rounded(param, self._masters[name][1])

    def names(self) -> list[str]:
        return list(self._masters)

    def clear(self) -> None:
        """Drop every master (the editor's reset restores the weights from the originals)."""
        self._masters.clear()

    def __len__(self) -> int:
        return len(self._masters)


# --------------------------------------------------------------------------- mixed precision
@contextlib.contextmanager
def low_precision_linears(modules: Iterable[nn.Module], dtype: str | None,
                          keep: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """For the duration, the float32 weights of every ``nn.Linear`` under ``modules`` hold
    copies cast to ``dtype`` (``None``: nothing changes); the original float32 tensors are put
    back afterwards, bit for bit (the same storage, never a round trip through ``dtype``).

    Under :func:`editbench.models.autocast_context` a float32 weight is cast again at every
    call, because autocast caches casts only of weights that require grad: in ROME's value
    search on SmolLM2 those casts cost as much as the bf16 matmuls themselves. The copies are
    exactly the casts autocast would make, so the numbers are those of plain autocast. Weights
    in ``keep`` (those an editor trains) stay float32."""
    if dtype is None:
        yield
        return
    target = AUTOCAST_DTYPES[dtype]
    skip = {id(t) for t in keep}
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    try:
        for root in modules:
            for mod in root.modules():
                w = getattr(mod, "weight", None)
                if isinstance(mod, nn.Linear) and isinstance(w, nn.Parameter) and w.dtype == torch.float32 \
                        and id(w) not in skip and id(w) not in saved:
                    saved[id(w)] = (w, w.data)
                    w.data = w.data.to(target)
        yield
    finally:
        for w, data in saved.values():
            w.data = data


@contextlib.contextmanager
def mixed_precision(model: nn.Module, arch: ArchSpec, first_layer: int, dtype: str | None,
                    keep: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """An editor's optimisation loop over the layers ``first_layer..`` (negative: from the
    end) and the LM head in
    ``dtype`` (:func:`editbench.models.autocast_context` with :func:`low_precision_linears`
    copies of those layers' weights); ``None``: full precision, nothing changes. Losses are
    computed from ``logits.float()``; whatever the editor optimises stays float32."""
    if dtype is None:
        yield
        return
    start = first_layer + arch.n_layers if first_layer < 0 else first_layer
    layers = [arch.module(model, "layer", i) for i in range(start, arch.n_layers)]
    head = model.get_output_embeddings()
    # no autocast cache: the loop steps the weights it trains, whose casts must be fresh each step
    with low_precision_linears([*layers, head], dtype, keep), \
            autocast_context(next(model.parameters()).device, dtype, cache=False):
        yield


def check_autocast(editor: str, value: str | None) -> None:
    """An editor's ``autocast`` setting must be null or a dtype of :data:`AUTOCAST_DTYPES`."""
    if value is not None and value not in AUTOCAST_DTYPES:
        raise ValueError(f"editor '{editor}': autocast must be null or one of {', '.join(AUTOCAST_DTYPES)}, "
                         f"got '{value}'")
