"""What the installed package holds: the library and app, the bundled data, no developer tools."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_model_training_code_is_not_part_of_the_package() -> None:
    assert importlib.util.find_spec("blasphemer.demo_model") is None
    assert not (ROOT / "src" / "blasphemer" / "demo_model").exists()
    assert (ROOT / "tools" / "demo_model" / "train.py").is_file()


def test_the_wheel_ships_the_package_and_its_data_but_no_training_code(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    # Build from a copy, so that the build leaves nothing behind in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    if (ROOT / "tools").is_dir():
        shutil.copytree(ROOT / "tools", source / "tools", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(source), "-w", str(tmp_path / "wheel")],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("blasphemer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert packages == {"blasphemer"}
    assert not [name for name in names if "demo_model" in name or name.startswith("tools/")]
    data = {name for name in names if name.startswith("blasphemer/data/demo-model/")}
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert f"blasphemer/data/demo-model/{needed}" in data, needed
    assert "blasphemer/config.default.toml" in names
    assert "blasphemer/py.typed" in names
    assert any(name.startswith("blasphemer/data/prompts/") for name in names)
    assert any(name.startswith("blasphemer/presets/") for name in names)


PACKAGE = ROOT / "src" / "blasphemer"


def _imported_modules(source: str, package: str) -> set[str]:
    """Every blasphemer module that ``source`` (a module of ``package``) imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "blasphemer" or name.startswith("blasphemer.")}


def _is_app(name: str) -> bool:
    return name == "blasphemer.app" or name.startswith("blasphemer.app.")


def test_the_library_never_imports_the_app() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "app") in path.parents:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        app_imports = sorted(filter(_is_app, _imported_modules(path.read_text(), package)))
        if app_imports:
            offenders[str(path.relative_to(PACKAGE))] = app_imports
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        "import blasphemer.app.console",
        "from blasphemer.app import console",
        "from blasphemer import app",
        "from blasphemer.app.config import Settings",
        "def f():\n    from ..app import cli",
        "from ..app.console import Console",
    ],
)
def test_the_import_graph_check_sees_every_spelling(source: str) -> None:
    assert any(map(_is_app, _imported_modules(source, "blasphemer.evaluation")))


def test_the_import_graph_check_ignores_library_imports() -> None:
    source = "from blasphemer import ablation\nfrom . import markers\nimport blasphemer.export"
    assert not any(map(_is_app, _imported_modules(source, "blasphemer.evaluation")))


@pytest.mark.parametrize(
    "package", ["blasphemer", "blasphemer.evaluation", "blasphemer.optimization"]
)
def test_every_lazily_exported_name_resolves_and_unknown_names_raise(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nothing'"):
        module.nothing  # noqa: B018


def _module_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports anywhere (package __init__ files, which
    only re-export lazily, are left out on both ends)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" or (PACKAGE / "app") in path.parents:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = _imported_modules(path.read_text(), name.rpartition(".")[0])
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], dict.fromkeys(graph, 0), []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    return cycles


def test_library_modules_import_each_other_without_cycles() -> None:
    graph = _module_graph()
    assert "blasphemer.evaluation.refusals" in graph["blasphemer.evaluation.base"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
