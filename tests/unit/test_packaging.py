"""What `pip install .` installs: the `recipe` package only, never a top-level `tools` (tools/ are
command lines run from a checkout, `python -m tools.x` from the repository root), and nothing it
installs imports `tools`.

    .venv/bin/python -m pytest tests/unit/test_packaging.py -q
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built offline from a copy of pyproject.toml, recipe/ and tools/ (the
    build writes build/ and *.egg-info beside its sources: not into the checkout)."""
    pytest.importorskip("setuptools", reason="the offline build (--no-build-isolation) uses the venv's setuptools")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for package in ("recipe", "tools"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "out"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (root / "out").glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_recipe_only(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"recipe"}, f"the wheel installs {sorted(top)} into site-packages"


def test_nothing_installed_imports_tools(wheel):
    for name in wheel.namelist():
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(wheel.read(name))):
                found = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                assert not any(m == "tools" or m.startswith("tools.") for m in found), (
                    f"{name}:{node.lineno} imports tools"
                )


def test_a_tool_runs_from_the_repository_root():
    """Not installed, a tool still runs as `python -m tools.x` from the checkout's root."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.sweep_report", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "usage: sweep_report.py" in done.stdout, done.stderr[-2000:]
