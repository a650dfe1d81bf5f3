"""``python -m editbench editor=<name> model=<name> data=<name> [overrides]``.

Exit status: 0 done; 1 an unexpected error (Hydra prints the traceback; also Hydra's own
errors, e.g. an unknown ``editor=``/``model=``/``data=`` name, which list the valid
options); 2 bad input or configuration (one line, no traceback); 3 an editor's
``reset()`` did not restore the model (one line naming the editor); 130 / 143
interrupted by SIGINT / SIGTERM (finished chunks are kept; rerun the same command to
resume). See docs/reliability.md.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from editbench.records import DataError

log = logging.getLogger("editbench")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops the way Ctrl-C stops it:
    the model is reset, no partial file is left, finished chunks stay on disk."""


def _on_sigterm(signum, frame):
    # A second SIGTERM while we wind down kills the process at once (default action).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def stop_now(err: KeyboardInterrupt, what: str) -> None:
    """Log why the process stops (SIGINT or SIGTERM, then ``what``) and exit at once with
    130 / 143. Every file is closed and written atomically by then; the interpreter's slow
    teardown (seconds with torch loaded) is skipped so that the process really stops promptly."""
    which = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
    log.error("stopped by %s; %s", which, what)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(143 if isinstance(err, Terminated) else 130)


def _in_multirun() -> bool:
    """True inside a job of a ``-m`` sweep: there an error must fail the job, not exit the
    process (which would stop the basic launcher's remaining jobs)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from editbench.results import RunFolderBusy
    from editbench.runner import RestoreError, run

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        path = run(cfg)
    except (DataError, ValueError, FileNotFoundError, RunFolderBusy) as err:
        # Bad input or configuration: one clear line, no stack trace. Finished chunks stay on disk.
        log.error("%s", err)
        if _in_multirun():  # the launcher records this job as failed and runs the sweep's other jobs
            raise RuntimeError(f"bad input or configuration: {err}") from None  # plain: picklable
        sys.exit(2)
    except RestoreError as err:
        log.error("%s", " ".join([str(err), *getattr(err, "__notes__", [])]))
        if _in_multirun():
            raise RuntimeError(" ".join([str(err), *getattr(err, "__notes__", [])])) from None
        sys.exit(3)
    except KeyboardInterrupt as err:
        stop_now(err, "finished chunks are kept, rerun the same command to resume")
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
