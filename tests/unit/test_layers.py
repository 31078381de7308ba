"""The layers of docs/ARCHITECTURE.md, read from the code: every import of every `recipe/` and `tools/`
module (module level and inside functions) against the allowed-imports table below.

    .venv/bin/python -m pytest tests/unit/test_layers.py -q

Fails on an import the table does not allow (an arrow upward or sideways), on `recipe/` importing
`tools/`, and on a private (`_x`) name used across modules (`from recipe.m import _x`, `m._x`).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Layer of each module, top (entry) to bottom (leaves); an arrow must point to a lower layer.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("tools", ("tools.*",)),
    ("entry", ("recipe.train",)),
    ("loop", ("recipe.grpo",)),
    ("loop helpers", ("recipe.checkpoint", "recipe.preflight", "recipe.assets", "recipe.export")),
    ("sync", ("recipe.sync",)),
    ("engine, state_dict", ("recipe.rollout", "recipe.state_dict")),
    ("model", ("recipe.model", "recipe.names")),
    ("support", ("recipe.dist", "recipe.tasks", "recipe.metrics", "recipe.progress", "recipe.profiling")),
    ("config", ("recipe.config",)),
    ("leaves", ("recipe.digest", "recipe.builtin_models", "recipe.logprobs", "recipe.files")),
]

# What each recipe module may import (other recipe modules). tools/ may import any recipe module.
ALLOWED: Dict[str, Set[str]] = {
    "recipe.train": {"recipe.config", "recipe.grpo", "recipe.assets", "recipe.dist", "recipe.preflight",
                     "recipe.progress", "recipe.files"},
    "recipe.grpo": {"recipe.dist", "recipe.metrics", "recipe.model", "recipe.rollout", "recipe.sync", "recipe.tasks",
                    "recipe.checkpoint", "recipe.progress", "recipe.profiling", "recipe.export", "recipe.logprobs",
                    "recipe.files"},
    "recipe.checkpoint": {"recipe.model", "recipe.names", "recipe.files"},
    "recipe.export": {"recipe.config", "recipe.model", "recipe.state_dict"},
    "recipe.preflight": {"recipe.config", "recipe.tasks", "recipe.files", "recipe.metrics"},
    "recipe.assets": {"recipe.config", "recipe.builtin_models"},
    "recipe.sync": {"recipe.state_dict", "recipe.model", "recipe.names", "recipe.digest", "recipe.config"},
    "recipe.rollout": {"recipe.config", "recipe.model", "recipe.names", "recipe.digest"},
    "recipe.state_dict": {"recipe.config", "recipe.model", "recipe.names", "recipe.digest"},
    "recipe.model": {"recipe.config", "recipe.logprobs"},
    "recipe.names": set(),
    "recipe.dist": {"recipe.config"},
    "recipe.tasks": {"recipe.config"},
    "recipe.metrics": {"recipe.files"},
    "recipe.progress": set(),
    "recipe.profiling": set(),
    "recipe.config": {"recipe.builtin_models"},
    "recipe.digest": set(),
    "recipe.builtin_models": set(),
    "recipe.logprobs": set(),
    "recipe.files": set(),
}


def modules() -> List[str]:
    found = []
    for package in ("recipe", "tools"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name != "__init__.py":
                found.append(f"{package}.{path.stem}")
    return found


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if module in members or (module.startswith("tools.") and "tools.*" in members):
            return i
    raise KeyError(f"{module} is in no layer of LAYERS: place it (and in docs/ARCHITECTURE.md)")


def project_module(name: str) -> bool:
    return name.split(".")[0] in ("recipe", "tools")


def imports(source: str) -> Iterator[Tuple[int, str, List[str]]]:
    """(line, imported module, names taken from it) for every import statement, at any depth.
    `from recipe import digest` imports the module recipe.digest."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("recipe", "tools"):
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}", []
            else:
                yield node.lineno, node.module, [alias.name for alias in node.names]


def module_aliases(source: str) -> Dict[str, str]:
    """Local names bound to project modules (`from recipe import model as policy`, `import recipe.x as y`)."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if project_module(alias.name) and alias.asname:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in ("recipe", "tools"):
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def violations(module: str, source: str) -> List[str]:
    """Every import of `module` (whose code is `source`) that the layers forbid."""
    problems = []
    for line, target, names in imports(source):
        if not project_module(target) or target == module:
            continue
        where = f"{module}:{line} imports {target}"
        if module.startswith("recipe.") and target.startswith("tools"):
            problems.append(f"{where}: recipe never imports tools")
        elif module.startswith("recipe.") and target not in ALLOWED.get(module, set()):
            problems.append(f"{where}: not in ALLOWED[{module!r}] (layer {LAYERS[layer_of(module)][0]!r} -> "
                            f"{LAYERS[layer_of(target)][0]!r})")
        elif module.startswith("tools.") and target.startswith("tools."):
            problems.append(f"{where}: a tool imports recipe modules only")
        problems += [f"{where}: private name {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    aliases = module_aliases(source)
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            problems.append(f"{module}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return problems


def test_every_module_is_placed_and_allowed_arrows_point_down():
    for module in modules():
        layer_of(module)
        if module.startswith("recipe."):
            assert module in ALLOWED, f"{module} has no row in ALLOWED"
    for module, targets in ALLOWED.items():
        for target in targets:
            assert layer_of(target) > layer_of(module), f"ALLOWED[{module!r}] has {target}: not a lower layer"


@pytest.mark.parametrize("module", modules())
def test_imports_follow_the_layers(module):
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert violations(module, path.read_text()) == []


@pytest.mark.parametrize("module, source, expected", [
    ("recipe.rollout", "def f():\n    from recipe.sync import WeightSync\n", "not in ALLOWED"),
    ("recipe.rollout", "from recipe.state_dict import hf_name\n", "not in ALLOWED"),
    ("recipe.model", "import recipe.grpo\n", "not in ALLOWED"),
    ("recipe.assets", "from tools.make_tiny_model import main\n", "recipe never imports tools"),
    ("tools.sync_bench", "from recipe.model import _shard_fsdp1\n", "private name _shard_fsdp1"),
    ("tools.sync_bench", "from recipe import model as policy\npolicy._shard_fsdp2(1)\n",
     "uses private recipe.model._shard_fsdp2"),
])
def test_a_wrong_arrow_is_caught(module, source, expected):
    found = violations(module, source)
    assert any(expected in v for v in found), found


def test_docs_table_is_this_table():
    """docs/ARCHITECTURE.md's allowed-imports table says what ALLOWED says."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`recipe/") and cells[1] in {name for name, _ in LAYERS}:
            module = "recipe." + cells[0].strip("`")[len("recipe/"):-len(".py")]
            rows[module] = (cells[1], {f"recipe.{m.strip()}" for m in cells[2].split(",") if m.strip() != "-"})
    assert set(rows) == set(ALLOWED)
    for module, (layer, targets) in rows.items():
        assert targets == ALLOWED[module], module
        assert layer == LAYERS[layer_of(module)][0], module
