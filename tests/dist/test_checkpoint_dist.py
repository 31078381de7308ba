"""Checkpoints of the sharded policy at world 2 (gloo): FSDP1 and FSDP2, full and LoRA, with the
manual offload that keeps shards on the host between phases: a save, another update, then a load
gives back the saved shards bit for bit, and leaves them on the host. The same body runs on CUDA
in tests/gpu/test_checkpoint_gpu.py, where the shards must come to the device around DCP.

    .venv/bin/python -m pytest tests/dist/test_checkpoint_dist.py
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from tests.helpers import policy_of

COMBOS = [(f, "manual", lora) for f in ("fsdp1", "fsdp2") for lora in ("none", "merged")]


def _local(model):
    return {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone().cpu()
            for n, p in model.named_parameters()}


def _on_host(model, optimizer) -> bool:
    tensors = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    return all(t.device.type == "cpu" for t in tensors)


def save_and_load_manual_offload(rank: int, world: int, cfg_yamls: List[str], root: str, device_type: str) -> list:
    from omegaconf import OmegaConf

    from recipe.checkpoint import load, save
    from recipe.dist import DistContext
    from recipe.model import Residency, build_optimizer, build_policy
    from tests.dist.test_state_dict import _train_step

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    ctx = DistContext(rank, world, rank, device)
    results = []
    for i, cfg_yaml in enumerate(cfg_yamls):
        cfg = OmegaConf.create(cfg_yaml)
        model = build_policy(policy_of(cfg), ctx)
        optimizer = build_optimizer(model, policy_of(cfg))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        residency = Residency(cfg.offload, model, optimizer, device)

        def step():  # as GRPOTrainer.update: device for the update, host between phases
            with residency.on_device():
                _train_step(model, optimizer, device)

        step()
        path = save(f"{root}/{i}", model, optimizer, scheduler, 1, ctx, residency=residency)
        saved, host_after_save = _local(model), _on_host(model, optimizer)
        step()
        changed = any(not torch.equal(saved[k], v) for k, v in _local(model).items())
        load(path, model, optimizer, scheduler, ctx, residency=residency)
        loaded = _local(model)
        results.append(dict(changed=changed, same=all(torch.equal(saved[k], loaded[k]) for k in saved),
                            host_after_save=host_after_save, host_after_load=_on_host(model, optimizer)))
    return results


def check_checkpoint_round_trips(model_dir, root, device_type: str, world: int, backend: str, combos) -> None:
    from omegaconf import OmegaConf

    from tests.dist.test_state_dict import combo_cfg
    from tests.helpers import run_world

    cfgs = [OmegaConf.to_yaml(combo_cfg(model_dir, combo, device=device_type)) for combo in combos]
    for rank_results in run_world(save_and_load_manual_offload, world, cfgs, str(root), device_type,
                                  backend=backend, timeout_s=300):
        for combo, r in zip(combos, rank_results):
            assert r["changed"], f"{combo}: the second update changed nothing; the test proves nothing"
            assert r["same"], f"{combo}: the loaded shards differ from the saved ones"
            assert r["host_after_save"] and r["host_after_load"], f"{combo}: shards must be back on the host"


@pytest.mark.slow
def test_sharded_checkpoint_round_trip_with_manual_offload(tiny_model_dir, tmp_path):
    check_checkpoint_round_trips(tiny_model_dir, tmp_path, "cpu", 2, "gloo", COMBOS)


def lora_checkpoint(rank: int, world: int, cfg_yamls: List[str], root: str, changed_base: str) -> list:
    """bf16 compute over float32 masters with LoRA: the base and the KL reference stay in bf16, a
    checkpoint holds only the adapters (and their AdamW state) and refuses a changed base."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from recipe.checkpoint import CheckpointError, load, save
    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy, build_reference
    from tests.dist.test_state_dict import _train_step

    device = torch.device("cpu")
    ctx = DistContext(rank, world, rank, device)
    results = []
    for i, cfg_yaml in enumerate(cfg_yamls):
        cfg = OmegaConf.create(cfg_yaml)
        model = build_policy(policy_of(cfg), ctx)
        reference = build_reference(policy_of(cfg), ctx)
        optimizer = build_optimizer(model, policy_of(cfg))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        _train_step(model, optimizer, device)
        path = save(f"{root}/{i}", model, optimizer, scheduler, 1, ctx, base=cfg.model.path)
        saved = _local(model)
        keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        _train_step(model, optimizer, device)
        load(path, model, optimizer, scheduler, ctx, base=cfg.model.path)
        loaded = _local(model)
        try:
            load(path, model, optimizer, scheduler, ctx, base=changed_base)
            refusal = ""
        except CheckpointError as exc:
            refusal = str(exc)
        results.append(dict(
            same=all(torch.equal(saved[k], loaded[k]) for k in saved),
            model_keys=sorted(k for k in keys if k.startswith("model.")),
            trainable=sorted(n for n, p in model.named_parameters() if p.requires_grad),
            reference={(str(p.dtype), p.requires_grad) for p in reference.parameters()},
            bytes=sum(f.stat().st_size for f in path.iterdir()), refusal=refusal))
    return results


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapters_and_refuses_a_changed_base(tiny_model_dir, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from recipe.names import is_lora_param
    from tests.dist.test_state_dict import combo_cfg
    from tests.helpers import run_world

    changed = tmp_path / "changed_base"
    shutil.copytree(tiny_model_dir, changed)
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (changed / "model.safetensors").write_bytes(bytes(weights))
    combos = [("fsdp1", "none", "adapter"), ("fsdp2", "none", "merged")]
    cfgs = [OmegaConf.to_yaml(combo_cfg(tiny_model_dir, combo, precision="bf16")) for combo in combos]
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size  # float32 on disk
    for rank, rank_results in enumerate(run_world(lora_checkpoint, 2, cfgs, str(tmp_path), str(changed),
                                                  timeout_s=300)):
        for combo, r in zip(combos, rank_results):
            assert r["same"], f"{combo}: the loaded adapters differ from the saved ones"
            assert r["model_keys"] and all(is_lora_param(k) for k in r["model_keys"]), f"{combo}: {r['model_keys']}"
            assert len(r["model_keys"]) == len(r["trainable"]), combo
            assert r["reference"] == {("torch.bfloat16", False)}, f"{combo}: KL reference {r['reference']}"
            # adapters + their AdamW state: less than the float32 base alone, which a full checkpoint holds
            assert r["bytes"] < base_bytes, f"{combo}: checkpoint of {r['bytes']} B (base {base_bytes} B)"
            # rank 0 checks the base; both ranks raise its refusal (recipe.dist.agree), naming rank 0
            assert r["refusal"].startswith("rank 0: "), r["refusal"]
            assert f"{changed / 'model.safetensors'} differs" in r["refusal"], r["refusal"]
