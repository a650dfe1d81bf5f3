"""Dataset loaders: the real files under ../shared/data, fixtures in the formats that are
not there (ROME's counterfact.json, RippleEdits' original and RECIPE-flattened files,
DAFSet parts), one-line DataErrors for every kind of corruption, skip_invalid, and
property tests (any JSON either loads or raises DataError)."""
from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editbench.data import LOADERS, load_cases
from editbench.data.dafset import PREFIX_WORDS
from editbench.records import DataError, EditCase, EditRequest, Probe
from tests.conftest import shared

# (kind, file under ../shared/data, records in the file, records the loader skips)
REAL_FILES = [
    ("zsre", "zsre/zsre_mend_eval.head72.json", 72, 1),     # record 54 has an empty `alt`
    ("zsre", "zsre/zsre_mend_train.1k.json", 1000, 2),      # records 534, 723: empty `alt`
    ("zsre", "zsre/ZsRE-test.knowedit.1k.json", 1000, 0),   # KnowEdit layout
    ("cf", "counterfact/counterfact-edit.json", 10000, 0),
    ("cf", "counterfact/counterfact-train.json", 10000, 0),
    ("dafset", "dafset/cf_train.json", 10000, 0),
    ("ripe", "ripple/wiki_recent_train.knowedit.json", 570, 0),
]


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def assert_well_formed(cases: list[EditCase]) -> None:
    """Every prompt and target non-empty and stripped; case ids unique; sources set."""
    assert len({c.case_id for c in cases}) == len(cases)
    for case in cases:
        r = case.request
        assert r.prompt and r.prompt == r.prompt.strip()
        assert r.target_new and r.target_new == r.target_new.strip()
        assert r.ground_truth == r.ground_truth.strip()
        assert "#" in case.source
        for kind in ("generality", "locality"):
            for family, probes in getattr(case, kind).items():
                assert probes, f"empty family {family} kept"
                for p in probes:
                    assert p.prompt and p.prompt == p.prompt.strip()
                    assert p.target and p.target == p.target.strip()


def assert_one_line_error(err: DataError, file_name: str, index: int | None = None,
                          field: str | None = None) -> None:
    message = str(err)
    assert "\n" not in message
    assert file_name in message
    if index is not None:
        assert re.search(rf", record {index}[,:]", message)
    if field is not None:
        assert f"field '{field}'" in message


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real():
    """(kind, relative path) -> (cases, raw records), each big file loaded once."""
    loaded = {}
    for kind, rel, _, _ in REAL_FILES:
        path = shared(rel)
        loaded[kind, rel] = (load_cases(kind, str(path)),
                             json.loads(path.read_text(encoding="utf-8")))
    return loaded


@pytest.mark.real
@pytest.mark.parametrize("kind,rel,n_records,n_skipped", REAL_FILES)
def test_real_file_loads_every_record(real, kind, rel, n_records, n_skipped):
    cases, raw = real[kind, rel]
    assert len(raw) == n_records
    assert cases.n_skipped == n_skipped
    assert len(cases) == n_records - n_skipped
    assert_well_formed(cases)


@pytest.mark.real
def test_real_zsre_record0_matches_raw(real):
    cases, raw = real["zsre", "zsre/zsre_mend_eval.head72.json"]
    case, rec = cases[0], raw[0]
    assert case.case_id == "0"
    assert case.request.prompt == rec["src"] and case.request.target_new == rec["alt"]
    assert case.request.subject == rec["subject"]
    assert case.request.ground_truth == rec["answers"][0]
    assert case.generality["rephrase"][0].prompt == rec["rephrase"]
    assert case.generality["rephrase"][0].target == rec["alt"]
    loc = case.locality["nq"][0]
    assert loc.prompt == rec["loc"] and loc.prompt.startswith("nq question: ")
    assert loc.target == rec["loc_ans"]
    # the record with an empty `alt` is gone; the ones after it keep their index as id
    assert "54" not in {c.case_id for c in cases} and cases[54].case_id == "55"


@pytest.mark.real
def test_real_zsre_knowedit_file_matches_raw(real):
    cases, raw = real["zsre", "zsre/ZsRE-test.knowedit.1k.json"]
    assert len(cases) == 1000 and cases.n_skipped == 0
    assert [c.case_id for c in cases] == [f"zsre-ke-{i}" for i in range(1000)]
    assert cases[999].source.endswith("ZsRE-test.knowedit.1k.json#999")
    def probe(prompt, target):   # texts are stripped (9 target_new have a leading space)
        return Probe(prompt.strip(), target.strip())

    for case, rec in zip(cases, raw):
        r = case.request
        assert (r.prompt, r.subject, r.target_new, r.ground_truth) == tuple(
            rec[k].strip() for k in ("prompt", "subject", "target_new")) + (rec["ground_truth"][0],)
        assert case.generality["rephrase"] == [probe(rec["rephrase_prompt"], rec["target_new"])]
        assert case.locality == {"Relation_Specificity": [
            probe(p["prompt"], p["ground_truth"][0]) for p in rec["locality"]["Relation_Specificity"]]}
        # every portability family is a generality family under its own name (as for RippleEdits)
        assert case.generality == {"rephrase": case.generality["rephrase"], **{
            fam: [probe(p["prompt"], p["ground_truth"]) for p in probes]
            for fam, probes in rec["portability"].items()}}
        assert case.portability == {}
    counts = Counter(f for c in cases for f in c.generality)
    assert counts == {"rephrase": 1000, "Reasoning": 589, "Logical_Generalization": 210,
                      "Subject_Aliasing": 201}
    assert {f for c in cases for f in c.locality} == {"Relation_Specificity"}


@pytest.mark.real
@pytest.mark.parametrize("rel", ["counterfact/counterfact-edit.json",
                                 "counterfact/counterfact-train.json"])
def test_real_counterfact_record0_matches_raw(real, rel):
    cases, raw = real["cf", rel]
    case, rec = cases[0], raw[0]
    assert case.case_id == str(rec["case_id"])
    assert (case.request.prompt, case.request.subject) == (rec["prompt"], rec["subject"])
    assert (case.request.target_new, case.request.ground_truth) == (rec["target_new"],
                                                                   rec["ground_truth"])
    assert [(p.prompt, p.target) for p in case.generality["rephrase"]] == [
        (rec["rephrase_prompt"], rec["target_new"])]
    assert [(p.prompt, p.target) for p in case.locality["neighborhood"]] == [
        (rec["locality_prompt"], rec["locality_ground_truth"])]


@pytest.mark.real
def test_real_dafset_part_record0_matches_raw(real):
    cases, raw = real["dafset", "dafset/cf_train.json"]
    case, rec = cases[0], raw[0]
    assert case.case_id == "cf:0" and cases[-1].case_id == "cf:9999"
    assert case.request.prompt == rec["prompt"] and case.request.subject == rec["subject"]
    assert case.request.ground_truth == ""           # DAFSet's cf part has none
    assert case.locality["locality"][0].target == rec["locality_ground_truth"]


@pytest.mark.real
def test_real_dafset_folder_is_its_cf_part(real):
    folder = load_cases("dafset", str(shared("dafset")), limit=5)
    assert [c.case_id for c in folder] == ["cf:0", "cf:1", "cf:2", "cf:3", "cf:4"]
    assert folder[:5] == real["dafset", "dafset/cf_train.json"][0][:5]


@pytest.mark.real
def test_real_knowedit_record_matches_raw(real):
    cases, raw = real["ripe", "ripple/wiki_recent_train.knowedit.json"]
    case, rec = cases[0], raw[0]
    assert (case.request.prompt, case.request.subject, case.request.target_new) == (
        rec["prompt"], rec["subject"], rec["target_new"])
    assert case.generality == {}                      # record 0 has no portability probes
    first = rec["locality"]["Relation_Specificity"][0]
    assert case.locality["Relation_Specificity"][0].prompt == first["prompt"]
    assert case.locality["Relation_Specificity"][0].target == first["ground_truth"][0][0]
    families = {f for c in cases for f in c.generality} | {f for c in cases for f in c.locality}
    assert families == {"Logical_Generalization", "Reasoning", "Subject_Aliasing",
                        "Relation_Specificity", "Forgetfulness"}
    # record 3: the first answer's alias list is empty, so the second answer is scored
    award = [p for p in cases[3].locality["Relation_Specificity"] if "award" in p.prompt]
    assert [p.target for p in award] == ["Honorary Doctor at Karolinska Institutet"]
    # record 138: a probe whose answers are all empty is dropped
    positions = [p for p in cases[138].locality.get("Relation_Specificity", [])
                 if "position held" in p.prompt]
    assert positions == []


def as_original_ripple(rec: dict) -> dict:
    """A KnowEdit record rewritten in the original RippleEdits layout: its prompt and
    target_new as the edit sentence, its locality prompts as queries about its subject."""
    def about_subject(family):
        return [ripple_test(query(item["prompt"], [(item["ground_truth"][0][0], [])], ["Q0"],
                                  subject_id="S"))
                for item in rec["locality"].get(family, []) if item["ground_truth"][0]]
    return {"edit": {"prompt": f"{rec['prompt']} {rec['target_new']}.", "subject_id": "S",
                     "relation": "R", "target_id": "T"},
            "Relation_Specificity": about_subject("Relation_Specificity"),
            "Forgetfulness": about_subject("Forgetfulness")}


@pytest.mark.real
def test_real_knowedit_records_split_like_their_own_fields(real, tmp_path):
    """The edit-sentence split, run on the real KnowEdit records (which name their subject
    and target): every prompt and target comes back; a subject is either the record's own,
    or part of it (record 457's queries call its subject only "Peder Siöblad"), or "" when
    no query but a Forgetfulness one is about it."""
    _, raw = real["ripe", "ripple/wiki_recent_train.knowedit.json"]
    cases = load_cases("ripe", str(write_json(tmp_path / "recent.json",
                                              [as_original_ripple(rec) for rec in raw])))
    got = [(c.request.prompt, c.request.target_new) for c in cases]
    assert got == [(rec["prompt"], rec["target_new"]) for rec in raw]
    subjects = [(c.request.subject, rec["subject"]) for c, rec in zip(cases, raw)]
    assert all(mine in theirs for mine, theirs in subjects)
    assert sum(mine == theirs for mine, theirs in subjects) >= 400          # of 570
    informative = [i for i, rec in enumerate(raw) if rec["locality"].get("Relation_Specificity")]
    assert all(cases[i].request.subject for i in informative)


@pytest.mark.real
def test_limit_keeps_the_first_cases(real):
    rel = "counterfact/counterfact-edit.json"
    head = load_cases("cf", str(shared(rel)), limit=3)
    assert head == real["cf", rel][0][:3]


# --------------------------------------------------------------------------- sample


def test_sample_is_packaged_and_well_formed():
    cases = load_cases("sample", None)
    assert len(cases) == 40 and cases.n_skipped == 0
    assert_well_formed(cases)
    edit_subjects = {c.request.subject.lower() for c in cases}
    for case in cases:
        r = case.request
        assert r.subject in r.prompt, "ROME-style editors locate the subject in the prompt"
        assert r.target_new != r.ground_truth and r.ground_truth
        assert set(case.generality) == {"rephrase"} and set(case.locality) == {"neighborhood"}
        loc_prompt = case.locality["neighborhood"][0].prompt.lower()
        assert not any(s in loc_prompt for s in edit_subjects), "locality subject is edited"
    assert cases[0].request.prompt == "The capital of France is"
    assert cases[0].source.endswith("sample_facts.json#0")


def test_sample_with_a_path_reads_that_file(tmp_path):
    rec = {"prompt": "The capital of Peru is", "subject": "Peru", "target_new": "Quito",
           "ground_truth": "Lima", "rephrase_prompt": "Peru's capital is",
           "locality_prompt": "The capital of Chile is", "locality_ground_truth": "Santiago"}
    cases = load_cases("sample", str(write_json(tmp_path / "mine.json", [rec])))
    assert [c.request.target_new for c in cases] == ["Quito"]


def test_load_cases_rejects_unknown_kind_and_missing_path():
    with pytest.raises(ValueError, match="valid kinds: cf, dafset, ripe, sample, zsre"):
        load_cases("mquake", "x.json")
    with pytest.raises(ValueError, match="needs a path"):
        load_cases("zsre", None)
    with pytest.raises(ValueError, match="limit"):
        load_cases("sample", None, limit=-1)
    assert set(LOADERS) == {"sample", "zsre", "cf", "ripe", "dafset"}


# --------------------------------------------------------------------------- fixtures


def rome_record(case_id: int = 0) -> dict:
    """A record of ROME's original counterfact.json (its record 0)."""
    return {
        "case_id": case_id, "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle "
                               "Darrieux, a native", "An album was recorded for Capitol "
                               "Nashville but never released. Danielle Darrieux spoke the "
                               "language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is",
                                 "The native language of Montesquieu is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


def test_rome_counterfact_layout(tmp_path):
    path = write_json(tmp_path / "counterfact.json", [rome_record(0), rome_record(7)])
    cases = load_cases("cf", str(path))
    assert [c.case_id for c in cases] == ["0", "7"]
    r = cases[0].request
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    assert [p.target for p in cases[0].generality["paraphrase"]] == ["English", "English"]
    assert cases[0].generality["paraphrase"][0].prompt.endswith("Danielle Darrieux, a native")
    assert [(p.prompt, p.target) for p in cases[0].locality["neighborhood"]] == [
        ("The mother tongue of Léon Blum is", "French"),
        ("The native language of Montesquieu is", "French")]
    assert set(cases[0].generality) == {"paraphrase"} and set(cases[0].locality) == {"neighborhood"}


def test_flat_counterfact_accepts_prompt_lists(tmp_path):
    rec = {"prompt": " The capital of Peru is ", "subject": "Peru", "target_new": " Quito ",
           "rephrase_prompt": ["Peru's capital is", "The Peruvian capital is"],
           "locality_prompt": ["The capital of Chile is", "The capital of Bolivia is"],
           "locality_ground_truth": ["Santiago", "Sucre"]}
    case = load_cases("cf", str(write_json(tmp_path / "cf.json", [rec])))[0]
    assert case.case_id == "0" and case.request.ground_truth == ""
    assert (case.request.prompt, case.request.target_new) == ("The capital of Peru is", "Quito")
    assert [p.target for p in case.generality["rephrase"]] == ["Quito", "Quito"]
    assert [p.target for p in case.locality["neighborhood"]] == ["Santiago", "Sucre"]
    rec["locality_ground_truth"] = ["Santiago"]
    with pytest.raises(DataError, match="1 targets for 2 locality prompts"):
        load_cases("cf", str(write_json(tmp_path / "cf.json", [rec])))


def query(prompt: str, answers: list[tuple[str, list[str]]], target_ids: list,
          query_type: str = "regular", subject_id: str = "Q1") -> dict:
    return {"prompt": prompt, "answers": [{"value": v, "aliases": a} for v, a in answers],
            "query_type": query_type, "subject_id": subject_id, "relation": "X",
            "target_ids": target_ids, "phrase": None}


def ripple_test(*queries: dict, condition: str = "OR") -> dict:
    return {"test_queries": list(queries), "test_condition": condition,
            "condition_queries": [query("ignored", [("ignored", [])], ["Q0"])]}


def ripple_record() -> dict:
    """A 'popular' record of the original RippleEdits benchmark (README's example)."""
    return {
        "example_type": "popular",
        "edit": {
            "prompt": "The name of the country of citizenship of Leonardo DiCaprio is Syria.",
            "subject_id": "Q38111", "relation": "COUNTRY_OF_CITIZENSHIP", "target_id": "Q858",
            "original_fact": {
                "prompt": "The name of the country of citizenship of Leonardo DiCaprio is "
                          "United States of America.",
                "subject_id": "Q38111", "relation": "COUNTRY_OF_CITIZENSHIP",
                "target_id": "Q30"}},
        "Relation_Specificity": [ripple_test(query(
            "The name of the mother of Leonardo DiCaprio is",
            [("Irmelin DiCaprio", ["Irmelin Indenbirken"])], ["Q22984557"],
            subject_id="Q38111"))],
        "Logical_Generalization": [ripple_test(
            query("The official language of Leonardo DiCaprio's country is",
                  [("Arabic", ["Arabic language"])], ["Q13955"]),
            query("Leonardo DiCaprio is a citizen of", [("Syria", [])], ["Q858"]),
            condition="AND")],
        "Subject_Aliasing": [ripple_test(
            query("The name of the country of citizenship of Leo DiCaprio is",
                  [("Syria", ["Syrian Arab Republic"])], ["Q858"], subject_id="Q38111"),
            query("The name of the country of citizenship of Leonardo Wilhelm DiCaprio is",
                  [("Syria", [])], ["Q858"], subject_id="Q38111"))],
        "Compositionality_I": [ripple_test(query(
            "The name of the capital city of the country of citizenship of Leonardo DiCaprio is",
            [("Damascus", [])], ["Q858"], query_type="two_hop"))],
        "Compositionality_II": [ripple_test(query("No answer here is", [("", [])], ["Q5"]))],
        "Forgetfulness": [],
    }


def test_ripple_original_layout(tmp_path):
    recent = ripple_record()
    recent["example_type"] = "recent"
    del recent["edit"]["original_fact"]
    recent["Relation_Specifity"] = recent.pop("Relation_Specificity")  # README's spelling
    cases = load_cases("ripe", str(write_json(tmp_path / "popular.json",
                                              [ripple_record(), recent])))
    r = cases[0].request
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        "The name of the country of citizenship of Leonardo DiCaprio is", "Leonardo DiCaprio",
        "Syria", "United States of America")
    gen = cases[0].generality
    assert set(gen) == {"Logical_Generalization", "Subject_Aliasing", "Compositionality_I"}
    assert [p.target for p in gen["Logical_Generalization"]] == ["Arabic", "Syria"]  # AND: all
    assert [p.prompt for p in gen["Subject_Aliasing"]] == [                          # OR: first
        "The name of the country of citizenship of Leo DiCaprio is"]
    assert gen["Compositionality_I"][0].target == "Damascus"
    assert [(p.prompt, p.target) for p in cases[0].locality["Relation_Specificity"]] == [
        ("The name of the mother of Leonardo DiCaprio is", "Irmelin DiCaprio")]
    assert "Forgetfulness" not in cases[0].locality
    assert cases[1].request.ground_truth == "" and cases[1].request.target_new == "Syria"
    assert cases[1].locality == cases[0].locality


def load_ripple_record(tmp_path, rec: dict):
    return load_cases("ripe", str(write_json(tmp_path / "popular.json", [rec])))[0].request


def sequel_record() -> dict:
    """A counterfactual FOLLOWED_BY edit whose target holds " is ": only the test query
    that names ``target_id`` (here through an alias) tells where the target starts."""
    film = "Q1530"
    return {
        "example_type": "random",
        "edit": {"prompt": "Madonna: Truth or Dare is followed by Paris is Burning.",
                 "subject_id": film, "relation": "FOLLOWED_BY", "target_id": "Q2048",
                 "original_fact": {"prompt": "Madonna: Truth or Dare is followed by Body of "
                                             "Evidence.", "subject_id": film,
                                   "relation": "FOLLOWED_BY", "target_id": "Q1192"}},
        "Relation_Specificity": [
            ripple_test(query("The name of the director of Madonna: Truth or Dare is",
                              [("Alek Keshishian", [])], ["Q2834"], subject_id=film)),
            ripple_test(query("The names of the cast members of Madonna: Truth or Dare are",
                              [("Madonna", ["Madonna Louise Ciccone"])], ["Q1744"],
                              subject_id=film))],
        "Subject_Aliasing": [ripple_test(query(
            "In Bed with Madonna is followed by",
            [("Paris Is Burning (documentary)", ["Paris is Burning"])], ["Q2048"],
            subject_id=film))],
        "Logical_Generalization": [ripple_test(query(
            "Paris is Burning follows", [("Madonna: Truth or Dare", [])], [film],
            subject_id="Q2048"))],
        "Forgetfulness": [],
    }


def test_ripple_target_named_by_a_test_query(tmp_path):
    r = load_ripple_record(tmp_path, sequel_record())
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        "Madonna: Truth or Dare is followed by", "Madonna: Truth or Dare", "Paris is Burning",
        "Body of Evidence")


def test_ripple_without_a_naming_query_the_target_follows_the_last_boundary(tmp_path):
    rec = sequel_record()
    del rec["Subject_Aliasing"], rec["edit"]["original_fact"]
    r = load_ripple_record(tmp_path, rec)
    assert (r.prompt, r.subject, r.target_new) == (
        "Madonna: Truth or Dare is followed by Paris is", "Madonna: Truth or Dare", "Burning")


def spouse_record() -> dict:
    """A counterfactual SPOUSE edit: no test query names the new spouse (``target_id``),
    so the sentence is split after its last " is "; the subject comes from the queries
    about other relations of Ada Lovelace."""
    ada = "Q7259"
    return {
        "example_type": "popular",
        "edit": {"prompt": "The name of the spouse of Ada Lovelace is Charles Babbage.",
                 "subject_id": ada, "relation": "SPOUSE", "target_id": "Q46633",
                 "original_fact": {
                     "prompt": "The name of the spouse of Ada Lovelace is William King-Noel, "
                               "1st Earl of Lovelace.",
                     "subject_id": ada, "relation": "SPOUSE", "target_id": "Q7183"}},
        "Relation_Specificity": [
            ripple_test(query("The name of the father of Ada Lovelace is",
                              [("Lord Byron", ["George Gordon Byron"])], ["Q5679"],
                              subject_id=ada)),
            ripple_test(query("The gender of Ada Lovelace is", [("female", ["woman"])],
                              ["Q6581072"], subject_id=ada)),
            ripple_test(query("The occupation of Ada Lovelace is",
                              [("mathematician", []), ("writer", [])], ["Q170790", "Q36180"],
                              subject_id=ada))],
        "Forgetfulness": [ripple_test(query(
            "The name of the spouse of Ada Lovelace, which is not Charles Babbage, is",
            [("William King-Noel, 1st Earl of Lovelace", [])], ["Q7183"], subject_id=ada))],
        "Logical_Generalization": [ripple_test(query(
            "The name of the spouse of Charles Babbage is", [("Ada Lovelace", [])], [ada],
            subject_id="Q46633"))],
        "Subject_Aliasing": [ripple_test(query(
            "The name of the spouse of Augusta Ada King is",
            [("Charles Babbage", [])], ["Q46633"], query_type="other", subject_id=ada))],
    }


def test_ripple_fallback_split_and_subject_from_other_relations(tmp_path):
    case = load_cases("ripe", str(write_json(tmp_path / "popular.json", [spouse_record()])))[0]
    r = case.request
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        "The name of the spouse of Ada Lovelace is", "Ada Lovelace", "Charles Babbage",
        "William King-Noel, 1st Earl of Lovelace")
    assert [p.target for p in case.locality["Relation_Specificity"]] == [
        "Lord Byron", "female", "mathematician"]


def test_ripple_subject_is_empty_without_a_query_about_the_same_subject(tmp_path):
    rec = spouse_record()
    for test in rec["Relation_Specificity"]:
        test["test_queries"][0]["subject_id"] = "Q5679"       # now about someone else
    # Left: the Forgetfulness query, which restates the whole prompt and cannot place the
    # subject, and queries of other categories, which are not used for it.
    r = load_ripple_record(tmp_path, rec)
    assert (r.prompt, r.subject, r.target_new) == (
        "The name of the spouse of Ada Lovelace is", "", "Charles Babbage")
    rec = spouse_record()
    del rec["edit"]["subject_id"]
    assert load_ripple_record(tmp_path, rec).subject == ""


@pytest.mark.parametrize("sentence,prompt,target", [
    ("The name of the position held by Angela Merkel is Pope.",
     "The name of the position held by Angela Merkel is", "Pope"),
    ("The names of the siblings of Venus Williams are Serena Williams.",
     "The names of the siblings of Venus Williams are", "Serena Williams"),
    ("Windows 8.1 follows Windows 8.", "Windows 8.1 follows", "Windows 8"),
    ("The Two Towers is followed by The Return of the King.",
     "The Two Towers is followed by", "The Return of the King"),
    ("The Eiffel Tower was designed by Gustave Eiffel.", "The Eiffel Tower was designed by",
     "Gustave Eiffel"),
])
def test_ripple_boundary_split(tmp_path, sentence, prompt, target):
    rec = ripple_record()
    rec["edit"] = {"prompt": sentence, "subject_id": "Q2", "relation": "R", "target_id": "Q9"}
    r = load_ripple_record(tmp_path, rec)
    assert (r.prompt, r.target_new, r.subject) == (prompt, target, "")


def recipe_ripple_record() -> dict:
    return {"example_type": "popular",
            "prompt": "The name of the country of citizenship of Leonardo DiCaprio is",
            "subject": "Leonardo DiCaprio", "target_new": "Syria",
            "ground_truth": "United States of America",
            "Logical_Generalization": [{"prompt": "Leonardo DiCaprio is a citizen of",
                                        "targets": ["", "Syria", "Syrian Arab Republic"]}],
            "Compositionality_I": [{"prompt": "The capital of DiCaprio's country is",
                                    "targets": ["Damascus"]}],
            "Compositionality_II": [],
            "Subject_Aliasing": [{"prompt": "Leo DiCaprio is a citizen of", "targets": [""]}],
            "Relation_Specificity": [{"prompt": "The name of the mother of Leonardo DiCaprio is",
                                      "targets": ["Irmelin DiCaprio"]}],
            "Forgetfulness": []}


def test_ripple_recipe_flattened_layout(tmp_path):
    recent = recipe_ripple_record()
    recent["example_type"] = "recent"
    del recent["ground_truth"]
    cases = load_cases("ripe", str(write_json(tmp_path / "ripe_test.json",
                                              [recipe_ripple_record(), recent])))
    case = cases[0]
    assert (case.request.subject, case.request.target_new, case.request.ground_truth) == (
        "Leonardo DiCaprio", "Syria", "United States of America")
    assert {f: [p.target for p in ps] for f, ps in case.generality.items()} == {
        "Logical_Generalization": ["Syria"], "Compositionality_I": ["Damascus"]}
    assert list(case.locality) == ["Relation_Specificity"]
    assert cases[1].request.ground_truth == ""


def test_knowedit_fixture_with_string_ground_truths(tmp_path):
    rec = {"subject": "Lac Otelnuk", "prompt": "Lac Otelnuk is located in",
           "target_new": "Canada", "ground_truth": ["Quebec"],
           "portability": {"Reasoning": [{"prompt": "Its capital is", "ground_truth": "Ottawa"}],
                           "Logical_Generalization": []},
           "locality": {"Forgetfulness": [{"prompt": "x is", "ground_truth": [["", "y"]]}]}}
    case = load_cases("ripe", str(write_json(tmp_path / "k.json", [rec])))[0]
    assert case.request.ground_truth == "Quebec"
    assert case.generality == {"Reasoning": [case.generality["Reasoning"][0]]}
    assert case.generality["Reasoning"][0].target == "Ottawa"
    assert case.locality["Forgetfulness"][0].target == "y"


def zsre_ke_record(i: int = 0) -> dict:
    """A KnowEdit ZsRE record (EasyEdit's layout), as in ZsRE-test-all.json."""
    return {"subject": f"Lake {i}", "target_new": f"Country {i}",
            "prompt": f"Which country is Lake {i} in?", "ground_truth": [f"Old {i}"],
            "rephrase_prompt": f"Lake {i} lies in which country?", "cond": "x >> y || z",
            "locality": {"Relation_Specificity": [
                {"prompt": f"The area of Lake {i} is", "ground_truth": [f"{i} km2"]}]},
            "portability": {"Reasoning": [
                {"prompt": f"The capital of the country of Lake {i} is", "ground_truth": f"City {i}"}]}}


def mend_record(i: int = 0) -> dict:
    return {"subject": "S", "src": f"Q{i}?", "pred": "p", "rephrase": f"R{i}?", "alt": f"A{i}",
            "answers": ["a"], "loc": "nq question: l", "loc_ans": "L", "cond": ""}


def test_zsre_knowedit_layout_maps_field_by_field(tmp_path):
    rec = zsre_ke_record(0)
    rec["ground_truth"] = ["  ", "Finland", "Suomi"]
    rec["portability"] = {
        "Reasoning": [{"prompt": "Its capital is", "ground_truth": " Helsinki "}],
        "Subject_Aliasing": [{"prompt": "Lake Zero is in", "ground_truth": ["", "Sweden", "Sverige"]},
                             {"prompt": "No answer", "ground_truth": [[""], []]}],   # dropped
        "Logical_Generalization": [{"prompt": "Its neighbour is",
                                    "ground_truth": [[], ["Norway", "Noreg"], ["Russia"]]}],
        "Empty": []}
    rec["locality"]["Relation_Specificity"].append({"prompt": "Lake 0 flows into",
                                                    "ground_truth": [["", "Baltic Sea"]]})
    second = zsre_ke_record(1)
    del second["ground_truth"], second["portability"]
    second["locality"] = None
    path = write_json(tmp_path / "ZsRE-test-all.json", [rec, second])
    cases = load_cases("zsre", str(path))
    case = cases[0]
    assert case.case_id == "zsre-ke-0" and case.source == f"{path}#0"
    assert case.request == EditRequest("Which country is Lake 0 in?", "Country 0", "Lake 0", "Finland")
    assert case.generality == {
        "rephrase": [Probe("Lake 0 lies in which country?", "Country 0")],
        "Reasoning": [Probe("Its capital is", "Helsinki")],
        "Subject_Aliasing": [Probe("Lake Zero is in", "Sweden")],        # first alias
        "Logical_Generalization": [Probe("Its neighbour is", "Norway")]}  # first alias of the first answer with one
    assert case.locality == {"Relation_Specificity": [Probe("The area of Lake 0 is", "0 km2"),
                                                      Probe("Lake 0 flows into", "Baltic Sea")]}
    assert case.portability == {}
    assert cases[1].case_id == "zsre-ke-1" and cases[1].request.ground_truth == ""
    assert set(cases[1].generality) == {"rephrase"} and cases[1].locality == {}
    assert_well_formed(cases)


@pytest.mark.parametrize("mutate,field", [
    (lambda rec: rec.pop("target_new"), "target_new"),
    (lambda rec: rec.update(rephrase_prompt=["Lake 7 lies in?"]), "rephrase_prompt"),
    (lambda rec: rec["locality"]["Relation_Specificity"][0].pop("prompt"),
     "locality.Relation_Specificity[0].prompt"),
    (lambda rec: rec["portability"].update(Reasoning=[{"prompt": "p", "ground_truth": 3}]),
     "portability.Reasoning[0].ground_truth"),
    (lambda rec: rec["portability"].update(rephrase=[{"prompt": "p", "ground_truth": "g"}]),
     "portability.rephrase"),
])
def test_zsre_knowedit_bad_field_names_file_record_and_field(tmp_path, mutate, field):
    records = [zsre_ke_record(i) for i in range(10)]
    mutate(records[7])
    path = write_json(tmp_path / "ZsRE-test-all.json", records)
    with pytest.raises(DataError) as err:
        load_cases("zsre", str(path))
    assert_one_line_error(err.value, "ZsRE-test-all.json", 7, field)
    assert (err.value.index, err.value.field) == (7, field)


def test_zsre_file_mixing_the_layouts_is_a_data_error(tmp_path, caplog):
    mend_first = write_json(tmp_path / "mixed.json", [mend_record(0), mend_record(1), zsre_ke_record(2)])
    with pytest.raises(DataError, match=r"KnowEdit-layout record in a file in the MEND layout "
                                        r"\(detected from record 0\); a file must use one zsRE layout") as err:
        load_cases("zsre", str(mend_first))
    assert_one_line_error(err.value, "mixed.json", 2, "prompt")
    knowedit_first = write_json(tmp_path / "mixed2.json", [zsre_ke_record(0), zsre_ke_record(1), mend_record(2)])
    with pytest.raises(DataError, match="MEND-layout record in a file in the KnowEdit layout") as err:
        load_cases("zsre", str(knowedit_first))
    assert_one_line_error(err.value, "mixed2.json", 2, "src")
    both = write_json(tmp_path / "both.json", [{**mend_record(0), **zsre_ke_record(0)}, mend_record(1)])
    with pytest.raises(DataError, match="mixes the zsRE layouts") as err:
        load_cases("zsre", str(both))
    assert_one_line_error(err.value, "both.json", 0, "prompt")
    # skip_invalid drops the records of the other layout; the file's layout is its first record's
    with caplog.at_level(logging.WARNING, logger="editbench.data"):
        cases = load_cases("zsre", str(mend_first), skip_invalid=True)
    assert [c.case_id for c in cases] == ["0", "1"] and cases.n_skipped == 1


def zsre_like(i: int, **extra) -> dict:
    return {"prompt": f"What is the capital of country {i}?", "target_new": f"City {i}",
            "rephrase_prompt": f"Country {i} has which capital?",
            "locality_prompt": f"nq question: who wrote book {i}",
            "locality_ground_truth": f"Author {i}", **extra}


def long_text(n_words: int, tag: str) -> str:
    return " ".join(f"{tag}{k}" for k in range(n_words))


@pytest.fixture
def dafset_dir(tmp_path) -> Path:
    folder = tmp_path / "comprehensive"
    (folder / "wikitext" / "wikitext-103-raw-v1").mkdir(parents=True)
    write_json(folder / "zsre_train.json", [zsre_like(0), zsre_like(1)])
    write_json(folder / "recent.json", [zsre_like(2)])
    write_json(folder / "robust.json", [
        zsre_like(3, prefix=[long_text(40, "a"), long_text(40, "b")]),
        zsre_like(4, prefix=["A short prefix."])])
    write_json(folder / "notes.json", {"not": "a part"})
    return folder


def test_dafset_folder_loads_present_parts_in_order(dafset_dir):
    cases = load_cases("dafset", str(dafset_dir))
    assert [c.case_id for c in cases] == ["zsre:0", "zsre:1", "recent:0", "robust:0", "robust:1"]
    assert all(c.request.subject == "" and c.request.ground_truth == "" for c in cases)
    assert cases[0].locality["locality"][0].target == "Author 0"
    assert_well_formed(cases)


def test_dafset_robust_prefixes_are_cut_and_deterministic(dafset_dir):
    robust = load_cases("dafset", str(dafset_dir / "robust.json"))
    assert [c.case_id for c in robust] == ["robust:0", "robust:1"]
    rephrase = robust[0].generality["rephrase"][0].prompt
    locality = robust[0].locality["locality"][0].prompt
    for prompt, original in ((rephrase, "Country 3 has which capital?"),
                             (locality, "nq question: who wrote book 3")):
        prefix = prompt[: -len(original)]
        assert prompt.endswith(original) and prefix.endswith(". ")
        words = prefix[:-2].split(" ")
        assert len(words) == PREFIX_WORDS and words[0] in ("a0", "b0")
    assert robust[1].generality["rephrase"][0].prompt == (
        "A short prefix. Country 4 has which capital?")
    again = load_cases("dafset", str(dafset_dir / "robust.json"))
    assert again == robust


def test_dafset_limit_spans_parts_and_empty_folder_fails(dafset_dir, tmp_path):
    assert [c.case_id for c in load_cases("dafset", str(dafset_dir), limit=3)] == [
        "zsre:0", "zsre:1", "recent:0"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DAFSet part") as err:
        load_cases("dafset", str(tmp_path / "empty"))
    assert_one_line_error(err.value, "empty")


def test_jsonl_files_load_and_name_the_bad_line(tmp_path):
    path = tmp_path / "cf.jsonl"
    rec = recipe_ripple_record()
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_cases("ripe", str(path))
    assert_one_line_error(err.value, "cf.jsonl")
    assert "line 4" in str(err.value)
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    assert len(load_cases("ripe", str(path))) == 2


# --------------------------------------------------------------------------- corruption

# kind, a function giving >= 30 valid records, the file name the loader is given, and
# corruptions of record 7: (description, mutate(record), field named in the error).


def real_head(rel: str):
    return lambda: json.loads(shared(rel).read_text(encoding="utf-8"))[:30]


def repeat(make):
    return lambda: [make() for _ in range(30)]


def _delete(*keys):
    def mutate(rec):
        for key in keys[:-1]:
            rec = rec[key]
        del rec[keys[-1]]
    return mutate


def _set(value, *keys):
    def mutate(rec):
        for key in keys[:-1]:
            rec = rec[key]
        rec[keys[-1]] = value
    return mutate


CORRUPTIONS = {
    "zsre": (real_head("zsre/zsre_mend_eval.head72.json"), "zsre_mend_eval.json", [
        (_delete("src"), "src"), (_set(17, "loc_ans"), "loc_ans"), (_set(" ", "loc_ans"), "loc_ans"),
        (_set("x", "answers"), "answers"), (_set([3], "answers"), "answers[0]")]),
    "zsre-knowedit": (lambda: [zsre_ke_record(i) for i in range(30)], "ZsRE-test-all.json", [
        (_delete("target_new"), "target_new"), (_set(17, "rephrase_prompt"), "rephrase_prompt"),
        (_delete("locality", "Relation_Specificity", 0, "prompt"), "locality.Relation_Specificity[0].prompt"),
        (_set([], "locality"), "locality"), (_set(" ", "prompt"), "prompt"),
        (_set([[""], [5]], "portability", "Reasoning", 0, "ground_truth"),
         "portability.Reasoning[0].ground_truth[1][0]")]),
    "cf": (real_head("counterfact/counterfact-edit.json"), "counterfact-edit.json", [
        (_delete("prompt"), "prompt"), (_set(17, "target_new"), "target_new"),
        (_set("", "target_new"), "target_new"), (_set(True, "case_id"), "case_id"),
        (_set(["ok", 5], "rephrase_prompt"), "rephrase_prompt[1]"),
        (_set(None, "locality_prompt"), "locality_prompt")]),
    "cf-rome": (lambda: [rome_record(i) for i in range(30)], "counterfact.json", [
        (_delete("requested_rewrite", "subject"), "requested_rewrite.subject"),
        (_set(17, "requested_rewrite", "target_new", "str"), "requested_rewrite.target_new.str"),
        (_set("", "requested_rewrite", "target_true", "str"), "requested_rewrite.target_true.str"),
        (_set("The mother tongue of Danielle Darrieux is", "requested_rewrite", "prompt"),
         "requested_rewrite.prompt"),
        (_set("x", "neighborhood_prompts"), "neighborhood_prompts"), (_set([1], "paraphrase_prompts"),
                                                    "paraphrase_prompts[0]")]),
    "ripe": (real_head("ripple/wiki_recent_train.knowedit.json"), "recent_train.json", [
        (_delete("target_new"), "target_new"), (_set(17, "subject"), "subject"),
        (_set("", "target_new"), "target_new"), (_set([], "locality"), "locality"),
        (_set({"Forgetfulness": [{"prompt": "x", "ground_truth": 5}]}, "locality"),
         "locality.Forgetfulness[0].ground_truth")]),
    "ripe-original": (repeat(ripple_record), "popular.json", [
        (_delete("edit", "relation"), "edit.relation"),
        (_set(["COUNTRY_OF_CITIZENSHIP"], "edit", "relation"), "edit.relation"),
        (_set("Leonardo DiCaprio, a citizen of Mars.", "edit", "prompt"), "edit.prompt"),
        (_set("The name of the mother of X is Y.", "edit", "original_fact", "prompt"),
         "edit.original_fact.prompt"),
        (_set({"value": 3}, "Relation_Specificity", 0, "test_queries", 0, "answers", 0),
         "Relation_Specificity[0].test_queries[0].answers[0].value"),
        (_set("x", "Forgetfulness"), "Forgetfulness")]),
    "ripe-recipe": (repeat(recipe_ripple_record), "ripe_test.json", [
        (_delete("subject"), "subject"), (_set(5, "Compositionality_I", 0, "targets"),
                                          "Compositionality_I[0].targets"),
        (_delete("Relation_Specificity", 0, "prompt"), "Relation_Specificity[0].prompt")]),
    "dafset": (real_head("dafset/cf_train.json"), "cf_train.json", [
        (_delete("locality_ground_truth"), "locality_ground_truth"),
        (_set(17, "target_new"), "target_new"), (_set("  ", "prompt"), "prompt")]),
    "dafset-robust": (lambda: [zsre_like(i, prefix=["p q r."]) for i in range(30)],
                      "robust.json", [(_set("p", "prefix"), "prefix"),
                                      (_set([], "prefix"), "prefix"),
                                      (_set([""], "prefix"), "prefix[0]")]),
    "sample": (lambda: json.loads((Path(__file__).parents[1] / "editbench" / "data" /
                                   "sample_facts.json").read_text(encoding="utf-8"))[:30],
               "my_facts.json", [(_delete("subject"), "subject")]),
}
CORRUPTION_CASES = [(name, i) for name, (_, _, mutations) in CORRUPTIONS.items()
                    for i in range(len(mutations))]


def loader_kind(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name,which", CORRUPTION_CASES)
def test_corrupt_record_7_names_file_record_and_field(tmp_path, name, which):
    records_of, file_name, mutations = CORRUPTIONS[name]
    mutate, field = mutations[which]
    records = records_of()
    mutate(records[7])
    path = write_json(tmp_path / file_name, records)
    with pytest.raises(DataError) as err:
        load_cases(loader_kind(name), str(path))
    assert_one_line_error(err.value, file_name, 7, field)
    assert (err.value.index, err.value.field) == (7, field)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_record_that_is_not_an_object(tmp_path, name):
    records_of, file_name, _ = CORRUPTIONS[name]
    records = records_of()
    records[7] = ["not", "an", "object"]
    with pytest.raises(DataError, match="expected an object, got list") as err:
        load_cases(loader_kind(name), str(write_json(tmp_path / file_name, records)))
    assert_one_line_error(err.value, file_name, 7)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("damage,problem", [
    (lambda text: text[: len(text) // 2].encode(), "invalid JSON at line"),
    (lambda text: text.encode()[:100] + b"\xff\xfe" + text.encode()[100:], "not UTF-8"),
    (lambda text: json.dumps({"data": json.loads(text)}).encode(), "must be a list"),
    (lambda text: b"", "invalid JSON"),
])
def test_file_level_damage(tmp_path, name, damage, problem):
    records_of, file_name, _ = CORRUPTIONS[name]
    path = tmp_path / file_name
    path.write_bytes(damage(json.dumps(records_of(), ensure_ascii=False)))
    with pytest.raises(DataError, match=problem) as err:
        load_cases(loader_kind(name), str(path))
    assert_one_line_error(err.value, file_name)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read file") as err:
        load_cases("zsre", str(tmp_path / "nope.json"))
    assert_one_line_error(err.value, "nope.json")


# --------------------------------------------------------------------------- skip_invalid


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_skip_invalid_skips_and_counts(tmp_path, name, caplog):
    records_of, file_name, mutations = CORRUPTIONS[name]
    records = records_of()
    for index in (3, 7):
        mutations[0][0](records[index])
    path = write_json(tmp_path / file_name, records)
    with pytest.raises(DataError, match="record 3,"):
        load_cases(loader_kind(name), str(path))
    with caplog.at_level(logging.WARNING, logger="editbench.data"):
        cases = load_cases(loader_kind(name), str(path), skip_invalid=True)
    assert cases.n_skipped == 2 and len(cases) == 28
    assert "skipped 2 record(s)" in caplog.text and "record 3," in caplog.text
    assert isinstance(cases, list) and all(isinstance(c, EditCase) for c in cases)


def test_zsre_empty_alt_is_always_skipped(tmp_path, caplog):
    records = [{"subject": "S", "src": f"Q{i}?", "pred": "p", "rephrase": f"R{i}?",
                "alt": "" if i == 1 else f"A{i}", "answers": [], "loc": "nq question: l",
                "loc_ans": "L", "cond": ""} for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="editbench.data"):
        cases = load_cases("zsre", str(write_json(tmp_path / "z.json", records)))
    assert [c.case_id for c in cases] == ["0", "2"] and cases.n_skipped == 1
    assert cases[0].request.ground_truth == "p"       # `answers` empty: falls back to pred
    assert "field 'alt': empty string" in caplog.text


# --------------------------------------------------------------------------- properties

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)

FIELD_NAMES = sorted({
    "subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "case_id",
    "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
    "locality_ground_truth", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
    "edit", "relation", "portability", "locality", "prefix", "targets", "test_queries",
    "Relation_Specificity", "Logical_Generalization", "Forgetfulness", "str", "value"})

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def load_or_data_error(kind: str, file_name: str, content: bytes) -> None:
    """Load ``content`` as ``file_name``: it must give EditCases or raise DataError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_bytes(content)
        try:
            cases = load_cases(kind, str(path), skip_invalid=False)
        except DataError as err:
            assert "\n" not in str(err) and file_name in str(err)
            return
        assert all(isinstance(c, EditCase) for c in cases)


KINDS_AND_FILES = [("zsre", "z.json"), ("cf", "c.json"), ("ripe", "r.json"),
                   ("dafset", "robust.json"), ("sample", "s.json")]


@PROPERTY_SETTINGS
@given(kind_file=st.sampled_from(KINDS_AND_FILES),
       records=st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5),
                                        JSON, max_size=8), max_size=3))
def test_random_records_load_or_raise_data_error(kind_file, records):
    kind, file_name = kind_file
    load_or_data_error(kind, file_name, json.dumps(records).encode())


@PROPERTY_SETTINGS
@given(kind_file=st.sampled_from(KINDS_AND_FILES), content=st.binary(max_size=40) | st.text(
    max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_random_bytes_load_or_raise_data_error(kind_file, content):
    load_or_data_error(*kind_file, content)


def mutate_somewhere(value, data):
    """``value`` with one nested element replaced by random JSON, or deleted."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.booleans()):
            del value[key]
        else:
            value[key] = mutate_somewhere(value[key], data)
        return value
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = mutate_somewhere(value[i], data)
        return value
    return data.draw(JSON)


VALID_RECORDS = [
    ("zsre", "z.json", {"subject": "S", "src": "Q?", "pred": "p", "rephrase": "R?", "alt": "A",
                        "answers": ["a", "b"], "loc": "nq question: l", "loc_ans": "L",
                        "cond": "c"}),
    ("zsre", "z.json", zsre_ke_record()),
    ("cf", "c.json", rome_record()),
    ("cf", "c.json", zsre_like(0, subject="country 0", case_id=3)),
    ("ripe", "r.json", ripple_record()),
    ("ripe", "r.json", recipe_ripple_record()),
    ("ripe", "r.json", {"subject": "S", "prompt": "S is", "target_new": "T",
                        "portability": {"Reasoning": [{"prompt": "p", "ground_truth": [["g"]]}]},
                        "locality": {"Forgetfulness": [{"prompt": "q", "ground_truth": ["h"]}]}}),
    ("dafset", "robust.json", zsre_like(0, prefix=["a b c", "d e."])),
]


@PROPERTY_SETTINGS
@given(which=st.sampled_from(range(len(VALID_RECORDS))), data=st.data())
def test_mutated_valid_records_load_or_raise_data_error(which, data):
    kind, file_name, record = VALID_RECORDS[which]
    mutated = mutate_somewhere(copy.deepcopy(record), data)
    load_or_data_error(kind, file_name, json.dumps([record, mutated]).encode())
