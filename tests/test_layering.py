"""The shape of the code: layers that depend downwards only, front ends that go through the API.

* No import cycle anywhere, between modules or between the package's rooms (``features``,
  ``evaluation``, ``io``, ...). Imports inside functions count: they run too.
* No front end (``cli``, ``serve``, ``batch``, ``watch``, ``benchmark``, ``demo``) imports another.
  The one door between them: the ``defectscope`` command (``cli``) launches the others through
  their entry modules (:data:`ENTRY_MODULES`: argparse wiring and a ``run``), nothing deeper.
* Front ends reach the model's internals (``io``, ``fitting``, ``scoring``) only through
  :mod:`defectscope.api`, and the library below the front ends imports none of them.

Imports are read from the source with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "defectscope"
ROOT = "defectscope"
#: the front ends: each a room of its own (a module or a package)
FRONT_ENDS = {"cli", "serve", "batch", "watch", "benchmark", "demo"}
#: the model internals a front end reaches only through defectscope.api
INTERNALS = {"fitting", "scoring", "io"}
#: what the command line may import of the other front ends: their entry points, which it dispatches to
ENTRY_MODULES = {f"{ROOT}.serve.command", f"{ROOT}.batch", f"{ROOT}.watch.command", f"{ROOT}.benchmark", f"{ROOT}.demo"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([ROOT, *parts])


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str, imported: str | None) -> str:
    """The module that ``from name import imported`` (or ``import name``) loads."""
    modules = _modules()
    if imported is not None and f"{name}.{imported}" in modules:
        return f"{name}.{imported}"
    while name not in modules and "." in name:  # an attribute of a module, e.g. defectscope.api.load
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> set[str]:
    """The defectscope modules ``path`` imports, at module level and inside functions alike."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name == ROOT or name.startswith(ROOT + "."):
                found.update(_resolve(name, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_resolve(a.name, None) for a in node.names if a.name.split(".")[0] == ROOT)
    found.discard(module)
    return found


def _room(module: str) -> str:
    """The room a module lives in: ``defectscope.features.weights`` -> ``features``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    return "cli" if parts[1] == "__main__" else parts[1]  # ``python -m defectscope`` is the command line


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _module_graph() -> dict[str, set[str]]:
    return {name: _imports(path) for name, path in _modules().items()}


def _room_graph() -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for name, targets in _module_graph().items():
        # the root package's lazy ``defectscope.load`` is a door into the API, not a room of its own
        rooms.setdefault(_room(name), set()).update(_room(t) for t in targets if _room(t) != _room(name))
    return rooms


def test_the_layout_is_what_this_test_assumes():
    modules = _modules()
    for name in ("api", "io", "cli", "cli.commands", "features.weights", "evaluation.metrics", "common.files"):
        assert f"{ROOT}.{name}" in modules, name
    assert {_room(m) for m in modules} >= FRONT_ENDS - {"watch"}


@pytest.mark.parametrize(("room", "allowed"), [("errors", set()), ("version", set()), ("common", {"errors"})])
def test_the_bottom_layers_import_almost_nothing(room, allowed):
    graph = _room_graph()
    assert graph[room] <= allowed, f"{room} imports {graph[room] - allowed}"


def test_no_module_import_cycle():
    assert _cycles(_module_graph()) == []


def test_no_import_cycle_between_rooms():
    graph = _room_graph()
    graph[ROOT] = set()  # the root's lazy names point to the API by design; nothing below imports the root
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(m for m in _modules() if _room(m) in FRONT_ENDS))
def test_no_front_end_imports_another(name):
    own = _room(name)
    targets = _imports(_modules()[name])
    if own == "cli":
        targets -= ENTRY_MODULES
    others = {t for t in targets if _room(t) in FRONT_ENDS - {own}}
    assert not others, f"{name} imports {others} of another front end"


def test_the_command_line_launches_the_other_front_ends_through_their_entry_modules():
    launched = set().union(*(_imports(p) for n, p in _modules().items() if _room(n) == "cli"))
    assert {f"{ROOT}.serve.command", f"{ROOT}.batch", f"{ROOT}.benchmark", f"{ROOT}.demo"} <= launched


@pytest.mark.parametrize("name", sorted(m for m in _modules() if _room(m) in FRONT_ENDS))
def test_front_ends_reach_the_model_only_through_the_api(name):
    internals = {_room(t) for t in _imports(_modules()[name])} & INTERNALS
    assert not internals, f"{name} imports {internals} directly; go through defectscope.api"


@pytest.mark.parametrize("name", sorted(m for m in _modules() if _room(m) not in FRONT_ENDS | {ROOT}))
def test_the_library_imports_no_front_end(name):
    front = {_room(t) for t in _imports(_modules()[name])} & FRONT_ENDS
    assert not front, f"{name} imports the front end(s) {front}"


def test_the_import_reader_sees_relative_and_function_level_imports():
    found = _imports(_modules()[f"{ROOT}.cli.commands"])
    # module level, relative to a subpackage; and inside functions (benchmark, demo)
    assert {f"{ROOT}.cli.options", f"{ROOT}.api", f"{ROOT}.benchmark", f"{ROOT}.demo"} <= found
    # ``from . import metrics`` names a module, not an attribute of the package
    assert f"{ROOT}.evaluation.metrics" in _imports(_modules()[f"{ROOT}.evaluation.calibration"])


def test_method_names_of_the_parser_match_the_detectors():
    from defectscope.cli.commands import METHOD_NAMES
    from defectscope.detectors import METHODS

    assert tuple(METHOD_NAMES) == tuple(METHODS)


def test_dataset_names_of_the_parser_match_the_downloader():
    from defectscope.cli.commands import DATASETS
    from defectscope.data.download import ARCHIVES

    assert tuple(DATASETS) == tuple(ARCHIVES)


def test_resize_choices_of_the_parser_match_the_geometry():
    from defectscope.cli.options import RESIZE_CHOICES
    from defectscope.data.geometry import RESIZE_MODES

    assert tuple(RESIZE_CHOICES) == tuple(RESIZE_MODES)
