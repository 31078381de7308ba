"""The typed settings (recipe/settings.py): built once from the composed config, frozen, with the
derived values resolved there; the engine is handed the sync's settings and reads none itself."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from recipe.settings import Settings, default_tolerance
from recipe.weights.units import StreamSpec
from tests.helpers import REPO, compose

CPU = "trainer.device=cpu"


def test_slices_are_typed_and_frozen():
    s = Settings.from_cfg(compose(["sync.probe_every=3", CPU]))
    assert s.sync.probe_every == 3 and isinstance(s.sync.probe_every, int)
    assert s.offload.pin_memory is None and s.offload.pin is False  # "auto" on CPU
    assert isinstance(s.lora.target_modules, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sync.probe_every = 1  # type: ignore[misc]


def test_derived_values_are_resolved_once():
    s = Settings.from_cfg(
        compose(
            ["model.dtype=bfloat16", "model.master_dtype=float32", CPU, "+lora=merged", "fsdp=fsdp1", "+offload=manual"]
        )
    )
    assert s.device == "cpu" and s.world_size == s.trainer.world_size
    assert s.sync.tolerance == default_tolerance("bfloat16", "cpu")  # probe_tolerance null: the dtype's default
    assert s.combo == ("fsdp1", "manual", "merged") and StreamSpec.of(s).name == "fsdp1/manual/merged"
    given = Settings.from_cfg(compose(["sync.probe_tolerance=0.25", "sync.strategy=naive", CPU]))
    assert given.sync.tolerance == 0.25 and StreamSpec.of(given).name == "naive"


def test_world_size_is_torchruns_when_it_started_the_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert Settings.from_cfg(compose(["trainer.world_size=2", CPU])).world_size == 3


def test_the_engine_reads_no_sync_settings():
    """The engine's load mode and digest setting come from whoever builds it (keyword-only, no default),
    never from `cfg.sync`: the engine knows nothing of the sync, in data as in imports."""
    from recipe import engine
    from recipe.engine.vllm import VllmEngine

    for fn in (engine.build_engine, VllmEngine.__init__):
        params = inspect.signature(fn).parameters
        for name in ("load", "digest"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn, name)
            assert params[name].default is inspect.Parameter.empty, (fn, name)
    engine_files = sorted((REPO / "recipe" / "engine").rglob("*.py"))
    assert engine_files
    for path in engine_files:
        if path.is_file():
            reads = re.findall(r"\bcfg\.sync\.\w+", path.read_text())
            assert not reads, f"{path.relative_to(REPO)} reads the sync's settings: {sorted(set(reads))}"
