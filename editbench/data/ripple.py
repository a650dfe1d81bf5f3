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

   The edit gives its subject and target only as Wikidata ids, plus one sentence that
   states the new fact: a relation phrase about the subject, then the target's label and
   a period (e.g. "The name of the spouse of Ada Lovelace is Charles Babbage."). The
   loader splits it with its own rule, no per-relation table:

   * **target_new**: the record's own regular test queries name ``edit.target_id``
     (a query's k-th answer, ``value`` and ``aliases``, names its k-th ``target_ids``).
     If the sentence, final period dropped (or kept, for a name that ends with a
     period), ends with a space and one of those names, the longest such name is the
     target. Otherwise the sentence is cut after the last occurrence of any of
     :data:`BOUNDARIES` (" is ", " are ", " was ", " by ", " follows "), the words a
     relation phrase ends with, and what follows is the target; so a target that itself
     holds one of them ("Paris is Burning") needs a query that names it. A sentence with
     neither gives a DataError on ``edit.prompt``.
   * **prompt**: the sentence up to the target, trailing space and period dropped.
   * **subject**: what the prompt shares with the prompts of the record's
     ``Relation_Specificity`` and ``Forgetfulness`` test queries whose ``subject_id`` is
     ``edit.subject_id`` (they ask about the same subject, mostly through other
     relations). Prompts are cut into word and punctuation tokens; a candidate is a run of
     whole tokens of the prompt that neither starts nor ends with a :data:`FUNCTION_WORDS`
     word (matched in lower case; the prompt's first token in any case, so "The name of"
     loses its "The" but a title's "The" inside the prompt stays) nor with punctuation
     that is not glued to a word. The candidate found in the most query prompts wins,
     then one with no "is"/"are"/"was" inside, then the longest (tokens, then
     characters), then the later one. A query that holds the whole run of the prompt from
     its first to its last content token (a Forgetfulness query restating the edit)
     cannot tell subject from relation and is ignored. With no usable query or no shared
     candidate the subject is "": editors that locate the subject are expected to fall
     back to the prompt's last token.

   ``edit.relation`` must be a string but is not used. ground_truth is what
   ``original_fact.prompt`` (or ``previous_fact.prompt``) adds after the same prompt; ""
   for ``recent`` edits, which have none.

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

import re
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from editbench.data.common import (
    Cases, alias_probes, as_record, case_id, check_str, fail, families, first_alias, flat_request, optional_list,
    parse_records, read_records, require_dict, require_list, require_str,
    source,
)
from editbench.records import EditCase, EditRequest, Probe

GENERALITY = ("Logical_Generalization", "Compositionality_I", "Compositionality_II",
              "Subject_Aliasing")
LOCALITY = ("Relation_Specificity", "Forgetfulness")
_ALT_SPELLINGS = {"Relation_Specificity": "Relation_Specifity"}

#: Where an edit sentence is cut when no name of its target ends it: after the last
#: occurrence of any of these (a relation phrase ends with one of them).
BOUNDARIES = (" is ", " are ", " was ", " by ", " follows ")
#: Words that join a subject to the rest of a prompt: a derived subject neither starts nor
#: ends with one (lower-case; any case for the prompt's first token).
FUNCTION_WORDS = frozenset({"the", "of", "is", "are", "in", "which", "by", "a", "an"})
#: The categories whose test queries ask other questions about the edit's own subject.
_SUBJECT_FAMILIES = ("Relation_Specificity", "Forgetfulness")
_TOKEN = re.compile(r"[\w'’-]+|[^\w\s]")
_WORD = re.compile(r"\w")
_COPULAS = frozenset({"is", "are", "was"})


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
    probes, queries = {}, []
    for family in GENERALITY + LOCALITY:
        probes[family], family_queries = _category(rec, family, path, index)
        queries += family_queries
    target_id, subject_id = edit.get("target_id"), edit.get("subject_id")
    target_names = [names for q in queries for tid, names in _labels(q) if tid == target_id]
    same_subject = [q.prompt for q in queries if q.family in _SUBJECT_FAMILIES
                    and subject_id is not None and q.subject_id == subject_id]
    prompt, target_new = _split_edit(edit, target_names, path, index)
    request = EditRequest(prompt, target_new, _subject(prompt, same_subject),
                          _old_target(edit, prompt, path, index))
    return _case(rec, index, path, request, {f: probes[f] for f in GENERALITY},
                 {f: probes[f] for f in LOCALITY})


class _Query(NamedTuple):
    """What the loader keeps of one test query besides its probe."""
    family: str
    prompt: str
    subject_id: Any
    query_type: Any
    target_ids: Any
    answers: list[list[str]]


def _category(rec: dict, family: str, path, index: int) -> tuple[list[Probe], list[_Query]]:
    """The probes of one category, and all of its test queries."""
    key = family if family in rec else _ALT_SPELLINGS.get(family, family)
    probes, queries = [], []
    for t, test in enumerate(optional_list(rec, key, path, index)):
        field = f"{key}[{t}]"
        test = as_record(test, path, index, field)
        found = []
        tests = require_list(test, "test_queries", path, index, prefix=field + ".")
        for q, query in enumerate(tests):
            qfield = f"{field}.test_queries[{q}]"
            query = as_record(query, path, index, qfield)
            prompt = require_str(query, "prompt", path, index, prefix=qfield + ".")
            answers = _answers(query, path, index, qfield)
            target = first_alias(answers, path, index, qfield + ".answers")
            if target:
                found.append(Probe(prompt, target))
            queries.append(_Query(family, prompt, query.get("subject_id"),
                                  query.get("query_type", "regular"), query.get("target_ids"),
                                  answers))
        probes += found if test.get("test_condition") == "AND" else found[:1]
    return probes, queries


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


def _labels(query: _Query) -> list[tuple[Any, list[str]]]:
    """(target id, its non-empty names) pairs of a regular query, whose answers follow its
    target_ids: the k-th answer's value and aliases name the k-th target id."""
    if query.query_type != "regular" or not isinstance(query.target_ids, list):
        return []
    return [(tid, [name for name in names if name])
            for tid, names in zip(query.target_ids, query.answers)]


def _without_period(sentence: str) -> str:
    return sentence[:-1].rstrip() if sentence.endswith(".") else sentence


def _split_edit(edit: dict, target_names: list[list[str]], path,
                index: int) -> tuple[str, str]:
    """(prompt, target) of the edit sentence: the target is the longest name of
    ``edit.target_id`` that ends the sentence, else what follows the last boundary word."""
    sentence = require_str(edit, "prompt", path, index, prefix="edit.")
    require_str(edit, "relation", path, index, prefix="edit.")
    body = _without_period(sentence)
    for name in sorted({n for names in target_names for n in names}, key=len, reverse=True):
        for text in (body, sentence):   # a name may end with the sentence's own period
            prompt = text[:-len(name)].rstrip()
            if text.endswith(" " + name) and prompt:
                return prompt, name
    at = max(body.rfind(boundary) for boundary in BOUNDARIES)
    if at == -1:
        fail(path, index, "edit.prompt",
             "cannot find the target: the sentence ends with no name of edit.target_id "
             "and has no boundary word (" + "/".join(b.strip() for b in BOUNDARIES) + ")")
    boundary = next(b for b in BOUNDARIES if body.startswith(b, at))
    return body[:at + len(boundary) - 1], body[at + len(boundary):].strip()


def _tokens(text: str) -> list[re.Match]:
    return list(_TOKEN.finditer(text))


def _subject(prompt: str, query_prompts: list[str]) -> str:
    """The subject in ``prompt``: the span it shares with the most prompts of other queries
    about the same subject, then the longest ("" when there is none); see the docstring."""
    tokens = _tokens(prompt)
    words = [t.group() for t in tokens]
    n = len(words)
    word = [_WORD.search(w) is not None for w in words]
    content = [word[i] and (w.lower() if i == 0 else w) not in FUNCTION_WORDS
               for i, w in enumerate(words)]
    glued = [i + 1 < n and tokens[i].end() == tokens[i + 1].start() for i in range(n)]
    starts = [content[i] or (not word[i] and glued[i]) for i in range(n)]
    ends = [content[j] or (not word[j] and j > 0 and glued[j - 1]) for j in range(n)]
    inner = [i for i in range(n) if content[i]]
    if not inner:
        return ""
    # shared[q][i]: how many tokens from i on occur in a row in query q. A query that holds
    # all of the prompt's content (e.g. a Forgetfulness query, which restates it) is skipped.
    shared = []
    for other in query_prompts:
        theirs = [t.group() for t in _tokens(other)]
        runs, best = [0] * (len(theirs) + 1), [0] * n
        for i in range(n - 1, -1, -1):
            runs = [1 + runs[k + 1] if words[i] == theirs[k] else 0
                    for k in range(len(theirs))] + [0]
            best[i] = max(runs)
        if best[inner[0]] <= inner[-1] - inner[0]:
            shared.append(best)
    top, subject = (0,), ""
    for i in range(n):
        if not starts[i]:
            continue
        for j in range(i, n):
            votes = sum(best[i] > j - i for best in shared)
            if not votes:
                break
            if not ends[j] or not any(content[i:j + 1]):
                continue
            span = prompt[tokens[i].start():tokens[j].end()]
            plain = not any(w.lower() in _COPULAS for w in words[i:j + 1])
            key = (votes, plain, j - i + 1, len(span), i)
            if key > top:
                top, subject = key, span
    return subject


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


def recipe_case(record, index: int, path: str | Path) -> EditCase:
    """One record of RECIPE's flattened RippleEdits as an EditCase."""
    rec = as_record(record, path, index)
    probes = {family: alias_probes(rec, family, "targets", path, index)
              for family in GENERALITY + LOCALITY}
    return _case(rec, index, path, flat_request(rec, path, index),
                 {f: probes[f] for f in GENERALITY}, {f: probes[f] for f in LOCALITY})


def knowedit_case(record, index: int, path: str | Path) -> EditCase:
    """One KnowEdit (WikiData_recent / WikiData_counterfact) record as an EditCase."""
    rec = as_record(record, path, index)
    request = flat_request(rec, path, index)
    sections = {}
    for section in ("portability", "locality"):
        group = {} if rec.get(section) is None else require_dict(rec, section, path, index)
        sections[section] = {family: alias_probes(group, family, "ground_truth", path, index,
                                                     prefix=section + ".")
                             for family in group}
    return _case(rec, index, path, request, sections["portability"], sections["locality"])
