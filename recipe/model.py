"""The policy model: HF checkpoint -> optional peft LoRA -> FSDP1 or FSDP2 (+ offload).

    from recipe.model import build_policy, build_optimizer, Residency
    model = build_policy(settings.policy, ctx)   # sharded, on ctx.device (or CPU for offload=cpu)
    optim = build_optimizer(model, settings.policy)
    residency = Residency(settings.offload, model, optim, ctx.device)
    with residency.on_device():             # offload=manual: the update's shards on the device
        ...

Precision (`model.dtype`, `model.master_dtype`): the checkpoint is loaded in the master dtype
(float32 by default), so the sharded parameters, their gradients after the reduce-scatter and
AdamW's state are float32; FSDP casts each unit's parameters to the compute dtype `model.dtype`
when it all-gathers them for forward/backward (FSDP2 `MixedPrecisionPolicy`, FSDP1
`MixedPrecision`), computes in it, and reduces the gradients in float32. Buffers (rotary
frequencies) keep the dtype they are loaded in, as HF keeps them for a bf16 model. With
`master_dtype == dtype` there is no policy: parameters, gradients and optimizer state are all
in that dtype (an update smaller than about 2^-9 of a bf16 weight is then rounded away).
LoRA: only the adapters train, so only they are float32 masters (with AdamW state); the frozen
base is loaded and kept in `model.dtype` (`base_dtype`), as is the KL reference (`build_reference`).
FSDP2 takes both dtypes in one unit (its policy casts the adapters, the base already is the
compute dtype); FSDP1 holds one dtype per flat parameter, so each adapter is a unit of its own.

Offload modes (conf/offload/):
- ``none``: shards live on the training device.
- ``cpu``: FSDP keeps the shards on the host itself (FSDP1 ``CPUOffload(offload_params=True)``,
  FSDP2 ``CPUOffloadPolicy``) and copies them in for each forward/backward.
- ``manual``: shards live on the device while training and on the host between phases, so
  rollout has the device memory; `Residency` owns the moves (``offload_to_cpu`` /
  ``load_to_device``), and each phase that computes with the shards (update, parity probe,
  checkpoint) asks it for them. The weight sync runs while they are on the host
  (recipe/weights/ streams each shard to the device and gathers it there).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from pathlib import Path
from typing import Iterator, List, Optional, Set, Tuple, Type

import torch
import torch.nn as nn

from recipe.logprobs import chunked_logprobs, shifted_targets, token_logprobs
from recipe.settings import Lora, Model, Offload, Policy


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype` ("float32", "bfloat16", "float16") as a torch dtype."""
    return getattr(torch, name)


def mixed_precision(model: Model) -> bool:
    """True when FSDP computes in `model.dtype` over masters of another dtype."""
    return model.master_dtype != model.dtype


def load_hf_model(settings: Model, device: str | torch.device = "cpu", dtype: Optional[str] = None) -> nn.Module:
    """AutoModelForCausalLM from `model.path` on `device`, in `dtype` (default `model.dtype`, the
    engine's; the policy loads its masters in `model.master_dtype`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.path, dtype=torch_dtype(dtype or settings.dtype))
    return model.to(device)


def lora_config(lora: Lora):
    """The peft LoraConfig of the `lora` slice (also the source of the adapter_config.json we publish)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_config(lora: Lora, base: str) -> dict:
    """The adapter_config.json that peft's `save_pretrained` writes for `lora` on the model at `base`
    (`model.path`)."""
    config = lora_config(lora)
    config.base_model_name_or_path = base
    config.inference_mode = True
    out = config.to_dict()
    out["target_modules"] = sorted(out["target_modules"])  # a set in peft; saved as a list
    return json.loads(json.dumps(out))


def apply_lora(model: nn.Module, lora: Lora, master_dtype: str) -> nn.Module:
    """Wrap with peft LoRA when `lora.name` is merged or adapter; only LoRA params then train.

    The adapters are made in `model.master_dtype` whatever the base's dtype: a LoRA base is
    loaded in `model.dtype` (frozen: no masters, see `base_dtype`), the adapters are what trains.
    peft initialises them in the base's dtype first (it casts new adapters to the base layer's),
    so over a bf16 base their initial values are bf16 values held in float32."""
    if lora.name == "none":
        return model
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(lora), autocast_adapter_dtype=False)
    master = torch_dtype(master_dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != master:
            param.data = param.data.to(master)
    return model


def base_dtype(model: Model, lora: Lora) -> str:
    """dtype the checkpoint's weights are held in by the trainer: `model.master_dtype` when they
    train (full fine-tuning), `model.dtype` when they are a frozen LoRA base (float32 masters of
    weights that never change would only double their memory and checkpoint)."""
    return model.master_dtype if lora.name == "none" else model.dtype


def unsharded_policy(spec: Policy) -> nn.Module:
    """The policy before sharding, on the host: the checkpoint in `base_dtype`, LoRA applied
    (initialised from `trainer.seed`, so every rank and every rebuild gets the same adapters)."""
    torch.manual_seed(spec.seed)
    return apply_lora(
        load_hf_model(spec.model, "cpu", base_dtype(spec.model, spec.lora)), spec.lora, spec.model.master_dtype
    )


def parameter_counts(spec: Policy) -> Tuple[int, int]:
    """(all, trainable) parameters of the policy `build_policy` makes, counted on the meta device
    (nothing loaded; a tied weight counts once): the FLOPs of the throughput metrics."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec.model.path)
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(config), spec.lora, spec.model.master_dtype)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def decoder_layer_classes(model: nn.Module) -> Set[Type[nn.Module]]:
    """Classes of the transformer blocks, found by HF's `_no_split_modules` (works through peft)."""
    names: Set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    # By the class or a base of it: FSDP2 makes a subclass (FSDPQwen2DecoderLayer) of each layer it shards.
    classes = {type(m) for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)}
    if not classes:
        raise ValueError(f"found no decoder layer class (looked for {sorted(names)}) in {type(model).__name__}")
    return classes


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def largest_unit_bytes(model: nn.Module) -> int:
    """Bytes of the largest FSDP unit as `shard` wraps the model: each decoder layer, and the root
    (everything else: embeddings, final norm, an untied lm_head; a tied weight counts once). Works on
    the unsharded model and on an FSDP2-sharded one (a DTensor's numel is the full tensor's)."""
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    per_layer = [nbytes(layer.parameters()) for layer in decoder_layers(model)]
    return max([nbytes(model.parameters()) - sum(per_layer)] + per_layer)


def _shard_fsdp1(model: nn.Module, spec: Policy, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy

    strategy = ShardingStrategy.FULL_SHARD if spec.fsdp.reshard_after_forward else ShardingStrategy.SHARD_GRAD_OP
    policy = None
    if mixed_precision(spec.model):  # buffer_dtype unset: buffers keep their dtype, as under FSDP2
        policy = MixedPrecision(param_dtype=torch_dtype(spec.model.dtype), reduce_dtype=torch.float32)
    return FSDP(
        model,
        auto_wrap_policy=_fsdp1_wrap_policy(model, policy),
        sharding_strategy=strategy,
        cpu_offload=CPUOffload(offload_params=spec.offload.name == "cpu"),
        use_orig_params=True,  # the root unit may hold frozen and trainable params in one flat parameter
        device_id=device,
        mixed_precision=policy,
    )


def is_trainable_leaf(module: nn.Module) -> bool:
    """A module without children whose own parameters all train (a LoRA A or B under peft)."""
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def _fsdp1_wrap_policy(model: nn.Module, policy):
    """Each decoder layer is a unit, and so is each trainable leaf inside one (LoRA A and B): an
    FSDP1 flat parameter holds one dtype, and a LoRA layer's frozen base (`model.dtype`) and its
    adapters (`model.master_dtype`) differ. Full fine-tuning has no such leaves in a layer.

    A LoRA leaf's unit casts its inputs to the compute dtype: peft casts x to the dtype of lora_A's
    weight, which outside the leaf's own forward is the float32 shard (under FSDP2 the layer is
    unsharded then, in `model.dtype`). bf16 -> float32 -> bf16 is exact, so both compute alike."""
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    classes = tuple(decoder_layer_classes(model))
    frozen = any(not p.requires_grad for p in model.parameters())
    leaf = True
    if policy is not None:
        leaf = {
            "mixed_precision": MixedPrecision(
                param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=True
            )
        }

    def wrap(module: nn.Module):
        if isinstance(module, classes):
            return True
        return leaf if frozen and is_trainable_leaf(module) else False

    return CustomPolicy(wrap)


def _shard_fsdp2(model: nn.Module, spec: Policy, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=spec.offload.pin) if spec.offload.name == "cpu" else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=spec.fsdp.reshard_after_forward, offload_policy=offload)
    if mixed_precision(spec.model):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch_dtype(spec.model.dtype), reduce_dtype=torch.float32
        )
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # moves shards to the mesh device, or keeps them on the host (cpu)
    return model


def build_policy(spec: Policy, ctx) -> nn.Module:
    """Load, apply LoRA, shard (FSDP1 or FSDP2 per `fsdp.name`) with the offload of `offload.name`.

    Every rank loads the same checkpoint (and seeds LoRA init from `trainer.seed`), so the
    shards agree without a broadcast. Trained parameters are in `model.master_dtype`, a frozen
    LoRA base in `model.dtype` (`base_dtype`); FSDP computes in `model.dtype` (module docstring).
    """
    if not mixed_precision(spec.model) and spec.model.dtype != "float32" and ctx.rank == 0:
        logging.getLogger(__name__).warning(
            "model.master_dtype=%s equals model.dtype: parameters and AdamW state are kept in %s, so an update "
            "smaller than about 2^-9 (bfloat16) of a weight is rounded away; model.master_dtype=float32 keeps "
            "float32 masters",
            spec.model.master_dtype,
            spec.model.dtype,
        )
    return shard(unsharded_policy(spec), spec, ctx.device)


def build_reference(spec: Policy, ctx) -> nn.Module:
    """The frozen KL reference: the checkpoint in `model.dtype` (it never trains, so no masters),
    sharded like the policy. Without LoRA it is the policy at step 0; with LoRA too, since peft's B
    starts at zero and the adapters then add exactly nothing."""
    model = load_hf_model(spec.model, "cpu", spec.model.dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    return shard(model, spec, ctx.device)


def shard(model: nn.Module, spec: Policy, device: torch.device) -> nn.Module:
    """Wrap an unsharded (peft) model with FSDP1 or FSDP2 per `fsdp.name`, with the offload and
    mixed-precision policies of `spec`."""
    if spec.fsdp.name == "fsdp1":
        return _shard_fsdp1(model, spec, device)
    return _shard_fsdp2(model, spec, device)


def build_optimizer(model: nn.Module, spec: Policy) -> torch.optim.Optimizer:
    """AdamW over the trainable params (LoRA: only the adapters); warm-up is the loop's job.

    The fused implementation (one kernel over all tensors, on CPU and CUDA): on the tiny model's
    CPU update it took 1.1 ms per step against 4.9 ms for the default per-tensor loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


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


class Residency:
    """Where the policy's parameters (and optimizer state) live between phases: the one owner of
    manual offload.

    With `offload=manual` on a GPU they live on the host between phases; `on_device()` brings them
    to the device for a phase that computes with them (the update, the sync's parity probe, a
    checkpoint's save or load) and sends them back after. Under every other offload mode FSDP
    decides where the shards live, and on a CPU run host and device are one: every method is then a
    no-op. (The weight sync itself reads the host shards: recipe/weights/fsdp1.py moves one unit at a time.)
    """

    def __init__(
        self, offload: Offload, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], device: torch.device
    ):
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.manual = offload.name == "manual" and self.device.type != "cpu"

    def to_device(self, optimizer: bool = True) -> None:
        if self.manual:
            load_to_device(self.model, self.optimizer if optimizer else None, self.device)

    def to_host(self, optimizer: bool = True) -> None:
        if self.manual:
            offload_to_cpu(self.model, self.optimizer if optimizer else None)

    @contextlib.contextmanager
    def on_device(self, optimizer: bool = True) -> Iterator[None]:
        """The parameters (and, with `optimizer`, its state) on the device inside the block, on the host after."""
        self.to_device(optimizer)
        try:
            yield
        finally:
            self.to_host(optimizer)


# The device's share left to activations by default: 0.55 minus the engine's share (colocated vLLM,
# `rollout.gpu_memory_utilization`); the other 0.45 holds the weights, gradients, AdamW state and
# transients: at 1.5B with float32 masters the states alone are 23 GiB, and the trainer's measured
# peak at 4096 tokens (59.4 GiB, docs/PERFORMANCE.md) is about 25 GiB more than states plus this
# estimate of activations explains, so the share stays cautious until a profile splits that peak.
# Activations per token and layer, in bf16: about 10 hidden-size and 4 intermediate-size values
# (HF Qwen2: the two RMSNorms' float32 inputs, rotary q, attention in/out, and gate, up, silu, product).
ACTIVATION_SHARE = 0.55
ACTIVATION_VALUES = (10, 4)


@functools.lru_cache(maxsize=None)
def auto_micro_batch_tokens(model_path: str, engine_share: float, device: int = 0) -> int:
    """Padded tokens per micro-batch on CUDA (`trainer.micro_batch_tokens=null`): the activations
    of the model's shape that fit in the device's share for them, as a power of two, 4096 at least.
    Per micro-batch the host pays a fixed cost (Python, autograd and FSDP's hooks over every layer,
    forward and backward) and the device fixed work (FSDP's parameter casts and gradient reductions);
    at 4096 tokens of a 1.5B model a pass held ~45 ms of matrix work against ~245 ms of wall per pass
    in docs/PERFORMANCE.md's table, so fewer, larger passes are the first lever. 8192 for Qwen2 1.5B and 4096 for 7B on an H200 beside a vLLM at 0.3."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    per_token = (
        config.num_hidden_layers
        * (ACTIVATION_VALUES[0] * config.hidden_size + ACTIVATION_VALUES[1] * config.intermediate_size)
        * 2
    )
    budget = max(ACTIVATION_SHARE - engine_share, 0.1) * torch.cuda.get_device_properties(device).total_memory
    return max(4096, 1 << int(math.log2(max(budget / per_token, 1))))


CPU_MICRO_BATCH_TOKENS = 4096  # trainer.micro_batch_tokens=null on CPU


def micro_batch_tokens(settings) -> int:
    """`trainer.micro_batch_tokens` of the run's settings, or when null 4096 on CPU and on CUDA
    `auto_micro_batch_tokens` (the engine's share counts only when it shares the device: colocated vLLM)."""
    if settings.trainer.micro_batch_tokens is not None:
        return int(settings.trainer.micro_batch_tokens)
    if settings.device != "cuda":
        return CPU_MICRO_BATCH_TOKENS
    colocated = settings.rollout.backend == "vllm" and settings.rollout.placement == "colocated"
    engine_share = settings.rollout.gpu_memory_utilization if colocated else 0.0
    return auto_micro_batch_tokens(
        str(Path(settings.model.path).expanduser()), engine_share, torch.cuda.current_device()
    )


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


# Causal LMs whose forward ends in `logits = lm_head(hidden_states)` with nothing after it (no
# soft-capping or scaling of the logits): `policy_logprobs` computes inside that call.
FUSED_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def fused_head_supported(model: nn.Module) -> bool:
    """True when `model`'s logits are its output embedding applied to the last hidden states."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in FUSED_HEAD_MODEL_TYPES and model.get_output_embeddings() is not None


def policy_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    positions: Optional[torch.Tensor] = None,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logp, entropy) [B, T-1] float32 from one forward of `model` (FSDP-wrapped or not, peft or not):
    log pi(x_t | x_<t) for t >= 1 and the entropy of softmax(logits / T) at those positions (None
    unless `entropy`; differentiable only with `entropy_grad`). With `positions` (bool [B, T-1]) only those positions are computed; the others
    read 0.

    For the models of FUSED_HEAD_MODEL_TYPES the output embedding's forward is swapped, for this
    call only, for the fused chunked computation (recipe/logprobs.py): it runs inside the model's
    forward, so FSDP has gathered the weight and tracks its gradient as for the plain lm_head, and
    neither the float32 nor the compute-dtype [tokens x vocabulary] logits exist for the whole batch.
    Other models go through their logits, block by block."""
    b, t = input_ids.shape
    keep = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
    keep[:, -1] = False
    if positions is not None:
        keep[:, :-1] &= positions.bool()
    keep = keep.reshape(-1)
    targets = shifted_targets(input_ids)[keep]

    def head(hidden: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = hidden.reshape(b * t, hidden.shape[-1])[keep]
        logp, ent = chunked_logprobs(
            rows, targets, temperature, weight=weight, entropy=entropy, entropy_grad=entropy_grad
        )
        return torch.stack([logp, ent], -1)

    if fused_head_supported(model):
        out_head = model.get_output_embeddings()
        out_head.forward = lambda hidden: head(hidden, out_head.weight)  # this instance, this call
        try:
            packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            del out_head.forward
    else:
        packed = head(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    full = packed.new_zeros(b * t, 2).masked_scatter(keep[:, None].expand(-1, 2), packed).view(b, t, 2)[:, :-1]
    return full[..., 0], (full[..., 1] if entropy else None)


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: List[List[int]], device: torch.device) -> List[List[float]]:
    """For each token list, the logprob of token i given tokens < i (i >= 1), from one eval-mode
    (and, when sharded, collective) forward of `model` over the right-padded batch. With causal
    attention the real tokens never see the pad."""
    width = max(len(ids) for ids in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask.to(device)).logits
    finally:
        model.train(was_training)
    lp = token_logprobs(logits, ids).cpu()
    return [lp[row, : len(seq) - 1].tolist() for row, seq in enumerate(batch)]
