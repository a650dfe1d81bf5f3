"""Fingerprints of the code that computes a result, so that nothing computed by other code is
reused silently (docs/protocol.md, "Reuse").

A result chunk is keyed by :func:`chunk_code` (the editor's module, the editor library
modules it imports, directly or not, the harness modules it imports, and the harness modules
on a chunk's path: the protocol, the scoring, the Editor interface, the model loader, the
general-ability tasks); a trained checkpoint by :func:`training_code` (the editor's module
and its imports, the Editor interface, the training loop).
The import graph is read from the source (:func:`static_imports`), so a change to a library
module that an editor does not use does not invalidate that editor's results. A module is
hashed by its syntax tree without docstrings (:func:`code_text`): a changed comment,
docstring, blank line or line wrap computes the same numbers and keeps the fingerprint;
any change to what runs changes it.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path
from typing import Iterable

#: the project's top-level packages
PACKAGES = ("editbench", "editors")
ROOT = Path(__file__).resolve().parents[1]

#: harness modules on the path of every chunk's numbers (besides the editor's own imports)
CHUNK_PATH = ("editbench/runner.py", "editbench/plan.py", "editbench/session.py", "editbench/reference.py",
              "editbench/scoring.py", "editbench/wild.py", "editbench/editor.py", "editbench/models.py",
              "editbench/general/__init__.py", "editbench/general/data.py", "editbench/general/tasks.py")
#: ... and of every trained checkpoint
TRAINING_PATH = ("editbench/editor.py", "editbench/train/loop.py")


def module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def static_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in ``path``, at
    module level or inside functions. ``from pkg import submodule`` counts as importing the
    submodule."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            names = [a.name for a in node.names]
            subs = [n for n in names if module_file(f"{node.module}.{n}") is not None]
            found += [(f"{node.module}.{n}", [], node.lineno) for n in subs]
            found.append((node.module, [n for n in names if n not in subs], node.lineno))
    return found


def import_closure(files: Iterable[Path], follow: tuple[str, ...] = ("editors",)) -> set[Path]:
    """``files`` and the project modules they import; the imports of imported modules are
    followed within the packages ``follow`` only (an editor's own library, transitively),
    while a harness module an editor imports counts by itself (its own imports are the
    harness's business, fixed by the explicit paths below)."""
    todo, seen = [(Path(f).resolve(), True) for f in files], set[Path]()
    while todo:
        path, expand = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if not expand:
            continue
        for name, _, _ in static_imports(path):
            target = module_file(name)
            if target is not None:
                todo.append((target.resolve(), name.split(".")[0] in follow))
    return seen


def code_text(path: Path) -> bytes:
    """What of a Python module's source decides what it computes: its syntax tree (no
    comments, no positions) without the docstrings of the module, its classes and functions.
    A file that does not parse counts by its bytes."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False).encode("utf-8")


def digest(files: Iterable[Path]) -> str:
    """A hash of the files' paths (relative to the project) and code (:func:`code_text`)."""
    h = hashlib.sha256()
    for f in sorted(Path(p).resolve() for p in files):
        rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else Path(f.name)
        h.update(str(rel).encode() + b"\0" + code_text(f) + b"\0")
    return h.hexdigest()[:12]


def chunk_code(editor_cls: type) -> str:
    """The code fingerprint stored in every chunk record of ``editor_cls``."""
    return digest(import_closure([Path(inspect.getfile(editor_cls))]) | {ROOT / p for p in CHUNK_PATH})


def training_code(editor_cls: type) -> str:
    """The code fingerprint in the cache key of ``editor_cls``'s trained checkpoints."""
    return digest(import_closure([Path(inspect.getfile(editor_cls))]) | {ROOT / p for p in TRAINING_PATH})
