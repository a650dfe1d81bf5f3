"""zsRE in two layouts, told apart per file: MEND/ROME's and KnowEdit's (EasyEdit).

1. **MEND/ROME** (``zsre_mend_eval.json``, ``zsre_mend_train.json``): records
   ``{subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond}``. The records
   have no id, so ``case_id`` is the record index. Mapping (as RECIPE and EasyEdit do):

   * request: prompt = ``src``, target_new = ``alt``, subject = ``subject``,
     ground_truth = first non-empty ``answers`` entry, else ``pred``;
   * generality ``rephrase``: (``rephrase``, ``alt``);
   * locality ``nq``: (``loc``, ``loc_ans``), with ``loc`` kept as-is, including its
     ``"nq question: "`` prefix (EasyEdit's ZsreDataset keeps it too).

   ``cond`` is ignored. The zsRE files contain a few records whose ``alt`` is empty (record
   54 of the eval file; 2 of the first 1,000 training records): they have no edit to make,
   so they are always skipped, counted in ``n_skipped`` and reported in a warning.

2. **KnowEdit ZsRE** (EasyEdit's benchmark layout, ``ZsRE-test-all.json``): records
   ``{subject, prompt, target_new, ground_truth[], rephrase_prompt, cond,
   locality{family: [{prompt, ground_truth}]}, portability{family: [{prompt,
   ground_truth}]}}``. The records have no id: ``case_id`` is ``"zsre-ke-<index>"``.

   * request: (``prompt``, ``target_new``, ``subject``, ground_truth = the first non-empty
     entry of ``ground_truth``, or "" when it is absent);
   * generality ``rephrase``: (``rephrase_prompt``, ``target_new``);
   * every ``locality`` family (the real file has only ``Relation_Specificity``: other
     relations of the same subject) is a locality family under its own name. It is not
     renamed ``nq``: these are not the MEND layout's NQ questions, and the RippleEdits
     loader gives KnowEdit's ``Relation_Specificity`` the same name;
   * every ``portability`` family (``Reasoning``, ``Logical_Generalization``,
     ``Subject_Aliasing``) is a *generality* family under its own name, exactly as the
     RippleEdits loader reads KnowEdit's portability: the scorer reports it as
     ``generality/<family>``, beside ``generality/rephrase`` (``EditCase.portability``
     is not scored). A family named ``rephrase`` would clash and is a DataError.

   A probe's ``ground_truth`` may be a string, a list of aliases or a list of alias
   lists; its target is :func:`~editbench.data.common.first_alias` (the first non-empty
   alias of the first answer that has one), and a probe with no alias at all is dropped.
   ``locality`` and ``portability`` may be absent or null; a family with no usable probe
   is omitted. ``cond`` is ignored.

**Detection.** A record is in the KnowEdit layout when it has any of
:data:`KNOWEDIT_FIELDS` and in the MEND layout when it has any of :data:`MEND_FIELDS`.
The file's layout is that of its first record (that is an object) which has fields of
one layout only; a file with none is read as MEND (so a record with neither names MEND's
missing ``src``). Every record is then read in the file's layout: a record with a field of
the other layout is a DataError naming that field (a file must not mix the layouts;
skipped and counted under ``skip_invalid``).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from editbench.data.common import (
    Cases, alias_probes, as_record, fail, families, first_alias, flat_request, optional_str, parse_records,
    read_records, require_dict, require_list, require_str, source, UnusableRecord,
)
from editbench.records import EditCase, EditRequest, Probe

#: The fields only a MEND/ROME record has, and those only a KnowEdit record has
#: (``subject`` and ``cond`` are in both).
MEND_FIELDS = ("src", "alt", "pred", "answers", "rephrase", "loc", "loc_ans")
KNOWEDIT_FIELDS = ("prompt", "target_new", "ground_truth", "rephrase_prompt", "locality",
                   "portability")
_LAYOUTS = {"mend": ("MEND", MEND_FIELDS), "knowedit": ("KnowEdit", KNOWEDIT_FIELDS)}


def load_zsre(path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> Cases:
    """Load a zsRE file in the MEND/ROME or the KnowEdit layout (auto-detected)."""
    records = read_records(path)
    layout, first = detect_layout(records)
    parse = {"mend": zsre_case, "knowedit": knowedit_case}[layout]
    return parse_records(records, path, partial(_in_layout, parse=parse, layout=layout,
                                                first=first, path=path), limit, skip_invalid)


def record_layouts(record) -> set[str]:
    """The layouts ("mend", "knowedit") whose own fields ``record`` has."""
    if not isinstance(record, dict):
        return set()
    return {name for name, (_, fields) in _LAYOUTS.items() if any(f in record for f in fields)}


def detect_layout(records: list) -> tuple[str, int | None]:
    """(layout, index of the record it was read from): the layout of the first record with
    the fields of one layout only; ("mend", None) when there is none."""
    for index, record in enumerate(records):
        layouts = record_layouts(record)
        if len(layouts) == 1:
            return layouts.pop(), index
    return "mend", None


def _in_layout(record, index: int, parse, layout: str, first: int | None,
               path: str | Path) -> EditCase:
    """``parse(record)`` after checking that the record has no field of the other layout."""
    rec = as_record(record, path, index)
    name, own = _LAYOUTS[layout]
    other_name, other = _LAYOUTS["knowedit" if layout == "mend" else "mend"]
    foreign = [f for f in other if f in rec]
    if foreign:
        mine = [f for f in own if f in rec]
        if mine:
            problem = (f"the record mixes the zsRE layouts ({name} field {mine[0]!r}, "
                       f"{other_name} field {foreign[0]!r})")
        else:
            problem = (f"a {other_name}-layout record in a file in the {name} layout "
                       f"(detected from record {first})")
        fail(path, index, foreign[0], problem + "; a file must use one zsRE layout")
    return parse(rec, index, path=path)


# --------------------------------------------------------------------------- MEND/ROME


def zsre_case(record, index: int, path: str | Path) -> EditCase:
    """One MEND/ROME zsRE record as an EditCase."""
    rec = as_record(record, path, index)
    prompt = require_str(rec, "src", path, index)
    target_new = require_str(rec, "alt", path, index, allow_empty=True)
    if not target_new:
        raise UnusableRecord(path, index, "alt", "empty string (no new target to edit)")
    answers = require_list(rec, "answers", path, index)
    ground_truth = (first_alias(answers, path, index, "answers")
                    or optional_str(rec, "pred", path, index))
    subject = require_str(rec, "subject", path, index)
    return EditCase(
        case_id=str(index),
        request=EditRequest(prompt, target_new, subject, ground_truth),
        generality={"rephrase": [Probe(require_str(rec, "rephrase", path, index), target_new)]},
        locality={"nq": [Probe(require_str(rec, "loc", path, index),
                               require_str(rec, "loc_ans", path, index))]},
        source=source(path, index),
    )


# --------------------------------------------------------------------------- KnowEdit


def knowedit_case(record, index: int, path: str | Path) -> EditCase:
    """One KnowEdit ZsRE record as an EditCase (portability families are generality ones)."""
    rec = as_record(record, path, index)
    request = flat_request(rec, path, index)
    generality = {"rephrase": [Probe(require_str(rec, "rephrase_prompt", path, index),
                                     request.target_new)]}
    locality = {}
    for section, probes in (("portability", generality), ("locality", locality)):
        group = {} if rec.get(section) is None else require_dict(rec, section, path, index)
        for family in group:
            if family in probes:
                fail(path, index, f"{section}.{family}",
                     f"family name {family!r} is taken by rephrase_prompt's probe")
            probes[family] = alias_probes(group, family, "ground_truth", path, index,
                                             prefix=section + ".")
    return EditCase(f"zsre-ke-{index}", request, families(generality), families(locality),
                    source=source(path, index))
