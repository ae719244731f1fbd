"""What the installed package holds: the library and app, the bundled data, no developer tools."""

from __future__ import annotations

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
