"""RippleEdits (Cohen et al., 2023) in three layouts, told apart by the first record.

Families (DESIGN.md): generality ``Logical_Generalization``, ``Compositionality_I``,
``Compositionality_II``, ``Subject_Aliasing`` (and KnowEdit's ``Reasoning``); locality
``Relation_Specificity``, ``Forgetfulness``. A family with no usable probe is omitted.
A probe's target is the first non-empty alias of its first answer that has one
(:func:`~editbench.data.common.first_alias`); a probe with no alias at all is dropped.

1. **Original benchmark files** (edenbiran/RippleEdits ``data/benchmark/{popular,random,
   recent}.json``): ``{example_type, edit{prompt, subject_id, relation, target_id,
   original_fact?}, <six categories>}``; a category is a list of test cases
   ``{test_queries[{prompt, answers[{value, aliases[]}], query_type, target_ids, ...}],
   test_condition, condition_queries}``. ``Relation_Specifity`` (the README's spelling)
   is read as ``Relation_Specificity``; a missing category is empty.

   The edit holds no subject or target label, only Wikidata ids and a full sentence made
   by RippleEdits as ``relation.phrase(subject) + " " + target + "."`` (``src/fact.py``).
   The loader inverts that with the relation's template (:data:`RELATION_PHRASES`,
   copied from RippleEdits ``src/relation.py``, MIT): the sentence must read
   ``<head> SUBJECT <tail> TARGET.``; request.prompt is ``<head> SUBJECT <tail>``. When
   ``<tail> `` occurs more than once, the split whose TARGET is the label that the
   record's own regular test queries give to ``edit.target_id`` wins, else the first.
   ground_truth is what ``original_fact.prompt`` (``previous_fact`` in RippleEdits'
   code) adds after the same prompt; "" for ``recent`` edits, which have none.

   Each test case gives one probe (its first query with a target) when its
   ``test_condition`` is ``OR``, and one per query when it is ``AND`` (all must hold).
   ``condition_queries`` (preconditions on the unedited model) are not used.

2. **RECIPE's flattened form** (``ripe_train.json``/``ripe_test.json``): ``{prompt,
   subject, target_new, ground_truth?, <category>: [{prompt, targets[]}]}``.

3. **KnowEdit** (``WikiData_recent``/``WikiData_counterfact``, EasyEdit): ``{subject,
   prompt, target_new, ground_truth?, portability{family: [{prompt,
   ground_truth[[aliases]]}]}, locality{family: [...]}}``. Every ``portability`` family
   becomes a generality family and every ``locality`` family a locality family, under
   its own name.

case_id is the record's ``case_id`` if it has one, else its index.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from editbench.data.common import (
    Cases, as_record, case_id, check_str, fail, families, first_alias, optional_list,
    optional_target, parse_records, read_records, require, require_dict, require_list, require_str,
    source,
)
from editbench.records import EditCase, EditRequest, Probe

GENERALITY = ("Logical_Generalization", "Compositionality_I", "Compositionality_II",
              "Subject_Aliasing")
LOCALITY = ("Relation_Specificity", "Forgetfulness")
_ALT_SPELLINGS = {"Relation_Specificity": "Relation_Specifity"}

#: RippleEdits relation name -> the phrase that RippleEdits turns into an edit sentence.
RELATION_PHRASES = {
    "MOTHER": "The name of the mother of <subject> is",
    "FATHER": "The name of the father of <subject> is",
    "BROTHER": "The name of the brother of <subject> is",
    "SISTER": "The name of the sister of <subject> is",
    "SIBLING": "The names of the siblings of <subject> are",
    "SPOUSE": "The name of the spouse of <subject> is",
    "UNCLE": "The name of the uncle of <subject> is",
    "AUNT": "The name of the aunt of <subject> is",
    "CHILD": "The name of the child of <subject> is",
    "NUMBER_OF_CHILDREN": "The number of children <subject> has is",
    "SEX_OR_GENDER": "The gender of <subject> is",
    "PLACE_OF_BIRTH": "The place of birth of <subject> is",
    "PLACE_OF_DEATH": "The place of death of <subject> is",
    "PLACE_OF_BURIAL": "The place of burial of <subject> is",
    "COUNTRY": "The name of the country which <subject> is associated with is",
    "COUNTRY_OF_CITIZENSHIP": "The name of the country of citizenship of <subject> is",
    "POSITION_HELD": "The name of the position held by <subject> is",
    "STEPFATHER": "The name of the stepfather of <subject> is",
    "STEPMOTHER": "The name of the stepmother of <subject> is",
    "MEMBER_OF_SPORTS_TEAM": "The name of the sports team which <subject> is a member of is",
    "ALMA_MATER": "The name of the alma mater of <subject> is",
    "SEXUAL_ORIENTATION": "The sexual orientation of <subject> is",
    "OCCUPATION": "The occupation of <subject> is",
    "EMPLOYER": "The name of the employer of <subject> is",
    "LEAGUE": "The name of the league which <subject> plays in is",
    "FIELD_OF_WORK": "The name of the field of work of <subject> is",
    "NATIVE_LANGUAGE": "The mother tongue of <subject> is",
    "AWARD_RECEIVED": "The name of the award <subject> won is",
    "FOLLOWS": "<subject> follows",
    "FOLLOWED_BY": "<subject> is followed by",
    "ETHNIC_GROUP": "The name of the ethnic group which <subject> is associated with is",
    "RELIGION": "The name of the religion which <subject> is associated with is",
    "EYE_COLOR": "The eye color of <subject> is",
    "DATE_OF_BIRTH": "The date of birth of <subject> is",
    "DATE_OF_DEATH": "The date of death of <subject> is",
    "IS_ALIVE": "Is <subject> still alive?",
    "HEAD_OF_GOVERNMENT": "The name of the head of government of <subject> is",
    "HEAD_OF_STATE": "The name of the head of state of <subject> is",
    "CONTINENT": "The name of the continent which <subject> is part of is",
    "CAPITAL": "The name of the capital city of <subject> is",
    "CURRENCY": "The name of the currency in <subject> is",
    "OFFICIAL_LANGUAGE": "The official language of <subject> is",
    "ANTHEM": "The name of the anthem of <subject> is",
    "LIKELY_ANTHEM": "The name of the anthem that is most likely to be performed in <subject> is",
    "CAPITAL_OF": "The name of the country which <subject> is the capital of is",
    "AUTHOR": "The name of the author of <subject> is",
    "EDITOR": "The name of the editor of <subject> is",
    "DIRECTOR": "The name of the director of <subject> is",
    "SCREENWRITER": "The name of the screenwriter of <subject> is",
    "CAST_MEMBER": "The names of the cast members of <subject> are",
    "ARCHITECT": "The name of the architect of <subject> is",
    "COMPOSER": "The name of the composer of <subject> is",
    "FOUNDER": "The name of the founder of <subject> is",
}


def load_ripple(path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> Cases:
    """Load a RippleEdits file in any of its three layouts (auto-detected)."""
    records = read_records(path)
    parse = {"original": original_case, "knowedit": knowedit_case,
             "recipe": recipe_case}[detect_layout(records)]
    return parse_records(records, path, partial(parse, path=path), limit, skip_invalid)


def detect_layout(records: list) -> str:
    """"original", "knowedit" or "recipe", from the first record that is an object."""
    first = next((r for r in records if isinstance(r, dict)), {})
    if "edit" in first:
        return "original"
    if "portability" in first or isinstance(first.get("locality"), dict):
        return "knowedit"
    return "recipe"


def _case(rec: dict, index: int, path, request: EditRequest,
          generality: dict[str, list[Probe]], locality: dict[str, list[Probe]]) -> EditCase:
    return EditCase(case_id(rec, index, path), request, families(generality),
                    families(locality), source=source(path, index))


# ------------------------------------------------------------------ original benchmark


def original_case(record, index: int, path: str | Path) -> EditCase:
    """One record of the original RippleEdits benchmark as an EditCase."""
    rec = as_record(record, path, index)
    edit = require_dict(rec, "edit", path, index)
    probes, labels = {}, []
    for family in GENERALITY + LOCALITY:
        probes[family], family_labels = _category(rec, family, path, index)
        labels += family_labels
    target_labels = [label for tid, label in labels if tid == edit.get("target_id")]
    prompt, subject, target_new = _split_edit(edit, target_labels, path, index)
    request = EditRequest(prompt, target_new, subject, _old_target(edit, prompt, path, index))
    return _case(rec, index, path, request, {f: probes[f] for f in GENERALITY},
                 {f: probes[f] for f in LOCALITY})


def _category(rec: dict, family: str, path,
              index: int) -> tuple[list[Probe], list[tuple[Any, str]]]:
    """The probes of one category, and the (target id, label) pairs its queries reveal."""
    key = family if family in rec else _ALT_SPELLINGS.get(family, family)
    probes, labels = [], []
    for t, test in enumerate(optional_list(rec, key, path, index)):
        field = f"{key}[{t}]"
        test = as_record(test, path, index, field)
        found = []
        queries = require_list(test, "test_queries", path, index, prefix=field + ".")
        for q, query in enumerate(queries):
            qfield = f"{field}.test_queries[{q}]"
            query = as_record(query, path, index, qfield)
            prompt = require_str(query, "prompt", path, index, prefix=qfield + ".")
            answers = _answers(query, path, index, qfield)
            target = first_alias(answers, path, index, qfield + ".answers")
            if target:
                found.append(Probe(prompt, target))
            labels += _labels(query, answers)
        probes += found if test.get("test_condition") == "AND" else found[:1]
    return probes, labels


def _answers(query: dict, path, index: int, qfield: str) -> list[list[str]]:
    """A query's ``answers[{value, aliases}]`` as alias lists ``[value, *aliases]``."""
    out = []
    for a, answer in enumerate(require_list(query, "answers", path, index, prefix=qfield + ".")):
        afield = f"{qfield}.answers[{a}]"
        answer = as_record(answer, path, index, afield)
        value = require_str(answer, "value", path, index, allow_empty=True, prefix=afield + ".")
        aliases = optional_list(answer, "aliases", path, index, afield + ".")
        aliases = [check_str(alias, path, index, f"{afield}.aliases[{k}]", allow_empty=True)
                   for k, alias in enumerate(aliases)]
        out.append([value, *aliases])
    return out


def _labels(query: dict, answers: list[list[str]]) -> list[tuple[Any, str]]:
    """(target id, label) pairs of a regular query, whose answers follow its target_ids."""
    ids = query.get("target_ids")
    if query.get("query_type", "regular") != "regular" or not isinstance(ids, list):
        return []
    return [(tid, answer[0]) for tid, answer in zip(ids, answers) if answer[0]]


def _without_period(sentence: str) -> str:
    return sentence[:-1].rstrip() if sentence.endswith(".") else sentence


def _split_edit(edit: dict, target_labels: list[str], path, index: int) -> tuple[str, str, str]:
    """(prompt, subject, target) of the edit sentence ``<head> SUBJECT <tail> TARGET.``."""
    sentence = require_str(edit, "prompt", path, index, prefix="edit.")
    relation = require_str(edit, "relation", path, index, prefix="edit.")
    if relation not in RELATION_PHRASES:
        fail(path, index, "edit.relation", f"unknown RippleEdits relation {relation!r}")
    head, tail = RELATION_PHRASES[relation].split("<subject>")
    body = _without_period(sentence)
    splits = []
    if body.startswith(head):
        at = body.find(tail + " ", len(head) + 1)
        while at != -1:
            subject, target = body[len(head):at].strip(), body[at + len(tail) + 1:].strip()
            if subject and target:
                splits.append((body[:at + len(tail)], subject, target))
            at = body.find(tail + " ", at + 1)
    if not splits:
        fail(path, index, "edit.prompt",
             f"does not read {RELATION_PHRASES[relation] + ' <target>.'!r} for relation {relation}")
    return next((s for s in splits if s[2] in target_labels), splits[0])


def _old_target(edit: dict, prompt: str, path, index: int) -> str:
    """The target that ``original_fact`` states after the edit's own prompt ("" if none)."""
    key = "original_fact" if "original_fact" in edit else "previous_fact"
    if edit.get(key) is None:
        return ""
    fact = require_dict(edit, key, path, index, prefix="edit.")
    body = _without_period(require_str(fact, "prompt", path, index, prefix=f"edit.{key}."))
    if body == prompt:
        return ""
    if not body.startswith(prompt + " "):
        fail(path, index, f"edit.{key}.prompt", f"does not start with the edit prompt {prompt!r}")
    return body[len(prompt) + 1:].strip()


# ------------------------------------------------------------------ RECIPE, KnowEdit


def _request(rec: dict, path, index: int) -> EditRequest:
    """The request of a RECIPE or KnowEdit record (flat prompt/subject/target_new)."""
    return EditRequest(require_str(rec, "prompt", path, index),
                       require_str(rec, "target_new", path, index),
                       require_str(rec, "subject", path, index),
                       optional_target(rec, "ground_truth", path, index))


def recipe_case(record, index: int, path: str | Path) -> EditCase:
    """One record of RECIPE's flattened RippleEdits as an EditCase."""
    rec = as_record(record, path, index)
    probes = {family: _prompt_targets(rec, family, "targets", path, index)
              for family in GENERALITY + LOCALITY}
    return _case(rec, index, path, _request(rec, path, index),
                 {f: probes[f] for f in GENERALITY}, {f: probes[f] for f in LOCALITY})


def knowedit_case(record, index: int, path: str | Path) -> EditCase:
    """One KnowEdit (WikiData_recent / WikiData_counterfact) record as an EditCase."""
    rec = as_record(record, path, index)
    request = _request(rec, path, index)
    sections = {}
    for section in ("portability", "locality"):
        group = {} if rec.get(section) is None else require_dict(rec, section, path, index)
        sections[section] = {family: _prompt_targets(group, family, "ground_truth", path, index,
                                                     prefix=section + ".")
                             for family in group}
    return _case(rec, index, path, request, sections["portability"], sections["locality"])


def _prompt_targets(obj: dict, key: str, target_key: str, path, index: int,
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
