"""The records every loader returns and every editor consumes.

A loader turns a dataset file into a list of :class:`EditCase`; nothing downstream
knows which dataset a case came from. Errors found while reading a file are raised as
:class:`DataError`, whose message is one line naming the file, the record and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    """A (prompt, target) pair scored by teacher forcing on the target tokens."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One requested edit: make ``prompt`` continue with ``target_new``.

    ``subject`` is the entity the fact is about (locate-then-edit editors need it);
    ``ground_truth`` is the old answer when the dataset knows it (may be empty).
    """

    prompt: str
    target_new: str
    subject: str = ""
    ground_truth: str = ""


@dataclass
class EditCase:
    """One edit and the probes that measure it.

    ``generality`` and ``locality`` map a probe family name (``rephrase``,
    ``Logical_Generalization``, ``neighborhood``...) to its probes. ``source`` is
    ``"<file>#<index>"`` so that any later error can point at the record.
    """

    case_id: str
    request: EditRequest
    generality: dict[str, list[Probe]] = field(default_factory=dict)
    locality: dict[str, list[Probe]] = field(default_factory=dict)
    portability: dict[str, list[Probe]] = field(default_factory=dict)
    source: str = ""

    def probes(self, kind: str) -> list[tuple[str, Probe]]:
        """All probes of ``kind`` ("generality", "locality", "portability") as (family, probe)."""
        return [(fam, p) for fam, ps in getattr(self, kind).items() for p in ps]


class DataError(ValueError):
    """Malformed input. The message is one line: file, record index, field, problem."""

    def __init__(self, path: str, index: int | None, field_name: str | None, problem: str):
        self.path, self.index, self.field, self.problem = str(path), index, field_name, problem
        where = str(path)
        if index is not None:
            where += f", record {index}"
        if field_name:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # picklable, so that launcher plugins (joblib, submitit) can return it from a job
        return (type(self), (self.path, self.index, self.field, self.problem))


class EditFailed(RuntimeError):
    """Raised by an editor when it cannot make one edit: a numerical failure of the method
    on that request (a singular system, a diverged optimisation). The runner marks the case
    failed, restores the model and goes on (docs/reliability.md); any other exception
    raised by an editor stops the run."""
