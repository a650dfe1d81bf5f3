"""LTE: Learning to Edit (retrieved edit facts in an instruction template; optional LoRA alignment).

Follows Jiang et al., 2024, "Learning to Edit: Aligning LLMs with Knowledge Editing" (ACL),
official code YJiangcm/LTE @ b8fb59b: the mass/sequential-editing inference of
``SeqEdit/`` (``easyeditor/models/ike/util.py: encode_ike_facts``,
``easyeditor/evaluate/evaluate.py: sentence_retrieval, knowledge_edit_template``,
``hparams/IKE/llama-7b.yaml``), the alignment data recipe of
``EasyEdit/create_train_data.ipynb`` and the LoRA settings of ``FastChat/lora_train.sh``
(+ ``fastchat/train/train_lora.py``).

Inference phase (always):

* ``edit(request)`` stores the fact ``"<prompt> <target_new>"`` under a key: the encoder
  embedding of the edit's prompt (``key_text=prompt``, as the official ``encode_ike_facts``
  does; ``key_text=fact`` embeds the whole fact instead).
* ``logits(ids, mask, prompt_len)``: per row, the query is the row's PROMPT tokens only
  (``editors.lib.memory.prompt_token_rows``; the scored answer never reaches the
  retriever), decoded and embedded; the ``top_k`` stored facts by cosine similarity
  (official ``k: 1``) are written into the official template (SeqEdit's
  ``knowledge_edit_template``: one fact as is, several as a numbered list)::

      Please acknowledge the updated information provided below and respond to the
      subsequent question.\\n\\n[Updated Information]:\\n<facts>\\n\\n[Question]:\\n

  whose tokens are inserted before the row's tokens (after a BOS token, where the
  tokenizer adds one). The logits at the row's own positions are returned (the inserted
  positions are stripped; left or right padding both work, pad positions carry
  meaningless finite values). The official code always inserts the top-k facts
  (``retrieval=always``); ``retrieval=threshold`` inserts only facts whose similarity is at
  least ``sim_threshold`` (not in the paper; the variant ``lte[threshold]``). Rows that
  get no fact are run through the model as they are (bit-identical to the unedited model).
  With an empty memory the model is run as is (with the adapters when aligned).
* ``stats()``: ``memory_size``; ``retrieval_rate`` (fraction of queried rows, since the
  last reset and while the memory was non-empty, that got at least one fact);
  ``retrieval_hit_rate``: over the queried rows whose query IS an edited prompt (the
  reliability queries, CounterFact's efficacy queries, the generation steps), the fraction
  whose top-1 fact is that edit's fact. For rephrase or locality rows the editor cannot
  know the right fact; :func:`retrieval_report` measures those on a data set where the
  ground truth is known (docs/editors-retrieval.md has the CounterFact numbers).
* ``infer_overhead`` (measured by the harness) includes the encoder pass and the
  inserted tokens, since both happen inside ``logits``.

Alignment phase (``align=true``; trained by editbench/train/, cached): LoRA adapters
(peft; official ``lora_r 8, lora_alpha 16, lora_dropout 0.05`` on ``q_proj, v_proj`` of
every layer) trained on LTE-style examples built from the train split, following
``create_train_data.ipynb`` as far as the split allows. Per training case:

* facts: the case's own fact, alone (p=0.5) or followed by 1 (0.25) or 2 (0.25)
  distractor facts sampled from its 5 nearest training facts (encoder similarity) whose
  subject differs, as a numbered list with the own fact first (official);
* in scope: (facts + the request prompt (p=0.3) or a rephrase (0.7)) -> ``target_new``,
  cross entropy on the target tokens;
* out of scope: (facts + the case's locality prompt) -> the UNEDITED model's answer:
  KL(unedited model without facts || adapted model with facts) on the answer positions
  (teacher forced with the probe's target). The official data use the data set's answer
  as the label; the harness scores locality against the unedited model, so its
  distribution is the label here;
* without facts (official: each example also appears without the facts, with the
  pre-edit answer): the adapted model without facts on the locality prompt and on the
  in-scope question (continued by ``ground_truth``) is held to the unedited model by the
  same KL, so that an aligned model with an empty memory still behaves as the original.

``loss = edit + locality_weight * locality + no_fact_weight * no_fact``. The adapters are
installed in the model only inside the editor's own forward passes (the wrapped
modules are swapped back before ``logits``/``training_loss`` return), so the model's
module tree and weights are the original ones between calls; ``reset()`` empties the
memory and keeps the adapters (they belong to the trained editor, not to the edits).
``training`` is narrowed per instance by ``align`` (``None`` without it). Validation (held-out train
cases): reliability/generality with the own fact, locality agreement with the unedited
model with the own fact inserted, and agreement without facts.

Deviations from the official code, and why:

* None in the default retrieval: ``conf/editor/lte.yaml`` is the paper's LTE, aligned
  (``align: true``) with the official always-insert retrieval, on every model. The
  similarity threshold is the named variant ``lte[threshold]`` (``conf/editor/lte_threshold.yaml``;
  the same trained adapters, its threshold chosen on CounterFact val by
  ``benchmarks/lte_threshold.py``). Unaligned, the 135M model copies whatever fact it is
  shown (CounterFact test, T=100, always-insert: locality well below the aligned model's;
  docs/editors-retrieval.md has the figures).
* Encoder: all-MiniLM-L6-v2 (offline wheel) by default; the official
  ``multi-qa-mpnet-base-dot-v1`` is ``encoder=multi-qa-mpnet-base-dot-v1`` (CLS pooling,
  online). Similarities are cosine (the official code normalises too).
* Plain-text prompts as the official LLaMA path (no chat template); the harness scores
  ``prompt + " " + target`` continuations.
* A second edit of the same prompt replaces the stored fact (the official memory appends
  and then retrieves either of the two).
* Alignment data: only what the train split holds (request, rephrase, locality probe);
  no GPT-4 completions, MQuAKE or WizardLM parts; labels of out-of-scope and
  without-facts examples are the unedited model's distributions (above). LoRA is
  trained by the shared pipeline (AdamW, editor.train.*), official lr 3e-4 with cosine
  decay and 3% warm-up, but far fewer steps on CPU (conf/editor/lte.yaml).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editbench.records import EditCase, EditRequest
from editbench.registry import register
from editbench.scoring import Encoded, encode, model_logits, pad_batch
from editbench.editor import Editor, hparams_from_cfg
from editors.lib.encoder import SentenceEncoder
from editors.lib.memory import RetrievalCounters, prompt_token_rows
from editors.lib.swap import ModuleSwap

#: SeqEdit's knowledge_edit_template, up to the question; ``{facts}`` is one fact or a numbered list
DEFAULT_TEMPLATE = ("Please acknowledge the updated information provided below and respond to the subsequent "
                    "question.\n\n[Updated Information]:\n{facts}\n\n[Question]:\n")
#: LTE's retriever (sentence-transformers), CLS pooling; online only
MPNET = "sentence-transformers/multi-qa-mpnet-base-dot-v1"


@dataclass
class LTEParams:
    encoder: str = "minilm"             # minilm (offline wheel) | multi-qa-mpnet-base-dot-v1 (official) | path
    encoder_pooling: str = "auto"       # auto: cls for multi-qa-mpnet, mean otherwise | mean | cls | pooler
    encoder_max_length: int = 128
    key_text: str = "prompt"            # prompt (official encode_ike_facts) | fact
    top_k: int = 1                      # official k
    retrieval: str = "always"           # always (official) | threshold
    sim_threshold: float = 0.5          # retrieval=threshold: insert facts with cosine >= this
    template: str = DEFAULT_TEMPLATE
    align: bool = False                 # train LoRA adapters (the alignment phase)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])  # children of the attention module
    lora_layers: list | None = None     # null: every layer
    rewrite_prob: float = 0.3           # in-scope question: the request prompt (else a rephrase)
    distractor_probs: list = field(default_factory=lambda: [0.5, 0.25, 0.25])  # P(0, 1, 2 distractor facts)
    distractor_pool: int = 5            # nearest training facts (other subject) to sample distractors from
    locality_weight: float = 1.0
    no_fact_weight: float = 1.0
    val_batch_size: int = 16
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if self.key_text not in ("prompt", "fact"):
            problems.append(f"key_text must be prompt or fact, got '{self.key_text}'")
        if self.retrieval not in ("always", "threshold"):
            problems.append(f"retrieval must be always or threshold, got '{self.retrieval}'")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if "{facts}" not in self.template:
            problems.append("template must contain '{facts}'")
        if self.encoder_pooling not in ("auto", "mean", "cls", "pooler"):
            problems.append(f"encoder_pooling must be auto, mean, cls or pooler, got '{self.encoder_pooling}'")
        if self.lora_r < 1 or not self.lora_modules:
            problems.append(f"lora_r must be >= 1 and lora_modules non-empty, got {self.lora_r}, {self.lora_modules}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.rewrite_prob <= 1:
            problems.append("lora_dropout must be in [0, 1) and rewrite_prob in [0, 1]")
        probs = list(self.distractor_probs)
        if not probs or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            problems.append(f"distractor_probs must be non-negative and sum to 1, got {probs}")
        if self.distractor_pool < 0 or self.locality_weight < 0 or self.no_fact_weight < 0:
            problems.append("distractor_pool, locality_weight and no_fact_weight must be >= 0")
        if problems:
            raise ValueError("editor 'lte': " + "; ".join(problems))


def _fact(request: EditRequest) -> str:
    return f"{request.prompt.strip()} {request.target_new.strip()}"


def facts_block(facts: Sequence[str]) -> str:
    """One fact as is; several as the official numbered list."""
    if len(facts) == 1:
        return facts[0]
    return "\n".join(f"{i}. {f}" for i, f in enumerate(facts, 1))


@register("lte")
class LTE(Editor):
    training = "pipeline"  # the alignment phase; an instance with align=false narrows it to None
    custom_logits = True   # retrieved facts are prepended in logits()
    #: configuration keys that only act at inference (left out of the training cache key)
    inference_only: ClassVar[tuple[str, ...]] = ("key_text", "top_k", "retrieval", "sim_threshold", "val_batch_size")

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        self.hp = hparams_from_cfg(LTEParams, cfg, "lte")
        self.training = "pipeline" if self.hp.align else None   # per instance: only the aligned variant trains
        name = MPNET if self.hp.encoder.lower() in ("multi-qa-mpnet-base-dot-v1", MPNET.lower()) else self.hp.encoder
        pooling = self.hp.encoder_pooling
        if pooling == "auto":
            pooling = "cls" if name == MPNET else "mean"
        self.encoder = SentenceEncoder(name, pooling=pooling, max_length=self.hp.encoder_max_length,
                                       device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        # memory
        self.facts: list[str] = []
        self.prompts: list[str] = []
        self.keys = torch.zeros(0, self.encoder.dim, device=self.encoder.device)
        self._by_prompt: dict[str, int] = {}
        self._prefix_cache: dict[tuple[str, ...], list[int]] = {}
        self.counters = RetrievalCounters()
        # alignment
        self._lora: list[ModuleSwap] = []                        # one LoRA wrapper per target module
        self.adapters: nn.ModuleDict | None = None
        self._pool: dict[str, Any] | None = None                 # training facts and their neighbours
        if self.hp.align:
            self._build_adapters()

    # ------------------------------------------------------------------ adapters
    def _build_adapters(self) -> None:
        """peft LoRA wrappers around the target projections, kept OUT of the model between calls."""
        from peft import LoraConfig, inject_adapter_in_model

        layers = self.hp.lora_layers if self.hp.lora_layers is not None else range(self.arch.n_layers)
        names = [f"{self.arch.name('attn', int(layer))}.{child}" for layer in layers for child in self.hp.lora_modules]
        originals = {}
        for n in names:
            try:
                module = self.model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"editor 'lte': no module '{n}' for LoRA (lora_modules={self.hp.lora_modules} "
                                 f"are children of the attention module '{self.arch.attn}')") from None
            if not isinstance(module, nn.Linear):
                raise ValueError(f"editor 'lte': LoRA target '{n}' is a {type(module).__name__}, not nn.Linear")
            originals[n] = module
        had_peft_config = hasattr(self.model, "peft_config")
        seed = int((self.hp.train or {}).get("seed", 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapters' initialisation depends on the seed only
            inject_adapter_in_model(LoraConfig(r=self.hp.lora_r, lora_alpha=self.hp.lora_alpha,
                                               lora_dropout=self.hp.lora_dropout, target_modules=names, bias="none"),
                                    self.model, adapter_name="default")
        self._lora = [ModuleSwap.taken_out(self.model, n, originals[n]) for n in names]  # the originals go back at once
        if not had_peft_config and hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self.adapters = nn.ModuleDict({s.name.replace(".", "__"): s.wrapper for s in self._lora})
        self.adapters.eval()

    @contextlib.contextmanager
    def adapted(self, on: bool = True) -> Iterator[None]:
        """The model with the LoRA wrappers installed (no-op without adapters or with ``on=False``)."""
        if not on or not self._lora:
            yield
            return
        try:
            for swap in self._lora:
                swap.install()
            yield
        finally:
            for swap in self._lora:
                swap.restore()

    # ------------------------------------------------------------------ editing
    def edit(self, request: EditRequest) -> dict[str, Any]:
        prompt, fact = request.prompt.strip(), _fact(request)
        key = self.encoder.encode([prompt if self.hp.key_text == "prompt" else fact])
        if prompt in self._by_prompt:          # a later edit of the same prompt replaces the fact
            i = self._by_prompt[prompt]
            self.facts[i] = fact
            self.keys[i] = key[0]
        else:
            self._by_prompt[prompt] = len(self.facts)
            self.facts.append(fact)
            self.prompts.append(prompt)
            self.keys = torch.cat([self.keys, key])
        self._prefix_cache.clear()
        return {"memory_size": len(self.facts)}

    # ------------------------------------------------------------------ retrieval
    def search(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities (Q, k), fact indices (Q, k)) of the top-k stored facts for each text."""
        q = self.encoder.encode(list(texts))
        sims = q @ self.keys.T
        return sims.topk(min(self.hp.top_k, len(self.facts)), dim=1)

    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_len: torch.Tensor | None = None) -> list[tuple[int, ...]]:
        """Per row, the indices of the facts to insert (best first; empty: none).

        The query is each row's prompt (``prompt_len``), never the scored answer."""
        texts = [self.tok.decode(row, skip_special_tokens=True).strip()
                 for row in prompt_token_rows(input_ids, attention_mask, prompt_len)]
        sims, idx = self.search(texts)
        chosen = []
        for text, s, i in zip(texts, sims.tolist(), idx.tolist()):
            pick = tuple(j for sj, j in zip(s, i) if self.hp.retrieval == "always" or sj >= self.hp.sim_threshold)
            chosen.append(pick)
            own = self._by_prompt.get(text)
            if own is not None:
                self.counters.count_exact(bool(pick) and pick[0] == own)
        self.counters.count(len(texts), sum(bool(p) for p in chosen))
        return chosen

    def prefix_ids(self, facts: Sequence[str]) -> list[int]:
        """Token ids of the template holding ``facts`` (inserted before a row's tokens)."""
        key = tuple(facts)
        if key not in self._prefix_cache:
            text = self.hp.template.replace("{facts}", facts_block(facts))
            self._prefix_cache[key] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._prefix_cache[key]

    def _lead(self, tokens: Sequence[int]) -> int:
        """1 when the row starts with the tokenizer's BOS (the template goes after it), else 0."""
        return int(self.bos_id is not None and len(tokens) > 0 and tokens[0] == self.bos_id)

    def insert(self, tokens: Sequence[int], prefix: Sequence[int]) -> tuple[list[int], int]:
        """(``tokens`` with ``prefix`` inserted after the BOS if any, the shift of every later token)."""
        lead = self._lead(tokens)
        return list(tokens[:lead]) + list(prefix) + list(tokens[lead:]), len(prefix)

    # ------------------------------------------------------------------ inference
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_len: torch.Tensor | None = None) -> torch.Tensor:
        if not self.facts:
            with self.adapted():
                return model_logits(self.model, input_ids, attention_mask)
        chosen = self.retrieve(input_ids, attention_mask, prompt_len)
        if not any(chosen):
            with self.adapted():
                return model_logits(self.model, input_ids, attention_mask)
        with self.adapted():
            plain = [r for r, pick in enumerate(chosen) if not pick]
            if not plain:
                return self._inserted_logits(input_ids, attention_mask, chosen)
            # rows that get no fact run as they are (the unedited model on them: same numbers as without LTE)
            out = None
            for rows, fn in ((plain, lambda i, m, _: model_logits(self.model, i, m)),
                             ([r for r, pick in enumerate(chosen) if pick], self._inserted_logits)):
                sel = torch.tensor(rows, device=input_ids.device)
                part = fn(input_ids[sel], attention_mask[sel], [chosen[r] for r in rows])
                if out is None:
                    out = part.new_empty((*input_ids.shape, part.shape[-1]))
                out[sel] = part
            return out

    def _inserted_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         chosen: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Logits at the rows' own positions with each row's facts inserted in the template."""
        rows = prompt_token_rows(input_ids, attention_mask)   # every real token of each row
        seqs, index = [], torch.zeros(input_ids.shape, dtype=torch.long)
        mask_cpu = attention_mask.detach().cpu().bool()
        for r, (tokens, pick) in enumerate(zip(rows, chosen)):
            prefix = self.prefix_ids([self.facts[j] for j in pick]) if pick else []
            seq, shift = self.insert(tokens, prefix)
            seqs.append(seq)
            new_pos = torch.arange(len(tokens))
            new_pos[self._lead(tokens):] += shift
            index[r, mask_cpu[r]] = new_pos
        ids2, mask2 = pad_batch(seqs, self.pad_id, "right", input_ids.device)
        hidden = self._hidden(ids2, mask2)
        picked = hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.get_output_embeddings()(picked)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (after the final norm) of the causal LM's body."""
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _answer_logprobs(self, items: Sequence[tuple[list[int], list[int]]], adapted: bool) -> list[torch.Tensor]:
        """For each (sequence, positions): log-probabilities (len(positions), vocab) of the
        next token at those positions, in one right-padded forward pass."""
        if not items:
            return []
        ids, mask = pad_batch([s for s, _ in items], self.pad_id, "right", self.device)
        rows = torch.tensor([r for r, (_, pos) in enumerate(items) for _ in pos], device=ids.device)
        cols = torch.tensor([c for _, pos in items for c in pos], device=ids.device)
        with self.adapted(adapted):
            hidden = self._hidden(ids, mask)
            logp = torch.log_softmax(self.model.get_output_embeddings()(hidden[rows, cols]).float(), -1)
        return list(logp.split([len(pos) for _, pos in items]))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        self.facts, self.prompts = [], []
        self.keys = torch.zeros(0, self.encoder.dim, device=self.encoder.device)
        self._by_prompt = {}
        self._prefix_cache = {}
        self.counters = RetrievalCounters()
        super().reset()

    def stats(self) -> dict[str, float]:
        return self.counters.stats(len(self.facts))

    # ------------------------------------------------------------------ alignment (training protocol)
    def trainable(self) -> nn.Module:
        if self.adapters is None:
            raise ValueError("editor 'lte': nothing to train with align=false (set editor.align=true)")
        return self.adapters

    def prepare_training(self, cases: Sequence[EditCase]) -> None:
        """Embed the training facts once and keep, per case, its nearest facts of another
        subject (the distractor pool of the official data recipe)."""
        facts = [_fact(c.request) for c in cases]
        subjects = [c.request.subject.strip().lower() for c in cases]
        neighbours: list[list[int]] = [[] for _ in cases]
        if self.hp.distractor_pool > 0 and len(cases) > 1:
            emb = self.encoder.encode(facts)
            want = min(len(cases), self.hp.distractor_pool + 16)
            for start in range(0, len(cases), 512):
                sims = emb[start:start + 512] @ emb.T
                for r, row in enumerate(sims.topk(want, dim=1).indices.tolist()):
                    i = start + r
                    keep = [j for j in row if j != i and facts[j] != facts[i]
                            and (not subjects[i] or subjects[j] != subjects[i])]
                    neighbours[i] = keep[:self.hp.distractor_pool]
        self._pool = {"facts": facts, "neighbours": neighbours, "index": {c.case_id: i for i, c in enumerate(cases)}}

    def _distractors(self, case: EditCase, batch: Sequence[EditCase], n: int) -> list[str]:
        if n == 0:
            return []
        pool = self._pool
        if pool is not None and case.case_id in pool["index"]:
            candidates = [pool["facts"][j] for j in pool["neighbours"][pool["index"][case.case_id]]]
        else:  # not prepared: other cases of the batch
            subject = case.request.subject.strip().lower()
            candidates = [_fact(c.request) for c in batch
                          if c is not case and (not subject or c.request.subject.strip().lower() != subject)]
        return random.sample(candidates, min(n, len(candidates)))

    def _layout(self, enc: Encoded, prefix: Sequence[int]) -> tuple[list[int], list[int]]:
        """(sequence with the template inserted, positions that predict the answer tokens)."""
        seq, shift = self.insert(enc.ids, prefix)
        return seq, [shift + enc.start - 1 + k for k in range(len(enc.ids) - enc.start)]

    @staticmethod
    def _plain(enc: Encoded) -> tuple[list[int], list[int]]:
        return list(enc.ids), [enc.start - 1 + k for k in range(len(enc.ids) - enc.start)]

    def training_loss(self, batch: Sequence[EditCase]) -> tuple[torch.Tensor, dict[str, float]]:
        n_distractors = list(range(len(self.hp.distractor_probs)))
        edit_items, base_items = [], []
        loc_pairs, nofact_pairs = [], []   # (adapted item, index of its unedited reference in base_items)
        for case in batch:
            r = case.request
            k = random.choices(n_distractors, weights=self.hp.distractor_probs)[0]
            prefix = self.prefix_ids([_fact(r)] + self._distractors(case, batch, k))
            gens = [p.prompt for _, p in case.probes("generality")]
            question = r.prompt if not gens or random.random() < self.hp.rewrite_prob else random.choice(gens)
            edit_items.append(self._layout(encode(self.tok, question, r.target_new), prefix))
            locs = [p for _, p in case.probes("locality")]
            if locs and (self.hp.locality_weight > 0 or self.hp.no_fact_weight > 0):
                probe = random.choice(locs)
                enc = encode(self.tok, probe.prompt, probe.target)
                base_items.append(self._plain(enc))
                if self.hp.locality_weight > 0:
                    loc_pairs.append((self._layout(enc, prefix), len(base_items) - 1))
                if self.hp.no_fact_weight > 0:
                    nofact_pairs.append((self._plain(enc), len(base_items) - 1))
            if self.hp.no_fact_weight > 0:
                enc = encode(self.tok, question, r.ground_truth or r.target_new)
                base_items.append(self._plain(enc))
                nofact_pairs.append((self._plain(enc), len(base_items) - 1))
        with torch.no_grad():
            base = self._answer_logprobs(base_items, adapted=False)
        adapted = self._answer_logprobs(edit_items + [it for it, _ in loc_pairs] + [it for it, _ in nofact_pairs],
                                        adapted=True)
        n_edit, n_loc = len(edit_items), len(loc_pairs)
        edit = torch.stack([-lp.gather(-1, torch.tensor(seq[pos[0] + 1:pos[-1] + 2], device=lp.device)[:, None]).mean()
                            for lp, (seq, pos) in zip(adapted[:n_edit], edit_items)]).mean()
        loss, parts = edit, {"edit": float(edit.detach())}
        if loc_pairs:
            loc = torch.stack([_kl(base[b], a) for (_, b), a in zip(loc_pairs, adapted[n_edit:n_edit + n_loc])]).mean()
            loss = loss + self.hp.locality_weight * loc
            parts["locality"] = float(loc.detach())
        if nofact_pairs:
            nofact = torch.stack([_kl(base[b], a) for (_, b), a in zip(nofact_pairs, adapted[n_edit + n_loc:])]).mean()
            loss = loss + self.hp.no_fact_weight * nofact
            parts["no_fact"] = float(nofact.detach())
        return loss, parts

    @torch.no_grad()
    def validation_metrics(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Token accuracy with the case's own fact inserted (reliability, generality), and
        argmax agreement with the unedited model on the locality probe with the fact
        inserted (locality) and without any fact (no_fact)."""
        sums: dict[str, list[float]] = {"reliability": [], "generality": [], "locality": [], "no_fact": []}
        bs = self.hp.val_batch_size
        for start in range(0, len(cases), bs):
            chunk = cases[start:start + bs]
            acc_items, acc_kinds, loc_items, plain_items = [], [], [], []
            for case in chunk:
                r = case.request
                prefix = self.prefix_ids([_fact(r)])
                acc_items.append(self._layout(encode(self.tok, r.prompt, r.target_new), prefix))
                acc_kinds.append("reliability")
                for _, p in case.probes("generality")[:1]:
                    acc_items.append(self._layout(encode(self.tok, p.prompt, r.target_new), prefix))
                    acc_kinds.append("generality")
                for _, p in case.probes("locality")[:1]:
                    enc = encode(self.tok, p.prompt, p.target)
                    loc_items.append(self._layout(enc, prefix))
                    plain_items.append(self._plain(enc))
            for (seq, pos), kind, lp in zip(acc_items, acc_kinds, self._answer_logprobs(acc_items, adapted=True)):
                target = torch.tensor(seq[pos[0] + 1:pos[-1] + 2], device=lp.device)
                sums[kind].append(float((lp.argmax(-1) == target).float().mean()))
            base = self._answer_logprobs(plain_items, adapted=False)
            with_fact = self._answer_logprobs(loc_items, adapted=True)
            without = self._answer_logprobs(plain_items, adapted=True)
            for b, w, o in zip(base, with_fact, without):
                sums["locality"].append(float((b.argmax(-1) == w.argmax(-1)).float().mean()))
                sums["no_fact"].append(float((b.argmax(-1) == o.argmax(-1)).float().mean()))
        return {k: sum(v) / len(v) for k, v in sums.items() if v}


def _kl(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || adapted), from log-probabilities (positions, vocab)."""
    return F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")


def retrieval_report(editor: LTE, cases: Sequence[EditCase]) -> dict[str, float]:
    """Top-1 retrieval accuracy where the right fact is known: edit every case (after a
    reset), then ask, for each case's request prompt and its generality prompts, whether the
    best stored fact is the case's own; for its locality prompts, how often the case's own
    fact is retrieved all the same (the unrelated neighbour the alignment must ignore).
    The editor is reset afterwards."""
    editor.reset()
    for c in cases:
        editor.edit(c.request)
    try:
        out = {}
        for kind in ("request", "generality", "locality"):
            texts, owners = [], []
            for c in cases:
                own = editor._by_prompt[c.request.prompt.strip()]
                prompts = [c.request.prompt] if kind == "request" else [p.prompt for _, p in c.probes(kind)]
                texts += [p.strip() for p in prompts]
                owners += [own] * len(prompts)
            if texts:
                _, idx = editor.search(texts)
                out[kind] = float((idx[:, 0].cpu() == torch.tensor(owners)).float().mean())
        out["memory_size"] = float(len(editor.facts))
        return out
    finally:
        editor.reset()
