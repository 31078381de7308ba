"""Checkpoints with manual offload on CUDA: the shards live on the host between phases, and DCP's
get/set_state_dict want them on the compute device ("Expects tensor to be on the compute device
cuda:0, was on cpu"). recipe/checkpoint.py brings them to the device around the save and the
load, and back to the host after.

    python -m pytest -m gpu tests/gpu/test_checkpoint_gpu.py -v     # world 2 with 2 CUDA devices, else 1

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _local(model):
    return {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}


def _on_host(model, optimizer) -> bool:
    tensors = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    return all(t.device.type == "cpu" for t in tensors)


def save_and_load_manual_offload(rank: int, world: int, cfg_yaml: str, root: str) -> dict:
    from omegaconf import OmegaConf

    from recipe.checkpoint import load, save
    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy, load_to_device, offload_to_cpu
    from tests.dist.test_state_dict import _train_step

    cfg, device = OmegaConf.create(cfg_yaml), torch.device("cuda", rank)
    ctx = DistContext(rank, world, rank, device)
    model = build_policy(cfg, ctx)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def step():  # as GRPOTrainer.update: device for the update, host between phases
        load_to_device(model, optimizer, device)
        _train_step(model, optimizer, device)
        offload_to_cpu(model, optimizer)

    step()
    path = save(root, model, optimizer, scheduler, 1, ctx, manual_offload=True)
    saved, host_after_save = {k: v.cpu() for k, v in _local(model).items()}, _on_host(model, optimizer)
    step()
    load(path, model, optimizer, scheduler, ctx, manual_offload=True)
    loaded = {k: v.cpu() for k, v in _local(model).items()}
    return dict(same=all(torch.equal(saved[k], loaded[k]) for k in saved), host_after_save=host_after_save,
                host_after_load=_on_host(model, optimizer))


@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
def test_checkpoint_with_manual_offload_on_cuda(tiny_model_dir, tmp_path, fsdp):
    from omegaconf import OmegaConf

    from tests.dist.test_state_dict import combo_cfg
    from tests.helpers import run_world

    world = min(2, torch.cuda.device_count())
    cfg = combo_cfg(tiny_model_dir, (fsdp, "manual", "none"), device="cuda")
    for r in run_world(save_and_load_manual_offload, world, OmegaConf.to_yaml(cfg), str(tmp_path / "ckpt"),
                       backend="nccl", timeout_s=180):
        assert r["same"], "the loaded shards differ from the saved ones"
        assert r["host_after_save"] and r["host_after_load"], "manual offload: shards must be back on the host"
