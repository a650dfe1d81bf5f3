"""Helpers shared by the dataset loaders: file reading, field validation, target lists.

Every problem found here is raised as :class:`~editbench.records.DataError`, whose message
is one line naming the file, the record index and the field, e.g.
``counterfact-edit.json, record 17, field 'target_new': empty string``. Nested fields are
named with dots and list indices (``requested_rewrite.target_new.str``,
``Logical_Generalization[2].test_queries[0].answers``).

Conventions every loader follows:

* Prompts and targets are stripped of surrounding whitespace. A prompt or a scored target
  that is empty after stripping is an error; ``ground_truth`` and ``subject`` may be
  empty where the format allows it.
* Target lists (ZsRE ``answers``, RippleEdits/KnowEdit alias lists) are reduced to one
  scored target by :func:`first_alias`: the first non-empty alias of the first answer
  that has one. A probe whose answers are all empty has no target and is dropped (this is
  what RECIPE does with RippleEdits' empty ``targets``).
* Case ids are unique within a file: a record whose id an earlier record already has is
  a DataError naming both records (skipped and counted under ``skip_invalid``), because
  every result is keyed by case id. Strings must be valid Unicode (no lone surrogates).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, NoReturn

from editbench.records import DataError, EditCase, EditRequest, Probe

log = logging.getLogger("editbench.data")


class UnusableRecord(DataError):
    """A record of a known, documented kind that a dataset contains but that cannot be
    edited (zsRE's records with an empty ``alt``). Always skipped and counted, never fatal."""


class Cases(list):
    """A list of :class:`EditCase` that also says how many records were skipped
    (``n_skipped``): malformed ones under ``skip_invalid=True``, and
    :class:`UnusableRecord` ones always."""

    def __init__(self, cases=(), n_skipped: int = 0):
        super().__init__(cases)
        self.n_skipped = n_skipped


# --------------------------------------------------------------------------- files


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; unreadable files and non-UTF-8 bytes are DataErrors."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataError(path, None, None, f"cannot read file ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            path, None, None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None


def read_json(path: str | Path) -> Any:
    """The parsed JSON value of ``path`` (any top-level type)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            path, None, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except (ValueError, RecursionError) as err:  # an integer too long to convert; nesting too deep
        raise DataError(path, None, None, f"unreadable JSON ({_json_problem(err)})") from None


def _json_problem(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return " ".join(str(err).split(";")[0].split())


def read_jsonl(path: str | Path) -> list:
    """One JSON value per non-blank line of ``path``."""
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                path, None, None, f"line {lineno}: invalid JSON at column {err.colno}: {err.msg}"
            ) from None
        except (ValueError, RecursionError) as err:
            raise DataError(path, None, None, f"line {lineno}: unreadable JSON ({_json_problem(err)})") from None
    return records


def read_records(path: str | Path) -> list:
    """The records of a ``.jsonl`` file, or of a ``.json`` file whose top level is a list."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path)
    data = read_json(path)
    if not isinstance(data, list):
        fail(path, None, None, f"top-level value must be a list of records, got {type_name(data)}")
    return data


def parse_records(
    records: list,
    path: str | Path,
    parse: Callable[[Any, int], EditCase],
    limit: int | None = None,
    skip_invalid: bool = False,
) -> Cases:
    """Apply ``parse(record, index)`` to each record until ``limit`` cases are collected.

    A record that raises DataError stops the load, or is skipped and counted when
    ``skip_invalid`` is true; an :class:`UnusableRecord` is always skipped and counted.
    One warning per file gives the count and the first reason.
    """
    cases, skipped, first_error = Cases(), 0, None
    first_index: dict[str, int] = {}  # case_id -> the record that has it
    for index, record in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        try:
            case = parse(record, index)
            if case.case_id in first_index:
                fail(path, index, "case_id",
                     f"duplicate case_id {case.case_id!r} (record {first_index[case.case_id]} has it too)")
            first_index[case.case_id] = index
            cases.append(case)
        except DataError as err:
            if not (skip_invalid or isinstance(err, UnusableRecord)):
                raise
            skipped += 1
            first_error = first_error or err
    if skipped:
        log.warning("skipped %d record(s) of %s; first: %s", skipped, path, first_error)
    cases.n_skipped = skipped
    return cases


def source(path: str | Path, index: int) -> str:
    """The ``EditCase.source`` string of record ``index`` of ``path``."""
    return f"{path}#{index}"


def families(probes: dict[str, list[Probe]]) -> dict[str, list[Probe]]:
    """``probes`` without its empty families (an absent family is never an empty list)."""
    return {name: ps for name, ps in probes.items() if ps}


# --------------------------------------------------------------------------- fields


def fail(path: str | Path, index: int | None, field: str | None, problem: str) -> NoReturn:
    raise DataError(path, index, field, problem)


def type_name(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def as_record(value: Any, path: str | Path, index: int, field: str | None = None) -> dict:
    """``value`` itself, which must be a JSON object."""
    if not isinstance(value, dict):
        fail(path, index, field, f"expected an object, got {type_name(value)}")
    return value


def require(obj: dict, key: str, path, index: int, prefix: str = "") -> Any:
    """``obj[key]``, which must be present."""
    if key not in obj:
        fail(path, index, prefix + key, "missing")
    return obj[key]


def require_dict(obj: dict, key: str, path, index: int, prefix: str = "") -> dict:
    """``obj[key]``, which must be present and a JSON object."""
    return as_record(require(obj, key, path, index, prefix), path, index, prefix + key)


def require_list(obj: dict, key: str, path, index: int, prefix: str = "") -> list:
    """``obj[key]``, which must be present and a list."""
    value = require(obj, key, path, index, prefix)
    if not isinstance(value, list):
        fail(path, index, prefix + key, f"expected a list, got {type_name(value)}")
    return value


def optional_list(obj: dict, key: str, path, index: int, prefix: str = "") -> list:
    """``obj[key]``, a list, or [] when the key is absent or null."""
    if obj.get(key) is None:
        return []
    return require_list(obj, key, path, index, prefix)


def check_str(value: Any, path, index: int, field: str, allow_empty: bool = False) -> str:
    """``value`` stripped; it must be a string, and non-empty unless ``allow_empty``."""
    if not isinstance(value, str):
        fail(path, index, field, f"expected a string, got {type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800" (legal JSON, not text)
        fail(path, index, field, f"not valid Unicode text (lone surrogate {value[err.start]!r} at {err.start})")
    value = value.strip()
    if not value and not allow_empty:
        fail(path, index, field, "empty string")
    return value


def require_str(obj: dict, key: str, path, index: int, allow_empty: bool = False,
                prefix: str = "") -> str:
    """``obj[key]`` stripped; it must be present, a string, and non-empty unless allowed."""
    return check_str(require(obj, key, path, index, prefix), path, index, prefix + key, allow_empty)


def optional_str(obj: dict, key: str, path, index: int, prefix: str = "") -> str:
    """``obj[key]`` stripped, or "" when the key is absent or null."""
    if obj.get(key) is None:
        return ""
    return check_str(obj[key], path, index, prefix + key, allow_empty=True)


def optional_target(obj: dict, key: str, path, index: int, prefix: str = "") -> str:
    """:func:`first_alias` of ``obj[key]``, or "" when the key is absent or null."""
    if obj.get(key) is None:
        return ""
    return first_alias(obj[key], path, index, prefix + key)


def require_str_list(obj: dict, key: str, path, index: int, prefix: str = "") -> list[str]:
    """``obj[key]``: a list of non-empty strings, each stripped."""
    values = require_list(obj, key, path, index, prefix)
    return [check_str(v, path, index, f"{prefix}{key}[{j}]") for j, v in enumerate(values)]


def str_or_list(obj: dict, key: str, path, index: int, prefix: str = "") -> list[str]:
    """``obj[key]`` as a list of non-empty stripped strings: a string or a list of them."""
    value = require(obj, key, path, index, prefix)
    if isinstance(value, str):
        return [check_str(value, path, index, prefix + key)]
    if not isinstance(value, list):
        fail(path, index, prefix + key,
             f"expected a string or a list of strings, got {type_name(value)}")
    return require_str_list(obj, key, path, index, prefix)


def case_id(obj: dict, index: int, path) -> str:
    """The record's ``case_id`` (an integer or a non-empty string) or, absent, its index."""
    value = obj.get("case_id")
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        fail(path, index, "case_id", f"expected an integer or a string, got {type_name(value)}")
    return check_str(str(value), path, index, "case_id")


def first_alias(value: Any, path, index: int, field: str) -> str:
    """The scored target of a target list: the first non-empty alias of the first answer
    that has one, or "" when there is none.

    ``value`` may be a string (the target itself), a list of aliases (RECIPE ``targets``,
    ZsRE ``answers``) or a list of alias lists (KnowEdit ``ground_truth``; RippleEdits
    answers once ``{value, aliases}`` is turned into ``[value, *aliases]``).
    """
    if isinstance(value, str):
        return check_str(value, path, index, field, allow_empty=True)
    if not isinstance(value, list):
        fail(path, index, field, f"expected a string or a list of aliases, got {type_name(value)}")
    for j, answer in enumerate(value):
        aliases = answer if isinstance(answer, list) else [answer]
        for k, alias in enumerate(aliases):
            where = f"{field}[{j}][{k}]" if isinstance(answer, list) else f"{field}[{j}]"
            alias = check_str(alias, path, index, where, allow_empty=True)
            if alias:
                return alias
    return ""


def flat_request(rec: dict, path, index: int) -> EditRequest:
    """The request of a RECIPE or KnowEdit record (flat prompt/subject/target_new)."""
    return EditRequest(require_str(rec, "prompt", path, index),
                       require_str(rec, "target_new", path, index),
                       require_str(rec, "subject", path, index),
                       optional_target(rec, "ground_truth", path, index))


def alias_probes(obj: dict, key: str, target_key: str, path, index: int,
                    prefix: str = "") -> list[Probe]:
    """Probes from ``obj[key]``, a list of ``{prompt, <target_key>: aliases}``."""
    probes = []
    for j, item in enumerate(optional_list(obj, key, path, index, prefix)):
        field = f"{prefix}{key}[{j}]"
        item = as_record(item, path, index, field)
        prompt = require_str(item, "prompt", path, index, prefix=field + ".")
        target = first_alias(require(item, target_key, path, index, prefix=field + "."),
                             path, index, f"{field}.{target_key}")
        if target:
            probes.append(Probe(prompt, target))
    return probes
