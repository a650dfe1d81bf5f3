"""Check the whole composed config before anything slow happens (data, weights, training).

:func:`validate_config` is the first thing ``editbench.runner.run`` and
``python -m editbench.train`` do. A bad value raises ``ValueError`` with one line,

    <key>=<value!r>: <what is allowed>

e.g. ``runner.steps=5: must be a list of positive integers, e.g. [1,10,100]``, which the
command line (:mod:`editbench.cli`) prints without a traceback and exits with status 2.

The rules are one table, :data:`RULES`: (key, check, what is allowed). Each states what the
code that reads the key accepts (the module named beside it), no more. A rule marked
``required`` is read without a default, so an absent key is an error; the others are read
with ``.get`` and a default, so an absent key is fine. A key written ``<section>.*`` stands
for every key of that section that no other rule names (``editor.train.*``: an unknown train
setting). An editor's own hyperparameters are not here: each editor checks them when it is
built (``hparams_from_cfg``); only the keys the harness itself reads (:data:`CONFIG_BOOKKEEPING
<editbench.editor.CONFIG_BOOKKEEPING>` and ``editor.train``) are.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Any, Callable, Mapping, NamedTuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from editbench.data import LOADERS, SPLITS
from editbench.data.hub import INSTALL_HINT as HUB_INSTALL_HINT, hub_kind
from editbench.general.lm_eval_backend import INSTALL_HINT as LM_EVAL_INSTALL_HINT, available as lm_eval_available
from editbench.general.data import TASKS
from editbench.models import DTYPES, SUPPORTED_FAMILIES
from editbench.registry import EDITORS, available
from editbench.tracking import INSTALL_HINT as TRACKING_INSTALL_HINT, available as tracking_available
from editbench.train.loop import AUTOCAST_DTYPES, TRAIN_DEFAULTS
from editbench.wild import CONTEXTS as WILD_CONTEXTS, MODES as WILD_MODES, WHEN as WILD_WHEN

__all__ = ["RULES", "Rule", "validate_config", "value_ok"]

#: the model sources of :func:`editbench.models.load_model`
MODEL_SOURCES = ("hf", "gguf", "random")
#: the families :func:`editbench.models.load_model` builds random-weight models for
RANDOM_FAMILIES = ("llama", "gptj")
_ABSENT = object()


class Rule(NamedTuple):
    key: str
    #: check(value, cfg) -> ok; ``cfg`` is the whole resolved config as plain dicts and lists
    check: Callable[[Any, Mapping[str, Any]], bool]
    #: what is allowed (a callable when it lists something found at run time)
    allowed: str | Callable[[], str]
    #: read without a default: an absent key is an error
    required: bool = False


# --------------------------------------------------------------------------- checks
def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bool(v, cfg=None) -> bool:
    return isinstance(v, bool)


def _bool_or_null(v, cfg=None) -> bool:
    return v is None or isinstance(v, bool)


def _pos_int(v, cfg=None) -> bool:
    return _int(v) and v >= 1


def _pos_int_or_null(v, cfg=None) -> bool:
    return v is None or _pos_int(v)


def _edit_batch_size(v, cfg) -> bool:
    # editbench.plan.edit_schedule: B groups the edits itself, so an explicit runner.batch_edit contradicts it
    return v is None or (_pos_int(v) and _get(cfg, "runner.batch_edit") is None)


def _nonneg_int(v, cfg=None) -> bool:
    return _int(v) and v >= 0


def _any_int(v, cfg=None) -> bool:
    return _int(v)


def _name(v, cfg=None) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _str_or_null(v, cfg=None) -> bool:
    return v is None or isinstance(v, str)


def _in(v, choices) -> bool:
    return isinstance(v, str) and v in choices


def _one_of(*choices) -> Callable[[Any, Any], bool]:
    return lambda v, cfg=None: _in(v, choices)


def _mapping_of_str_or_null(v, cfg=None) -> bool:
    return v is None or (isinstance(v, Mapping) and all(x is None or isinstance(x, str) for x in v.values()))


def _package_file(v) -> bool:
    return isinstance(v, Mapping) and _name(v.get("package")) and _name(v.get("file"))


def _steps(v, cfg=None) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_pos_int(t) for t in v)


def _data_path(v, cfg) -> bool:
    if v is None:
        return _get(cfg, "data.kind") == "sample"
    return isinstance(v, str)


def _val_from(v, cfg) -> bool:
    if not _in(v, ("eval", "train")):
        return False
    # editbench.data: the val part comes from the train file (split val or test) only if there is one
    return not (v == "train" and _get(cfg, "data.split") in ("val", "test") and not _get(cfg, "data.train_path"))


def _fraction(v, cfg=None) -> bool:
    return _number(v) and 0 < v < 1


def _model_family(v, cfg) -> bool:
    if _get(cfg, "model.source", "hf") == "random":
        return _in(v, RANDOM_FAMILIES)
    return v is None or _in(v, SUPPORTED_FAMILIES)


def _model_path(v, cfg) -> bool:
    if _get(cfg, "model.source", "hf") == "hf":
        return _name(v)
    return _str_or_null(v)


def _gguf(v, cfg) -> bool:
    return _package_file(v) if _get(cfg, "model.source", "hf") == "gguf" else v is None or isinstance(v, Mapping)


def _tokenizer_from(v, cfg) -> bool:
    return _package_file(v) if _get(cfg, "model.source", "hf") == "random" else v is None or isinstance(v, Mapping)


def _device(v, cfg=None) -> bool:
    return isinstance(v, str) and re.fullmatch(r"cpu|cuda|auto|cuda:\d+", v) is not None


def _tasks(v, cfg=None) -> bool:
    return v is None or (isinstance(v, list) and all(_in(t, TASKS) for t in v))


def _backend(v, cfg=None) -> bool:
    return v == "builtin" or (v == "lm_eval" and lm_eval_available())


def _lm_eval_tasks(v, cfg) -> bool:
    if not (isinstance(v, list) and all(_name(t) for t in v)):
        return False
    return bool(v) == (_get(cfg, "general.backend", "builtin") == "lm_eval")


def _data_files(v, cfg=None) -> bool:
    def patterns(x) -> bool:
        return _name(x) or (isinstance(x, list) and len(x) > 0 and all(_name(p) for p in x))
    return v is None or patterns(v) or (isinstance(v, Mapping) and len(v) > 0
                                        and all(_name(k) and patterns(p) for k, p in v.items()))


def _hub_readable(v, cfg) -> bool:
    """A data.path that names a hub dataset (or a hub-layout folder) needs ``datasets``."""
    if not isinstance(v, str) or hub_kind(v, str(_get(cfg, "data.kind"))) is None:
        return True
    return importlib.util.find_spec("datasets") is not None


def _editors() -> list[str]:
    """Every editor name ``editbench.registry.editor_class`` finds: the modules of ``editors/``
    and the classes registered at run time (``@register`` outside that package)."""
    return sorted(set(available()) | set(EDITORS))


def _editor_name(v, cfg=None) -> bool:
    return _in(v, _editors())


def _positive_number(v, cfg=None) -> bool:
    return _number(v) and v > 0


def _nonneg_number(v, cfg=None) -> bool:
    return _number(v) and v >= 0


def _never(v, cfg=None) -> bool:
    return False


# --------------------------------------------------------------------------- the table
_BOOL = "must be true or false"
_POS = "must be a positive integer"

RULES: list[Rule] = [
    # runner (conf/config.yaml; editbench/runner.py, plan.py, session.py, scoring.py)
    Rule("runner.steps", _steps, "must be a list of positive integers, e.g. [1,10,100]", True),
    Rule("runner.n_cases", _pos_int_or_null, "must be a positive integer or null (all cases)", True),
    Rule("runner.seed", _any_int, "must be an integer", True),
    Rule("runner.shuffle", _bool, _BOOL, True),
    Rule("runner.batch_size", _pos_int, _POS + " (scoring batch)", True),
    Rule("runner.padding_side", _one_of("right", "left"), "must be right or left", True),
    Rule("runner.exact_match", _bool, _BOOL, True),
    Rule("runner.batch_edit", _bool_or_null, "must be true, false or null (the editor's protocol, editor.batch_edit)"),
    Rule("runner.edit_batch_size", _edit_batch_size,
         "must be a positive integer (edits per edit_batch within a chunk) or null (runner.batch_edit decides); "
         "not together with runner.batch_edit=true/false"),
    Rule("runner.reuse_stale", _bool_or_null, _BOOL),
    Rule("runner.curve", _bool_or_null, _BOOL),
    Rule("runner.progress", _bool, _BOOL, True),
    # evaluation (conf/config.yaml eval:; editbench/scoring.py, wild.py, runner.eval_when)
    Rule("eval", lambda v, cfg=None: v is None or isinstance(v, Mapping), "must be a mapping or null"),
    Rule("eval.mode", _one_of(*WILD_MODES), f"must be one of {', '.join(WILD_MODES)}"),
    Rule("eval.when", _one_of(*WILD_WHEN), f"must be one of {', '.join(WILD_WHEN)}"),
    Rule("eval.wild_context", _one_of(*WILD_CONTEXTS), f"must be one of {', '.join(WILD_CONTEXTS)}"),
    Rule("eval.wild_budget_factor", _nonneg_number, "must be a number >= 0"),
    Rule("eval.wild_budget_extra", _nonneg_int, "must be a non-negative integer"),
    Rule("eval.wild_max_new_tokens", _pos_int, _POS),
    Rule("eval.wild_batch_size", _pos_int, _POS + " (prompts per WILD generation batch)"),
    Rule("eval.wild_stop", lambda v, cfg=None: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
         "must be a list of non-empty strings (may be empty: stop at end of sequence or the budget only)"),
    Rule("eval.judge", lambda v, cfg=None: v is None or (isinstance(v, str) and re.fullmatch(
        r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*([.:][A-Za-z_][\w]*)", v) is not None),
         "must be null (normalised exact match) or a dotted path package.module.function to "
         "judge(question, target, generation) -> bool | float"),
    Rule("eval.*", _never, "is not an eval setting; valid: mode, when, wild_context, wild_budget_factor, "
         "wild_budget_extra, wild_max_new_tokens, wild_batch_size, wild_stop, judge"),
    Rule("runner.curve", lambda v, cfg: not v or (_get(cfg, "eval.mode", "teacher_forced") != "wild"
                                                   and _get(cfg, "eval.when", "after_chunk") == "after_chunk"),
         "runner.curve=true needs teacher-forced scoring after the chunk (eval.mode teacher_forced or both, "
         "eval.when=after_chunk)"),
    # run folder (editbench/results.py, plan.run_id)
    Rule("out_dir", _name, "must be a folder path (a non-empty string)", True),
    Rule("run_id", lambda v, cfg=None: v is None or _name(v) or _int(v),
         "must be null (<editor>_<model>_<data>_<config hash>) or a non-empty name"),
    Rule("data_root", _str_or_null, "must be a folder path (a string)"),
    # data (conf/data/*.yaml; editbench/data/__init__.py)
    Rule("data.name", _name, "must be a non-empty string", True),
    Rule("data.kind", lambda v, cfg=None: _in(v, LOADERS),
         f"must be a dataset kind: {', '.join(sorted(LOADERS))}", True),
    Rule("data.train_kind", lambda v, cfg=None: v is None or _in(v, LOADERS),
         f"must be null (data.kind) or a dataset kind: {', '.join(sorted(LOADERS))}"),
    Rule("data.path", _data_path, "must be a file or folder path (a string); null only with data.kind=sample"),
    Rule("data.train_path", _str_or_null, "must be a file or folder path (a string) or null (no train split)"),
    Rule("data.cf_metrics", _bool, _BOOL),
    Rule("data.split", lambda v, cfg=None: v is None or _in(v, SPLITS), f"must be one of {', '.join(SPLITS)}"),
    Rule("data.val", lambda v, cfg=None: v is None or isinstance(v, Mapping),
         "must be a mapping (from, fraction, salt) or null"),
    Rule("data.val.from", _val_from,
         "must be eval or train (train needs data.train_path when data.split is val or test)"),
    Rule("data.val.fraction", _fraction, "must be a number strictly between 0 and 1"),
    Rule("data.val.salt", lambda v, cfg=None: isinstance(v, str) or _int(v), "must be a string"),
    # a data config's own runner defaults (editbench/cli.py with_data_runner; conf/data/sample.yaml)
    Rule("data.runner", lambda v, cfg=None: v is None or isinstance(v, Mapping),
         "must be a mapping of runner defaults (steps, n_cases) or null"),
    Rule("data.runner.steps", _steps, "must be a list of positive integers, e.g. [1,10]"),
    Rule("data.runner.n_cases", _pos_int_or_null, "must be a positive integer or null (all cases)"),
    Rule("data.runner.*", _never, "is not a runner default a data config may set; valid: steps, n_cases"),
    # Hugging Face datasets as data.path (editbench/data/hub.py)
    Rule("data.hub_split", _name, "must be a split name (a non-empty string), e.g. train"),
    Rule("data.hub_train_split", _name, "must be a split name (a non-empty string), e.g. train"),
    Rule("data.hub_config", _str_or_null, "must be a dataset configuration name (a string) or null"),
    Rule("data.hub_revision", _str_or_null, "must be a revision (a branch, tag or commit; a string) or null"),
    Rule("data.data_files", _data_files,
         "must be null, a file pattern, a list of patterns or a mapping split -> pattern(s) (strings)"),
    Rule("data.path", _hub_readable, lambda: f"names a Hugging Face dataset: reading it needs {HUB_INSTALL_HINT}"),
    # experiment tracking (editbench/tracking.py)
    Rule("tracking", lambda v, cfg=None: v is None or isinstance(v, Mapping), "must be a mapping (tensorboard, dir) or null"),
    Rule("tracking.tensorboard", lambda v, cfg=None: isinstance(v, bool) and (not v or tracking_available()),
         f"must be true or false; true needs the tensorboard package: {TRACKING_INSTALL_HINT}"),
    Rule("tracking.dir", _str_or_null, "must be null (<run or checkpoint folder>/tensorboard) or a folder path"),
    Rule("tracking.*", _never, "is not a tracking setting; valid: tensorboard, dir"),
    # model (conf/model/*.yaml; editbench/models.py load_model, session.check_compatible)
    Rule("model.name", _name, "must be a non-empty string", True),
    Rule("model.description", _str_or_null, "must be a string or null"),
    Rule("model.source", _one_of(*MODEL_SOURCES), f"must be one of {', '.join(MODEL_SOURCES)}"),
    Rule("model.family", _model_family,
         f"must be one of {', '.join(SUPPORTED_FAMILIES)} or null; with model.source=random one of "
         f"{', '.join(RANDOM_FAMILIES)}"),
    Rule("model.dtype", _one_of(*DTYPES), f"must be one of {', '.join(DTYPES)}"),
    Rule("model.device", _device, "must be cpu, cuda, cuda:N or auto (device_map=auto)"),
    Rule("model.path", _model_path,
         "must be a hub id or a local folder (a non-empty string) with model.source=hf, else a string or null"),
    Rule("model.gguf", _gguf, "must be a mapping with package and file (strings) with model.source=gguf"),
    Rule("model.tokenizer_from", _tokenizer_from,
         "must be a mapping with package and file (strings) with model.source=random"),
    Rule("model.tokenizer", _str_or_null, "must be a tokenizer id or folder (a string) or null (model.path)"),
    Rule("model.arch", lambda v, cfg=None: isinstance(v, Mapping), "must be a mapping of config fields"),
    Rule("model.seed", _any_int, "must be an integer"),
    Rule("model.trust_remote_code", _bool, _BOOL),
    # general ability (conf/general/default.yaml; editbench/general/)
    Rule("general.tasks", _tasks, f"must be a list of task names from {', '.join(TASKS)} (empty: off)"),
    Rule("general.n", _pos_int_or_null, "must be a positive integer or null (all examples)"),
    Rule("general.backend", _backend, f"must be builtin or lm_eval; lm_eval needs lm-evaluation-harness: "
         f"{LM_EVAL_INSTALL_HINT}"),
    Rule("general.lm_eval_tasks", _lm_eval_tasks, "must be a list of lm-eval task names (strings); "
         "non-empty with general.backend=lm_eval, empty otherwise"),
    # general_ability_hook is built only for a non-empty general.tasks (editbench/session.py
    # after_edit_hooks), so the lm-eval tasks run beside at least one built-in task for now
    Rule("general.lm_eval_tasks", lambda v, cfg: not v or bool(_get(cfg, "general.tasks")),
         "with general.backend=lm_eval, general.tasks must name at least one built-in task too "
         "(the after-edit measurement is built for general.tasks; docs/general.md)"),
    Rule("general.lm_eval_include", _str_or_null, "must be null (lm-eval's tasks) or a folder of lm-eval task YAMLs"),
    Rule("general.lm_eval_limit", lambda v, cfg=None: v is None or _pos_int(v) or (_number(v) and 0 < v <= 1),
         "must be a positive integer (documents per task), a fraction in (0, 1] or null (all)"),
    Rule("general.lm_eval_num_fewshot", lambda v, cfg=None: v is None or _nonneg_int(v),
         "must be a non-negative integer or null (the task's default)"),
    Rule("general.seed", _nonneg_int, "must be a non-negative integer"),
    Rule("general.path", _str_or_null, "must be a folder path (a string)"),
    Rule("general.source", _one_of("local", "hf"), "must be local or hf"),
    Rule("general.files", _mapping_of_str_or_null, "must be a mapping of task -> path (strings) or null"),
    Rule("general.splits", _mapping_of_str_or_null, "must be a mapping of task -> split name (or null) or null"),
    Rule("general.format", _one_of("letter", "cloze"), "must be letter or cloze"),
    Rule("general.cloze_norm", _one_of("sum", "mean"), "must be sum or mean"),
    Rule("general.chunks", _pos_int_or_null, "must be a positive integer or null (every chunk)"),
    Rule("general.steps", lambda v, cfg=None: v is None or _steps(v), "must be null (every T) or a list of positive integers, e.g. [100,1000]"),
    Rule("general.max_tokens", _pos_int, _POS),
    Rule("general.squad_context_tokens", _pos_int, _POS),
    Rule("general.batch_size", _pos_int_or_null, "must be a positive integer or null (32)"),
    Rule("general.batch_tokens", _pos_int, _POS),
    Rule("general.cache", _bool, _BOOL),
    # editor: the keys the harness reads (editbench.editor.CONFIG_BOOKKEEPING, editbench/train/loop.py)
    Rule("editor.name", _editor_name, lambda: f"must be a registered editor: {', '.join(_editors())}", True),
    Rule("editor.variant", _str_or_null, "must be a string or null"),
    Rule("editor.batch_edit", _bool_or_null, "must be true, false or null"),
    Rule("editor.train", lambda v, cfg=None: v is None or isinstance(v, Mapping), "must be a mapping or null"),
    Rule("editor.train.steps", _pos_int, _POS),
    Rule("editor.train.batch_size", _pos_int, _POS),
    Rule("editor.train.lr", _positive_number, "must be a number > 0"),
    Rule("editor.train.lr_schedule", _one_of("constant", "cosine"), "must be constant or cosine"),
    Rule("editor.train.warmup_steps", _nonneg_int, "must be a non-negative integer"),
    Rule("editor.train.weight_decay", _nonneg_number, "must be a number >= 0"),
    Rule("editor.train.grad_clip", lambda v, cfg=None: v is None or _positive_number(v),
         "must be a number > 0 or null (no clipping)"),
    Rule("editor.train.n_val", _nonneg_int, "must be a non-negative integer (0: no validation)"),
    Rule("editor.train.val_every", _nonneg_int, "must be a non-negative integer (0: never)"),
    Rule("editor.train.ckpt_every", _pos_int, _POS),
    Rule("editor.train.seed", _any_int, "must be an integer"),
    Rule("editor.train.progress", _bool, _BOOL),
    Rule("editor.train.autocast", lambda v, cfg=None: v is None or _in(v, AUTOCAST_DTYPES),
         f"must be null (full precision) or one of {', '.join(AUTOCAST_DTYPES)}"),
    Rule("editor.train.*", _never, f"is not a train setting; valid: {', '.join(sorted(TRAIN_DEFAULTS))}"),
]

_NAMED = {r.key for r in RULES}


# --------------------------------------------------------------------------- validation
def _text(allowed: str | Callable[[], str]) -> str:
    return allowed() if callable(allowed) else allowed


def _fail(key: str, value: Any, allowed: str | Callable[[], str]) -> ValueError:
    return ValueError(f"{key}={value!r}: {_text(allowed)}")


def _resolved(cfg) -> dict[str, Any]:
    """The config as plain dicts and lists with every interpolation resolved; a value that
    cannot be resolved is a one-line error naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raw = _get(OmegaConf.to_container(cfg, resolve=False), key, "?")
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{key}={raw!r}: cannot be resolved ({reason})") from None


def value_ok(key: str, value: Any, cfg: Mapping[str, Any] | None = None) -> bool:
    """Whether ``value`` passes every rule of ``key`` (``cfg``: the whole config as plain
    dicts, for the rules that read other keys)."""
    return all(rule.check(value, cfg or {}) for rule in RULES if rule.key == key)


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise a one-line ``ValueError`` (``<key>=<value!r>: <what is allowed>``) at the first
    value of the composed config that the harness cannot run with; see :data:`RULES`."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    plain = _resolved(cfg)
    for rule in RULES:
        if rule.key.endswith(".*"):
            section = rule.key[:-2]
            children = _get(plain, section)
            if isinstance(children, Mapping):
                for child, value in children.items():
                    if f"{section}.{child}" not in _NAMED and not rule.check(value, plain):
                        raise _fail(f"{section}.{child}", value, rule.allowed)
            continue
        value = _get(plain, rule.key, _ABSENT)
        if value is _ABSENT:
            if rule.required:
                raise ValueError(f"{rule.key} is not set: {_text(rule.allowed)}")
            continue
        if not rule.check(value, plain):
            raise _fail(rule.key, value, rule.allowed)
