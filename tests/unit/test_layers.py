"""The layers of docs/ARCHITECTURE.md, read from the code: every import of every `recipe/` and `tools/`
module, subpackages included (module level and inside functions, relative imports resolved), against
the allowed-imports table below. A subpackage listed in LAYERS / ALLOWED places all its modules (one of
them may have its own row); modules of one subpackage may import each other.

    .venv/bin/python -m pytest tests/unit/test_layers.py -q

Fails on an import the table does not allow (an arrow upward or sideways), on `recipe/` importing
`tools/`, and on a private (`_x`) name used across modules (`from recipe.m import _x`, `m._x`).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Layer of each module, top (entry) to bottom (leaves); an arrow must point to a lower layer.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("tools", ("tools.*",)),
    ("entry", ("recipe.train",)),
    ("loop", ("recipe.grpo",)),
    ("loop helpers", ("recipe.checkpoint", "recipe.preflight", "recipe.assets", "recipe.export", "recipe.update")),
    ("sync", ("recipe.sync",)),
    ("placement", ("recipe.remote",)),
    ("engine, weights", ("recipe.engine", "recipe.weights")),
    ("model", ("recipe.model", "recipe.names")),
    (
        "support",
        (
            "recipe.dist",
            "recipe.tasks",
            "recipe.metrics",
            "recipe.progress",
            "recipe.profiling",
            "recipe.batch",
            "recipe.transport",
        ),
    ),
    ("config", ("recipe.config",)),
    ("settings", ("recipe.settings",)),
    ("leaves", ("recipe.digest", "recipe.builtin_models", "recipe.logprobs", "recipe.files", "recipe.loss")),
]

# What each recipe module may import (other recipe modules). tools/ may import any recipe module.
ALLOWED: Dict[str, Set[str]] = {
    "recipe.train": {
        "recipe.config",
        "recipe.grpo",
        "recipe.assets",
        "recipe.dist",
        "recipe.preflight",
        "recipe.progress",
        "recipe.files",
        "recipe.settings",
    },
    "recipe.grpo": {
        "recipe.dist",
        "recipe.metrics",
        "recipe.model",
        "recipe.engine",
        "recipe.sync",
        "recipe.tasks",
        "recipe.checkpoint",
        "recipe.progress",
        "recipe.profiling",
        "recipe.export",
        "recipe.logprobs",
        "recipe.files",
        "recipe.settings",
        "recipe.remote",
        "recipe.batch",
        "recipe.loss",
        "recipe.update",
    },
    "recipe.checkpoint": {"recipe.dist", "recipe.model", "recipe.names", "recipe.files"},
    "recipe.export": {"recipe.dist", "recipe.model", "recipe.weights", "recipe.files", "recipe.settings"},
    "recipe.update": {"recipe.batch", "recipe.loss", "recipe.model", "recipe.settings"},
    "recipe.preflight": {"recipe.config", "recipe.tasks", "recipe.files", "recipe.metrics", "recipe.settings"},
    "recipe.assets": {"recipe.config", "recipe.builtin_models", "recipe.settings"},
    "recipe.sync": {
        "recipe.weights",
        "recipe.model",
        "recipe.names",
        "recipe.digest",
        "recipe.config",
        "recipe.dist",
        "recipe.settings",
    },
    "recipe.remote": {"recipe.engine", "recipe.dist", "recipe.settings", "recipe.transport"},
    "recipe.engine": {
        "recipe.config",
        "recipe.model",
        "recipe.names",
        "recipe.digest",
        "recipe.dist",
        "recipe.settings",
    },
    "recipe.weights": {"recipe.config", "recipe.model", "recipe.names", "recipe.settings"},
    "recipe.model": {"recipe.config", "recipe.logprobs", "recipe.settings"},
    "recipe.names": set(),
    "recipe.dist": {"recipe.config", "recipe.settings"},
    "recipe.tasks": {"recipe.config", "recipe.settings"},
    "recipe.metrics": {"recipe.files", "recipe.settings"},
    "recipe.progress": set(),
    "recipe.profiling": {"recipe.settings"},
    "recipe.batch": {"recipe.settings"},
    "recipe.transport": set(),
    "recipe.config": {"recipe.builtin_models", "recipe.settings"},
    "recipe.settings": set(),
    "recipe.digest": set(),
    "recipe.builtin_models": set(),
    "recipe.logprobs": set(),
    "recipe.files": set(),
    "recipe.loss": set(),  # the objective's math: torch only
}


@functools.lru_cache(maxsize=None)
def module_files() -> Dict[str, Path]:
    """Every module of `recipe/` and `tools/`, subpackages included, by dotted name. A subpackage's
    `__init__.py` is the module named by its package (`recipe/engine/__init__.py` is `recipe.engine`);
    the top-level `__init__.py` files hold no code and are left out."""
    found = {}
    for package in ("recipe", "tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
                if len(parts) == 1:
                    continue
            found[".".join(parts)] = path
    return found


def modules() -> List[str]:
    return list(module_files())


def parents(module: str) -> Iterator[str]:
    """The module, then each package above it, nearest first (`recipe.engine.vllm`, `recipe.engine`, `recipe`)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])


def layer_of(module: str) -> int:
    """A module's layer: its own entry in LAYERS, else the nearest package listed there (a subpackage
    listed in LAYERS places all its modules)."""
    for name in parents(module):
        for i, (_, members) in enumerate(LAYERS):
            if name in members or (name.startswith("tools.") and "tools.*" in members):
                return i
    raise KeyError(f"{module} is in no layer of LAYERS: place it (and in docs/ARCHITECTURE.md)")


def allowed(module: str) -> Set[str]:
    """What `module` may import: its row of ALLOWED, else the nearest package's row; plus the other
    modules of its own subpackage (one package is one layer, its modules work together)."""
    row = next((ALLOWED[name] for name in parents(module) if name in ALLOWED), set())
    return row | {m for m in module_files() if same_package(module, m)}


def same_package(a: str, b: str) -> bool:
    """Both in one subpackage of recipe/ or tools/ (not the top-level package), or one is that package."""
    pa, pb = a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]
    return a != b and (pa == pb and pa.count(".") >= 1 or pa == b or pb == a)


def project_module(name: str) -> bool:
    return name.split(".")[0] in ("recipe", "tools")


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved against `module`'s package."""
    if not node.level:
        return node.module
    files = module_files()
    package = module if module in files and files[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_module(name: str) -> bool:
    return name in module_files() or name.rsplit(".", 1)[0] in ("recipe", "tools")


def imports(source: str, module: str = "") -> Iterator[Tuple[int, str, List[str], str]]:
    """(line, imported module, names taken from it, local name of the module or "") for every import
    statement, at any depth. `from recipe import digest` and `from recipe.engine import vllm` import
    the modules recipe.digest and recipe.engine.vllm; relative imports are resolved against `module`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], alias.asname or ""
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            taken = []
            for alias in node.names:
                if project_module(base) and is_module(f"{base}.{alias.name}"):
                    yield node.lineno, f"{base}.{alias.name}", [], alias.asname or alias.name
                else:
                    taken.append(alias.name)
            if taken:
                yield node.lineno, base, taken, ""


def module_aliases(source: str, module: str = "") -> Dict[str, str]:
    """Local names bound to project modules (`from recipe import model as policy`, `import recipe.x as y`)."""
    return {local: target for _, target, _, local in imports(source, module) if local and project_module(target)}


def permitted(module: str, target: str) -> bool:
    """`target`, or a subpackage it is in, is among what `module` may import."""
    return any(name in allowed(module) for name in parents(target) if "." in name)


def violations(module: str, source: str) -> List[str]:
    """Every import of `module` (whose code is `source`) that the layers forbid."""
    problems = []
    for line, target, names, _ in imports(source, module):
        if not project_module(target) or target == module:
            continue
        where = f"{module}:{line} imports {target}"
        if module.startswith("recipe.") and target.startswith("tools"):
            problems.append(f"{where}: recipe never imports tools")
        elif module.startswith("recipe.") and not permitted(module, target):
            problems.append(
                f"{where}: not in ALLOWED[{module!r}] (layer {LAYERS[layer_of(module)][0]!r} -> "
                f"{LAYERS[layer_of(target)][0]!r})"
            )
        elif module.startswith("tools.") and target.startswith("tools."):
            problems.append(f"{where}: a tool imports recipe modules only")
        problems += [f"{where}: private name {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    aliases = module_aliases(source, module)
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            problems.append(f"{module}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return problems


def test_every_module_is_placed_and_allowed_arrows_point_down():
    for module in modules():
        layer_of(module)
        if module.startswith("recipe."):
            assert any(name in ALLOWED for name in parents(module)), f"{module} has no row in ALLOWED (nor its package)"
    for module, targets in ALLOWED.items():
        for target in targets:
            assert layer_of(target) > layer_of(module), f"ALLOWED[{module!r}] has {target}: not a lower layer"


@pytest.mark.parametrize("module", modules())
def test_imports_follow_the_layers(module):
    assert violations(module, module_files()[module].read_text()) == []


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("recipe.engine.vllm", "def f():\n    from recipe.sync import WeightSync\n", "not in ALLOWED"),
        ("recipe.engine.hf", "from recipe.weights import stream_weights\n", "not in ALLOWED"),
        ("recipe.weights.fsdp2", "from recipe.weights.units import _hf_config\n", "private name _hf_config"),
        ("recipe.weights.table", "from recipe.engine import build_engine\n", "not in ALLOWED"),
        ("recipe.engine.vllm", "from recipe.engine.worker import _vllm_model\n", "private name _vllm_model"),
        ("recipe.model", "import recipe.grpo\n", "not in ALLOWED"),
        ("recipe.loss", "from recipe.settings import Algo\n", "not in ALLOWED"),
        ("recipe.batch", "from recipe.update import backward_mini_batch\n", "not in ALLOWED"),
        ("recipe.update", "from recipe.grpo import GRPOTrainer\n", "not in ALLOWED"),
        ("recipe.assets", "from tools.make_tiny_model import main\n", "recipe never imports tools"),
        ("tools.sync_bench", "from recipe.model import _shard_fsdp1\n", "private name _shard_fsdp1"),
        (
            "tools.sync_bench",
            "from recipe import model as policy\npolicy._shard_fsdp2(1)\n",
            "uses private recipe.model._shard_fsdp2",
        ),
        # relative imports, and modules inside a subpackage (placed by their package: recipe.model.parts)
        ("recipe.engine.vllm", "from ..sync import WeightSync\n", "recipe.sync: not in ALLOWED"),
        ("recipe.engine.vllm", "from .. import grpo\n", "recipe.grpo: not in ALLOWED"),
        ("recipe.model.parts", "from recipe.sync import WeightSync\n", "recipe.sync: not in ALLOWED"),
        ("recipe.model.parts", "from ..grpo import run\n", "recipe.grpo: not in ALLOWED"),
        ("recipe.model.parts", "from tools import sync_bench\n", "recipe never imports tools"),
        ("tools.bench.sinks", "from recipe.model import _shard_fsdp1\n", "private name _shard_fsdp1"),
    ],
)
def test_a_wrong_arrow_is_caught(module, source, expected):
    found = violations(module, source)
    assert any(expected in v for v in found), found


def test_the_loss_math_imports_torch_only():
    """recipe/loss.py is the objective as functions of tensors: no project module, nothing but torch."""
    found = {
        target.split(".")[0] for _, target, _, _ in imports(module_files()["recipe.loss"].read_text(), "recipe.loss")
    }
    assert found <= {"__future__", "math", "torch"}, found


def test_docs_table_is_this_table():
    """docs/ARCHITECTURE.md's allowed-imports table says what ALLOWED says."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`recipe/") and cells[1] in {name for name, _ in LAYERS}:
            module = cells[0].strip("`").removesuffix(".py").removesuffix("/__init__").strip("/").replace("/", ".")
            rows[module] = (cells[1], {f"recipe.{m.strip()}" for m in cells[2].split(",") if m.strip() != "-"})
    assert set(rows) == set(ALLOWED)
    for module, (layer, targets) in rows.items():
        assert targets == ALLOWED[module], module
        assert layer == LAYERS[layer_of(module)][0], module


MAX_MODULE_LINES = 600  # docs/ARCHITECTURE.md: a module that grows past this is split along its seams


def test_no_module_in_recipe_is_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "recipe").rglob("*.py")}
    assert len(sizes) > 20  # the walk reached the packages
    over = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
