"""``python -m editbench editor=<name> model=<name> data=<name> [overrides]``."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from editbench.records import DataError

log = logging.getLogger("editbench")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from editbench.runner import run

    try:
        path = run(cfg)
    except (DataError, ValueError, FileNotFoundError) as err:
        # Bad input or configuration: one clear line, no stack trace. Finished chunks stay on disk.
        log.error("%s", err)
        sys.exit(2)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
