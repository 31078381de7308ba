"""Per model, the direct load and the digest's picture of the engine are proven against vLLM's own
loader when the engine starts (recipe/engine/vllm.py `VllmEngine._check_layout`), on CPU with real vLLM:

- the tiny Qwen2: vLLM's loader puts every checkpoint tensor where the direct map says (fused
  qkv / gate_up rows): the direct map is proven, and syncs pass the digest and the probe;
- GPT-2: vLLM's loader transposes its Conv1D weights (the square attention c_proj keeps its shape,
  so a shape check alone would write it the wrong way round): the direct map is refused with the
  reason, the trainer digests those tensors transposed, and syncs pass the digest and the probe.
  Before this check the digest compared them untransposed and failed every sync of GPT-2.

    .venv/bin/python -m pytest tests/e2e/test_model_layouts.py -v
"""

from __future__ import annotations

import pytest

from recipe.settings import Settings

from tests.helpers import engine_spec, policy_of, run_world

pytestmark = pytest.mark.slow


def _sync_twice(ctx, model_dir: str, dtype: str) -> dict:
    """Engine + FSDP2 policy (world 1): the first sync, one optimizer step, a second sync."""
    from transformers import AutoTokenizer

    from recipe.model import build_optimizer, build_policy
    from recipe.engine import build_engine
    from recipe.sync import WeightSync
    from tests.e2e.test_rollout_sync import _train_step
    from tests.helpers import compose

    cfg = compose(
        [
            f"model.path={model_dir}",
            "fsdp=fsdp2",
            "+offload=none",
            "+lora=none",
            "trainer.device=cpu",
            f"model.dtype={dtype}",
            "rollout.max_model_len=128",
        ]
    )
    engine = build_engine(engine_spec(cfg), ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        policy = build_policy(policy_of(cfg), ctx)
        optimizer = build_optimizer(policy, policy_of(cfg))
        sync = WeightSync(Settings.from_cfg(cfg), ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir))
        first = sync.sync(0)
        _train_step(policy, optimizer, sync.probe)
        second = sync.sync(1)
        layout = engine.layout
        return {
            "direct_ok": layout.direct_ok,
            "why": layout.why_not_direct(),
            "transposed": layout.transposed,
            "rearranged": layout.rearranged,
            "same": len(layout.same),
            "first": first,
            "second": second,
        }
    finally:
        engine.close()


def _layouts(rank, world, qwen2_dir, gpt2_dir):
    import torch

    from recipe.dist import DistContext

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    return {
        "qwen2": _sync_twice(ctx, qwen2_dir, "float32"),
        "gpt2": _sync_twice(ctx, gpt2_dir, "float32"),
        "gpt2_bf16": _sync_twice(ctx, gpt2_dir, "bfloat16"),
    }


@pytest.fixture(scope="module")
def layouts(tiny_model_dir, tmp_path_factory):
    from tests import tiny_models

    gpt2_dir = tiny_models.gpt2(tmp_path_factory.mktemp("gpt2"))
    return run_world(_layouts, 1, str(tiny_model_dir), gpt2_dir, timeout_s=1200)[0]


def _synced(r: dict) -> None:
    for stats in (r["first"], r["second"]):
        assert stats["sync/verified_tensors"] > 0 and stats["sync/verified_bytes"] == stats["sync/bytes"]
    assert r["second"]["sync/digest"] != r["first"]["sync/digest"]


def test_direct_map_is_proven_for_qwen2(layouts):
    r = layouts["qwen2"]
    assert r["direct_ok"] and r["why"] == "" and r["transposed"] == [] and r["rearranged"] == {}
    assert r["same"] > 0
    _synced(r)
    assert r["second"]["sync/parity_mean_abs_diff"] <= 1e-3


@pytest.mark.parametrize("which", ["gpt2", "gpt2_bf16"])
def test_direct_map_is_refused_for_gpt2_and_the_sync_is_exact(layouts, which):
    r = layouts[which]
    assert not r["direct_ok"] and "transposed" in r["why"], r["why"]
    # every Conv1D weight of both layers, the square attention c_proj included
    assert sorted(r["transposed"]) == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert r["rearranged"] == {}
    _synced(r)
    assert r["second"]["sync/parity_mean_abs_diff"] <= (1e-3 if which == "gpt2" else 0.5)
