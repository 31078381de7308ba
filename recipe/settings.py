"""The run's settings as typed, frozen slices, built once from the composed config.

Hydra composes `conf/` over the schema of recipe/config.py (a `DictConfig`); `Settings.from_cfg(cfg)`
then turns it into one frozen dataclass per group and resolves what is derived from several fields
or from the machine once: the device, the world size, whether to pin host memory, the probe's
tolerance and the dispatch-table key. Each component is given only its slice (`settings.sync`,
`settings.model`, ...), so what a component may read is written in its signature.

Each slice's `check()` holds the rules of its own group (choices, and limits between two of its own
fields); `recipe.config.validate` keeps the rules that span groups, the numeric ranges and the
unknown keys. The slices keep the group's field names, so `settings.trainer.seed` is `cfg.trainer.seed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

# The option names of the three groups that key the dispatch table (recipe/weights/).
FSDP_CHOICES = ("fsdp1", "fsdp2")
OFFLOAD_CHOICES = ("none", "manual", "cpu")
LORA_CHOICES = ("none", "merged", "adapter")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
ROLLOUT_CHOICES = ("vllm", "hf")
PLACEMENT_CHOICES = ("colocated", "separate")
TRANSPORT_CHOICES = ("auto", "group", "ipc")  # how weights reach a separate engine (recipe/transport.py)
LOGGER_CHOICES = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
LOSS_AGG_CHOICES = ("token_mean", "seq_mean")
# Reference strategies the benchmark may name; "auto" means the dispatch-table entry.
SYNC_STRATEGY_CHOICES = ("auto", "naive", "dcp_full_cpu", "dtensor_stream")
SYNC_LOAD_CHOICES = ("auto", "direct", "reload")
EXPORT_CHOICES = ("final", "every_checkpoint", "none")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the valid choices."""


class UnsupportedError(ConfigError):
    """The combination is valid but this machine cannot run it (e.g. needs an accelerator)."""


BUILDER_CHOICES = ("tiny", "smollm2", "none")
PIN_CHOICES = {"auto": None, "true": True, "false": False}


def choose(key: str, value: Any, choices) -> None:
    """Refuse `value` unless it is one of `choices`; the message names the field and the choices."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def pin_setting(value: Any) -> Optional[bool]:
    """`offload.pin_memory` as typed: "auto" -> None, "true" / "false" (or the bools the command line
    gives for `offload.pin_memory=true`) -> True / False."""
    text = str(value).lower()
    if text not in PIN_CHOICES:
        raise ConfigError(f"offload.pin_memory={value!r} is not valid; choose one of: auto, true, false")
    return PIN_CHOICES[text]


# Mean |logprob_trainer - logprob_engine| over the probe tokens when sync.probe_tolerance is null. A bound
# on the worst token is too tight in bf16: its gap grows with the model and with training (logits
# sharpen, a token at logprob -10 carries a large rounding error); SmolLM2 trained at lr 3e-5 on an
# H200 showed 0.72 on one token at logprob -10 after 75 correct syncs, which stopped the run when
# the bound was on the worst token. The mean over the ~50 probe tokens averages that rounding out; a wrong weight moves
# most tokens. The worst token is still logged (sync/parity_max_abs_diff) and named in the error.
# Worst-token figures, measured on CPU (docs/SYNC.md): float32 noise <= 5e-5 on SmolLM2-135M, while
# one stale MLP tensor after one optimizer step shifts a probe token by 0.03 (tiny) to 0.11 (SmolLM2).
# bfloat16 noise reaches 0.25 on SmolLM2 (engine and trainer round every matmul differently),
# so its default sits at 2x that; it does not catch a single stale tensor, nor a missed update at small
# learning rates (tiny model, step trained off the probe's tokens: 0.035 at lr 1e-4): the digest check
# proves those; the probe checks kernels and layouts (docs/SYNC.md, "What each check can and cannot see").
# float16 is not measured here: 0.1 follows from its 3 extra mantissa bits (8x finer than bf16).
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}
# On CUDA the engine's float32 kernels (attention backend, fused ops) differ from the trainer's more than
# on CPU: the tiny model's first, correct sync measured 0.0043 on an H200 (docs/GPU.md), which the CPU
# float32 tolerance refused. 2.3x that; the exact digest check, not the probe, proves the weights there.
CUDA_FLOAT32_TOLERANCE = 1e-2


def default_tolerance(dtype: str, device_type: str) -> float:
    """The probe's tolerance when sync.probe_tolerance is null: per dtype, and for float32 per device."""
    if dtype == "float32" and device_type == "cuda":
        return CUDA_FLOAT32_TOLERANCE
    return DEFAULT_TOLERANCE[dtype]


def _node(node) -> Dict[str, Any]:
    """One group of the composed config as plain values (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True)


def _build(cls, values: Dict[str, Any], **resolved):
    """The slice `cls` of one group's values; a key the slice does not declare is an error here (a field
    added to a group's config must be added to its slice too, or it would be dropped unseen)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known - set(resolved))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field for {unknown}: add them to recipe/settings.py")
    return cls(**{**values, **resolved})


@dataclass(frozen=True)
class Model:
    name: str
    path: str
    builder: str
    dtype: str
    master_dtype: str
    lr: float
    warmup_steps: int

    def check(self) -> None:
        choose("model.dtype", self.dtype, DTYPE_CHOICES)
        choose("model.master_dtype", self.master_dtype, DTYPE_CHOICES)
        if self.master_dtype not in ("float32", self.dtype):
            raise ConfigError(
                f"model.master_dtype={self.master_dtype!r} with model.dtype={self.dtype!r} is not "
                f"valid; choose one of: float32, {self.dtype} (masters at least as precise as compute)"
            )
        choose("model.builder", self.builder, BUILDER_CHOICES)

    @property
    def mixed_precision(self) -> bool:
        """Compute in `dtype` over masters in `master_dtype` (FSDP's mixed-precision policy)."""
        return self.master_dtype != self.dtype


@dataclass(frozen=True)
class Fsdp:
    name: str
    reshard_after_forward: bool

    def check(self) -> None:
        choose("fsdp.name", self.name, FSDP_CHOICES)


@dataclass(frozen=True)
class Offload:
    name: str
    # None = auto (pin when the device is CUDA); `pin` is the resolved value.
    pin_memory: Optional[bool]
    pin: bool

    def check(self) -> None:
        choose("offload.name", self.name, OFFLOAD_CHOICES)


@dataclass(frozen=True)
class Lora:
    name: str
    rank: int
    alpha: float
    dropout: float
    target_modules: Tuple[str, ...]

    def check(self) -> None:
        choose("lora.name", self.name, LORA_CHOICES)
        if self.name != "none" and not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module when lora is merged or adapter")


@dataclass(frozen=True)
class Rollout:
    backend: str
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    kv_cache_gb: int
    gpu_memory_utilization: float
    sleep: bool
    max_model_len: int
    enforce_eager: bool
    placement: str
    transport: str
    num_engines: Optional[int]
    devices: Tuple[int, ...]

    def check(self) -> None:
        choose("rollout.backend", self.backend, ROLLOUT_CHOICES)
        choose("rollout.placement", self.placement, PLACEMENT_CHOICES)
        choose("rollout.transport", self.transport, TRANSPORT_CHOICES)
        if self.backend == "vllm" and self.kv_cache_gb <= 0:
            raise ConfigError(f"rollout.kv_cache_gb must be > 0 for rollout=vllm, got {self.kv_cache_gb}")
        if self.max_model_len <= self.max_new_tokens:
            raise ConfigError(
                f"rollout.max_model_len={self.max_model_len} leaves no room for a prompt before "
                f"rollout.max_new_tokens={self.max_new_tokens}; it must hold prompt + completion"
            )


@dataclass(frozen=True)
class Task:
    name: str
    target: str
    seed: int
    num_prompts: int
    params: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        pass  # the task class checks its own params when built (recipe.tasks.build_task)


@dataclass(frozen=True)
class Algo:
    clip_eps: float
    kl_coef: float
    entropy_coef: float
    entropy_tokens: int
    scale_by_std: bool
    loss_agg: str
    off_policy_steps: int
    is_cap: float

    def check(self) -> None:
        choose("algo.loss_agg", self.loss_agg, LOSS_AGG_CHOICES)


@dataclass(frozen=True)
class Sync:
    strategy: str
    digest: bool
    probe_every: int
    # As given (None = the dtype-aware default); `tolerance` is the value the probe uses.
    probe_tolerance: Optional[float]
    bucket_mb: int
    num_probe_prompts: int
    load: str
    tolerance: float

    def check(self) -> None:
        choose("sync.strategy", self.strategy, SYNC_STRATEGY_CHOICES)
        choose("sync.load", self.load, SYNC_LOAD_CHOICES)


@dataclass(frozen=True)
class Logger:
    backend: str
    project: str
    mode: str
    verbose: bool

    def check(self) -> None:
        choose("logger.backend", self.backend, LOGGER_CHOICES)
        choose("logger.mode", self.mode, LOGGER_MODES)


@dataclass(frozen=True)
class Trainer:
    steps: int
    prompts_per_step: int
    world_size: int
    seed: int
    device: str
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    updates_per_batch: int
    micro_batch_size: int
    micro_batch_tokens: Optional[int]  # null: per device (recipe.model.micro_batch_tokens, resolved by the loop)
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    timeout_s: int
    eval_every: int
    eval_prompts: int
    profile_steps: int
    profile_trace: bool
    export: str

    def check(self) -> None:
        choose("trainer.device", self.device, DEVICE_CHOICES)
        choose("trainer.export", self.export, EXPORT_CHOICES)
        if self.profile_steps > 0 and self.steps < 2:
            raise ConfigError(
                f"trainer.profile_steps={self.profile_steps} needs trainer.steps >= 2 (the first "
                f"step is warm-up and is not profiled); got trainer.steps={self.steps}"
            )
        if self.eval_every != 0 and self.eval_prompts <= 0:
            raise ConfigError(f"trainer.eval_prompts must be > 0 with trainer.eval_every > 0, got {self.eval_prompts}")


@dataclass(frozen=True)
class Policy:
    """What builds, shards and optimizes the policy (recipe/model.py): the model, fsdp, offload and lora
    slices, and the trainer's seed (LoRA's initialisation), learning rate and weight decay."""

    model: Model
    fsdp: Fsdp
    offload: Offload
    lora: Lora
    seed: int
    lr: float
    weight_decay: float


def device_of(setting: str) -> str:
    """`trainer.device` resolved against the hardware: "cpu" or "cuda"."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Settings:
    """The whole run's settings: one slice per config group plus the values resolved once."""

    model: Model
    fsdp: Fsdp
    offload: Offload
    lora: Lora
    rollout: Rollout
    task: Task
    algo: Algo
    sync: Sync
    logger: Logger
    trainer: Trainer
    cache_dir: str
    run_dir: str
    device: str  # "cpu" or "cuda": trainer.device resolved
    world_size: int  # torchrun's WORLD_SIZE when it started the process, else trainer.world_size
    # The composed config as plain containers (what wandb records as the run's config).
    source: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def combo(self) -> Tuple[str, str, str]:
        """The dispatch-table key: the option names of fsdp, offload and lora."""
        return (self.fsdp.name, self.offload.name, self.lora.name)

    @property
    def policy(self) -> Policy:
        """The slices recipe/model.py builds the policy from."""
        return Policy(
            self.model,
            self.fsdp,
            self.offload,
            self.lora,
            self.trainer.seed,
            self.trainer.lr,
            self.trainer.weight_decay,
        )

    def slices(self) -> Tuple[Any, ...]:
        return (
            self.model,
            self.fsdp,
            self.offload,
            self.lora,
            self.rollout,
            self.task,
            self.algo,
            self.sync,
            self.logger,
            self.trainer,
        )

    def check(self) -> None:
        """Every group's own rules, group by group."""
        for part in self.slices():
            part.check()

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "Settings":
        """The typed settings of a composed config (the model path must be set: see config.validate)."""
        trainer = _build(Trainer, _node(cfg.trainer))
        device = device_of(trainer.device) if trainer.device in DEVICE_CHOICES else trainer.device
        model = _build(Model, _node(cfg.model))
        offload = _node(cfg.offload)
        pinned = pin_setting(offload.get("pin_memory", "auto"))
        lora = _node(cfg.lora)
        lora["target_modules"] = tuple(lora.get("target_modules") or ())
        rollout = _node(cfg.rollout)
        rollout["devices"] = tuple(rollout.get("devices") or ())
        sync = _node(cfg.sync)
        tolerance = sync["probe_tolerance"]
        if tolerance is None:  # (an unknown dtype has none: Model.check refuses it)
            tolerance = default_tolerance(model.dtype, device) if model.dtype in DTYPE_CHOICES else float("nan")
        return cls(
            model=model,
            fsdp=_build(Fsdp, _node(cfg.fsdp)),
            offload=_build(Offload, offload, pin_memory=pinned, pin=(device == "cuda") if pinned is None else pinned),
            lora=_build(Lora, lora),
            rollout=_build(Rollout, rollout),
            task=_build(Task, _node(cfg.task)),
            algo=_build(Algo, _node(cfg.algo)),
            sync=_build(Sync, sync, tolerance=tolerance),
            logger=_build(Logger, _node(cfg.logger)),
            trainer=trainer,
            cache_dir=str(cfg.cache_dir),
            run_dir=str(cfg.run_dir),
            device=device,
            world_size=int(os.environ.get("WORLD_SIZE", trainer.world_size)),
            source=OmegaConf.to_container(cfg, resolve=True),
        )
