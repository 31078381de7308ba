"""Weight-sync strategies on GPUs (NCCL, world 2): the verl #5995 regression and all 18 combinations.

    python -m pytest -m gpu tests/gpu/test_state_dict_gpu.py -v     # needs 2 CUDA devices

Skipped without CUDA (tests/conftest.py). The per-combination check is the one of
tests/dist/test_state_dict.py (bit for bit against an unsharded copy given the same step).
"""

from __future__ import annotations

import pytest
import torch

from recipe.weights import all_keys
from tests.dist.test_state_dict import (
    _train_step,
    assert_combo,
    check_stream,
    checkpoint_state,
    combo_cfg,
    reference,
    run_combos,
)
from tests.helpers import policy_of

pytestmark = pytest.mark.gpu

# The device-mismatch error of verl #5995 ("Attempted to set the storage of a tensor on device
# "cpu" to a storage on different device "cuda:0""), or the same mismatch reported elsewhere.
SEED_BUG = ("different device", "same device")


def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


def seed_regression(rank: int, world: int, cfg_yaml: str) -> dict:
    """FSDP2 + CPUOffloadPolicy after a step: our entry streams; `naive` (model.to + state_dict) fails."""
    from omegaconf import OmegaConf

    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy
    from recipe.weights import StreamSpec, stream_weights

    cfg, device = OmegaConf.create(cfg_yaml), torch.device("cuda", rank)
    model = build_policy(policy_of(cfg), DistContext(rank, world, rank, device))
    _train_step(model, build_optimizer(model, policy_of(cfg)), device)
    on_host = all(p.to_local().device.type == "cpu" for p in model.parameters())
    ours = check_stream(stream_weights(model, StreamSpec.of(cfg), device), reference(cfg, device), device)
    cfg.sync.strategy = "naive"
    try:
        for _ in stream_weights(model, StreamSpec.of(cfg), device):
            pass
        naive_error = None
    except RuntimeError as exc:  # raised locally on every rank, before any collective
        naive_error = str(exc)
    return dict(ours=ours, naive_error=naive_error, on_host=on_host)


def test_seed_bug_fsdp2_cpu_offload(tiny_model_dir):
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    _two_gpus()
    cfg = combo_cfg(tiny_model_dir, ("fsdp2", "cpu", "none"), device="cuda")
    for result in run_world(seed_regression, 2, OmegaConf.to_yaml(cfg), backend="nccl", timeout_s=180):
        assert result["on_host"], "CPUOffloadPolicy should keep the shards on the host"
        assert not result["ours"]["bad"], result["ours"]["bad"]
        assert set(result["ours"]["names"]) == set(checkpoint_state(tiny_model_dir))
        error = result["naive_error"]
        print("naive:", error)
        assert error is not None, "the naive strategy no longer fails under FSDP2 + CPUOffloadPolicy"
        assert any(s in error for s in SEED_BUG), error


def _run_all(model_dir, keys, extra_dtype=None):
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    cfgs = [combo_cfg(model_dir, key, device="cuda") for key in keys]
    for cfg in cfgs:
        if extra_dtype:
            cfg.model.dtype = extra_dtype
    ranks = run_world(run_combos, 2, [OmegaConf.to_yaml(c) for c in cfgs], "cuda", backend="nccl", timeout_s=300)
    failures = []
    for cfg, r0, r1 in zip(cfgs, ranks[0], ranks[1]):
        for result in (r0, r1):
            try:
                assert_combo(result, cfg, model_dir)
            except AssertionError as exc:
                failures.append(str(exc))
    print(f"{len(keys)} combinations x 2 ranks checked, {len(failures)} failures")
    assert not failures, "\n".join(failures)


def test_all_18_combinations_fp32(tiny_model_dir):
    _two_gpus()
    _run_all(tiny_model_dir, all_keys())


def test_bf16_combinations(tiny_model_dir):
    """bf16 engine dtype: merge in fp32 then cast, adapters kept in the base dtype."""
    _two_gpus()
    keys = [
        ("fsdp2", "cpu", "merged"),
        ("fsdp1", "cpu", "adapter"),
        ("fsdp2", "manual", "none"),
        ("fsdp1", "manual", "merged"),
        ("fsdp2", "none", "adapter"),
        ("fsdp2", "none", "merged"),
    ]
    _run_all(tiny_model_dir, keys, extra_dtype="bfloat16")


# LoRA layer shapes (out, in) of the benchmarked models: q/o, k/v, gate/up, down of Qwen2 1.5B and 7B.
BENCH_LORA_SHAPES = [
    (1536, 1536),
    (256, 1536),
    (8960, 1536),
    (1536, 8960),
    (3584, 3584),
    (512, 3584),
    (18944, 3584),
    (3584, 18944),
]


def test_merged_rows_equal_rows_of_the_full_merge_on_cuda():
    """FSDP2 merged LoRA on CUDA: each rank's rows (Shard(0) at world 1-8) of the float32 merge
    are bit for bit those rows of `merge_lora` on the full tensors, at the benchmarked shapes and
    LoRA ranks 8-64 (the product is taken at the full shape, so cuBLAS must give the full merge's bits)."""
    from recipe.weights import merge_lora, merge_lora_rows

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    failures = []
    for (out, inn), r in [(shape, r) for shape in BENCH_LORA_SHAPES for r in (8, 16, 64)]:
        w = torch.randn(out, inn, device="cuda", generator=g)
        a, b = torch.randn(r, inn, device="cuda", generator=g), torch.randn(out, r, device="cuda", generator=g)
        full = merge_lora(w, a, b, 2.0, torch.bfloat16)
        for world in (2, 3, 4, 8):
            offset = 0
            for rows_w, rows_b in zip(torch.chunk(w, world), torch.chunk(b, world)):
                part = merge_lora_rows(rows_w.clone(), a, rows_b.clone(), 2.0, torch.bfloat16, offset, out)
                if not torch.equal(part, full[offset : offset + rows_w.shape[0]]):
                    failures.append((out, inn, r, world, offset))
                offset += rows_w.shape[0]
    assert not failures, f"row blocks differ from the full merge: {failures[:10]} ({len(failures)} in all)"
