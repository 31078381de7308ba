"""Model directories named by the config: built on first use for the built-in models, and
checked at start (before any rank starts) for what the trainer and the engine will read.

A built-in model (`model.builder` tiny / smollm2) is (re)built only where `model.path` is
absent, empty, or a copy this project built (recipe/builtin_models.py's marker); any other
directory is refused at start and never touched.
"""

from __future__ import annotations

import json
from pathlib import Path


from recipe.builtin_models import NotOursError, check_buildable, fetch_default_model, make_tiny_model
from recipe.config import ConfigError
from recipe.settings import Model

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Encoded at start: a tokenizer that loads but turns text into no tokens (its tokenizer.json gone, the
# rest of its files still there) would fail much later, in the engine ("The decoder prompt cannot be empty").
PROBE_TEXT = "What is 12 + 30? Answer: 42"


def check_model_path(model: Model) -> None:
    """`model.path` at start, before anything is built (no I/O but stat): a built-in model is never built
    over a directory the project did not make; any other model's directory exists."""
    if model.builder != "none":
        try:
            check_buildable(model.path, model.builder)
        except NotOursError as exc:
            raise ConfigError(str(exc)) from None
        return
    where = Path(model.path).expanduser()
    if where.exists() and not where.is_dir():
        raise ConfigError(
            f"model.path={model.path!r} is a file, not a directory; give a local HF checkpoint "
            "directory (the folder that holds config.json, the weights and the tokenizer)"
        )
    if not where.is_dir():
        raise ConfigError(
            f"model.path={model.path!r} does not exist; give a local HF checkpoint directory "
            "or use model=tiny / model=smollm2, which are created on first use"
        )


def check_model_dir(path: Path) -> None:
    """A directory the trainer and engine can read: config.json, weights and a tokenizer that loads and
    encodes text; every JSON file in it parses. Each failure names the file, in one line."""
    _check_files(path)
    _check_json(path)
    _check_tokenizer(path)


def _check_json(path: Path) -> None:
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"model.path={str(path)!r}: {file.name} cannot be parsed ({exc}); the file is damaged, "
                "fetch or save the model again"
            ) from None


def _check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    except Exception as exc:  # noqa: BLE001  (transformers raises many kinds; the message is what matters)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"model.path={str(path)!r}: its tokenizer cannot be loaded ({type(exc).__name__}: {first[:300]})"
        ) from None
    if not ids:
        present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
        raise ConfigError(
            f"model.path={str(path)!r}: its tokenizer loads but encodes text to no tokens (files "
            f"present: {', '.join(present) or 'none'}; is tokenizer.json missing?). Give a directory "
            "saved with save_pretrained (model and tokenizer)."
        )


def _check_files(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        missing.append(f"weights ({', '.join(WEIGHT_PATTERNS)})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ConfigError(
            f"model.path={str(path)!r} is not a usable HF checkpoint directory; it lacks: "
            f"{'; '.join(missing)}. Give a directory saved with save_pretrained (model and tokenizer)."
        )


def ensure_model(model) -> Path:
    """Return the local HF directory of the model group `model`, building `tiny` / `smollm2` if absent; check it."""
    path = Path(model.path).expanduser().resolve()
    try:
        if model.builder == "tiny":  # rebuilt when the cached copy is of an older version
            path = make_tiny_model(path)
        elif model.builder == "smollm2":
            path = fetch_default_model(path)
    except NotOursError as exc:  # validate() refuses this already; the builders check again
        raise ConfigError(str(exc)) from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model.path={str(path)!r} is a file, not a directory; give a local HF checkpoint directory")
    if not path.is_dir():
        raise ConfigError(f"model.path={str(path)!r} does not exist; give a local HF checkpoint directory")
    check_model_dir(path)
    return path
