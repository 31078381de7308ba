"""lora=merged into a bf16 engine: the rounding of W + s*B@A is measured on every sync and logged
(`sync/merge_rounding_*`, recipe/weights/lora.py `measure_merge_rounding`, recipe/sync.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from recipe.settings import Settings
from recipe.weights import measure_merge_rounding, merge_lora
from recipe.sync import merge_rounding_metrics
from tests.helpers import engine_spec, policy_of, run_world


def _layer(seed=0, rows=256, cols=128, rank=8, b_scale=1e-4):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, cols, generator=g) * 0.05,
        torch.randn(rank, cols, generator=g) * 0.05,
        torch.randn(rows, rank, generator=g) * b_scale,
    )


def test_rounding_is_measured_against_the_update_without_changing_the_merge():
    w, a, b = _layer()
    plain = merge_lora(w, a, b, 2.0, torch.bfloat16)
    with measure_merge_rounding() as acc:
        measured = merge_lora(w, a, b, 2.0, torch.bfloat16)
        merge_lora(w, a, b, 2.0, torch.float32)  # a float32 merge rounds nothing: not counted
    assert torch.equal(plain.view(torch.int16), measured.view(torch.int16))  # bit for bit the same merge
    exact = w + (b @ a) * 2.0
    err, update = (exact.bfloat16().float() - exact).abs(), ((b @ a) * 2.0).abs()
    stats = merge_rounding_metrics(acc, torch.device("cpu"))
    assert stats["sync/merge_rounding_mean"] == pytest.approx(err.mean().item(), rel=1e-4)
    assert stats["sync/merge_rounding_max"] == pytest.approx(err.max().item(), rel=1e-6)
    assert stats["sync/merge_rounding_ratio"] == pytest.approx(err.sum().item() / update.sum().item(), rel=1e-4)
    assert stats["sync/merge_rounding_ratio"] > 1  # a small update: bf16's rounding of W is larger


def test_nothing_is_measured_outside_the_block():
    w, a, b = _layer()
    with measure_merge_rounding() as acc:
        pass
    merge_lora(w, a, b, 2.0, torch.bfloat16)
    assert acc.sums is None


def _merged_bf16_sync(rank, world, model_dir):
    from recipe.dist import DistContext
    from recipe.model import build_policy
    from recipe.engine import build_engine
    from recipe.sync import WeightSync
    from tests.helpers import compose
    from transformers import AutoTokenizer

    cfg = compose(
        [
            f"model.path={model_dir}",
            "fsdp=fsdp2",
            "+offload=none",
            "+lora=merged",
            "trainer.device=cpu",
            "model.dtype=bfloat16",
            "rollout=hf",
            "rollout.max_model_len=128",
        ]
    )
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("recipe.sync").addHandler(handler)
    logging.getLogger("recipe.sync").setLevel(logging.INFO)
    policy = build_policy(policy_of(cfg), ctx)
    with torch.no_grad():  # a LoRA update of a realistic size (peft starts B at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 1e-4)
    engine = build_engine(engine_spec(cfg), ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    sync = WeightSync(Settings.from_cfg(cfg), ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir))
    stats = sync.sync(0)
    return {k: v for k, v in stats.items() if "merge_rounding" in k}, [line for line in lines if "lora=merged" in line]


def test_a_merged_bf16_sync_logs_its_rounding(tiny_model_dir):
    (stats, lines), _ = run_world(_merged_bf16_sync, 2, str(tiny_model_dir), timeout_s=300)
    assert set(stats) == {"sync/merge_rounding_mean", "sync/merge_rounding_max", "sync/merge_rounding_ratio"}
    # The base is held in bf16 (model.dtype), so bf16(W + sBA) either keeps W (the update is lost whole:
    # rounding == update) or moves by whole bf16 steps: the ratio is at most about 1. An update of 1e-4
    # on the tiny model is mostly lost (measured: 0.93).
    assert stats["sync/merge_rounding_max"] > 0 and stats["sync/merge_rounding_ratio"] > 0.5, stats
    assert len(lines) == 1 and "lora=adapter" in lines[0] and "exact" in lines[0]
