"""``python -m editbench editor=<name> model=<name> data=<name> [overrides]``.

Exit status (:mod:`editbench.cli`): 0 done; 1 an unexpected error (Hydra prints the
traceback; also Hydra's own errors, e.g. an unknown ``editor=``/``model=``/``data=`` name,
which list the valid options); 2 bad input or configuration (one line, no traceback); 3 an
editor's ``reset()`` did not restore the model (one line naming the editor); 130 / 143
interrupted by SIGINT / SIGTERM (finished chunks are kept; rerun the same command to
resume). See docs/reliability.md.

When the run ends, the result table (editor x T x metric, mean, 95% CI, n) is printed
(:mod:`editbench.console`), then the paths of summary.csv, the plot and the run folder; with
``tracking.tensorboard=true`` the summary is also logged to TensorBoard (:mod:`editbench.tracking`).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from editbench.cli import guarded, with_data_runner


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from editbench.console import print_run
    from editbench.runner import run
    from editbench.tracking import log_run

    cfg = with_data_runner(cfg)   # data.runner (the embedded sample's short first run) unless given
    path = guarded(lambda: run(cfg), "finished chunks are kept, rerun the same command to resume")
    guarded(lambda: log_run(cfg, path), "the run's results are written")
    print_run(path)               # the result table, then where summary.csv and the plot are
    print(f"results: {path}")


if __name__ == "__main__":
    main()
