"""Command-line plumbing shared by the benchmark scripts.

A script takes Hydra overrides (as ``python -m editbench`` does) mixed with its own ``bench.*``
keys: ``python benchmarks/perf.py editor=rome data=cf bench.n_cases=20``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def split_bench_args(argv: Sequence[str], defaults: Mapping[str, Any]) -> tuple[list[str], DictConfig]:
    """(Hydra overrides, the script's ``bench`` config) from the command line: every
    ``bench.key=value`` (or ``+bench.key=value``) is merged over ``defaults``, values parsed as
    in a Hydra override (``bench.n=100`` is an int, ``bench.modes=a,b`` the string ``a,b``); a
    key that ``defaults`` lacks exits with the known keys."""
    hydra_args = [a for a in argv if not a.lstrip("+").startswith("bench.")]
    bench_args = [a.lstrip("+")[len("bench."):] for a in argv if a.lstrip("+").startswith("bench.")]
    unknown = sorted({a.partition("=")[0] for a in bench_args} - set(defaults))
    if unknown:
        raise SystemExit(f"unknown bench key(s): {unknown}; known: {sorted(defaults)}")
    return hydra_args, OmegaConf.merge(OmegaConf.create(dict(defaults)), OmegaConf.from_dotlist(bench_args))


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    """The config ``python -m editbench <overrides>`` runs with (same tree, same composition)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))
