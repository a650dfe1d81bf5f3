"""The layering rules of docs/architecture.md, checked on the source (no import needed)."""
from __future__ import annotations

from pathlib import Path

from editbench.fingerprint import static_imports
from tests.conftest import ROOT

PACKAGES = ("editbench", "editors")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file,
    at module level or inside functions (the same reader the code fingerprints use)."""
    return static_imports(path)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target, _, _ in _imports(path, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package's ``__init__`` importing its own submodules is
    not a cycle of the layering (it is how a package exposes its API)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # package -> its own submodule
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_the_projects_modules():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_a_cycle_is_detected():
    """The checker itself can fail."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"a.x"}, "a.x": {"a"}}) is None  # a package exposing its submodule: allowed


def test_the_harness_imports_no_private_name_of_another_module():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith("editbench"):
            continue
        for target, names, line in _imports(path, modules):
            bad += [f"{path.relative_to(ROOT)}:{line} imports {n} from {target}"
                    for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_harness_finds_editors_only_through_the_registry():
    """``editbench`` never imports an editor module (editors register themselves)."""
    modules = _modules()
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for name, path in modules.items() if name.startswith("editbench")
           for target, _, line in _imports(path, modules)
           if target.startswith("editors") and target != "editors"]
    assert not bad, bad


def test_benchmarks_build_the_run_session_as_the_runner_does():
    source = (ROOT / "benchmarks" / "perf.py").read_text(encoding="utf-8")
    assert "open_session(" in source
    assert "runner._" not in source and "scorer._" not in source
