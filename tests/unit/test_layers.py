"""The import graph shows the layers (../shared/STYLE.md, "Shape of the code").

Every module's imports are read with ``ast`` (imports inside functions included, since the
CLI and the services import heavy modules lazily) and checked against the floors:

* floor 0, ``freshrec``: contracts, settings, epochs, files, dataset, the Kafka adapters, the
  infrastructure launcher and ``reset``, child processes. Imports no other package of ours.
* floor 1, what several services share: ``ranking`` (shopper state, decay, popularity, train-pair
  rules, blends, similarity scale, candidates), ``models`` (encoder back ends, tokenize, merge,
  export, registry, live index and its build), ``stores`` (the Redis adapters). Each imports
  floor 0 and only the floor-1 packages listed in ``SIDEWAYS``.
* floor 2, the services ``streams``, ``learner``, ``indexer``, ``serving``, ``collector``, ``monitor``: import floors 0
  and 1, never each other (a function two services need moves down a floor).
* floor 3, on top: ``console`` (the ``freshrec`` command, demo, replay), ``evaluation``, ``bench``.
  Nothing below imports them.

The single exception is ``freshrec/__main__.py``: ``python -m freshrec`` has to start in the
``freshrec`` package, and the command lives on the top floor. It is an entry point that
nothing imports, so it puts no upward edge into anyone's import graph.

Point ``FRESHREC_LAYERS_ROOT`` at another checkout to check its tree instead of this one.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("FRESHREC_LAYERS_ROOT") or Path(__file__).resolve().parents[2])

FLOORS: dict[str, int] = {
    "freshrec": 0,
    "ranking": 1, "models": 1, "stores": 1,
    "streams": 2, "learner": 2, "indexer": 2, "serving": 2, "collector": 2, "monitor": 2,
    "console": 3, "evaluation": 3, "bench": 3,
}
# Imports allowed between packages on the same floor (importer -> imported); acyclic.
SIDEWAYS: dict[str, set[str]] = {
    "stores": {"ranking"},  # the user-state wire format is UserState's
    "console": {"evaluation"},  # `freshrec eval` (by name, see COMPONENT_COMMANDS)
    "bench": {"evaluation"},  # bench.ranker_study reuses the evaluation's data and protocol
}
# (importing module, imported package): the documented exceptions, see the module docstring.
EXCEPTIONS: set[tuple[str, str]] = {("freshrec.__main__", "console")}
NOT_OURS = {"tests", "dev", "docs"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in the module, at any depth of the tree."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                found.add(base[0] if base else (node.module or "").split(".")[0])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found & set(FLOORS)


def _graph() -> dict[str, set[str]]:
    """module -> our packages it imports, for every module of every package under ROOT."""
    graph: dict[str, set[str]] = {}
    for package in sorted(FLOORS):
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[_module_name(path)] = _imported_packages(path)
    return graph


def _allowed(importer: str, imported: str) -> bool:
    if importer == imported:
        return True
    if FLOORS[imported] < FLOORS[importer]:
        return True
    return FLOORS[imported] == FLOORS[importer] and imported in SIDEWAYS.get(importer, set())


def test_every_package_has_a_floor() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_OURS
    assert packages <= set(FLOORS), f"give each new package a floor in FLOORS: {sorted(packages - set(FLOORS))}"


def test_imports_go_down_the_floors() -> None:
    violations = sorted(
        f"{module} (floor {FLOORS[module.split('.')[0]]}) imports {imported} (floor {FLOORS[imported]})"
        for module, imported_packages in _graph().items()
        for imported in imported_packages
        if not _allowed(module.split(".")[0], imported) and (module, imported) not in EXCEPTIONS
    )
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_services_never_import_each_other() -> None:
    services = {p for p, floor in FLOORS.items() if floor == 2}
    sideways = sorted(
        f"{module} imports {imported}"
        for module, imported_packages in _graph().items()
        if module.split(".")[0] in services
        for imported in imported_packages & services - {module.split(".")[0]}
    )
    assert not sideways, "a service imports another; move what both need down to floor 1:\n" + "\n".join(sideways)


def test_package_graph_has_no_cycle() -> None:
    edges: dict[str, set[str]] = {p: set() for p in FLOORS}
    for module, imported_packages in _graph().items():
        if (module, "console") in EXCEPTIONS:
            continue
        edges[module.split(".")[0]] |= imported_packages - {module.split(".")[0]}
    done: set[str] = set()

    def visit(package: str, path: list[str]) -> None:
        if package in path:
            pytest.fail("package cycle: " + " -> ".join([*path[path.index(package):], package]))
        if package in done:
            return
        for imported in sorted(edges[package]):
            visit(imported, [*path, package])
        done.add(package)

    for package in sorted(edges):
        visit(package, [])


def test_exceptions_are_still_needed() -> None:
    graph = _graph()
    stale = sorted(f"{m} -> {p}" for m, p in EXCEPTIONS if p not in graph.get(m, set()))
    assert not stale, f"remove exceptions nothing needs any more: {stale}"


def test_component_commands_name_existing_modules() -> None:
    """console.cli imports each command's module by its name: a module moved must be renamed there."""
    tree = ast.parse((ROOT / "console" / "cli.py").read_text())
    table = next(
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "COMPONENT_COMMANDS"
    )
    modules = [ast.literal_eval(value)[0] for value in table.values]  # type: ignore[attr-defined]
    missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).exists()]
    assert not missing, f"COMPONENT_COMMANDS names modules that do not exist: {missing}"
