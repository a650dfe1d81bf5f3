"""Performance of one editor on one model under the harness's lifelong protocol, next to
the FLOP floor of the same work.

    python benchmarks/perf.py [Hydra overrides of `python -m editbench`] [bench.<key>=<value> ...]
    python benchmarks/perf.py editor=ft model=smollm2 data=cf bench.n_cases=100 'bench.T=[1,100]'
    python benchmarks/perf.py editor=memit model=tiny-llama 'bench.stats_layers=[0,1,2,3]' bench.stats_samples=200
    python benchmarks/perf.py editor=rome model.device=cuda model.dtype=bfloat16

Every argument that does not start with ``bench.`` is a Hydra override composed exactly as
``python -m editbench`` composes it (conf/, editor_model/ per-model files, ``runner.*``,
``data_root``...). The ``bench.*`` keys belong to this script (defaults in ``BENCH``
below; see benchmarks/README.md):

    n_cases        cases of the runner's seeded shuffle (default 8)
    T              chunk sizes (default [1, 4]); each T runs floor(n_cases / T) chunks
    out            output folder (default <out_dir>/perf, i.e. results/perf)
    stats          time a fresh covariance-statistics computation (default true; ROME-family editors)
    stats_layers   another layer set to time the statistics of (default null: skip)
    stats_samples  sample count for that extra timing (default null: the editor's mom2_n_samples)
    warmup         one untimed chunk of one edit first (one-time costs out of the figures; default true)
    gemm_seconds   length of the GEMM throughput probe (default 0.5)

For each T the chunks go through ``editbench.runner.run_chunk`` (the function ``python -m
editbench`` runs for every chunk: unedited scoring pass, T sequential edits, scoring,
reset and bit-exact restore check) on the Session that ``editbench.session.open_session``
builds for every run. Nothing is written to a run folder; the figures go to
``<bench.out>/perf_<editor>_<model>_<data>.csv`` (one row per figure) and a Markdown table
(printed, and saved beside the CSV as ``.md``).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compose_cfg, split_bench_args  # noqa: E402
from editbench import plan, runner  # noqa: E402
from editbench.results import RunDir  # noqa: E402
from editbench.session import check_compatible, open_session  # noqa: E402
from editbench.scoring import Scorer, encode, length_batches, model_logits, pad_batch, sync  # noqa: E402

#: defaults of the script's own ``bench.*`` keys
BENCH: dict[str, Any] = {"n_cases": 8, "T": [1, 4], "out": None, "stats": True, "stats_layers": None,
                         "stats_samples": None, "warmup": True, "gemm_seconds": 0.5}

#: the editors whose edit needs covariance statistics (editors/lib/layer_stats.py)
STATS_EDITORS = ("rome", "memit", "wilke", "rrome")

CSV_FIELDS = ["editor", "model", "T", "figure", "value", "unit", "floor", "ratio", "device", "dtype", "threads",
              "note"]


# =========================================================================== the FLOP model
@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs of a decoder-only transformer.

    Per token and layer, every Linear costs 2 FLOPs per multiply-add (2 * d_in * d_out):
    q and o (d x d), k and v (d x kv_dim), and the MLP (``n_mlp`` matrices of d x ff:
    3 for LLaMA's gated MLP, 2 for GPT-J/GPT-2/NeoX). Attention scores and values cost
    4 * d * ctx per token and layer (ctx: the keys it attends to; causal, so token i of a
    sequence sees i + 1). The LM head costs 2 * d * vocab only at positions whose logits are
    needed. Norms, activations, softmax, embeddings and biases are left out (O(d) per token).
    """

    n_layers: int
    d: int
    ff: int
    n_heads: int
    kv_dim: int
    vocab: int
    n_mlp: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Shape":
        c = model.config
        d = getattr(c, "hidden_size", None) or c.n_embd
        n_layers = getattr(c, "num_hidden_layers", None) or c.n_layer
        heads = getattr(c, "num_attention_heads", None) or c.n_head
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or d // heads
        ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
        gated = c.model_type in ("llama", "mistral", "qwen2")
        return cls(n_layers, d, ff, heads, kv * head_dim, c.vocab_size, 3 if gated else 2)

    @property
    def linear(self) -> int:
        """FLOPs of every Linear of one layer, per token."""
        return 2 * (2 * self.d * self.d + 2 * self.d * self.kv_dim) + 2 * self.n_mlp * self.d * self.ff

    @property
    def n_params_linear(self) -> int:
        """Weights of all layers' Linears plus the head (what a full fine-tune updates, roughly)."""
        return self.n_layers * self.linear // 2 + self.d * self.vocab

    def head(self, positions: int) -> int:
        return 2 * self.d * self.vocab * positions

    def forward(self, ctxs: Sequence[int], n_layers: int, head_positions: int = 0) -> int:
        """Forward FLOPs of the tokens whose attention contexts are ``ctxs``, through
        ``n_layers`` layers, with the head at ``head_positions`` positions."""
        return n_layers * (len(ctxs) * self.linear + 4 * self.d * sum(ctxs)) + self.head(head_positions)

    def backward(self, ctxs: Sequence[int], n_layers: int, head_positions: int = 0, weight_grad: int = 0) -> int:
        """Activation gradients only: every Linear once more (dx = dy W^T), attention twice
        its forward (both operands are activations), the head's input gradient at the loss
        positions; plus ``weight_grad`` FLOPs for the trained parameters."""
        return (n_layers * (len(ctxs) * self.linear + 8 * self.d * sum(ctxs)) + self.head(head_positions)
                + weight_grad)


def causal(n: int) -> list[int]:
    """Attention contexts of the n tokens of one sequence."""
    return list(range(1, n + 1))


def full_finetune_flops(shape: Shape, n_tokens: int, head_positions: int, steps: int) -> int:
    """Reference: ``steps`` x (forward + backward of every layer + every weight gradient)."""
    ctxs = causal(n_tokens)
    wgrad = 2 * shape.n_params_linear * n_tokens
    return steps * (shape.forward(ctxs, shape.n_layers, head_positions)
                    + shape.backward(ctxs, shape.n_layers, head_positions, wgrad))


def trained_upper_flops(shape: Shape, n_tokens: int, layer: int, head_positions: int, steps: int,
                        weight_grad_per_token: int) -> int:
    """FT / GRACE / T-Patcher at ``layer``: one no-grad forward of the layers below it, then
    ``steps`` x (forward of layers >= layer + backward of layers >= layer with the trained
    module's weight gradient)."""
    ctxs = causal(n_tokens)
    upper = shape.n_layers - layer
    return shape.forward(ctxs, layer) + steps * (
        shape.forward(ctxs, upper, head_positions)
        + shape.backward(ctxs, upper, head_positions, weight_grad_per_token * n_tokens))


def rows_ctxs(mask: torch.Tensor, from_col: int = 0) -> list[int]:
    """Attention contexts of the real tokens of every row at columns >= ``from_col``."""
    m = mask.long().cpu()
    seen = m.cumsum(-1)
    return seen[:, from_col:][m[:, from_col:].bool()].tolist()


def value_search_flops(shape: Shape, rows, layer: int, steps: int) -> int:
    """ROME/MEMIT value search: ``steps`` x (forward + backward of the layers above ``layer``)
    over the real tokens at and after the lookup column (the columns before it do not
    depend on the delta), head at the loss positions (target tokens + KL rows)."""
    tail = rows_ctxs(rows.attention_mask, rows.prefix_len)
    upper = shape.n_layers - layer - 1
    positions = int(rows.target_rows.numel() + rows.kl_rows.numel())
    return steps * (shape.forward(tail, upper, positions) + shape.backward(tail, upper, positions))


def query_flops(shape: Shape, encoded: Sequence[Any]) -> int:
    """Teacher-forced scoring floor: one forward of the real tokens, head at target positions."""
    return sum(shape.forward(causal(len(e.ids)), shape.n_layers, len(e.ids) - e.start) for e in encoded)


def generation_flops(shape: Shape, encoded: Sequence[Any]) -> int:
    """Greedy decoding of len(target) tokens with a KV cache: the prompt plus the generated
    tokens but the last, once each; head at the generated positions."""
    return sum(shape.forward(causal(len(e.ids) - 1), shape.n_layers, len(e.ids) - e.start) for e in encoded)


def stats_flops(shape: Shape, token_counts: Sequence[int], layers: Sequence[int]) -> int:
    """Statistics floor: forward up to (and including) the highest layer over the corpus
    tokens, plus the outer products 2 * ff^2 per token per layer (ff: the input width of
    the MLP output projection)."""
    ctxs = [c for n in token_counts for c in causal(n)]
    return shape.forward(ctxs, max(layers) + 1) + 2 * shape.ff ** 2 * len(ctxs) * len(layers)


class EditFloor:
    """FLOPs of one edit as the method's math requires them; None where no floor is known."""

    def __init__(self, editor, shape: Shape):
        self.editor, self.shape = editor, shape
        self.steps_basis: set[str] = set()

    def _steps(self, info: dict | None, key: str, configured: int) -> int:
        if info and key in info and info[key] is not None:
            self.steps_basis.add("reported")
            return int(info[key])
        self.steps_basis.add("configured max")
        return int(configured)

    def __call__(self, request, info: dict | None) -> int | None:
        ed, s = self.editor, self.shape
        name = ed.name
        tok = ed.tok
        if name == "ft":
            hp = ed.hp
            enc = encode(tok, request.prompt, request.target_new)
            n_tok = enc.start if hp.objective == "prompt_last" else len(enc.ids)
            head = 1 if hp.objective == "prompt_last" else len(enc.target_ids)
            w = ed.model.get_parameter(ed.weight_names[0])
            wgrad = 2 * w.numel() * len(ed.weight_names)
            return trained_upper_flops(s, n_tok, min(ed.layer_indices), head,
                                       self._steps(info, "steps", hp.num_steps), wgrad)
        if name in ("grace", "tpatcher"):
            enc = encode(tok, request.prompt, request.target_new)
            layer = ed.arch.layer_index(ed.hp.layer) if name == "grace" else ed.layer
            configured = ed.hp.n_iter if name == "grace" else ed.hp.max_steps
            # the trained parameters are one value vector / a few neurons: O(d) per token, counted as 0
            return trained_upper_flops(s, len(enc.ids), layer, len(enc.target_ids),
                                       self._steps(info, "steps", configured), 0)
        if name in ("rome", "rrome", "wilke", "memit"):
            from editors.lib.locate import build_edit_rows

            hp = ed.hp
            rows = build_edit_rows(tok, [request], ed.templates, hp.fact_token, hp.kl_prompt)
            all_ctxs = rows_ctxs(rows.attention_mask)
            layers = list(ed.edit_layers)
            if name == "memit":
                z = layers[-1]
                steps = self._steps(info, "v_steps", hp.v_num_grad_steps)
                # keys/values: one capture up to the z layer per edited layer (each after the previous update)
                keys = len(layers) * s.forward(all_ctxs, z + 1)
                solve = len(layers) * (2 * s.ff ** 3 // 3 + 2 * s.ff ** 2 + 2 * s.ff * s.d)
                return keys + value_search_flops(s, rows, z, steps) + solve
            if name == "wilke":  # every candidate layer: one shared capture, a value search each
                steps = self._steps(None, "v_steps", hp.v_num_grad_steps)
                return (s.forward(all_ctxs, max(layers) + 1)
                        + sum(value_search_flops(s, rows, layer, steps) for layer in layers)
                        + len(layers) * (2 * s.ff ** 2 + 2 * s.ff * s.d))
            steps = self._steps(info, "v_steps", hp.v_num_grad_steps)
            return sum(s.forward(all_ctxs, layer + 1) + value_search_flops(s, rows, layer, steps)
                       + 2 * s.ff ** 2 + 2 * s.ff * s.d for layer in layers)
        return None


# =========================================================================== measurements
def gemm_flops_per_s(shape: Shape, dtype: torch.dtype, device: torch.device, seconds: float,
                     m: int = 512) -> tuple[float, float]:
    """Dense matmul throughput at the model's MLP shapes ((m x d) @ (d x ff) and back):
    FLOPs per wall second, and FLOPs per second of process CPU time (a figure that a busy
    machine disturbs less; meaningless on CUDA)."""
    a = torch.randn(m, shape.d, dtype=dtype, device=device)
    b = torch.randn(shape.d, shape.ff, dtype=dtype, device=device)
    c = torch.randn(shape.ff, shape.d, dtype=dtype, device=device)
    flops_per = 2 * m * shape.d * shape.ff * 2
    with torch.no_grad():
        for _ in range(3):
            (a @ b) @ c
        sync(device)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            (a @ b) @ c
            n += 1
            if n % 4 == 0:
                sync(device)
                if time.perf_counter() - t0 >= seconds:
                    break
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n * flops_per / elapsed, n * flops_per / max(cpu, 1e-9)


class PeakMemory:
    """Peak since :meth:`reset`: CUDA max_memory_allocated, else the resident set size
    (Linux VmHWM after a clear_refs reset where allowed; else getrusage's lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @property
    def what(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak RSS since this T started (VmHWM)" if self.resettable else "process peak RSS (getrusage)"


class Stopwatch:
    """Accumulated wall time of calls to a wrapped callable."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device
        self.clear()

    def clear(self) -> None:
        self.seconds, self.cpu, self.calls = 0.0, 0.0, 0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            self.cpu += time.process_time() - c0
            self.calls += 1


@contextlib.contextmanager
def cache_root(path: Path):
    """EDITBENCH_CACHE pointed at ``path`` for the duration (editbench.models.cache_dir reads it per call)."""
    old = os.environ.get("EDITBENCH_CACHE")
    os.environ["EDITBENCH_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDITBENCH_CACHE", None)
        else:
            os.environ["EDITBENCH_CACHE"] = old


def time_statistics(lm, layers: Sequence[int], scfg, keep_in_cache: bool) -> tuple[float, list[int], int]:
    """Seconds of a fresh ``second_moments`` computation of ``layers`` into a temporary cache;
    the corpus token counts; the number of texts. With ``keep_in_cache`` the files are then
    copied into the real cache when absent there (the editor would compute them anyway)."""
    from editbench.models import cache_dir
    from editors.lib.layer_stats import corpus_texts, second_moments

    device = next(lm.model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="editbench-perf-stats-") as tmp:
        with cache_root(Path(tmp)):
            sync(device)
            t0 = time.perf_counter()
            second_moments(lm.model, lm.tokenizer, lm.arch, layers, scfg)
            sync(device)
            seconds = time.perf_counter() - t0
        if keep_in_cache:
            for f in Path(tmp).rglob("*.pt"):
                dest = cache_dir(*f.relative_to(tmp).parts)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    part = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                    shutil.copyfile(f, part)
                    os.replace(part, dest)
    texts = corpus_texts(scfg)
    counts = [len(lm.tokenizer(t, truncation=True, max_length=scfg.max_length)["input_ids"]) for t in texts]
    return seconds, [c for c in counts if c], len(texts)


def stats_layers_of(cfg: DictConfig) -> list[int]:
    ed = cfg.editor
    if ed.name == "wilke":
        return list(range(ed.get("scanning_floor", 0), ed.scanning_ceiling))
    return [int(x) for x in ed.layers]


def chunk_queries(scorer: Scorer, chunk) -> list:
    return [scorer.encode(q.prompt, q.target) for c in chunk for q in scorer.queries(c)]


@torch.no_grad()
def plain_forward_seconds(model, scorer: Scorer, chunks: Sequence[Sequence[Any]], device) -> tuple[float, int]:
    """Seconds and queries of ``model(input_ids, attention_mask)`` (full logits, no editor) on
    the padded batches the scorer builds for each chunk (length-sorted, runner.batch_size)."""
    seconds, queries = 0.0, 0
    for chunk in chunks:
        enc = chunk_queries(scorer, chunk)
        for batch in length_batches([len(e.ids) for e in enc], scorer.batch_size):
            ids, mask = pad_batch([enc[i].ids for i in batch], scorer.pad_id, scorer.padding_side, device)
            sync(device)
            t0 = time.perf_counter()
            model_logits(model, ids, mask)
            sync(device)
            seconds += time.perf_counter() - t0
            queries += len(batch)
    return seconds, queries


# =========================================================================== the benchmark
class Rows:
    def __init__(self, meta: dict[str, Any]):
        self.meta, self.rows = meta, []

    def add(self, T, figure: str, value: float | None, unit: str, floor: float | None = None,
            ratio: str = "time", note: str = "") -> None:
        """``ratio``: "time" (value / floor), "rate" (floor / value: throughputs), or "" (none)."""
        r = None
        if floor and value is not None and ratio:
            r = value / floor if ratio == "time" else (floor / value if value else math.inf)
        self.rows.append({**self.meta, "T": T, "figure": figure, "value": value, "unit": unit, "floor": floor,
                          "ratio": r, "note": note})


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Measure; write the CSV and the table; return {"csv", "md", "rows", "shape", "gemm"}."""
    hydra_args, bench = split_bench_args(argv, BENCH)
    cfg = compose_cfg(hydra_args)
    check_compatible(cfg)
    from editbench.data import evaluation_cases
    from editbench.models import load_model

    cases = evaluation_cases(cfg.data)   # the cases of data.split, as a run selects them
    plan.check_unique_ids(cases)
    Ts = [int(t) for t in bench.T]
    n_cases = int(bench.n_cases)
    selected = plan.select_cases(cases, n_cases, cfg.runner.seed, cfg.runner.shuffle)
    warm_case = []
    if bench.warmup:  # the case after the measured ones (the first measured one when there is none)
        pool = plan.select_cases(cases, n_cases + 1, cfg.runner.seed, cfg.runner.shuffle)
        warm_case = pool[n_cases:n_cases + 1] or pool[:1]

    t0 = time.perf_counter()
    lm = load_model(cfg.model)
    load_s = time.perf_counter() - t0
    model = lm.model
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    threads = torch.get_num_threads()
    shape = Shape.of(model)
    meta = {"editor": cfg.editor.name, "model": cfg.model.name, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "threads": threads}
    out = Rows(meta)
    print(f"perf: editor={cfg.editor.name} model={cfg.model.name} data={cfg.data.name} cases={len(selected)} "
          f"T={Ts} device={device} dtype={meta['dtype']} torch threads={threads}", flush=True)
    print(f"model shape: {shape}", flush=True)

    gemm, gemm_cpu = gemm_flops_per_s(shape, dtype, device, float(bench.gemm_seconds))
    on_cpu = device.type == "cpu"
    print(f"GEMM probe ({512}x{shape.d}x{shape.ff} and back, {meta['dtype']}, {threads} threads): "
          f"{gemm / 1e9:.2f} GFLOP/s wall" + (f", {gemm_cpu / 1e9:.2f} GFLOP per CPU-second" if on_cpu else ""),
          flush=True)
    out.add("-", "gemm_throughput", gemm / 1e9, "GFLOP/s", ratio="", note="floor seconds = FLOPs / this")
    if on_cpu:
        out.add("-", "gemm_cpu_throughput", gemm_cpu / 1e9, "GFLOP/cpu-s", ratio="",
                note="floor CPU-seconds = FLOPs / this")
    out.add("-", "model_load", load_s, "s", ratio="")
    sec = lambda flops: None if flops is None else flops / gemm  # noqa: E731
    cpu_sec = lambda flops: None if flops is None or not on_cpu else flops / gemm_cpu  # noqa: E731

    # ---- statistics (a fresh computation into a temporary cache)
    if cfg.editor.name in STATS_EDITORS and bench.stats:
        from editors.lib.locate import LocateParams

        e = OmegaConf.to_container(cfg.editor, resolve=True)
        hp = LocateParams(**{k: e[k] for k in ("mom2_dataset", "mom2_online_dataset", "mom2_n_samples",
                                               "mom2_dtype", "mom2_max_length", "mom2_batch_size")
                             if k in e})
        jobs = [("statistics", stats_layers_of(cfg), hp.stats_config(), True)]
        if bench.stats_layers is not None or bench.stats_samples is not None:
            from dataclasses import replace

            n = int(bench.stats_samples) if bench.stats_samples is not None else hp.mom2_n_samples
            layers = [int(x) for x in (bench.stats_layers if bench.stats_layers is not None else jobs[0][1])]
            jobs.append(("statistics_extra", layers, replace(hp.stats_config(), n_samples=n), False))
        for figure, layers, scfg, keep in jobs:
            layers = sorted({lm.arch.layer_index(x) for x in layers})
            seconds, counts, n_texts = time_statistics(lm, layers, scfg, keep)
            flops = stats_flops(shape, counts, layers)
            out.add("-", figure, seconds, "s", sec(flops),
                    note=f"layers {layers}, {n_texts} texts, {sum(counts)} tokens, {flops / 1e9:.1f} GFLOP")
            print(f"{figure}: layers {layers}, {n_texts} texts: {seconds:.2f} s", flush=True)

    # ---- the session (model, scorer, editor, guard, hooks), built as every run builds it
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="editbench-perf-run-") as tmp:
        ctx = open_session(cfg, list(selected) + list(warm_case), lm, RunDir(Path(tmp)))
        out.add("-", "editor_build", time.perf_counter() - t0, "s", ratio="",
                note="open_session: case checks, editor build, cached statistics loads / training checkpoint, "
                     "weight digests")
        scorer, editor = ctx.scorer, ctx.editor
        # Stopwatches on the instance (the runner's code is unchanged; it calls these attributes).
        score_sw = Stopwatch(scorer.score, device)
        scorer.score = score_sw
        reset_sw = Stopwatch(editor.reset, device)
        editor.reset = reset_sw
        verify_sw = Stopwatch(ctx.guard.verify, device)
        ctx.guard.verify = verify_sw
        edit_sw = Stopwatch(editor.edit, device)
        editor.edit = edit_sw
        floor_of = EditFloor(editor, shape)
        peak = PeakMemory(device)
        weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

        if warm_case:
            runner.run_chunk(ctx, 1, 10**6, list(warm_case))
        for T in Ts:
            chunks, dropped = plan.chunks_of(selected, T)
            if not chunks:
                print(f"T={T}: fewer than {T} cases; skipped", flush=True)
                continue
            for sw in (score_sw, reset_sw, verify_sw, edit_sw):
                sw.clear()
            peak.reset()
            sync(device)
            cpu0, t0 = time.process_time(), time.perf_counter()
            records = [runner.run_chunk(ctx, T, i, chunk) for i, chunk in enumerate(chunks)]
            sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            peak_mb = max([peak.mb()] + ([r["peak_mem_mb"] for r in records] if device.type == "cuda" else []))
            n = sum(len(c) for c in chunks)
            done = [(case, entry) for chunk, r in zip(chunks, records) for case, entry in zip(chunk, r["cases"])]

            # seconds per edit and its floor
            edit_times = [e["edit_time_s"] for _, e in done if e["edit_time_s"] is not None]
            floors = [floor_of(case.request, e["info"]) for case, e in done]
            edit_floor = None if any(f is None for f in floors) else statistics.mean(floors)
            basis = ", ".join(sorted(floor_of.steps_basis)) or "-"
            floor_of.steps_basis.clear()
            out.add(T, "edit_s_per_edit", statistics.mean(edit_times) if edit_times else None, "s", sec(edit_floor),
                    note=f"{len(edit_times)} edits; floor {edit_floor / 1e9:.3g} GFLOP/edit; "
                         f"optimisation steps: {basis}"
                    if edit_floor else
                    f"{len(edit_times)} edits; no known floor for this editor")

            # scoring: teacher-forced passes (unedited reference + after the edits), as timed by the scorer
            q_enc = [chunk_queries(scorer, chunk) for chunk in chunks]
            tf_flops = sum(query_flops(shape, enc) for enc in q_enc)
            n_q = sum(len(enc) for enc in q_enc)
            s_sec = sum(r["timing"]["seconds"] + r["reference_timing"]["seconds"] for r in records)
            s_q = sum(r["timing"]["queries"] + r["reference_timing"]["queries"] for r in records)
            floor_qps = n_q / sec(tf_flops)
            out.add(T, "scoring_qps", s_q / s_sec, "queries/s", floor_qps, ratio="rate",
                    note="harness scoring through editor.logits, both passes; ratio = floor / measured")
            gen_flops = sum(generation_flops(shape, [scorer.encode(c.request.prompt, c.request.target_new)
                                                     for c in chunk]) for chunk in chunks) \
                if cfg.runner.exact_match else 0
            out.add(T, "scoring_wall_s_per_case", score_sw.seconds / n, "s", sec(2 * tf_flops + gen_flops) / n,
                    note="whole Scorer.score calls (encoding, batching, generation, metrics)")

            # plain forward on the same padded batches
            f_sec, f_q = plain_forward_seconds(model, scorer, chunks, device)
            out.add(T, "forward_qps", f_q / f_sec, "queries/s", floor_qps, ratio="rate",
                    note="model(input_ids, attention_mask) full logits, no editor; ratio = floor / measured")
            out.add(T, "scoring_over_forward", (s_sec / s_q) / (f_sec / f_q), "x", 1.0,
                    note="seconds per query, scoring / plain forward (target <= 2)")

            # end to end, restore, CPU, memory
            e2e_floor = None if edit_floor is None else sec(edit_floor * n + 2 * tf_flops + gen_flops) / n
            out.add(T, "case_s_end_to_end", wall / n, "s", e2e_floor,
                    note=f"{len(chunks)} chunk(s) through runner.run_chunk: edits + 2 scoring passes + reset; "
                         f"{dropped} case(s) dropped")
            out.add(T, "restore_s_per_chunk", (reset_sw.seconds + verify_sw.seconds) / len(chunks), "s", ratio="",
                    note=f"reset() {reset_sw.seconds:.3f} s + bit-exact check {verify_sw.seconds:.3f} s in all")
            if on_cpu and edit_sw.calls:
                out.add(T, "edit_cpu_s_per_edit", edit_sw.cpu / edit_sw.calls, "cpu-s", cpu_sec(edit_floor),
                        note="process CPU time of editor.edit (less disturbed by other load than wall time)")
            out.add(T, "cpu_s_per_case", cpu / n, "cpu-s",
                    None if e2e_floor is None or not on_cpu else cpu_sec(edit_floor * n + 2 * tf_flops + gen_flops) / n,
                    note=f"process CPU time of the chunk loop; {cpu / wall:.2f} cores busy on average, "
                         f"{threads} torch threads")
            out.add(T, "peak_memory", peak_mb, "MiB", weight_mb, note=f"{peak.what}; floor = the weights")

            # quality, to check that a speed change did not change the results
            for metric in ("reliability", "generality", "locality"):
                vals = [e["metrics"][metric] for _, e in done if e["status"] == "ok" and metric in e["metrics"]]
                if vals:
                    out.add(T, metric, statistics.mean(vals), "mean", ratio="", note=f"{len(vals)} cases")
            failed = sum(e["status"] != "ok" for _, e in done)
            out.add(T, "failed_cases", failed, "cases", ratio="")
            print(f"T={T}: {n} cases in {wall:.2f} s", flush=True)
        ctx.guard.verify_all(editor.name)

    dest = Path(bench.out) if bench.out else Path(cfg.out_dir) / "perf"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{cfg.editor.name}_{cfg.model.name}_{cfg.data.name}"
    csv_path = dest / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in out.rows:
            w.writerow({k: _fmt(r[k]) for k in CSV_FIELDS})
    table = markdown(out.rows)
    (dest / f"{stem}.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwrote {csv_path}")
    return {"csv": csv_path, "md": dest / f"{stem}.md", "rows": out.rows, "shape": shape, "gemm": gemm}


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _short(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| T | figure | value | unit | floor | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3g}x"
        lines.append(f"| {r['T']} | {r['figure']} | {_short(r['value'])} | {r['unit']} | {_short(r['floor'])} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
