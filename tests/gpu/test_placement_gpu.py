"""rollout.placement=separate on ONE GPU: trainer and engine process both on cuda:0, the weights by CUDA IPC.

    python -m pytest -m gpu tests/gpu/test_placement_gpu.py -v     # needs 1 CUDA device (vLLM for its case)

NCCL cannot pair two processes on one device, so this form exists only with rollout.transport=ipc
(recipe/transport.py): each bucket crosses as a CUDA IPC handle, the engine copies it and acknowledges
before the trainer refills its staging buffer. Two syncs (the second after the weights moved) must pass
the digest check, with several buckets per sync, and the engine must generate from them.
"""

from __future__ import annotations

import pytest

from tests.helpers import compose, run_world

pytestmark = pytest.mark.gpu


def _one_gpu_syncs(rank, world, model_dir, rollout):
    import torch
    from transformers import AutoTokenizer

    from recipe.config import validate
    from recipe.dist import DistContext
    from recipe.model import build_policy
    from recipe.remote import place_engine
    from recipe.sync import WeightSync

    cfg = validate(
        compose(
            [
                f"model.path={model_dir}",
                f"rollout={rollout}",
                "trainer.device=cuda",
                "rollout.placement=separate",
                "rollout.devices=[0]",
                "rollout.transport=auto",  # cuda:0 is the trainer's: auto must choose ipc
                "rollout.enforce_eager=true",
                "rollout.gpu_memory_utilization=0.2",
                "sync.bucket_mb=1",  # the tiny model (1.2 MB in float32) crosses in more than one bucket
            ]
        )
    )
    ctx = DistContext(rank, world, rank, torch.device("cuda", rank))
    engine = place_engine(cfg, ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        policy = build_policy(cfg.policy, ctx)
        sync = WeightSync(cfg, ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir))
        first = sync.sync(0)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        second = sync.sync(1)
        samples = engine.generate([[3, 4, 5]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
        return engine.transport, engine.buckets_sent, first, second, len(samples)
    finally:
        engine.close()


@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_one_gpu_separate_engine_syncs_by_cuda_ipc(tiny_model_dir, rollout):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if rollout == "vllm":
        pytest.importorskip("vllm")
    ((transport, buckets, first, second, samples),) = run_world(
        _one_gpu_syncs, 1, str(tiny_model_dir), rollout, backend="nccl", timeout_s=600
    )
    assert transport == "ipc"
    assert buckets >= 4, buckets  # two syncs of two or more buckets each
    assert first["sync/verified_tensors"] > 0 and second["sync/verified_tensors"] > 0
    assert samples == 2
