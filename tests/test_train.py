"""The training pipeline (editbench/train.py): training, the cache (a second call trains
nothing), exact resume after an interruption (in process and after SIGKILL), frozen LLM
weights, clear errors for bad settings and for corrupt or mismatched checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from editbench.checkpoints import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from editbench.models import cache_dir
from editbench.registry import register
from editbench.train import (FINAL, PARTIAL, batch_indices, ensure_trained, train_key, train_settings,
                             trained_dir)
from editbench.editor import Editor
from tests.conftest import ROOT, compose_cfg, write_train_file


@register("toy_trained")
class ToyTrained(Editor):
    """A minimal trained editor for pipeline tests: a residual linear map on the last hidden
    state, with dropout (so training draws random numbers), trained to predict target_new."""

    training = "pipeline"
    inference_only = ("probe_only",)

    def __init__(self, model, tokenizer, arch, cfg):
        super().__init__(model, tokenizer, arch, cfg)
        torch.manual_seed(123)
        d = arch.hidden_size
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(d, d))
        self.calls = 0
        self.interrupt_after: int | None = None   # raise KeyboardInterrupt on this training_loss call

    def trainable(self):
        return self.head

    def training_loss(self, batch):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        from editbench.scoring import encode, pad_batch

        encs = [encode(self.tok, c.request.prompt, c.request.target_new) for c in batch]
        ids, mask = pad_batch([e.ids[:e.start] for e in encs], self.tok.pad_token_id, "right")
        h = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = h[torch.arange(len(encs)), mask.sum(1) - 1]
        logits = self.model.get_output_embeddings()(last + self.head(last))
        self.logits_dtype = logits.dtype
        target = torch.tensor([e.target_ids[0] for e in encs])
        loss = nn.functional.cross_entropy(logits, target)
        return loss, {"ce": float(loss.detach())}

    def validation_metrics(self, cases):
        return {"n": float(len(cases))}


def _toy(lm, **train):
    settings = {"steps": 8, "batch_size": 4, "lr": 1e-2, "n_val": 4, "val_every": 4, "ckpt_every": 2,
                "progress": False, **train}
    return ToyTrained(lm.model, lm.tokenizer, lm.arch, {"name": "toy_trained", "train": settings})


@pytest.fixture
def train_env(tmp_path, private_cache):
    """A private cache (sharing the dequantized model folder) and a small train file."""
    train = write_train_file(tmp_path / "train.json")
    cfg = compose_cfg("model=tiny-llama", "data=cf", f"data.train_path={train}")
    return cfg, train


def _state(editor):
    return {n: t.clone() for n, t in editor.trained_state().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_trains_writes_the_cache_and_a_second_call_trains_nothing(train_env, tiny_llama):
    cfg, _ = train_env
    model_before = {n: p.clone() for n, p in tiny_llama.model.state_dict().items()}
    editor = _toy(tiny_llama)
    init = _state(editor)
    path = ensure_trained(cfg, tiny_llama, editor)
    assert editor.calls == 8 and path.name == FINAL
    trained = _state(editor)
    assert not _same(init, trained)
    # the LLM's own weights: bit-identical, still frozen
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(after[n], model_before[n]) for n in model_before)
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())
    folder = path.parent
    assert folder.parent == cache_dir("trained", "toy_trained")
    assert not (folder / PARTIAL).exists()
    hist = pd.read_csv(folder / "history.csv")
    assert list(hist["step"]) == list(range(1, 9)) and {"loss", "train/ce", "val/n", "seconds"} <= set(hist.columns)
    assert hist["val/n"].notna().sum() == 2  # steps 4 and 8
    assert (folder / "loss.png").stat().st_size > 1000
    meta = read_meta(path)
    assert meta["kind"] == "final" and meta["steps"] == 8

    again = _toy(tiny_llama)
    assert not _same(_state(again), trained)
    assert ensure_trained(cfg, tiny_llama, again) == path
    assert again.calls == 0            # loaded from the cache: no training step
    assert _same(_state(again), trained)


def test_interrupted_training_resumes_to_the_same_state(train_env, tiny_llama, monkeypatch, tmp_path):
    cfg, _ = train_env
    reference = _toy(tiny_llama)
    ensure_trained(cfg, tiny_llama, reference)
    expected = _state(reference)
    hist_ref = pd.read_csv(trained_dir("toy_trained", train_key(cfg, reference, train_settings(reference))[0])
                           / "history.csv")

    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "other"))
    broken = _toy(tiny_llama)
    broken.interrupt_after = 5          # steps 1..5 run; the 6th raises (checkpoints at 2 and 4)
    with pytest.raises(KeyboardInterrupt):
        ensure_trained(cfg, tiny_llama, broken)
    folder = trained_dir("toy_trained", train_key(cfg, broken, train_settings(broken))[0])
    assert not (folder / FINAL).exists() and read_meta(folder / PARTIAL)["step"] == 4

    resumed = _toy(tiny_llama)
    ensure_trained(cfg, tiny_llama, resumed)
    assert resumed.calls == 4           # steps 5..8 only
    assert _same(_state(resumed), expected)
    hist = pd.read_csv(folder / "history.csv")
    assert list(hist["step"]) == list(range(1, 9))
    assert hist["loss"].tolist() == hist_ref["loss"].tolist()


def test_batches_depend_on_seed_and_step_only():
    a = [batch_indices(0, s, 3, 10) for s in range(8)]
    assert a == [batch_indices(0, s, 3, 10) for s in range(8)]
    first_epoch = [i for b in a for i in b][:10]
    assert sorted(first_epoch) == list(range(10))   # one epoch sees every case once
    assert a != [batch_indices(1, s, 3, 10) for s in range(8)]


def test_cache_key_ignores_inference_only_and_bookkeeping_settings(train_env, tiny_llama):
    cfg, train = train_env

    def key(**cfg_extra):
        ed = ToyTrained(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                        {"name": "toy_trained", "train": {"steps": 8}, **cfg_extra})
        return train_key(cfg, ed, train_settings(ed))[0]

    base = key()
    assert key(probe_only=3) == base                                  # declared inference-only
    ed = ToyTrained(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                    {"name": "toy_trained", "train": {"steps": 8, "progress": False, "val_every": 1,
                                                      "ckpt_every": 3}})
    assert train_key(cfg, ed, train_settings(ed))[0] == base          # settings that do not change weights
    ed = ToyTrained(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                    {"name": "toy_trained", "train": {"steps": 9}})
    assert train_key(cfg, ed, train_settings(ed))[0] != base
    ed = ToyTrained(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                    {"name": "toy_trained", "train": {"steps": 8, "autocast": None}})
    assert train_key(cfg, ed, train_settings(ed))[0] == base          # added later: keyed only when set
    ed = ToyTrained(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                    {"name": "toy_trained", "train": {"steps": 8, "autocast": "bfloat16"}})
    assert train_key(cfg, ed, train_settings(ed))[0] != base
    write_train_file(train, n=25)                                     # other train data
    assert key() != base


def test_autocast_trains_in_bf16_and_leaves_the_llm_untouched(train_env, tiny_llama):
    cfg, _ = train_env
    model_before = {n: p.clone() for n, p in tiny_llama.model.state_dict().items()}
    full = _toy(tiny_llama)
    ensure_trained(cfg, tiny_llama, full)
    assert full.logits_dtype == torch.float32
    mixed = _toy(tiny_llama, autocast="bfloat16")
    init = _state(mixed)
    path = ensure_trained(cfg, tiny_llama, mixed)
    assert mixed.logits_dtype == torch.bfloat16 and path != ensure_trained(cfg, tiny_llama, _toy(tiny_llama))
    trained = _state(mixed)
    assert not _same(init, trained) and not _same(trained, _state(full))
    assert all(t.dtype == torch.float32 for t in trained.values())     # master weights stay float32
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(after[n], model_before[n]) for n in model_before)
    hist = pd.read_csv(path.parent / "history.csv")
    assert hist["loss"].notna().all() and hist["loss"].iloc[-1] < hist["loss"].iloc[0]


def test_bad_train_settings_fail_clearly(train_env, tiny_llama):
    cfg, _ = train_env
    with pytest.raises(ValueError, match=r"unknown train setting\(s\) \['stpes'\]; valid: .*'steps'"):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama, stpes=3))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama, steps=0))
    with pytest.raises(ValueError, match=r"autocast must be null or one of \['bfloat16', 'float16'\], got 'fp8'"):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama, autocast="fp8"))
    with pytest.raises(ValueError, match="lr_schedule must be constant or cosine"):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama, lr_schedule="linear"))
    no_data = compose_cfg("model=tiny-llama", "data=sample")
    with pytest.raises(ValueError, match="needs training data: set data.train_path"):
        ensure_trained(no_data, tiny_llama, _toy(tiny_llama))


def test_corrupt_or_mismatched_checkpoints_name_the_file(train_env, tiny_llama):
    cfg, _ = train_env
    editor = _toy(tiny_llama)
    path = ensure_trained(cfg, tiny_llama, editor)
    good = path.read_bytes()

    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama))

    tensors, meta = load_checkpoint_bytes(good, path)
    save_checkpoint(path, {"other.weight": torch.zeros(3)}, meta)      # right key, wrong tensors
    with pytest.raises(CheckpointError, match=rf"{path}: does not fit editor 'toy_trained'"):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama))

    save_checkpoint(path, tensors, {**meta, "key": "0123456789abcdef"})   # made for other settings
    with pytest.raises(CheckpointError, match=rf"{path}: made for key="):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama))

    path.unlink()                        # a corrupt partial checkpoint is an error too, not silently retrained
    (path.parent / PARTIAL).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=PARTIAL):
        ensure_trained(cfg, tiny_llama, _toy(tiny_llama))


def load_checkpoint_bytes(data: bytes, path: Path):
    tmp = path.with_name("copy.safetensors")
    tmp.write_bytes(data)
    try:
        return load_checkpoint(tmp)
    finally:
        tmp.unlink()


class _Leaky(ToyTrained):
    def trainable(self):
        return self.model.get_output_embeddings()


register("toy_leaky")(_Leaky)


def test_trainable_must_not_expose_the_llm_weights(train_env, tiny_llama):
    cfg, _ = train_env
    head = tiny_llama.model.get_output_embeddings()
    head.weight.requires_grad_(True)
    try:
        editor = _Leaky(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.arch,
                        {"name": "toy_leaky", "train": {"steps": 2, "n_val": 4, "progress": False}})
        with pytest.raises(ValueError, match="would train the model's own weights"):
            ensure_trained(cfg, tiny_llama, editor)
    finally:
        head.weight.requires_grad_(False)


def _train_cli(cache: Path, train: Path) -> subprocess.Popen:
    env = {**os.environ, "EDITBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "editbench.train", *_CLI_ARGS, f"data.train_path={train}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_CLI_ARGS = ["editor=lte", "model=tiny-llama", "data=cf", "editor.align=true", "editor.train.steps=14",
             "editor.train.ckpt_every=2", "editor.train.batch_size=2", "editor.train.progress=false"]


def test_cli_killed_with_sigkill_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch, tiny_llama):
    """Real processes: LTE's LoRA alignment on the tiny model through ``python -m
    editbench.train``, killed (SIGKILL) after a checkpoint, rerun: the final adapters equal
    those of an uninterrupted training (one thread everywhere), bit for bit."""
    models = cache_dir("models")
    train = write_train_file(tmp_path / "train.json")
    caches = {}
    for name in ("straight", "killed"):
        caches[name] = tmp_path / name
        caches[name].mkdir()
        if models.is_dir():
            (caches[name] / "models").symlink_to(models)

    killed = _train_cli(caches["killed"], train)
    try:
        deadline = time.time() + 180
        partial = None
        while time.time() < deadline and killed.poll() is None:
            found = list(caches["killed"].glob(f"trained/lte/*/{PARTIAL}"))
            if found and read_meta_safe(found[0]) >= 4:
                partial = found[0]
                break
            time.sleep(0.05)
        assert partial is not None, killed.communicate()[1][-2000:]
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        if killed.poll() is None:
            killed.kill()
    assert not (partial.parent / FINAL).exists()
    resumed = _train_cli(caches["killed"], train)   # runs while the reference trains here

    monkeypatch.setenv("EDITBENCH_CACHE", str(caches["straight"]))
    cfg = compose_cfg(*_CLI_ARGS, f"data.train_path={train}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from editbench.session import build_editor

        final_a = ensure_trained(cfg, tiny_llama, build_editor(cfg, tiny_llama))
    finally:
        torch.set_num_threads(threads)

    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming training from step" in err + out
    [final_b] = caches["killed"].glob(f"trained/lte/*/{FINAL}")
    assert final_a.parent.name == final_b.parent.name            # same cache key
    assert f"trained: {final_b}" in out
    a, _ = load_checkpoint(final_a)
    b, _ = load_checkpoint(final_b)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert any(bool(t.abs().sum() > 0) for n, t in a.items() if "lora_B" in n)   # it did train


def read_meta_safe(path: Path) -> int:
    try:
        return int(read_meta(path)["step"])
    except (FileNotFoundError, CheckpointError, KeyError):
        return -1
