"""CounterFact, in two layouts, told apart by the first record (``requested_rewrite``).

(a) The flat layout of RECIPE, DAFNet and EasyEdit (``counterfact-edit.json``,
``counterfact-train.json``): records ``{case_id, prompt, subject, target_new,
ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}``. DAFSet's
``cf_train.json`` lacks ``case_id`` and ``ground_truth`` (then case_id = record index and
ground_truth = ""). ``rephrase_prompt`` and ``locality_prompt`` may be a string or a list
of strings; ``locality_ground_truth`` is one string for all locality prompts or a list
of the same length. Families: generality ``rephrase`` (target_new), locality
``neighborhood`` (locality_ground_truth).

(b) ROME's original ``counterfact.json``: records ``{case_id, pararel_idx,
requested_rewrite{prompt, subject, relation_id, target_new{str, id}, target_true{str,
id}}, paraphrase_prompts[], neighborhood_prompts[], attribute_prompts[],
generation_prompts[]}``. The prompt holds ``"{}"`` where the subject goes. Families:
generality ``paraphrase`` (target_new), locality ``neighborhood`` (target_true), as in
ROME's evaluation. ``attribute_prompts`` and ``generation_prompts`` are not probes of this
harness and are ignored.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from editbench.data.common import (
    Cases, as_record, case_id, fail, families, optional_str, parse_records, read_records,
    require_dict, require_str, require_str_list, source, str_or_list,
)
from editbench.records import EditCase, EditRequest, Probe


def load_counterfact(path: str | Path, limit: int | None = None,
                     skip_invalid: bool = False) -> Cases:
    """Load a CounterFact file in the flat or in ROME's layout (auto-detected)."""
    records = read_records(path)
    parse = rome_case if is_rome_layout(records) else flat_case
    return parse_records(records, path, partial(parse, path=path), limit, skip_invalid)


def is_rome_layout(records: list) -> bool:
    """Whether the first record that is an object has ROME's ``requested_rewrite``."""
    first = next((r for r in records if isinstance(r, dict)), {})
    return "requested_rewrite" in first


def flat_case(record, index: int, path: str | Path, *, cid: str | None = None,
              subject_required: bool = True, locality_family: str = "neighborhood") -> EditCase:
    """One flat CounterFact record as an EditCase.

    DAFSet reuses this for its zsRE-like parts, which have no subject
    (``subject_required=False``) and whose locality prompts are not CounterFact neighbours.
    """
    rec = as_record(record, path, index)
    target_new = require_str(rec, "target_new", path, index)
    subject = (require_str(rec, "subject", path, index) if subject_required
               else optional_str(rec, "subject", path, index))
    request = EditRequest(require_str(rec, "prompt", path, index), target_new, subject,
                          optional_str(rec, "ground_truth", path, index))
    rephrase = [Probe(p, target_new) for p in str_or_list(rec, "rephrase_prompt", path, index)]
    return EditCase(
        case_id=cid if cid is not None else case_id(rec, index, path),
        request=request,
        generality=families({"rephrase": rephrase}),
        locality=families({locality_family: _locality_probes(rec, index, path)}),
        source=source(path, index),
    )


def _locality_probes(rec: dict, index: int, path) -> list[Probe]:
    prompts = str_or_list(rec, "locality_prompt", path, index)
    targets = str_or_list(rec, "locality_ground_truth", path, index)
    if isinstance(rec["locality_ground_truth"], str):
        targets = targets * len(prompts)
    elif len(targets) != len(prompts):
        fail(path, index, "locality_ground_truth",
             f"{len(targets)} targets for {len(prompts)} locality prompts")
    return [Probe(p, t) for p, t in zip(prompts, targets)]


def rome_case(record, index: int, path: str | Path) -> EditCase:
    """One record of ROME's ``counterfact.json`` as an EditCase."""
    rec = as_record(record, path, index)
    rewrite = require_dict(rec, "requested_rewrite", path, index)
    pre = "requested_rewrite."
    subject = require_str(rewrite, "subject", path, index, prefix=pre)
    template = require_str(rewrite, "prompt", path, index, prefix=pre)
    if "{}" not in template:
        fail(path, index, pre + "prompt", 'no "{}" placeholder for the subject')
    target_new = _target_str(rewrite, "target_new", path, index)
    target_true = _target_str(rewrite, "target_true", path, index)
    paraphrase = [Probe(p, target_new)
                  for p in require_str_list(rec, "paraphrase_prompts", path, index)]
    neighborhood = [Probe(p, target_true)
                    for p in require_str_list(rec, "neighborhood_prompts", path, index)]
    return EditCase(
        case_id=case_id(rec, index, path),
        request=EditRequest(template.replace("{}", subject), target_new, subject, target_true),
        generality=families({"paraphrase": paraphrase}),
        locality=families({"neighborhood": neighborhood}),
        source=source(path, index),
    )


def _target_str(rewrite: dict, key: str, path, index: int) -> str:
    target = require_dict(rewrite, key, path, index, prefix="requested_rewrite.")
    return require_str(target, "str", path, index, prefix=f"requested_rewrite.{key}.")
