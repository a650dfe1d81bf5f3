"""What every command line of the harness shares: signals, exit codes, the multirun rule.

``python -m editbench`` and ``python -m editbench.train`` both run their work through
:func:`guarded`, so that they stop and report the same way (docs/reliability.md):

* 0: done (the command prints its result line);
* 2: bad input or configuration (one line, no traceback; finished chunks and checkpoints
  stay on disk);
* 3: an editor's ``reset()`` did not restore the model (one line naming the editor);
* 130 / 143: interrupted by SIGINT / SIGTERM (finished work is kept; rerun the same
  command to resume);
* 1: an unexpected error (Hydra prints the traceback).

Inside a job of a ``-m`` sweep an error must fail that job, not exit the process (which
would stop the basic launcher's remaining jobs): there the bad-input and restore errors
are raised again as plain (picklable) ``RuntimeError``.

A data config may carry its own runner defaults (``data.runner.steps``,
``data.runner.n_cases``; the embedded ``data=sample`` does, so that the first run is short):
:func:`with_data_runner` puts them into ``runner`` unless the command line sets that
runner key itself (docs/data.md, "The embedded sample").
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
from typing import Callable, TypeVar

log = logging.getLogger("editbench")


def _fast_teardown() -> None:
    """At exit, move every live object to the permanent generation, so that the interpreter's
    final garbage collections do not walk the millions of objects torch and transformers leave
    (2 to 7 s per process on the development machine, for a command or each job process of a
    sweep; measured). Runs after the files are closed: every result is written atomically and
    closed before, and the logging handlers are flushed by logging's own exit hook after this one."""
    gc.freeze()


atexit.register(_fast_teardown)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or configuration (CheckpointError is a ValueError).

    Imported when a job runs, not when this module is: the launcher process of a ``-m`` sweep
    imports this module to pickle the job function, and needs neither torch nor pandas."""
    from editbench.records import DataError
    from editbench.results import RunFolderBusy

    return (DataError, ValueError, FileNotFoundError, RunFolderBusy)


T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops the way Ctrl-C stops it:
    the model is reset, no partial file is left, finished chunks stay on disk."""


def on_sigterm(signum, frame):
    """The SIGTERM handler: raise :class:`Terminated`. A second SIGTERM while the process
    winds down kills it at once (the default action)."""
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


def in_multirun() -> bool:
    """True inside a job of a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(message: str, in_sweep: str, status: int) -> None:
    log.error("%s", message)
    if in_multirun():  # the launcher records this job as failed and runs the sweep's other jobs
        raise RuntimeError(in_sweep) from None
    sys.exit(status)


#: the runner keys a data config may set for itself under ``data.runner``
DATA_RUNNER_KEYS = ("steps", "n_cases")


def command_line_keys() -> set[str]:
    """The config keys the command line of this Hydra job overrides (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def with_data_runner(cfg, given: set[str] | None = None):
    """``cfg`` with the data config's own runner defaults (``data.runner.<key>``) copied into
    ``runner.<key>``, except the keys in ``given`` (default: the command line's overrides),
    which the user chose. Returns ``cfg`` itself when the data config has none.

    Never raises: it runs before :func:`guarded`, so a ``data.runner`` that is not a mapping, does
    not resolve, or holds a value the harness refuses is left where it is, and the config check
    then names it (``data.runner.steps=[0]: must be ...``, exit 2) instead of a traceback or an
    error about ``runner.steps``, which the user did not write."""
    import copy

    from omegaconf import DictConfig, OmegaConf, open_dict

    from editbench.validate import value_ok

    try:
        data = cfg.get("data")
        own = data.get("runner") if isinstance(data, DictConfig) else None
        if not isinstance(own, DictConfig) or not own:
            return cfg
        values = OmegaConf.to_container(own, resolve=True)
    except Exception:  # noqa: BLE001 - the config check reports it, with the key
        return cfg
    copied = {key: values[key] for key in DATA_RUNNER_KEYS
              if key in values and value_ok(f"data.runner.{key}", values[key])}
    given = command_line_keys() if given is None else given
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in copied.items():
            if f"runner.{key}" not in given:
                out.runner[key] = value
    return out


def guarded(work: Callable[[], T], on_interrupt: str) -> T:
    """Run ``work()`` with SIGTERM handled and errors mapped to the exit codes above;
    ``on_interrupt`` says what the user can do after SIGINT / SIGTERM."""
    from editbench.guard import RestoreError

    bad_input = bad_input_errors()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return work()
    except bad_input as err:
        _fail(str(err), f"bad input or configuration: {err}", 2)
    except RestoreError as err:
        message = " ".join([str(err), *getattr(err, "__notes__", [])])
        _fail(message, message, 3)
    except KeyboardInterrupt as err:
        stop_now(err, on_interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise AssertionError("unreachable")  # every except branch exits or raises
