"""The embedded offline default dataset (``data=sample``).

``sample_facts.json`` ships inside the package: 40 counterfactual edits of well-known
facts (capitals, languages, continents, professions, founders, landmarks...), written by
this project in the flat CounterFact layout (``case_id, prompt, subject, target_new,
ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``). Each locality
prompt is a true fact about a subject that no sample edit touches, so a sequence of
sample edits never legitimately changes another case's locality answer. It is read by
the CounterFact loader, so its families are ``rephrase`` and ``neighborhood``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from editbench.data.common import Cases
from editbench.data.counterfact import load_counterfact

SAMPLE_FILE = "sample_facts.json"


def load_sample(path: str | Path | None = None, limit: int | None = None,
                skip_invalid: bool = False) -> Cases:
    """Load the packaged sample edits, or a file in the same layout when ``path`` is given."""
    if path is not None:
        return load_counterfact(path, limit, skip_invalid)
    with resources.as_file(resources.files(__package__) / SAMPLE_FILE) as packaged:
        return load_counterfact(packaged, limit, skip_invalid)
