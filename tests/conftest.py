"""Shared fixtures: composed configs, tiny random models (seconds), the real SmolLM2 (marked)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from editbench.models import cache_dir, load_model
from editbench.scoring import encode, model_logits
from editbench.records import EditCase, EditRequest, Probe

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Under pytest-xdist (`-n N`, the README's test command) each worker gets its share of the cores, so
# N workers do not oversubscribe the machine with N x cores intra-op threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def compose_cfg(*overrides: str):
    """The composed Hydra config, exactly as `python -m editbench <overrides>` builds it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when it is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is only beside the development checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model(compose_cfg("model=tiny-llama").model)


@pytest.fixture(scope="session")
def tiny_gptj():
    return load_model(compose_cfg("model=tiny-gptj").model)


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_gptj"])
def tiny(request):
    """Each tiny architecture in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smollm2():
    return load_model(compose_cfg("model=smollm2").model)


def toy_cases(n: int = 6) -> list[EditCase]:
    """Synthetic cases for the tiny random models (which know no facts anyway)."""
    return [EditCase(case_id=f"toy{i}",
                     request=EditRequest(f"The capital of Country{i} is", f"City{i}", f"Country{i}", "Paris"),
                     generality={"rephrase": [Probe(f"Country{i}'s capital city is", f"City{i}")]},
                     locality={"neighborhood": [Probe(f"The capital of Germany is number {i}", "Berlin"),
                                                Probe(f"Water boils at {i}", "one hundred degrees")]})
            for i in range(n)]


def write_train_file(path: Path, n: int = 24) -> Path:
    """A small CounterFact-format train split (flat RECIPE schema)."""
    recs = [{"case_id": i, "prompt": f"The capital of Country{i} is", "subject": f"Country{i}",
             "target_new": f"City{i}", "ground_truth": "Paris", "rephrase_prompt": f"Country{i}'s capital city is",
             "locality_prompt": f"The capital of Germany number {i} is", "locality_ground_truth": "Berlin"}
            for i in range(n)]
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty EDITBENCH_CACHE for this test that shares the dequantized model folder."""
    models = cache_dir("models")
    cache = tmp_path / "cache"
    cache.mkdir()
    if models.is_dir():
        (cache / "models").symlink_to(models)
    monkeypatch.setenv("EDITBENCH_CACHE", str(cache))
    return cache


def target_nll(model, tok, prompt: str, target: str) -> float:
    """Mean NLL of ``target``'s tokens after ``prompt`` under ``model`` (teacher forcing)."""
    e = encode(tok, prompt, target)
    ids = torch.tensor([e.ids])
    with torch.no_grad():
        logp = torch.log_softmax(model_logits(model, ids, torch.ones_like(ids))[0].float(), -1)
    cols = torch.arange(e.start - 1, len(e.ids) - 1)
    return -logp[cols, torch.tensor(e.target_ids)].mean().item()
