"""vLLM on the GPUs: one engine per rank on its own device, sleep/wake, every combination at world 2.

    python -m pytest -m gpu tests/gpu/test_vllm_gpu.py -v          # needs 2 CUDA devices and vLLM

Skipped without CUDA (tests/conftest.py) and without vLLM. The combination run is the one
docs/GPU.md reports (tools/combo_matrix.py, tiny model here so it fits a test's time).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, compose, engine_spec, run_world

pytestmark = pytest.mark.gpu


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA devices")
    pytest.importorskip("vllm")


def engine_devices(rank: int, world: int, model_dir: str) -> dict:
    from recipe.dist import DistContext
    from recipe.engine import VllmEngine

    cfg = compose(
        [
            f"model.path={model_dir}",
            "trainer.device=cuda",
            "rollout.sleep=true",
            "rollout.enforce_eager=true",
            "rollout.gpu_memory_utilization=0.2",
        ]
    )
    ctx = DistContext(rank, world, rank, torch.device("cuda", rank))
    engine = VllmEngine(engine_spec(cfg), ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        devices = engine.llm.apply_model(lambda m: sorted({str(p.device) for p in m.parameters()}))
        samples = engine.generate([[3, 4, 5]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=rank)
        engine.sleep()
        engine.wake()
        after_wake = engine.generate([[3, 4, 5]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=rank)
        total = torch.cuda.mem_get_info(ctx.device)[1] / 2**30
        return {
            "devices": devices[0],
            "samples": len(samples),
            "after_wake": len(after_wake),
            "memory": engine.memory_stats(),
            "total_gb": total,
        }
    finally:
        engine.close()


def test_each_rank_engine_on_its_own_gpu_and_sleep_releases_memory(tiny_model_dir):
    _needs(2)
    results = run_world(engine_devices, 2, str(tiny_model_dir), backend="nccl", timeout_s=600)
    for rank, r in enumerate(results):
        assert r["devices"] == [f"cuda:{rank}"], r
        assert r["samples"] == r["after_wake"] == 2
        mem = r["memory"]
        released = mem["rollout/mem_free_asleep_gb"] - mem["rollout/mem_free_awake_gb"]
        # Level-1 sleep frees the KV cache and moves the weights to the host: most of the engine's share.
        assert released > 0.5 * 0.2 * r["total_gb"], mem


def test_every_combination_runs_checks_and_resumes_at_world_2(tmp_path, tiny_model_dir):
    _needs(2)
    out = tmp_path / "matrix.json"
    cmd = [
        sys.executable,
        "-m",
        "tools.combo_matrix",
        "--isolate",
        "--resume",
        "--out",
        str(out),
        "--root",
        str(tmp_path / "runs"),
        f"model.path={tiny_model_dir}",
        "trainer.device=cuda",
        "trainer.world_size=2",
        "rollout.sleep=true",
        "rollout.enforce_eager=true",
        "rollout.gpu_memory_utilization=0.2",
        "debug=tiny",
        "model.dtype=bfloat16",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=1800)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 18
    bad = [(r["combo"], r["status"], r["error"]) for r in rows if r["status"] != "ok" or not r["resumed"]]
    assert not bad, bad


def direct_vs_reload(rank: int, world: int, model_dir: str, lora: str) -> dict:
    """The direct path and vLLM's reload write the same bytes into every engine parameter."""
    from recipe.dist import DistContext
    from recipe.engine import VllmEngine, streamed_shapes

    cfg = compose(
        [
            f"model.path={model_dir}",
            "trainer.device=cuda",
            "model.dtype=bfloat16",
            "sync.load=direct",
            "rollout.enforce_eager=true",
            "rollout.gpu_memory_utilization=0.2",
            f"+lora={lora}",
        ]
    )
    ctx = DistContext(rank, world, rank, torch.device("cuda", rank))
    engine = VllmEngine(engine_spec(cfg), ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        g = torch.Generator(device=ctx.device).manual_seed(1)
        new = {
            n: torch.randn(s, generator=g, device=ctx.device).to(torch.bfloat16)
            for n, s in streamed_shapes(model_dir).items()
        }

        def params():
            return {
                n: p.detach().clone()
                for n, p in engine.llm.apply_model(lambda m: dict(m.named_parameters()))[0].items()
            }

        engine.load_weights(iter(new.items()))
        torch.cuda.synchronize()
        direct = params()
        for p in engine.llm.apply_model(lambda m: list(m.parameters()))[0]:
            p.data.zero_()
        engine.reload_weights(iter(new.items()))
        torch.cuda.synchronize()
        reloaded = params()
        return {
            "path": engine.load_path,
            "names": len(direct),
            "differ": sorted(n for n in direct if not torch.equal(direct[n], reloaded[n])),
        }
    finally:
        engine.close()


@pytest.mark.parametrize("lora", ["none", "adapter"])
def test_direct_load_writes_what_vllm_reload_writes(tiny_model_dir, lora):
    _needs(1)
    (r,) = run_world(direct_vs_reload, 1, str(tiny_model_dir), lora, backend="nccl", timeout_s=600)
    assert r["path"] == "direct" and r["names"] > 0
    assert r["differ"] == [], r
