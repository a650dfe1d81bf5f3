"""T-Patcher: a few trainable neurons added to the last FFN per edit.

Follows Huang et al. (ICLR 2023), "Transformer-Patcher: One Mistake Worth One Neuron",
official code ZeroYuHuang/Transformer-Patcher (``scripts/T-patch.py``,
``src/models/patch.py``, ``src/models/seq2seq_modules.py``, ``src/dataset/zsre_dataloader.py``,
defaults in ``src/utils.py``), and its port to decoder-only LLMs in qizhou000/UniEdit
(``editor/llm_editors/tp/tp.py``, ``configs/llms/tp/{gpt-j-6b,llama-3-8b}.yaml``: the FFN of
the last layer).

A patch neuron is a key ``k``, a bias ``b`` and a value ``v`` added to the FFN ``f`` of
``layer``: ``f'(x) = f(x) + act(x·k + b) v``. Per edit:

* The edit is teacher-forced through the current (already patched) model. If every
  target token is already predicted, nothing is added (the official code only patches
  mistakes). Otherwise one neuron is added per mispredicted target position, at most
  ``max_add_neuron_num`` (official 5), each *located* at the position that predicts
  that token.
* Initialisation (official ``use_init_weight``, ``amplify_v``): the key is the FFN input
  ``x_p`` at its position divided by ``|x_p|²`` (pre-activation 1 there), bias 0; the
  value is ``v ⊙ a`` with ``v`` standard normal and ``a`` a trainable amplifier filled
  with ``amplify_con`` (10).
* The training batch holds ``example_repeat`` copies of the edit (official 8: the edit
  collate function repeats source and target, ``zsre_dataloader.py`` ``collate_fn``).
* Loss = edit loss (cross entropy of the target tokens, mean over the batch's tokens)
  + ``alc`` · activation loss: mean of the top-``act_topk`` of ``exp(act_margin - a)``
  over the batch's (rows × neurons) pre-activations ``a`` at the neurons' positions
  + ``mlc`` · memory loss: top-``memory_topk`` means of ``exp(h - a + margin_val1)`` and
  ``exp(h - margin_val2)`` over (memory × rows × neurons), ``h`` the new neurons'
  pre-activations on every memory vector (the patch stays at least ``margin_val1`` below
  its edit activation and below ``margin_val2`` on memory inputs). Official: alc 1, mlc 5
  (``src/utils.py``; ``scripts/main.py`` sets 10 for zsRE), margins 0 / 3 / -3, top-5 /
  top-1000 (``top5_exp``, ``top1000_exp+top1000_exp``).
* Adam (lr 1e-2, weight decay 0.01), gradient norm clipped at 5, at most ``max_steps``
  (official ``max_edit_step`` 2000) steps; every ``check_every`` (25) steps a validation
  check on the edit example: the learning rate is halved when the edit loss plateaus
  (ReduceLROnPlateau, factor 0.5, patience 1, threshold 0.05), and once more than
  ``start_val_step`` (100) steps have run the check asks whether the edit succeeds (every
  target token predicted). ``use_val=1`` (official default): each successful check also
  records the *validation memory loss* (the memory loss on a held-out memory), and
  training stops at the first successful check whose validation memory loss is not more
  than ``val_threshold`` (0.001) below the best of the earlier successful checks
  (``val_patience`` 1), so at least two successful checks are needed. ``use_val=0``:
  stop at the first successful check. Otherwise training ends after ``max_steps`` with
  the last patch. (The official check after epoch ``e`` counts when ``e >= 100``, epochs
  counted from 0: with 25-step checks the first counted one follows step 125.)
* The memory: FFN inputs (all token positions) of training-set inputs, built once by
  :meth:`TPatcher.fit` from ``data.train_path`` (the request prompts with their ground
  truth answers, and the locality probes), at most ``memory_size`` vectors (official
  40000), cached under ``$EDITBENCH_CACHE/tpatcher``. With ``use_val=1`` every
  ``val_memory_every``-th (5th) training case is held out and its inputs form the
  validation memory (the official one comes from its validation split). After each edit
  the FFN inputs of the edit batch join both memories (official ``update_memory``: the
  whole batch, so ``example_repeat`` copies), so later patches do not fire on earlier
  edits; ``reset`` drops them again.

What the copies change. Edit loss: the mean over identical rows is the one-copy loss,
same gradient. The two top-k means are not: with B identical rows every value appears
B times, so the top-k mean over the batch is the top-(k/B) mean over distinct values. With
B = 8 the activation loss (top 5 of 8·n values) is ``exp(act_margin - min a)``, the
worst neuron only, instead of the mean over the n <= 5 neurons, and each memory term is
the mean of the top 125 memory entries instead of the top 1000: a larger loss, pushed onto
fewer entries; the memory update stores each edit position 8 times. On the tiny test
models (a 3-neuron patch, after 30 one-copy steps) the memory loss is 5x larger with 8
copies and the key's gradient 6-9x (docs/editors-memory.md). Officially the copies also
differ through dropout (the BART model trains in train mode); the decoders here have no
dropout, so the rows are identical.

Variant ``fast`` (conf/editor/tpatcher_fast.yaml, shown as ``tpatcher[fast]``): the
setting used before the official schedule was the default: one copy, ``use_val=0``,
checks counted from step 25 (``start_val_step: 0``), at most 500 steps (the per-model
files keep their own ``max_steps``). Measured on 5 CounterFact edits with SmolLM2-135M
(CPU, one thread; a speed check, not a tuning result): 10.7 s per edit with the official
schedule (150 steps each) vs 2.05 s with ``fast`` (50 steps each), the same metrics on
those 5 cases (docs/editors-memory.md).

Deviations:
* Patch activation. The official patch neuron uses the FFN's own activation (GELU in
  BART and GPT-J: ``activation: model``). LLaMA's FFN is a gated SiLU, and a SiLU
  neuron never switches off (``silu(-3) = -0.14``): every patch would leak
  ``-0.14·v`` into every token. For LLaMA-family models the patch therefore uses ReLU
  (``activation: relu``), which is exactly zero where the patch does not fire, so an
  input that fires no patch gives bit-identical outputs. UniEdit instead adds a neuron
  to both gate and up projections; that neuron leaks in the same way.
* The edit loss is plain cross entropy (the official seq2seq code reuses BART's 0.1
  label smoothing from fine-tuning, also in the validation loss that drives the learning
  rate); success is teacher-forced argmax on every target token, which for a greedy decoder
  is the official check "greedy generation equals the target".
* The validation memory is a held-out fifth of the training cases (no separate split).
* The memory loss is computed without materialising the (memory × rows × neurons)
  tensor (:func:`memory_loss`: same value and gradient).
* Training re-runs only the layers from ``layer`` up (with ``layer = -1``: the last
  layer, the final norm and the LM head at the target positions); the layers below are
  run once per edit without gradients (:class:`editors.lib.forward.UpperStack`).

Defaults: conf/editor/tpatcher.yaml (the official schedule; SmolLM2-135M), the variant
conf/editor/tpatcher_fast.yaml, and per model conf/editor_model/tpatcher/{llama2,gptj}.yaml
(official values), conf/editor_model/tpatcher/tiny.yaml (the tiny test models, a scaled-down
schedule); conf/editor_model/tpatcher_fast/ holds the same per model with the fast schedule.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editbench.models import cache_dir
from editbench.registry import register
from editbench.scoring import encode, model_logits, pad_batch
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.forward import UpperStack
from editors.lib.layer_stats import atomic_torch_save
from editors.lib.precision import check_autocast, mixed_precision
from editors.lib.swap import ModuleSwap

log = logging.getLogger(__name__)


@dataclass
class TPatcherParams:
    layer: int = -1
    module: str = "mlp"
    activation: str = "relu"
    max_add_neuron_num: int = 5
    lr: float = 1e-2
    weight_decay: float = 0.01
    max_steps: int = 2000
    check_every: int = 25
    start_val_step: int = 100
    use_val: int = 1
    val_threshold: float = 0.001
    val_patience: int = 1
    val_memory_every: int = 5
    example_repeat: int = 8
    grad_clip: float = 5.0
    lr_decay: float = 0.5
    alc: float = 1.0
    mlc: float = 5.0
    act_margin: float = 0.0
    margin_val1: float = 3.0
    margin_val2: float = -3.0
    act_topk: int = 5
    memory_topk: int = 1000
    amplify_v: bool = True
    amplify_con: float = 10.0
    memory_size: int = 40000
    update_memory: bool = True
    fit_batch_size: int = 16
    #: null (float32) | bfloat16: the patch training's forward passes in half precision
    #: (editors.lib.precision.mixed_precision); the neurons and Adam stay float32
    autocast: str | None = None

    def __post_init__(self):
        check_autocast("tpatcher", self.autocast)
        for f in ("lr", "weight_decay", "grad_clip", "lr_decay", "alc", "mlc", "act_margin", "margin_val1",
                  "margin_val2", "amplify_con", "val_threshold"):
            setattr(self, f, float(getattr(self, f)))  # `editor.lr=1` on the command line is an int
        if self.activation not in ("relu", "gelu", "model"):
            raise ValueError(f"editor 'tpatcher': activation must be relu, gelu or model, got '{self.activation}'")
        if self.max_add_neuron_num < 1 or self.max_steps < 1 or self.check_every < 1 or self.example_repeat < 1:
            raise ValueError("editor 'tpatcher': max_add_neuron_num, max_steps, check_every and example_repeat "
                             "must be >= 1")
        if self.use_val not in (0, 1):
            raise ValueError(f"editor 'tpatcher': use_val must be 0 or 1, got {self.use_val}")
        if self.start_val_step < 0 or self.val_patience < 1 or self.val_memory_every < 2:
            raise ValueError("editor 'tpatcher': start_val_step must be >= 0, val_patience >= 1 and "
                             "val_memory_every >= 2")
        if self.use_val and self.mlc <= 0:
            raise ValueError("editor 'tpatcher': use_val=1 stops on the validation memory loss, which needs mlc > 0")


def topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest entries of ``x`` (all of them if fewer)."""
    flat = x.reshape(-1)
    return flat.topk(min(k, flat.numel())).values.mean()


def memory_loss(memory: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, act: torch.Tensor, k: int,
                margin_val1: float, margin_val2: float) -> torch.Tensor:
    """The official memory loss of a batch (``top{k}_exp+top{k}_exp``).

    ``act`` (B, n) are the new neurons' pre-activations at their positions in each of the B
    rows of the batch, ``h = memory @ key + bias`` (m, n) their pre-activations on the memory.
    Officially ``h`` is stacked once per row, (m, B, n), and the loss is
    ``topk_mean(exp(h - act + margin_val1), k) + topk_mean(exp(h - margin_val2), k)`` over
    all m·B·n entries, so with B copies of the edit each memory entry fills B of the k slots.
    The same value is computed here without the (m, B, n) tensors: both terms grow with
    ``h`` for a fixed row and neuron, so the k largest entries overall lie among the k largest
    ``h`` of each neuron; only those are expanded over the rows (exact, gradients included).
    """
    his = memory @ key + bias                                             # (m, n)
    rows = act.shape[0]
    idx = his.detach().topk(min(k, his.shape[0]), dim=0).indices           # (k', n)
    top = his.gather(0, idx)                                              # (k', n)
    l1 = topk_mean(torch.exp(top[None] - act[:, None, :] + margin_val1), k)   # over (B, k', n)
    l2 = topk_mean(torch.exp(top - margin_val2).expand(rows, -1, -1), k)
    return l1 + l2


def stopped_improving(losses: Sequence[float], threshold: float, patience: int) -> bool:
    """The official early stop on the validation losses (lower is better): stop when none of
    the last ``patience`` values is more than ``threshold`` below the best value before it."""
    best = 0
    for i, v in enumerate(losses):
        if v < losses[best] - threshold:
            best = i
    return best < len(losses) - patience


class PatchedFFN(nn.Module):
    """An FFN plus patch neurons: ``inner(x) + act(x @ keys + biases) @ values``.

    Frozen neurons are plain tensors (the model's parameters stay untouched);
    ``pending`` holds the trainable neurons of the edit in progress.
    """

    def __init__(self, inner: nn.Module, act):
        super().__init__()
        self.inner = inner
        self.act = act
        self.keys: torch.Tensor | None = None      # (hidden, n)
        self.biases: torch.Tensor | None = None    # (n,)
        self.values: torch.Tensor | None = None    # (n, hidden)
        #: (key (hidden, m), bias (m,), value (m, hidden), amplifier (m, hidden) or None)
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.pending_pre: torch.Tensor | None = None
        self.record = False
        self.last_input: torch.Tensor | None = None

    @property
    def n_neurons(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the frozen patch neurons for inputs ``x`` (..., hidden)."""
        return x.float() @ self.keys + self.biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.record:
            self.last_input = x.detach()
        if self.n_neurons:
            out = out + (self.act(self.pre_activations(x)) @ self.values).to(out.dtype)
        if self.pending is not None:
            key, bias, value, amp = self.pending
            pre = x.float() @ key + bias
            self.pending_pre = pre
            v = value * amp if amp is not None else value
            out = out + (self.act(pre) @ v).to(out.dtype)
        return out

    def commit(self) -> None:
        """Freeze the pending neurons into the patch."""
        key, bias, value, amp = (t.detach() if t is not None else None for t in self.pending)
        value = value * amp if amp is not None else value
        if self.keys is None:
            self.keys, self.biases, self.values = key.clone(), bias.clone(), value.clone()
        else:
            self.keys = torch.cat([self.keys, key], 1)
            self.biases = torch.cat([self.biases, bias])
            self.values = torch.cat([self.values, value])
        self.pending = None
        self.pending_pre = None


@register("tpatcher")
class TPatcher(Editor):
    training = "fit"      # fit() collects the memory texts from the train split

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(TPatcherParams, cfg, "tpatcher")
        self.layer = arch.layer_index(self.hp.layer)
        self.module_name = arch.name(self.hp.module, self.hp.layer)
        #: the patched FFN around the module, installed by the first edit and discarded by reset
        self._swap: ModuleSwap[PatchedFFN] = ModuleSwap(
            model, self.module_name, lambda inner: PatchedFFN(inner, self._activation(inner)))
        self.memory_base: torch.Tensor | None = None      # (m, hidden) float32, from fit
        self.memory: torch.Tensor | None = None           # memory_base + the edits' inputs
        self.val_memory_base: torch.Tensor | None = None  # held-out memory of use_val=1, from fit
        self.val_memory: torch.Tensor | None = None       # val_memory_base + the edits' inputs

    # ------------------------------------------------------------------ memory
    def memory_texts(self, train_cases) -> list[str]:
        """Training-set inputs whose FFN activations form the memory: each request prompt
        with its ground-truth answer (the prompt alone if none), and each locality probe."""
        texts = []
        for c in train_cases:
            r = c.request
            texts.append(f"{r.prompt.rstrip()} {r.ground_truth.strip()}" if r.ground_truth.strip() else r.prompt)
            texts += [f"{p.prompt.rstrip()} {p.target.strip()}" for _, p in c.probes("locality")]
        return texts

    def split_memory_cases(self, train_cases) -> tuple[list, list]:
        """(memory cases, validation-memory cases). With ``use_val=1`` every
        ``val_memory_every``-th training case is held out for the validation memory (the
        official code builds it from its validation split); with ``use_val=0`` all cases
        form the memory and there is no validation memory."""
        cases = list(train_cases)
        if not self.hp.use_val:
            return cases, []
        every = self.hp.val_memory_every
        return ([c for i, c in enumerate(cases) if i % every != every - 1],
                [c for i, c in enumerate(cases) if i % every == every - 1])

    def fit(self, train_cases) -> None:
        cases, val_cases = self.split_memory_cases(train_cases)
        texts = self.memory_texts(cases)
        if not texts:
            raise ValueError("editor 'tpatcher': fit() got no training cases to build the memory from")
        self.memory_base = self._memory(texts)
        self.memory = self.memory_base
        if self.hp.use_val:
            val_texts = self.memory_texts(val_cases)
            if not val_texts:
                raise ValueError(f"editor 'tpatcher': use_val=1 holds out every {self.hp.val_memory_every}-th "
                                 f"training case for the validation memory, but fit() got only {len(cases)} case(s)")
            self.val_memory_base = self._memory(val_texts)
            self.val_memory = self.val_memory_base

    def _memory(self, texts: Sequence[str]) -> torch.Tensor:
        """The FFN inputs of ``texts`` (see :meth:`_collect_memory`), cached by model, module,
        tokenizer, size and texts, on the FFN's device."""
        key = hashlib.sha256(json.dumps({
            "model": _weights_fingerprint(self.model), "module": self.module_name,
            "tokenizer": [type(self.tok).__name__, len(self.tok)], "memory_size": self.hp.memory_size,
            "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir("tpatcher") / f"memory-{key}.pt"
        if path.is_file():
            memory = torch.load(path, map_location="cpu", weights_only=True)
            log.info("tpatcher: loaded %d memory vectors from %s", len(memory), path)
        else:
            memory = self._collect_memory(texts)
            atomic_torch_save(memory, path)
            log.info("tpatcher: %d memory vectors from %d texts, cached in %s", len(memory), len(texts), path)
        ffn_device = next(self.model.get_submodule(self.module_name).parameters()).device
        return memory.to(ffn_device, torch.float32)

    @torch.no_grad()
    def _collect_memory(self, texts: Sequence[str]) -> torch.Tensor:
        """FFN inputs at every real token of ``texts``, up to ``memory_size`` vectors."""
        module = self.model.get_submodule(self.module_name)
        seen: dict[str, torch.Tensor] = {}
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        chunks, total = [], 0
        try:
            for i in range(0, len(texts), self.hp.fit_batch_size):
                seqs = [self.tok(t)["input_ids"] for t in texts[i:i + self.hp.fit_batch_size]]
                ids, mask = pad_batch(seqs, pad, "right", self.device)
                model_logits(self.model, ids, mask)
                vecs = seen["x"][mask.bool().to(seen["x"].device)].cpu()
                chunks.append(vecs)
                total += len(vecs)
                if total >= self.hp.memory_size:
                    break
        finally:
            handle.remove()
        return torch.cat(chunks)[:self.hp.memory_size]

    # ------------------------------------------------------------------ wrapper
    def _activation(self, inner: nn.Module):
        if self.hp.activation == "relu":
            return F.relu
        if self.hp.activation == "gelu":
            return F.gelu
        act = getattr(inner, "act_fn", None) or getattr(inner, "act", None)
        if act is None:
            raise ValueError(f"editor 'tpatcher': activation=model but {self.module_name} has no act_fn/act")
        return act

    @property
    def ffn(self) -> PatchedFFN | None:
        return self._swap.wrapper

    def reset(self) -> None:
        self._swap.discard()
        self.memory = self.memory_base
        self.val_memory = self.val_memory_base
        super().reset()

    def stats(self):
        return {"patch_neurons": float(self.ffn.n_neurons if self.ffn is not None else 0)}

    # ------------------------------------------------------------------ edit
    def edit(self, request):
        hp = self.hp
        if self.memory is None and hp.mlc > 0:
            raise RuntimeError("editor 'tpatcher' has no memory: call fit(train_cases) first "
                               "(the runner does so from data.train_path)")
        ffn = self._swap.install()
        enc = encode(self.tok, request.prompt, request.target_new)
        # the batch: `example_repeat` copies of the edit (official), one per row
        ids = torch.tensor([enc.ids], device=self.device).repeat(hp.example_repeat, 1)
        cols = torch.arange(enc.start - 1, len(enc.ids) - 1, device=self.device)
        targets = torch.tensor(enc.target_ids, device=self.device)

        # Layers below `layer` are frozen: run them once; one pass through the layers
        # above gives the current predictions and records the FFN input.
        stack = UpperStack.capture(self.model, self.arch, self.layer, ids, torch.ones_like(ids))
        ffn.record = True
        try:
            with torch.no_grad():
                current = stack.head(stack.hidden_states()[0, cols])
        finally:
            ffn.record = False
        x = ffn.last_input[0].float()
        ffn.last_input = None
        wrong = (current.argmax(-1) != targets).nonzero()[:, 0]
        info = {"neurons_added": 0, "steps": 0, "success": True}
        if len(wrong) > 0:
            info = self._train_patch(ffn, stack, x, cols[wrong[:hp.max_add_neuron_num]], cols, targets)
        if hp.update_memory:
            # official: the FFN inputs of the whole edit batch join both memories (every copy)
            seen = x[:-1].repeat(hp.example_repeat, 1)
            if self.memory is not None:
                self.memory = torch.cat([self.memory, seen])
            if self.val_memory is not None:
                self.val_memory = torch.cat([self.val_memory, seen])
        info["patch_neurons"] = ffn.n_neurons
        return info

    def _train_patch(self, ffn, stack, x, where, cols, targets) -> dict:
        """Train ``len(where)`` new neurons, neuron ``i`` located at position ``where[i]``, on
        the batch of ``stack`` (its rows: copies of the edit). Returns the edit's info."""
        hp = self.hp
        n = len(where)
        batch = stack.hidden.shape[0]
        rows = torch.arange(batch, device=x.device).repeat_interleave(len(cols))
        at = cols.repeat(batch)
        labels = targets.repeat(batch)
        xs = x[where]                                                  # (n, hidden)
        key = nn.Parameter((xs / xs.norm(dim=-1, keepdim=True).pow(2)).T.contiguous())
        bias = nn.Parameter(torch.zeros(n, device=x.device))
        value = nn.Parameter(torch.randn(n, x.shape[-1], device=x.device))
        amp = nn.Parameter(torch.full((n, x.shape[-1]), hp.amplify_con, device=x.device)) if hp.amplify_v else None
        params = [p for p in (key, bias, value, amp) if p is not None]
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=hp.lr_decay, patience=1,
                                                           threshold=0.05)
        memory = self.memory
        neuron = torch.arange(n, device=x.device)
        ffn.pending = (key, bias, value, amp)
        val_losses: list[float] = []
        success, step, losses = False, 0, {}
        try:
            # bfloat16 autocast (hp.autocast): the layers from the patched one and the head in half
            # precision for the whole loop; the patch neurons and Adam stay float32
            with mixed_precision(self.model, self.arch, self.layer, hp.autocast):
                with torch.enable_grad():
                    # `step` = optimiser steps taken; the forward pass of each iteration sees the
                    # patch after `step` steps, which is what the official validation after epoch
                    # `step - 1` sees (its model is the same: no dropout, frozen base model)
                    while True:
                        logits = stack.head(stack.hidden_states()[rows, at]).float()
                        loss_e = F.cross_entropy(logits, labels)
                        act = ffn.pending_pre[:, where, neuron]                      # (batch, n)
                        loss_a = topk_mean(torch.exp(hp.act_margin - act), hp.act_topk)
                        loss = loss_e + hp.alc * loss_a
                        loss_m = torch.zeros(())
                        if memory is not None and hp.mlc > 0:
                            loss_m = memory_loss(memory, key, bias, act, hp.memory_topk, hp.margin_val1, hp.margin_val2)
                            loss = loss + hp.mlc * loss_m
                        losses = {"loss_e": loss_e.item(), "loss_a": loss_a.item(), "loss_m": loss_m.item()}
                        check = step > 0 and step % hp.check_every == 0
                        if check or step == hp.max_steps:
                            success = bool((logits.argmax(-1) == labels).all())
                        if check:
                            sched.step(losses["loss_e"])      # official: ReduceLROnPlateau on the validation loss
                            if step > hp.start_val_step and success and self._stop(step, val_losses, key, bias, act):
                                break
                        if step == hp.max_steps:
                            break
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
                        opt.step()
                        step += 1
        finally:
            if ffn.pending is not None:
                ffn.commit()
        info = {"neurons_added": n, "steps": step, "success": success, **losses}
        if hp.use_val:
            info["val_checks"] = len(val_losses)
            info["val_memory_loss"] = val_losses[-1] if val_losses else float("nan")
        return info

    @torch.no_grad()
    def _stop(self, step: int, val_losses: list[float], key, bias, act) -> bool:
        """At a counted check (after ``step`` steps) where the edit succeeds: ``use_val=0``
        stops; ``use_val=1`` records the validation memory loss and stops once it has
        stopped improving."""
        hp = self.hp
        if not hp.use_val:
            return True
        val_losses.append(memory_loss(self.val_memory, key, bias, act, hp.memory_topk, hp.margin_val1,
                                      hp.margin_val2).item())
        stop = stopped_improving(val_losses, hp.val_threshold, hp.val_patience)
        log.debug("tpatcher: step %d, edit succeeds, validation memory loss %.4f%s", step, val_losses[-1],
                  " (stopped improving)" if stop else "")
        return stop


def _weights_fingerprint(model: nn.Module) -> str:
    """A cheap id of a model's weights for cache keys: its config and, per parameter, the
    name, shape and the bytes of the first 256 values."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
