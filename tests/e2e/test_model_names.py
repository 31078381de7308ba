"""Names from the engine and the checkpoint, with real vLLM on CPU (world 1, float32): each model
syncs twice (before and after an optimizer step) with the digest on every tensor and the probe.

- an untied Llama (the head streamed and held under its own name);
- a tied Llama whose checkpoint also holds `lm_head.weight` (a copy of the embedding) and each
  layer's `rotary_emb.inv_freq`: keys the model ignores, so not expected in the stream (before,
  every sync failed naming them "not streamed");
- an untied Llama saved as `.bin` only (before, every sync failed: the checkpoint's names were
  read from safetensors files only, so every streamed name was "unexpected").
GPT-2's tied head (`lm_head.weight` is `transformer.wte.weight`) is in tests/e2e/test_model_layouts.py.

    .venv/bin/python -m pytest tests/e2e/test_model_names.py -v
"""

from __future__ import annotations

import pytest

from tests.helpers import run_world

pytestmark = pytest.mark.slow
MODELS = ("untied", "tied_with_ignored_keys", "bin_only")


def _names(rank, world, dirs):
    import torch

    from recipe.dist import DistContext
    from tests.e2e.test_model_layouts import _sync_twice

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    out = {}
    for label, model_dir in dirs.items():
        try:
            out[label] = _sync_twice(ctx, model_dir, "float32")
        except Exception as e:  # noqa: BLE001  reported per model, so one failure does not hide the others
            out[label] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    from tests import tiny_models

    root = tmp_path_factory.mktemp("models")
    dirs = {
        "untied": tiny_models.llama(root / "untied"),
        "tied_with_ignored_keys": tiny_models.llama(root / "tied", tied=True, edit=tiny_models.with_ignored_keys),
        "bin_only": tiny_models.llama_bin(root / "bin"),
    }
    return run_world(_names, 1, dirs, timeout_s=1500)[0]


@pytest.mark.parametrize("model", MODELS)
def test_model_syncs_exactly(synced, model):
    r = synced[model]
    assert "error" not in r, r.get("error")
    for stats in (r["first"], r["second"]):
        assert stats["sync/verified_tensors"] > 0 and stats["sync/verified_bytes"] == stats["sync/bytes"]
        assert stats["sync/parity_mean_abs_diff"] <= 1e-3
    assert r["second"]["sync/digest"] != r["first"]["sync/digest"]
    assert r["direct_ok"], r["why"]  # Llama's layout is the map's
