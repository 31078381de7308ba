"""Typed config schema, registered in Hydra's ConfigStore, plus cross-field validation.

Every YAML group under ``conf/`` is merged over the dataclass of the same name below, so an
unknown key or a value of the wrong type fails when the config is composed, before any
process starts. ``validate(cfg)`` then checks the rules that span fields (choices,
ranges, hardware support) and raises ``ConfigError`` naming the field and the valid choices.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from recipe.settings import (  # noqa: F401  (the choices and errors are part of this module's interface)
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    EXPORT_CHOICES,
    FSDP_CHOICES,
    LOGGER_CHOICES,
    LOGGER_MODES,
    LORA_CHOICES,
    LOSS_AGG_CHOICES,
    OFFLOAD_CHOICES,
    ROLLOUT_CHOICES,
    SYNC_LOAD_CHOICES,
    SYNC_STRATEGY_CHOICES,
    ConfigError,
    Settings,
    UnsupportedError,
)
from recipe.settings import Algo, Lora, Policy, Rollout, Sync, Trainer


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Local HF checkpoint directory. For `tiny` and `smollm2` it is created on first use.
    path: str = MISSING
    # How the directory is made when missing: "tiny", "smollm2" or "none" (must exist).
    builder: str = "none"
    # Compute dtype: the trainer's forward/backward and the rollout engine's weights.
    dtype: str = "float32"
    # dtype of the trained (sharded) parameters, their gradients and AdamW's state. float32
    # (default) or equal to `dtype` (saves memory; small updates are then rounded away).
    master_dtype: str = "float32"
    # The model group's learning rate and warm-up steps; trainer.lr / trainer.warmup_steps
    # default to these (conf/trainer/default.yaml).
    lr: float = 1e-3
    warmup_steps: int = 2


@dataclass
class FsdpConfig:
    name: str = "fsdp2"
    # FSDP2 `reshard_after_forward` / FSDP1 FULL_SHARD vs SHARD_GRAD_OP.
    reshard_after_forward: bool = True


@dataclass
class OffloadConfig:
    name: str = "none"
    # Pin host memory for offloaded parameters; "auto" pins only when CUDA is in use.
    pin_memory: str = "auto"


@dataclass
class LoraConfig:
    name: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    # Samples per prompt: the GRPO group size.
    n: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    # vLLM: KV cache size on CPU in GiB, fraction of GPU memory on CUDA.
    kv_cache_gb: int = 1
    gpu_memory_utilization: float = 0.3
    # Release engine memory around training (vLLM sleep / wake_up).
    sleep: bool = False
    max_model_len: int = 256
    # CUDA: skip CUDA-graph capture and compilation (the engine starts in seconds, decodes slower).
    # On CPU the engine always runs eagerly.
    enforce_eager: bool = False
    # "colocated": the engine runs in the trainer's process (one per rank). "separate": each rank's engine
    # runs in a process of its own (recipe/remote.py), on `devices` under CUDA; weights go across a
    # process group of two (gloo on CPU, NCCL on CUDA) with the same digest check.
    placement: str = "colocated"
    # How weights reach a separate engine (recipe/transport.py): "group" (the process group above), "ipc"
    # (the bucket over the pipe: shared memory on CPU, a CUDA IPC handle on CUDA; the form for trainer and
    # engine on one GPU), "auto" (ipc where the engine's device is one of the trainer's, else group).
    transport: str = "auto"
    # Engine processes in all; null = one per trainer rank, the only layout supported for now.
    num_engines: Optional[int] = None
    # CUDA device ids of the engines with placement=separate, rank r's engine on devices[r]; empty = the
    # devices after the trainer's (world_size + r). Ignored on CPU; one of the trainer's devices only with
    # transport ipc or auto (NCCL cannot pair two processes on one device).
    devices: List[int] = field(default_factory=list)


@dataclass
class TaskConfig:
    name: str = "arith"
    # Dotted path of the task class (recipe/tasks.py); users add tasks by pointing here.
    target: str = "recipe.tasks.Arithmetic"
    seed: int = 0
    num_prompts: int = 512
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgoConfig:
    # PPO-style clip range of the importance ratio.
    clip_eps: float = 0.2
    # KL penalty to a frozen reference; 0 disables it (and the reference model).
    kl_coef: float = 0.0
    # Entropy bonus: the loss subtracts entropy_coef x the per-token entropy of the tempered policy.
    entropy_coef: float = 0.0
    # The bonus covers each completion's first entropy_tokens tokens; 0 = every completion token.
    entropy_tokens: int = 0
    # Divide group-centred rewards by the group std (GRPO paper) or not (Dr. GRPO).
    scale_by_std: bool = True
    loss_agg: str = "token_mean"
    # 0: the batch of step k is sampled with the weights of step k. 1: with those of step k-1, so an engine that
    # generates elsewhere samples the next batch while the trainer updates (recipe/loss.py, "Off-policy").
    off_policy_steps: int = 0
    # off_policy_steps=1: the cap C of each token's importance weight min(pi_prox / pi_behav, C).
    is_cap: float = 2.0


@dataclass
class SyncConfig:
    # "auto" = the dispatch-table entry for (fsdp, offload, lora); others are references.
    strategy: str = "auto"
    # Exact digest of every tensor the engine holds vs what was streamed, every sync.
    digest: bool = True
    # Logprob probe, trainer vs engine: 0 = off, 1 = every sync, N = the 1st and every N-th after it
    # (the 1st, N+1-th, 2N+1-th, ... sync), -1 = the first sync only.
    probe_every: int = 10
    # Mean abs difference of the probe tokens' logprobs tolerated; null = dtype-aware default.
    probe_tolerance: Optional[float] = None
    # Tensors are grouped into buckets of at most this many MiB before loading.
    bucket_mb: int = 64
    num_probe_prompts: int = 4
    # How the engine takes the stream: "direct" (copies into its parameters through a map built once;
    # CUDA), "reload" (vLLM's own reload and weight loaders), "auto" (direct where it applies).
    load: str = "auto"


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    project: str = "grpo-recipe"
    mode: str = "offline"
    # Console: false shows the progress bar and errors; true adds the libraries' start-up logs and warnings.
    verbose: bool = False


@dataclass
class TrainerConfig:
    steps: int = 60
    # Prompts each rank draws per step (per rank, not global): a step trains on
    # prompts_per_step x world_size x rollout.n completions.
    prompts_per_step: int = 16
    world_size: int = 2
    seed: int = 0
    device: str = "auto"
    # Default: the model group's `model.lr` / `model.warmup_steps`.
    lr: float = "${model.lr}"  # type: ignore[assignment]  (an interpolation; resolves to a float)
    weight_decay: float = 0.0
    warmup_steps: int = "${model.warmup_steps}"  # type: ignore[assignment]
    grad_clip: float = 1.0
    # Optimizer steps per rollout batch.
    updates_per_batch: int = 2
    # A micro-batch (one forward/backward) holds at most micro_batch_size sequences and, when
    # micro_batch_tokens > 0, at most that many padded tokens (sequences x the longest one).
    # null: 4096 on CPU; on CUDA what the device's memory holds in activations for the model's shape
    # (recipe.model.auto_micro_batch_tokens: 8192 for a 1.5B Qwen2 on an H200, 4096 for a 7B).
    micro_batch_size: int = 256
    micro_batch_tokens: Optional[int] = None
    checkpoint_every: int = 0
    # Complete checkpoints kept (the newest); older ones are removed only after a newer one is
    # complete. 0 keeps all.
    keep_checkpoints: int = 3
    resume: bool = False
    # Seconds a collective may wait before the process group gives up.
    timeout_s: int = 300
    # Held-out evaluation: greedy answers (up to rollout.max_new_tokens) to `eval_prompts` prompts
    # outside the training pool, before training, every `eval_every` steps and at the end
    # (`eval/exact`, `eval/reward`). 0 = off, the default: the default arithmetic task's pool holds
    # nearly every question it can ask.
    eval_every: int = 0
    eval_prompts: int = 64
    # > 0: the run's steps 2 .. 1 + profile_steps run under torch.profiler; rank 0 writes the phase
    # times and the top operators to <run dir>/profile/steps.txt (recipe/profiling.py), and with
    # profile_trace a chrome trace per rank beside it.
    profile_steps: int = 0
    profile_trace: bool = False
    # The policy as a Hugging Face directory (LoRA: merged, plus the PEFT adapter) in
    # <run dir>/export/step_<N>/ (recipe/export.py): after the last step ("final"), with every
    # checkpoint and after the last step ("every_checkpoint"), or never ("none").
    export: str = "final"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cache_dir: str = ".cache"
    run_dir: str = "."


def register_configs() -> None:
    # Only the top-level schema: it types every group's node already. Registering one per
    # group too would list e.g. `fsdp_schema` among the options of `fsdp=` (and accept it).
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts; `str()` is how an error names them ("> 0", "in (0, 1]")."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SEED_LIMIT = 2**32  # numpy's (and so vLLM's) seeds are 32-bit unsigned
# The valid range of every numeric (int or float) field of the schema. NaN and infinity are refused
# first: a comparison with NaN is false, so NaN would pass any range and act as some other value
# later (a NaN clip limit switches clipping off). tests/unit/test_bad_inputs.py checks that every
# numeric field of the schema is listed here.
RANGES: Dict[str, Range] = {
    "model.lr": POSITIVE,
    "model.warmup_steps": NON_NEGATIVE,
    "lora.rank": POSITIVE,
    "lora.alpha": POSITIVE,
    "lora.dropout": Range(0, 1, high_open=True, why="a probability; 1 would drop every input"),
    "rollout.n": Range(2, why="GRPO compares samples within a group"),
    "rollout.max_new_tokens": POSITIVE,
    "rollout.temperature": Range(
        0,
        low_open=True,
        why="the trainer divides logits by it, and GRPO needs sampled (different) completions within a group",
    ),
    "rollout.top_p": Range(0, 1, low_open=True),
    "rollout.kv_cache_gb": NON_NEGATIVE,
    "rollout.gpu_memory_utilization": Range(
        0, 1, low_open=True, high_open=True, why="the engine's share of the GPU, the trainer keeps the rest"
    ),
    "rollout.max_model_len": POSITIVE,
    "rollout.num_engines": POSITIVE,
    "task.seed": Range(0, SEED_LIMIT - 1),
    "task.num_prompts": POSITIVE,
    "algo.clip_eps": NON_NEGATIVE,
    "algo.kl_coef": NON_NEGATIVE,
    "algo.entropy_coef": NON_NEGATIVE,
    "algo.entropy_tokens": NON_NEGATIVE,
    "algo.off_policy_steps": Range(0, 1, why="0 = on-policy, 1 = the batch is sampled one weight version behind"),
    "algo.is_cap": Range(1, why="the cap of the truncated importance weight; below 1 it would shrink on-policy tokens"),
    "sync.probe_tolerance": NON_NEGATIVE,
    "sync.probe_every": Range(-1, why="0 = off, 1 = every sync, N = the 1st and every N-th, -1 = the first only"),
    "sync.bucket_mb": POSITIVE,
    "sync.num_probe_prompts": POSITIVE,
    "trainer.steps": POSITIVE,
    "trainer.prompts_per_step": POSITIVE,
    "trainer.world_size": POSITIVE,
    "trainer.seed": Range(0, SEED_LIMIT - 1, why="numpy's and vLLM's seeds are 32-bit"),
    "trainer.lr": POSITIVE,
    "trainer.weight_decay": NON_NEGATIVE,
    "trainer.warmup_steps": NON_NEGATIVE,
    "trainer.grad_clip": NON_NEGATIVE,
    "trainer.updates_per_batch": POSITIVE,
    "trainer.micro_batch_size": POSITIVE,
    "trainer.micro_batch_tokens": NON_NEGATIVE,
    "trainer.checkpoint_every": NON_NEGATIVE,
    "trainer.keep_checkpoints": NON_NEGATIVE,
    "trainer.timeout_s": POSITIVE,
    "trainer.eval_every": NON_NEGATIVE,
    "trainer.eval_prompts": NON_NEGATIVE,
    "trainer.profile_steps": NON_NEGATIVE,
}
# vLLM's own limit on the samples of one request (its default; the environment variable raises it).
VLLM_MAX_N_DEFAULT = 16384


def numeric_fields(schema: type = None, prefix: str = "") -> Iterator[Tuple[str, type]]:
    """(dotted key, int or float) of every numeric field of the schema (bools are not numbers here)."""
    schema = schema or TrainConfig
    for name, hint in typing.get_type_hints(schema).items():
        if is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if base in (int, float):
            yield f"{prefix}{name}", base


def check_numbers(cfg: DictConfig) -> None:
    """Every numeric field is finite and inside RANGES; the error names the field and the range."""
    for key, _ in numeric_fields():
        value = OmegaConf.select(cfg, key)
        if value is None:  # Optional fields (sync.probe_tolerance): null means the default
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; give a value {RANGES.get(key, 'that is finite')}")
        bound = RANGES.get(key)
        if bound is not None and not bound.holds(value):
            raise ConfigError(f"{key} must be {bound}, got {value}" + (f": {bound.why}" if bound.why else ""))


def _engine_limits(rollout: Rollout, lora: Lora, seed: int, world: int) -> None:
    """Limits that come from the engine rather than from the field itself. The world is the run's
    (`Settings.world_size`: torchrun's WORLD_SIZE when it started the process, else trainer.world_size)."""
    if seed + world - 1 >= SEED_LIMIT:
        raise ConfigError(
            f"trainer.seed={seed} is too large: rank r's engine takes seed + r, and seeds "
            f"are 32-bit; give trainer.seed <= {SEED_LIMIT - world}"
        )
    if rollout.backend != "vllm":
        return
    max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", VLLM_MAX_N_DEFAULT))
    if rollout.n > max_n:
        raise ConfigError(
            f"rollout.n={rollout.n} is more samples per prompt than vLLM takes in one request "
            f"({max_n}; the environment variable VLLM_MAX_N_SEQUENCES raises it)"
        )
    if lora.name == "adapter" and lora.rank > 512:
        raise ConfigError(
            f"lora.rank={lora.rank} is larger than vLLM's largest max_lora_rank (512) with "
            "lora=adapter; use lora.rank <= 512, or lora=merged"
        )


# Config keys renamed, old -> new. Given under the old name the run is refused at start, naming the new one.
RENAMED = {
    "sync.verify": "sync.probe_every (an int: 0 = off, 1 = every sync, N = the 1st and every N-th, "
    "-1 = the first only)",
    "sync.tolerance": "sync.probe_tolerance",
}


def refuse_renamed(overrides: Sequence[str]) -> None:
    """Command-line overrides (`sync.verify=every`, `+sync.verify=...`, `~sync.tolerance`) that use a renamed
    key: refused before Hydra composes, whose schema would only say the key is not in the struct."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            raise ConfigError(f"{key} was renamed: use {RENAMED[key]}")


def _unknown_keys(node: Any, prefix: str = "") -> None:
    """`+trainer.stepz=3` adds a key even to a typed node; refuse keys the schema lacks."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        for key in node.keys():
            if f"{prefix}{key}" in RENAMED:
                refuse_renamed([f"{prefix}{key}"])
            if key not in known:
                raise ConfigError(
                    f"{prefix}{key} is not a config key; {prefix.rstrip('.') or 'the top level'} "
                    f"has: {', '.join(sorted(known))}"
                )
    for key in node.keys():
        if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
            _unknown_keys(node[key], f"{prefix}{key}.")


def validate(cfg: DictConfig) -> Settings:
    """Every rule: unknown keys and numeric ranges on the composed config, each group's own rules
    (`Settings.check`), then the rules across groups. Raises ConfigError naming the field(s) and the
    valid choices; returns the settings. The model directory is checked by recipe.assets.check_model_path."""
    _unknown_keys(cfg)
    check_numbers(cfg)  # first: later rules compare numbers, and a NaN passes every comparison
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is missing; set model.path=/path/to/hf_checkpoint (a local HF directory)")
    s = Settings.from_cfg(cfg)
    _engine_limits(s.rollout, s.lora, s.trainer.seed, s.world_size)
    s.check()
    _rollout_and_batch(s.trainer, s.rollout, s.algo)
    _placement(s.rollout, s.device, s.world_size)
    _evaluation(s.trainer, s.world_size)
    _reference_strategy(s.sync, s.lora)
    _hardware(s.policy, s.device, s.world_size)
    return s


def _reference_strategy(sync: Sync, lora: Lora) -> None:
    """The reference strategies stream full weights: they cannot serve a LoRA run."""
    if sync.strategy != "auto" and lora.name != "none":
        raise ConfigError(
            f"sync.strategy={sync.strategy!r} is a full-weight reference strategy; "
            f"it requires lora=none (got lora.name={lora.name!r}); use sync.strategy=auto"
        )


def _hardware(s: Policy, device: str, world_size: int) -> None:
    """What this machine (`device`, `world_size`) can run with the chosen fsdp, offload and lora (`s`:
    the policy's slices)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    if device == "cpu" and s.fsdp.name == "fsdp1" and s.offload.name == "cpu":
        raise UnsupportedError(
            "fsdp=fsdp1 with offload=cpu needs an accelerator: FSDP1's CPUOffload(offload_params=True) pins host "
            "memory unconditionally ('Cannot access accelerator device when none is available'). On a CPU-only "
            "machine use fsdp=fsdp2 +offload=cpu (CPUOffloadPolicy with pin_memory=False) or fsdp=fsdp1 +offload=manual."
        )
    if world_size == 1 and s.fsdp.name == "fsdp1" and s.lora.name != "none" and s.offload.name != "cpu":
        raise UnsupportedError(
            f"fsdp=fsdp1 with lora={s.lora.name} at world size 1 is not supported: FSDP1 falls back to NO_SHARD "
            "there, and with peft's frozen and trainable parameters in one flat parameter the second forward "
            "fails (torch 2.13: 'as_params=True type(prim_param)=Tensor'). Use fsdp=fsdp2, or "
            "trainer.world_size >= 2."
        )
    if device == "cpu" and s.offload.pin_memory is True:
        raise ConfigError("offload.pin_memory=true needs CUDA; on CPU use offload.pin_memory=auto or false")


def _rollout_and_batch(trainer: Trainer, rollout: Rollout, algo: Algo) -> None:
    """Values that pass one by one but cannot sample or train together."""
    samples = trainer.prompts_per_step * rollout.n
    if trainer.updates_per_batch > samples:
        raise ConfigError(
            f"trainer.updates_per_batch={trainer.updates_per_batch} is more than the samples per "
            f"rank (trainer.prompts_per_step * rollout.n = {samples}): a mini-batch would be empty"
        )
    if algo.off_policy_steps > 0 and rollout.top_p < 1:
        raise ConfigError(
            f"algo.off_policy_steps={algo.off_policy_steps} with rollout.top_p={rollout.top_p} "
            "is not supported: with top_p < 1 the engine reports logprobs of the truncated distribution, "
            "so the stale sampler's probability (the importance weight's denominator) is unknown; use "
            "rollout.top_p=1 or algo.off_policy_steps=0"
        )


def _placement(rollout: Rollout, device: str, world: int) -> None:
    """One engine per trainer rank; with placement=separate on CUDA, on devices of its own, or on the trainer's
    with transport ipc (NCCL cannot pair two processes on one device)."""
    if rollout.num_engines is not None and rollout.num_engines != world:
        raise ConfigError(
            f"rollout.num_engines={rollout.num_engines} is not valid with {world} trainer ranks: "
            f"every rank samples its own prompts from an engine of its own; choose one of: null, {world}"
        )
    if rollout.transport == "ipc" and rollout.placement != "separate":
        raise ConfigError(
            f"rollout.transport=ipc is how weights reach an engine in a process of its own, but "
            f"rollout.placement={rollout.placement}; choose rollout.placement=separate, or rollout.transport "
            f"one of: auto, group"
        )
    devices = list(rollout.devices)
    if rollout.placement != "separate" or device != "cuda":
        return  # colocated engines share their rank's device; on CPU there are no device ids
    import torch

    devices = devices or list(range(world, 2 * world))
    trainer = set(range(world))  # rank r trains on cuda:<local rank r> (recipe/dist.py)
    if len(devices) != world:
        raise ConfigError(
            f"rollout.devices={devices} gives {len(devices)} devices for {world} engines; give one per "
            f"trainer rank (rank r's engine takes rollout.devices[r])"
        )
    shared = sorted(trainer & set(devices))
    if shared and rollout.transport == "group":
        raise ConfigError(
            f"rollout.devices={devices} overlaps the trainer's devices {sorted(trainer)} (cuda:{shared[0]}) "
            f"with rollout.transport=group: NCCL cannot pair two processes on one device; use "
            f"rollout.transport=ipc (or auto), or choose devices outside them"
        )
    if len(set(devices)) != len(devices):
        raise ConfigError(f"rollout.devices={devices} names a device twice; give each engine a device of its own")
    visible = torch.cuda.device_count()
    if max(devices) >= visible:
        raise ConfigError(
            f"rollout.devices={devices} needs device {max(devices)} but {visible} CUDA devices are "
            f"visible; give devices below {visible} (rollout.devices=[0] with rollout.transport=ipc shares "
            f"the trainer's one GPU)"
        )


def _evaluation(trainer: Trainer, world: int) -> None:
    """The held-out evaluation: off (eval_every=0), or at least one prompt per rank."""
    if trainer.eval_every != 0 and trainer.eval_prompts < world:
        raise ConfigError(
            f"trainer.eval_prompts={trainer.eval_prompts} is fewer than the ranks ({world}): "
            "every rank evaluates its share of the held-out prompts; give at least one per rank"
        )


def expand_paths(cfg: DictConfig) -> None:
    """`~` in the paths the run reads or writes, expanded once at start, so every later reader (the
    libraries too, which do not expand it) sees the same absolute path, and config.yaml records it."""
    for key in ("model.path", "cache_dir", "run_dir"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), merge=False)


def launcher_world(trainer) -> None:
    """Under torchrun the world is torchrun's (WORLD_SIZE): `trainer.world_size` (of the trainer group
    `trainer`, set in place) takes its value, so that
    config.yaml records the world a run had and a resume at another world size is refused like any
    other change of the math (each rank's checkpoint file, RNG and share of the prompts are its own)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # as recipe/dist.py tells torchrun
        return
    world = int(os.environ["WORLD_SIZE"])
    if world != trainer.world_size:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"note: trainer.world_size={trainer.world_size} but torchrun started {world} ranks; the run "
                f"uses {world}",
                flush=True,
            )
        trainer.world_size = world
