"""Build what a run works with, once: model, scorer, editor (trained if it learns), restore
guard and the after-edit measurements.

The runner, the training command, ``benchmarks/perf.py`` and the tests all build it here, so
that a benchmark measures exactly what a run computes:

* :func:`check_compatible`: the editor supports the model's family, and batch mode (or
  ``runner.edit_batch_size`` > 1) only where the editor declares ``supports_batch`` (before
  any weight is loaded);
* :func:`build_editor`: the registered class with the composed editor config;
* :func:`prepare_editor`: what the editor's declared ``training`` asks for: nothing, ``fit``
  on the train split, or the training pipeline (a cached checkpoint, else train / resume);
* :func:`open_session`: all of the above around a loaded model, as a :class:`Session`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from editbench.guard import WeightGuard, weights_sample
from editbench.models import SUPPORTED_FAMILIES, LoadedModel, cache_dir, load_model, model_fingerprint
from editbench.plan import batch_mode, check_cases, max_positions
from editbench.records import EditCase
from editbench.registry import editor_class
from editbench.results import RunDir
from editbench.scoring import Scorer
from editbench.wild import WildSettings

log = logging.getLogger("editbench.runner")

#: after-edit measurement: fn(editor, T, chunk_index) -> {key: value}, stored in the chunk record
AfterEditHook = Callable[[Any, int, int], dict[str, float]]


@dataclass
class Session:
    """Everything a chunk of the lifelong protocol needs."""

    cfg: DictConfig
    lm: LoadedModel
    editor: Any
    scorer: Scorer
    guard: WeightGuard
    run: RunDir | None
    #: extra measurements after a chunk's edits: name -> hook (general ability)
    after_edit_hooks: dict[str, AfterEditHook]
    #: scores reliability only, for the retention curve (runner.curve=true); None: no curve
    curve_scorer: Scorer | None = None
    #: why the chunks of this session are stale (a checkpoint trained by other code, reused with
    #: runner.reuse_stale=true); None: not stale
    stale: str | None = None
    #: the model's identity in cache keys (config fingerprint and a sample of its weights)
    model_id: str = ""


def check_compatible(cfg: DictConfig) -> type:
    """Fail before loading weights when the editor does not support the model's family."""
    cls = editor_class(cfg.editor.name)
    family = cfg.model.get("family")
    if family is not None and family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model '{cfg.model.name}' declares family '{family}', which has no ArchSpec; "
                         f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
    if cls.supported_families is not None and family is not None and family not in cls.supported_families:
        raise ValueError(f"editor '{cls.name}' does not support the {family} architecture of model "
                         f"'{cfg.model.name}'; it supports: {', '.join(cls.supported_families)}")
    if batch_mode(cfg) and not cls.supports_batch:
        raise ValueError(f"runner.batch_edit=true but editor '{cls.name}' has no batched edit")
    size = cfg.runner.get("edit_batch_size")
    if size is not None and int(size) > 1 and not cls.supports_batch:
        raise ValueError(f"runner.edit_batch_size={size} but editor '{cls.name}' has no batched edit "
                         f"(supports_batch is False); use 1 or null")
    return cls


def build_editor(cfg: DictConfig, lm: LoadedModel):
    """The registered editor class of ``cfg.editor.name`` built around ``lm``."""
    cls = editor_class(cfg.editor.name)
    editor_cfg = OmegaConf.to_container(cfg.editor, resolve=True)
    return cls(lm.model, lm.tokenizer, lm.arch, editor_cfg)


def prepare_editor(cfg: DictConfig, lm: LoadedModel, editor) -> str | None:
    """Do what the editor's declared ``training`` asks for before its first edit. Returns why
    the editor is stale (a checkpoint of other code, reused with ``runner.reuse_stale=true``),
    else None."""
    if editor.training == "pipeline":
        from editbench.train import ensure_trained

        # cached checkpoint, or train / resume
        from editbench.checkpoints import read_meta
        from editbench.fingerprint import training_code

        path = ensure_trained(cfg, lm, editor, reuse_stale=bool(cfg.runner.get("reuse_stale")))
        if (read_meta(path).get("key_parts") or {}).get("code") != training_code(type(editor)):
            return f"checkpoint {path} was trained by other code"
    if editor.training == "fit":
        from editbench.data import load_train_cases

        editor.fit(load_train_cases(cfg.data, editor.name))
    return None


def after_edit_hooks(cfg: DictConfig, lm: LoadedModel) -> dict[str, AfterEditHook]:
    """Measurements taken after a chunk's edits besides the probes (general ability)."""
    tasks = list(cfg.get("general", {}).get("tasks", []) or [])
    if not tasks:
        return {}
    from editbench.general import general_ability_hook

    return {"general": general_ability_hook(cfg, lm)}


def make_scorer(cfg: DictConfig, lm: LoadedModel) -> Scorer:
    """The scorer of ``cfg.runner`` / ``cfg.data`` on the model's device."""
    ev = cfg.get("eval") or {}
    return Scorer(lm.tokenizer, batch_size=cfg.runner.batch_size, padding_side=cfg.runner.padding_side,
                  cf_metrics=bool(cfg.data.get("cf_metrics", False)),
                  exact_match=bool(cfg.runner.exact_match), device=next(lm.model.parameters()).device,
                  mode=str(ev.get("mode", "teacher_forced")), wild=WildSettings.from_cfg(ev))


def open_session(cfg: DictConfig, cases: Sequence[EditCase], lm: LoadedModel | None = None,
                 run: RunDir | None = None) -> Session:
    """Load the model (unless given), check every query of ``cases`` before anything slow,
    build and prepare the editor, record the environment and the editor's provenance in
    ``run``'s env.json, and hash the model for the restore check."""
    if lm is None:
        lm = load_model(cfg.model)
    scorer = make_scorer(cfg, lm)
    # Before any training or edit: a bad case must not surface hours into the run.
    check_cases(cases, scorer, max_positions(lm.model))
    editor = build_editor(cfg, lm)
    stale = prepare_editor(cfg, lm, editor)
    lm.model.eval()
    if run is not None:
        run.write_env(str(lm.model.device if hasattr(lm.model, "device") else "cpu"),
                      {"model_description": cfg.model.get("description"), "editor": editor.provenance()})
    model_id = f"{model_fingerprint(cfg.model)}-{weights_sample(lm.model)}"
    session = Session(cfg, lm, editor, scorer, WeightGuard(lm.model, cache_dir("guard")), run,
                      after_edit_hooks(cfg, lm), stale=stale, model_id=model_id)
    if cfg.runner.get("curve") and batch_mode(cfg):
        log.warning("runner.curve=true has no effect with runner.batch_edit=true (no state between edits)")
    elif cfg.runner.get("curve"):
        session.curve_scorer = Scorer(lm.tokenizer, batch_size=cfg.runner.batch_size,
                                      padding_side=cfg.runner.padding_side, device=scorer.device,
                                      cf_metrics=False, exact_match=False)
    return session
