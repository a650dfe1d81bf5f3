"""zsRE in the MEND/ROME layout (``zsre_mend_eval.json``, ``zsre_mend_train.json``).

A file is a list (or JSONL) of records
``{subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond}``. The records have
no id, so ``case_id`` is the record index. Mapping (as RECIPE and EasyEdit do):

* request: prompt = ``src``, target_new = ``alt``, subject = ``subject``,
  ground_truth = first non-empty ``answers`` entry, else ``pred``;
* generality ``rephrase``: (``rephrase``, ``alt``);
* locality ``nq``: (``loc``, ``loc_ans``), with ``loc`` kept as-is, including its
  ``"nq question: "`` prefix (EasyEdit's ZsreDataset keeps it too).

``cond`` is ignored. The zsRE files contain a few records whose ``alt`` is empty (record
54 of the eval file; 2 of the first 1,000 training records): they have no edit to make,
so they are always skipped, counted in ``n_skipped`` and reported in a warning.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from editbench.data.common import (
    Cases, as_record, first_alias, optional_str, parse_records, read_records, require_list,
    require_str, source, UnusableRecord,
)
from editbench.records import EditCase, EditRequest, Probe


def load_zsre(path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> Cases:
    """Load a MEND/ROME zsRE file."""
    parse = partial(zsre_case, path=path)
    return parse_records(read_records(path), path, parse, limit, skip_invalid)


def zsre_case(record, index: int, path: str | Path) -> EditCase:
    """One zsRE record as an EditCase."""
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
