"""DAFSet, DAFNet's meta-training set (qizhou000/DAFNet ``data/meta-train/comprehensive/``).

``path`` is that folder or one of its part files. Parts, read in DAFNet's order when
present (case_id = ``"<part>:<index>"``):

=================  ===========  ===================================================
file               part         records
=================  ===========  ===================================================
cf_train.json      cf           flat CounterFact without case_id/ground_truth
zsre_train.json    zsre         zsRE-like: prompt, target_new, rephrase_prompt,
long_tail.json     long_tail      locality_prompt, locality_ground_truth
popular.json       popular        (subject when present)
recent.json        recent
robust.json        robust       the same plus ``prefix``: a list of distractor texts
=================  ===========  ===================================================

Every part goes through the flat CounterFact parser
(:func:`editbench.data.counterfact.flat_case`) with families ``rephrase`` and
``locality``. For ``robust``, as in DAFNet's ``get_robust_data``, each rephrase and
locality prompt gets a prefix: one of the record's ``prefix`` texts, cut to its first 30
words and ended with ". " (or " " after a final period). DAFNet draws it at random at
every use; here the draw is seeded by ``(seed, record index)`` so a load is reproducible.

``wikitext/`` (DAFNet's ``wiki_base``: wikitext-103 paragraphs used as extra locality
text during training) and any other file are ignored. A single file whose name is not a
part above is read as a zsRE-like part named after its stem. A folder with no part is an
error.
"""
from __future__ import annotations

import random
from functools import partial
from pathlib import Path

from editbench.data.common import (
    Cases, fail, parse_records, read_records, require_str_list,
)
from editbench.data.counterfact import flat_case
from editbench.records import EditCase, Probe

PARTS = {"cf_train.json": "cf", "zsre_train.json": "zsre", "long_tail.json": "long_tail",
         "popular.json": "popular", "recent.json": "recent", "robust.json": "robust"}
PREFIX_WORDS = 30


def load_dafset(path: str | Path, limit: int | None = None, skip_invalid: bool = False,
                seed: int = 0) -> Cases:
    """Load a DAFSet folder (every part present) or a single part file."""
    cases = Cases()
    for file, part in part_files(Path(path)):
        if limit is not None and len(cases) >= limit:
            break
        remaining = None if limit is None else limit - len(cases)
        parse = partial(dafset_case, path=file, part=part, seed=seed)
        loaded = parse_records(read_records(file), file, parse, remaining, skip_invalid)
        cases.extend(loaded)
        cases.n_skipped += loaded.n_skipped
    return cases


def part_files(path: Path) -> list[tuple[Path, str]]:
    """(file, part name) of each DAFSet part at ``path`` (a folder or one file)."""
    if not path.is_dir():
        return [(path, PARTS.get(path.name, path.stem))]
    found = [(path / name, part) for name, part in PARTS.items() if (path / name).is_file()]
    if not found:
        fail(path, None, None, f"no DAFSet part in folder (expected any of {', '.join(PARTS)})")
    return found


def dafset_case(record, index: int, path: Path, part: str, seed: int) -> EditCase:
    """One record of a DAFSet part as an EditCase."""
    case = flat_case(record, index, path, cid=f"{part}:{index}", subject_required=False,
                     locality_family="locality")
    if part == "robust":
        prefixes = require_str_list(record, "prefix", path, index)
        if not prefixes:
            fail(path, index, "prefix", "empty list")
        rng = random.Random(f"{seed}:{index}")
        case.generality = _prefixed(case.generality, prefixes, rng)
        case.locality = _prefixed(case.locality, prefixes, rng)
    return case


def _prefixed(probes: dict[str, list[Probe]], prefixes: list[str],
              rng: random.Random) -> dict[str, list[Probe]]:
    return {family: [Probe(_draw_prefix(prefixes, rng) + p.prompt, p.target) for p in ps]
            for family, ps in probes.items()}


def _draw_prefix(prefixes: list[str], rng: random.Random) -> str:
    prefix = " ".join(rng.choice(prefixes).split(" ")[:PREFIX_WORDS])
    return prefix + (" " if prefix.endswith(".") else ". ")
