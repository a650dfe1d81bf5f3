"""``python -m editbench.train editor=<name> model=<m> data=<d> [overrides]``.

Trains the editor (or finds its cached checkpoint) with the same Hydra config as
``python -m editbench`` and prints the checkpoint's path. Exit codes as every command of the
harness (:mod:`editbench.cli`): 2 bad configuration, 130 / 143 interrupted (rerun the same
command to resume from the last checkpoint).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from editbench.cli import guarded
from editbench.validate import validate_config


def train_only(cfg: DictConfig):
    validate_config(cfg)   # the whole composed config, before anything slow
    from editbench.models import load_model
    from editbench.session import build_editor, check_compatible
    from editbench.train.loop import ensure_trained

    check_compatible(cfg)
    lm = load_model(cfg.model)
    editor = build_editor(cfg, lm)
    if editor.training != "pipeline":
        raise ValueError(f"editor '{cfg.editor.name}' needs no training with this configuration")
    return ensure_trained(cfg, lm, editor)


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    path = guarded(lambda: train_only(cfg), "rerun the same command to resume from the last checkpoint")
    print(f"trained: {path}")


if __name__ == "__main__":
    main()
