"""Property tests of every loader against bad input (docs/reliability.md, "Bad input").

For each format (zsRE, CounterFact flat and ROME, RippleEdits original, RECIPE and
KnowEdit, DAFSet parts, the sample layout with a path) hypothesis builds a file of valid
records with arbitrary text (any Unicode, huge strings, surrounding blanks), checks that it
loads, then damages it in one way (a field of one record set to a wrong type, an empty,
blank or lone-surrogate string or a huge number; a field deleted; a record that is not an
object; a duplicate case id; a non-UTF-8 byte) and checks the contract:

* the file either loads, and then every record other than the damaged one gives exactly
  the case it gave before (nothing silently reinterpreted) and no record is silently
  dropped (cases + n_skipped == records);
* or it raises DataError, one line naming the file and, for a damaged record, that
  record's index and a field; never any other exception;
* with ``skip_invalid=True`` the same file loads without that record, the count of
  skipped records is 1 and every other case is unchanged.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editbench.data import load_cases
from editbench.records import DataError, EditCase

# Bounded for CI; EDITBENCH_HYPOTHESIS_EXAMPLES=500 (and a random seed) for a deeper local hunt.
_DEEP = int(os.environ.get("EDITBENCH_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 25, deadline=None, derandomize=not _DEEP,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])  # caplog is cleared per example

# Any non-blank text without lone surrogates (those are not text: see BAD_VALUES).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12).filter(str.strip)
HUGE = st.builds(lambda s, n: s * n, TEXT, st.integers(2_000, 20_000))
ANY_TEXT = st.one_of(TEXT, TEXT.map(lambda s: f"  {s}\n"), HUGE)
# Plain words, for the sentence RippleEdits' original layout must be split into.
WORD = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8)
NAME = st.lists(WORD, min_size=1, max_size=3).map(" ".join)

HUGE_NUMBER = "@@huge-number@@"  # written as a 5000-digit integer literal (Python's json cannot parse it)
BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.just(""), st.just(" \t\n"),
    st.just("\ud800"), TEXT.map(lambda s: s + "\udfff"), st.just(HUGE_NUMBER),
    st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, st.integers(), max_size=2),
    st.lists(st.lists(st.none(), max_size=1), max_size=2))


@dataclass
class Form:
    kind: str
    file_name: str
    make: Callable[[Any, int], dict]     # (draw, index) -> a valid record
    fields: list[tuple]                  # paths that may be damaged
    has_id: bool                         # records carry an explicit case_id


def _zsre(draw, i):
    return {"subject": draw(ANY_TEXT), "src": draw(ANY_TEXT), "pred": draw(ANY_TEXT), "rephrase": draw(ANY_TEXT),
            "alt": draw(ANY_TEXT), "answers": draw(st.lists(ANY_TEXT, max_size=2)), "loc": draw(ANY_TEXT),
            "loc_ans": draw(ANY_TEXT), "cond": draw(ANY_TEXT)}


def _cf_flat(draw, i, case_id=True):
    n_loc = draw(st.integers(1, 3))
    rec = {"prompt": draw(ANY_TEXT), "subject": draw(ANY_TEXT), "target_new": draw(ANY_TEXT),
           "ground_truth": draw(ANY_TEXT),
           "rephrase_prompt": draw(ANY_TEXT | st.lists(ANY_TEXT, min_size=1, max_size=2)),
           "locality_prompt": draw(st.lists(ANY_TEXT, min_size=n_loc, max_size=n_loc)),
           "locality_ground_truth": draw(ANY_TEXT | st.lists(ANY_TEXT, min_size=n_loc, max_size=n_loc))}
    if case_id:
        rec["case_id"] = 100 + i if draw(st.booleans()) else f"id-{i}"
    return rec


def _cf_rome(draw, i):
    return {"case_id": 100 + i, "pararel_idx": i,
            "requested_rewrite": {"prompt": f"{draw(TEXT)} {{}} {draw(TEXT)}", "subject": draw(ANY_TEXT),
                                  "relation_id": "P1", "target_new": {"str": draw(ANY_TEXT), "id": "Q1"},
                                  "target_true": {"str": draw(ANY_TEXT), "id": "Q2"}},
            "paraphrase_prompts": draw(st.lists(ANY_TEXT, min_size=1, max_size=2)),
            "neighborhood_prompts": draw(st.lists(ANY_TEXT, min_size=1, max_size=2)),
            "attribute_prompts": [], "generation_prompts": []}


def _ripple_original(draw, i):
    subject, target, old = draw(NAME), draw(NAME), draw(NAME)
    query = {"prompt": draw(ANY_TEXT), "answers": [{"value": target, "aliases": draw(st.lists(ANY_TEXT, max_size=2))}],
             "query_type": "regular", "subject_id": "Q1", "relation": "SPOUSE", "target_ids": ["Q9"]}
    return {"case_id": 100 + i, "example_type": "random",
            "edit": {"prompt": f"The name of the spouse of {subject} is {target}.", "subject_id": "Q1",
                     "relation": "SPOUSE", "target_id": "Q9",
                     "original_fact": {"prompt": f"The name of the spouse of {subject} is {old}."}},
            "Logical_Generalization": [{"test_queries": [query], "test_condition": "OR", "condition_queries": []}],
            "Relation_Specificity": [{"test_queries": [dict(query, prompt=draw(ANY_TEXT))],
                                      "test_condition": draw(st.sampled_from(["OR", "AND"])),
                                      "condition_queries": []}],
            "Subject_Aliasing": [], "Compositionality_I": [], "Compositionality_II": [], "Forgetfulness": []}


def _ripple_recipe(draw, i):
    def probes():
        return draw(st.lists(st.fixed_dictionaries({"prompt": ANY_TEXT, "targets": st.lists(ANY_TEXT, max_size=2)}),
                             max_size=2))
    return {"case_id": 100 + i, "prompt": draw(ANY_TEXT), "subject": draw(ANY_TEXT), "target_new": draw(ANY_TEXT),
            "ground_truth": draw(st.lists(ANY_TEXT, max_size=2)), "Logical_Generalization": probes(),
            "Subject_Aliasing": probes(), "Relation_Specificity": probes(), "Forgetfulness": probes()}


def _knowedit(draw, i):
    def probes():
        return draw(st.lists(st.fixed_dictionaries({"prompt": ANY_TEXT,
                                                    "ground_truth": st.lists(st.lists(ANY_TEXT, max_size=2),
                                                                             max_size=2) | ANY_TEXT}),
                             min_size=1, max_size=2))
    return {"subject": draw(ANY_TEXT), "prompt": draw(ANY_TEXT), "target_new": draw(ANY_TEXT),
            "ground_truth": draw(ANY_TEXT), "portability": {"Reasoning": probes(), "Subject_Aliasing": probes()},
            "locality": {"Relation_Specificity": probes()}}


def _dafset_robust(draw, i):
    rec = _cf_flat(draw, i, case_id=False)
    del rec["subject"]
    rec["prefix"] = draw(st.lists(ANY_TEXT, min_size=1, max_size=3))
    return rec


def _dafset_zsre(draw, i):
    rec = _cf_flat(draw, i, case_id=False)
    if draw(st.booleans()):
        del rec["subject"]
    return rec


CF_FIELDS = [("case_id",), ("prompt",), ("subject",), ("target_new",), ("ground_truth",), ("rephrase_prompt",),
             ("locality_prompt",), ("locality_ground_truth",)]
FORMS = {
    "zsre": Form("zsre", "zsre_mend_eval.json", _zsre,
                 [("src",), ("alt",), ("answers",), ("subject",), ("rephrase",), ("loc",), ("loc_ans",),
                  ("pred",)], False),
    "cf-flat": Form("cf", "counterfact-edit.json", _cf_flat, CF_FIELDS, True),
    "cf-rome": Form("cf", "counterfact.json", _cf_rome,
                    [("case_id",), ("requested_rewrite",), ("requested_rewrite", "prompt"),
                     ("requested_rewrite", "subject"), ("requested_rewrite", "target_new"),
                     ("requested_rewrite", "target_new", "str"), ("requested_rewrite", "target_true", "str"),
                     ("paraphrase_prompts",), ("neighborhood_prompts",)], True),
    "ripe-original": Form("ripe", "popular.json", _ripple_original,
                          [("case_id",), ("edit", "prompt"), ("edit", "relation"), ("edit", "original_fact"),
                           ("Logical_Generalization",), ("Logical_Generalization", 0, "test_queries"),
                           ("Relation_Specificity", 0, "test_queries", 0, "prompt"),
                           ("Relation_Specificity", 0, "test_queries", 0, "answers"),
                           ("Relation_Specificity", 0, "test_queries", 0, "answers", 0, "value")], True),
    "ripe-recipe": Form("ripe", "ripe_test.json", _ripple_recipe,
                        [("case_id",), ("prompt",), ("subject",), ("target_new",), ("ground_truth",),
                         ("Logical_Generalization",), ("Relation_Specificity",)], True),
    "ripe-knowedit": Form("ripe", "recent_train.json", _knowedit,
                          [("prompt",), ("subject",), ("target_new",), ("ground_truth",), ("portability",),
                           ("portability", "Reasoning"), ("portability", "Reasoning", 0, "ground_truth"),
                           ("locality",), ("locality", "Relation_Specificity", 0, "prompt")], False),
    "dafset-robust": Form("dafset", "robust.json", _dafset_robust, CF_FIELDS[1:] + [("prefix",)], False),
    "dafset-zsre": Form("dafset", "zsre_train.json", _dafset_zsre, CF_FIELDS[2:], False),
    "sample": Form("sample", "my_facts.json", _cf_flat, CF_FIELDS, True),
}


def _set(record: dict, path: tuple, value: Any) -> bool:
    """Set ``record[path]``; False when the path does not exist in this record."""
    *parents, last = path
    obj = record
    for key in parents:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(obj, dict) or (isinstance(obj, list) and isinstance(last, int) and last < len(obj)):
        obj[last] = value
        return True
    return False


def _delete(record: dict, path: tuple) -> bool:
    *parents, last = path
    obj = record
    for key in parents:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(obj, dict) and last in obj:
        del obj[last]
        return True
    return False


def _encode(records: list, jsonl: bool) -> bytes:
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    return text.replace(f'"{HUGE_NUMBER}"', "7" * 5000).encode()  # json writes a surrogate as \ud800


def _load(kind: str, path: Path, skip_invalid: bool = False):
    try:
        return load_cases(kind, str(path), skip_invalid=skip_invalid), None
    except DataError as err:
        return None, err


def _by_index(cases) -> dict[int, EditCase]:
    return {int(c.source.rpartition("#")[2]): c for c in cases}


def _assert_well_formed(cases, n_records: int) -> None:
    assert len({c.case_id for c in cases}) == len(cases), "duplicate case ids loaded"
    for c in cases:
        texts = [c.request.prompt, c.request.target_new] + [
            x for ps in (*c.generality.values(), *c.locality.values()) for p in ps for x in (p.prompt, p.target)]
        for t in texts:
            assert t and t == t.strip()
            t.encode("utf-8")  # valid Unicode: no lone surrogate reaches the tokenizer
        for t in (c.request.subject, c.request.ground_truth):
            assert t == t.strip()
            t.encode("utf-8")
        assert 0 <= int(c.source.rpartition("#")[2]) < n_records


def _assert_one_line(err: DataError, file_name: str) -> None:
    assert isinstance(err, DataError)
    assert "\n" not in str(err) and file_name in str(err)


@pytest.mark.parametrize("name", list(FORMS))
@SETTINGS
@given(data=st.data())
def test_damaged_file_loads_unchanged_or_names_the_damaged_record(name, data, caplog):
    form = FORMS[name]
    n = data.draw(st.integers(1, 4), label="records")
    records = [form.make(data.draw, i) for i in range(n)]
    jsonl = data.draw(st.booleans(), label="jsonl")
    file_name = form.file_name + ("l" if jsonl else "")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_bytes(_encode(records, jsonl))
        clean, err = _load(form.kind, path)
        assert err is None, f"a valid file did not load: {err}"
        assert len(clean) == n and clean.n_skipped == 0
        _assert_well_formed(clean, n)

        k = data.draw(st.integers(0, n - 1), label="damaged record")
        damage = data.draw(st.sampled_from(["value", "value", "value", "delete", "not an object", "duplicate id",
                                            "non-UTF-8 byte"]), label="damage")
        damaged = copy.deepcopy(records)
        if damage == "value":
            field = data.draw(st.sampled_from(form.fields), label="field")
            value = data.draw(BAD_VALUES, label="value")
            if not _set(damaged[k], field, value):
                return
            if value == HUGE_NUMBER:  # Python's json cannot read the file at all: a file-level error
                damage = "huge number"
        elif damage == "delete":
            if not _delete(damaged[k], data.draw(st.sampled_from(form.fields), label="field")):
                return
        elif damage == "not an object":
            damaged[k] = data.draw(BAD_VALUES.filter(lambda v: not isinstance(v, dict) and v != HUGE_NUMBER), label="record")
        elif damage == "duplicate id":
            if not form.has_id or n < 2:
                return
            k = max(k, 1)
            damaged[k]["case_id"] = damaged[data.draw(st.integers(0, k - 1), label="first")]["case_id"]
        raw = _encode(damaged, jsonl)
        if damage == "non-UTF-8 byte":
            at = data.draw(st.integers(0, len(raw)), label="offset")
            raw = raw[:at] + b"\xff" + raw[at:]
        path.write_bytes(raw)

        cases, err = _load(form.kind, path)
        if damage in ("non-UTF-8 byte", "huge number"):
            problem = "not UTF-8" if damage == "non-UTF-8 byte" else "unreadable JSON (Exceeds the limit (4300 digits)"
            assert err is not None and problem in str(err) and err.index is None, err
            _assert_one_line(err, file_name)
            return
        if err is None:
            # Harmless damage (an optional field, a value of an accepted type): nothing else changed.
            _assert_well_formed(cases, n)
            skipped_alt = form.kind == "zsre" and cases.n_skipped == 1 and k not in _by_index(cases)
            assert len(cases) + cases.n_skipped == n and (cases.n_skipped == 0 or skipped_alt)
            before, after = _by_index(clean), _by_index(cases)
            for i in before:
                if i != k:
                    assert after[i] == before[i], f"record {i} changed when record {k} was damaged"
            return
        _assert_one_line(err, file_name)
        if damage == "duplicate id":
            assert (err.index, err.field) == (k, "case_id") and "duplicate case_id" in str(err)
        else:
            assert err.index == k, f"error names record {err.index}, record {k} was damaged: {err}"
            assert err.field or damage == "not an object", str(err)

        with caplog.at_level(logging.WARNING, logger="editbench.data"):
            caplog.clear()
            kept, err = _load(form.kind, path, skip_invalid=True)
        assert err is None, f"skip_invalid=True still failed: {err}"
        assert kept.n_skipped == 1 and len(kept) == n - 1 and k not in _by_index(kept)
        assert "skipped 1 record(s)" in caplog.text
        before = _by_index(clean)
        for i, case in _by_index(kept).items():
            assert case == before[i]


@SETTINGS
@given(content=st.binary(max_size=64) | st.sampled_from([b"", b"[", b"{}", b"null", b"[" * 5000 + b"]" * 5000,
                                                         b"[" + b"9" * 6000 + b"]", b"\xef\xbb\xbf[]",
                                                         b"[[[[" * 100_000]),
       name=st.sampled_from(list(FORMS)))
def test_arbitrary_bytes_load_or_raise_one_data_error(content, name):
    """Truncated, binary, deeply nested or huge-number files: DataError, never a crash."""
    form = FORMS[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / form.file_name
        path.write_bytes(content)
        cases, err = _load(form.kind, path)
        if err is not None:
            _assert_one_line(err, form.file_name)
        else:
            assert all(isinstance(c, EditCase) for c in cases)


def test_duplicate_ids_name_both_records_and_skip_invalid_counts_them(tmp_path, caplog):
    rec = {"prompt": "P is", "subject": "P", "target_new": "x", "rephrase_prompt": "r", "locality_prompt": "l",
           "locality_ground_truth": "z"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([dict(rec, case_id=7), dict(rec, case_id=8), dict(rec, case_id="7"),
                                dict(rec)]))  # the last one's id is its index: 3
    with pytest.raises(DataError) as err:
        load_cases("cf", str(path))
    assert str(err.value) == f"{path}, record 2, field 'case_id': duplicate case_id '7' (record 0 has it too)"
    with caplog.at_level(logging.WARNING, logger="editbench.data"):
        cases = load_cases("cf", str(path), skip_invalid=True)
    assert [c.case_id for c in cases] == ["7", "8", "3"] and cases.n_skipped == 1
    assert "skipped 1 record(s)" in caplog.text and "duplicate case_id '7'" in caplog.text


def test_json_that_python_cannot_read_is_a_data_error(tmp_path):
    """Found by the properties above: these used to escape as ValueError/RecursionError."""
    for content, problem in [(b'[{"case_id": ' + b"1" * 5000 + b"}]", "unreadable JSON (Exceeds the limit"),
                             (b"[" * 100_000 + b"]" * 100_000, "unreadable JSON (nested too deeply)")]:
        path = tmp_path / "f.json"
        path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(problem)):
            load_cases("cf", str(path))
        jsonl = tmp_path / "f.jsonl"
        jsonl.write_bytes(b"\n" + content)
        with pytest.raises(DataError, match=re.escape("line 2: " + problem)):
            load_cases("zsre", str(jsonl))


def test_lone_surrogates_are_rejected_with_the_field(tmp_path):
    """Legal JSON (``"\\ud800"``) but not text: the tokenizer would crash on it later."""
    rec = {"case_id": 1, "prompt": "P is", "subject": "P", "target_new": "x\ud800", "rephrase_prompt": "r",
           "locality_prompt": "l", "locality_ground_truth": "z"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(DataError, match=r"record 0, field 'target_new': not valid Unicode text \(lone surrogate"):
        load_cases("cf", str(path))
