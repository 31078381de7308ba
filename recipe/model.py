"""The policy model: HF checkpoint -> optional peft LoRA -> FSDP1 or FSDP2 (+ offload).

    from recipe.model import build_policy, build_optimizer
    model = build_policy(cfg, ctx)          # sharded, on ctx.device (or CPU for offload=cpu)
    optim = build_optimizer(model, cfg)

Precision (`model.dtype`, `model.master_dtype`): the checkpoint is loaded in the master dtype
(float32 by default), so the sharded parameters, their gradients after the reduce-scatter and
AdamW's state are float32; FSDP casts each unit's parameters to the compute dtype `model.dtype`
when it all-gathers them for forward/backward (FSDP2 `MixedPrecisionPolicy`, FSDP1
`MixedPrecision`), computes in it, and reduces the gradients in float32. Buffers (rotary
frequencies) keep the dtype they are loaded in, as HF keeps them for a bf16 model. With
`master_dtype == dtype` there is no policy: parameters, gradients and optimizer state are all
in that dtype (an update smaller than about 2^-9 of a bf16 weight is then rounded away).

Offload modes (conf/offload/):
- ``none``: shards live on the training device.
- ``cpu``: FSDP keeps the shards on the host itself (FSDP1 ``CPUOffload(offload_params=True)``,
  FSDP2 ``CPUOffloadPolicy``) and copies them in for each forward/backward.
- ``manual``: shards live on the device while training; the trainer calls
  ``offload_to_cpu(model, optim)`` after the update and ``load_to_device(model, optim, device)``
  before the next one, so rollout has the device memory. The weight sync runs while they are
  on the host (recipe/state_dict.py streams each shard to the device and gathers it there).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Set, Type

import torch
import torch.nn as nn
from omegaconf import DictConfig

from recipe.config import pin_memory


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype` ("float32", "bfloat16", "float16") as a torch dtype."""
    return getattr(torch, name)


def mixed_precision(cfg: DictConfig) -> bool:
    """True when FSDP computes in `model.dtype` over masters of another dtype."""
    return cfg.model.master_dtype != cfg.model.dtype


def load_hf_model(cfg: DictConfig, device: str | torch.device = "cpu", dtype: Optional[str] = None) -> nn.Module:
    """AutoModelForCausalLM from `model.path` on `device`, in `dtype` (default `model.dtype`, the
    engine's; the policy loads its masters in `model.master_dtype`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch_dtype(dtype or cfg.model.dtype))
    return model.to(device)


def lora_config(cfg: DictConfig):
    """The peft LoraConfig of `cfg.lora` (also the source of the adapter_config.json we publish)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """Wrap with peft LoRA when `lora.name` is merged or adapter; only LoRA params then train."""
    if cfg.lora.name == "none":
        return model
    from peft import get_peft_model

    config = lora_config(cfg)
    # Adapters in the base's dtype, the master dtype: FSDP needs one dtype per sharded group
    # (peft would upcast the adapters of a bf16 base to fp32 by default). With float32
    # masters (the default) adapters and base are float32 alike.
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def decoder_layer_classes(model: nn.Module) -> Set[Type[nn.Module]]:
    """Classes of the transformer blocks, found by HF's `_no_split_modules` (works through peft)."""
    names: Set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"found no decoder layer class (looked for {sorted(names)}) in {type(model).__name__}")
    return classes


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def _shard_fsdp1(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = ShardingStrategy.FULL_SHARD if cfg.fsdp.reshard_after_forward else ShardingStrategy.SHARD_GRAD_OP
    policy = None
    if mixed_precision(cfg):  # buffer_dtype unset: buffers keep their dtype, as under FSDP2
        policy = MixedPrecision(param_dtype=torch_dtype(cfg.model.dtype), reduce_dtype=torch.float32)
    return FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(model)),
        sharding_strategy=strategy,
        cpu_offload=CPUOffload(offload_params=cfg.offload.name == "cpu"),
        use_orig_params=True,  # LoRA: frozen and trainable params share a flat parameter
        device_id=device,
        mixed_precision=policy,
    )


def _shard_fsdp2(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=pin_memory(cfg)) if cfg.offload.name == "cpu" else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=cfg.fsdp.reshard_after_forward, offload_policy=offload)
    if mixed_precision(cfg):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(cfg.model.dtype), reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # moves shards to the mesh device, or keeps them on the host (cpu)
    return model


def build_policy(cfg: DictConfig, ctx) -> nn.Module:
    """Load, apply LoRA, shard (FSDP1 or FSDP2 per `fsdp.name`) with the offload of `offload.name`.

    Every rank loads the same checkpoint (and seeds LoRA init from `trainer.seed`), so the
    shards agree without a broadcast. Parameters are in `model.master_dtype`; FSDP computes in
    `model.dtype` (see the module docstring).
    """
    if not mixed_precision(cfg) and cfg.model.dtype != "float32" and ctx.rank == 0:
        logging.getLogger(__name__).warning(
            "model.master_dtype=%s equals model.dtype: parameters and AdamW state are kept in %s, so an update "
            "smaller than about 2^-9 (bfloat16) of a weight is rounded away; model.master_dtype=float32 keeps "
            "float32 masters", cfg.model.master_dtype, cfg.model.dtype)
    torch.manual_seed(cfg.trainer.seed)
    model = apply_lora(load_hf_model(cfg, "cpu", cfg.model.master_dtype), cfg)
    return shard(model, cfg, ctx.device)


def shard(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    """Wrap an unsharded (peft) model with FSDP1 or FSDP2 per `fsdp.name`, with the offload and
    mixed-precision policies of `cfg`."""
    if cfg.fsdp.name == "fsdp1":
        return _shard_fsdp1(model, cfg, device)
    return _shard_fsdp2(model, cfg, device)


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable params (LoRA: only the adapters); warm-up is the loop's job."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)


def move_fsdp1_unit(unit: nn.Module, device: torch.device) -> torch.device:
    """Move one FSDP1 unit's flat shard (not its children's) to `device`; returns where it was.

    The local shard is repointed at the moved data so FSDP's next unshard reads from there.
    Units whose shards FSDP itself offloads (CPUOffload) are left alone.
    """
    handle = unit._handle
    if handle is None or handle._offload_params:
        return torch.device(device)
    flat, home = handle.flat_param, handle.flat_param.device
    if home == torch.device(device):
        return home
    # FSDP1 keeps the sharded grad on the flat parameter even after zero_grad(set_to_none=True).
    grad, flat.grad = flat.grad, None
    handle.flat_param_to(device, non_blocking=True)
    flat._local_shard = flat.data
    if grad is not None:
        flat.grad = grad.to(device, non_blocking=True)
        handle._use_sharded_grad_views()
    return home


def _move_params(model: nn.Module, device: torch.device) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        for unit in FSDP.fsdp_modules(model):
            move_fsdp1_unit(unit, device)
    else:
        model.to(device)  # FSDP2 re-registers its sharded params after `_apply`


def _move_optimizer_state(optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> None:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for key, value in state.items():
            # AdamW's `step` counter stays where it is (a CPU scalar unless capturable).
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device, non_blocking=True)


def offload_to_cpu(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Manual offload: move sharded params (with any grads) and optimizer state to host memory."""
    _move_params(model, torch.device("cpu"))
    _move_optimizer_state(optimizer, torch.device("cpu"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_to_device(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> None:
    """Manual offload: bring sharded params (with any grads) and optimizer state back for the update."""
    _move_params(model, torch.device(device))
    _move_optimizer_state(optimizer, torch.device(device))


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm across shards (max_norm 0 = only measure it); returns the norm."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    limit = max_norm if max_norm > 0 else float("inf")
    if isinstance(model, FSDP):  # FSDP1 reduces the norm over its flat shards itself
        return float(model.clip_grad_norm_(limit))
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):  # FSDP2: DTensor grads give a DTensor norm
        norm = norm.full_tensor()
    return float(norm)
