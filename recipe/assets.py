"""Model directories named by the config: created on first use for the built-in models."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def ensure_model(cfg: DictConfig) -> Path:
    """Return the local HF directory of `cfg.model`, building `tiny` / `smollm2` if missing."""
    path = Path(cfg.model.path).expanduser().resolve()
    if cfg.model.builder == "tiny":  # rebuilt when the cached copy is of an older version
        from tools.make_tiny_model import make_tiny_model

        return make_tiny_model(path)
    if (path / "config.json").exists():
        return path
    if cfg.model.builder == "smollm2":
        from tools.fetch_default_model import fetch_default_model

        return fetch_default_model(path)
    raise FileNotFoundError(f"model.path={str(path)!r} holds no config.json; give a local HF checkpoint directory")
