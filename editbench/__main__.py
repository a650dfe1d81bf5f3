"""``python -m editbench editor=<name> model=<name> data=<name> [overrides]``.

Exit status (:mod:`editbench.cli`): 0 done; 1 an unexpected error (Hydra prints the
traceback; also Hydra's own errors, e.g. an unknown ``editor=``/``model=``/``data=`` name,
which list the valid options); 2 bad input or configuration (one line, no traceback); 3 an
editor's ``reset()`` did not restore the model (one line naming the editor); 130 / 143
interrupted by SIGINT / SIGTERM (finished chunks are kept; rerun the same command to
resume). See docs/reliability.md.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from editbench.cli import guarded


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from editbench.runner import run

    path = guarded(lambda: run(cfg), "finished chunks are kept, rerun the same command to resume")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
