"""The shape of the code: every front end goes through the Python API and none imports another.

Front ends: the command line (cli, cli_options), the inspection service (serve/) and
batch scoring (batch); the benchmark and demo jobs are libraries the command line dispatches to.
Imports are read from the source (module level and inside functions alike).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "defectscope"
COMMAND_LINE = {"cli", "cli_options"}  # cli_types (argparse value types) is shared by every front end
JOBS = {"benchmark", "demo"}
#: the model internals a front end reaches only through defectscope.api
INTERNALS = {"fitting", "scoring", "io"}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path) -> set[str]:
    """Top-level defectscope modules imported by ``path`` ("api", "cli", "serve", ...)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module(path).split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                parts = [*base, *(node.module.split(".") if node.module else [])]
                if not parts:
                    found.update(alias.name for alias in node.names)
                else:
                    found.add(parts[0])
                    if not node.module:
                        found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("defectscope."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("defectscope."):
                    found.add(alias.name.split(".")[1])
    return found


def _files(names: set[str]) -> list[Path]:
    out = []
    for name in names:
        if (SRC / f"{name}.py").is_file():
            out.append(SRC / f"{name}.py")
        elif (SRC / name).is_dir():
            out.extend(sorted((SRC / name).rglob("*.py")))
    return out


def test_the_layout_is_what_this_test_assumes():
    assert (SRC / "api.py").is_file() and (SRC / "cli.py").is_file()
    assert all((SRC / f"{job}.py").is_file() for job in JOBS)


@pytest.mark.parametrize("path", _files(JOBS | {"serve", "batch"}), ids=lambda p: _module(p))
def test_no_front_end_imports_the_command_line_or_another_front_end(path):
    own = _module(path).split(".")[0]
    others = (COMMAND_LINE | JOBS | {"serve", "batch"}) - {own}
    assert not (_imports(path) & others), f"{_module(path)} imports {_imports(path) & others}"


@pytest.mark.parametrize("path", _files(COMMAND_LINE | JOBS | {"serve", "batch"}), ids=lambda p: _module(p))
def test_front_ends_reach_the_model_only_through_the_api(path):
    assert not (_imports(path) & INTERNALS), f"{_module(path)} imports {_imports(path) & INTERNALS} directly"


def test_the_api_imports_no_front_end():
    assert not (_imports(SRC / "api.py") & (COMMAND_LINE | JOBS | {"serve", "batch"}))


def test_the_import_reader_sees_relative_and_function_level_imports():
    probe = SRC / "cli.py"
    found = _imports(probe)
    assert {"api", "cli_options", "benchmark", "demo"} <= found  # benchmark/demo: inside functions


def test_method_names_of_the_parser_match_the_detectors():
    from defectscope.cli import METHOD_NAMES
    from defectscope.detectors import METHODS

    assert tuple(METHOD_NAMES) == tuple(METHODS)


def test_dataset_names_of_the_parser_match_the_downloader():
    from defectscope.cli import DATASETS
    from defectscope.data.download import ARCHIVES

    assert tuple(DATASETS) == tuple(ARCHIVES)


def test_resize_choices_of_the_parser_match_the_geometry():
    from defectscope.cli_options import RESIZE_CHOICES
    from defectscope.data.geometry import RESIZE_MODES

    assert tuple(RESIZE_CHOICES) == tuple(RESIZE_MODES)
