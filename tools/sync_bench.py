"""Weight-sync benchmark: every dispatch-table strategy, and the reference strategies, timed
against copy limits measured in the same process.

    python -m tools.sync_bench                                      # tiny model, world 2 (make bench)
    python -m tools.sync_bench bench.sink=copy bench.warm_iters=1   # quick, without vLLM
    python -m tools.sync_bench -m bench_model=qwen2_1p5b,qwen2_7b trainer.world_size=2,1 \
        bench.out_dir=results                                       # GPU (docs/PERFORMANCE.md)

For one model shape (`bench_model`) and one world size (`trainer.world_size`) every rank:
1. measures the limits: pinned host-to-device copy (concurrently on all ranks, so per rank),
   device-to-device copy, and the all-gather bandwidth of the process group;
2. for each (fsdp, offload, lora) combination of the dispatch table, and each reference
   strategy (`sync.strategy` naive | dcp_full_cpu | dtensor_stream on fsdp2), builds the
   sharded policy, then times one cold and `bench.warm_iters` warm syncs into a sink, each one
   `recipe.sync.WeightSync.sync` (the training sync itself, with the digest check and the probe
   off), its times read from the `sync/*` metrics it returns;
3. rank 0 prints a table and writes it, with the target checks, to `bench.out` (JSON).

The sink is the `recipe.engine.Engine` the sync loads into. `copy`: a preallocated destination
laid out as the engine's weights (an HF model's state dict on the device, `dest[name].copy_(t)`),
so the figure includes the load; adapter tensors get their slot on first sight. `vllm` (needs a
checkpoint: the tiny model on CPU, `bench.engine_dir` for a random shape on GPU): the real
in-process engine (`sync.load`: direct copies on CUDA, vLLM's reload on CPU); adapter rows still
use the copy sink there. Columns: `cold s` / `warm s` = `sync/total_s` of the first / median warm
sync, `gather s` / `load s` = `sync/gather_s` / `sync/load_s` of the warm median.
Warm-up: WeightSync loads the base on its first lora=adapter sync, so adapter rows run one
untimed sync first; their `cold s` is the next sync (the adapter slots are then already made).
lora=merged into a narrower engine dtype: WeightSync measures the merge's rounding every sync,
as in training, and the figure includes it.

Limit of one sync of B bytes at world W (every rank receives the whole B):
- offloaded (cpu, manual): t_limit = max(B / (W * h2d), B / allgather) -- each rank copies
  its 1/W to the device, overlapped with the all-gather; the serial sum is reported too;
- on the device: t_limit = B / allgather (world 1: B / device-to-device copy).
`x limit` = t_limit / t_measured (1.0 = at the limit). A strategy that raises (the naive
reference under FSDP2 + CPUOffloadPolicy on CUDA, verl #5995) is a `crashed` row with its error.
Digest cost: after the timed syncs, up to 3 more WeightSync syncs run with its digest check
(the trainer digests what it streams, the sink digests what it holds, then they are compared,
names included); `digest s` is the median `sync/digest_s` and `x move` = digest / (gather + load)
of the same sync (target <= 0.10). With the vLLM sink on CPU the engine's digests are taken
inside its load, before packing, and WeightSync moves that time from the load to the digest.
The trl_colocate row (TRL checks nothing, its sink has no digests) runs none.
Profile (`bench.profile=true`): one more warm sync per strategy runs under torch.profiler; rank 0
writes the key_averages table (top 25 by self device time on CUDA, else self CPU time) to
`<dir of bench.out>/profile/<out stem>__<label>.txt`, with a chrome trace beside it when
`bench.profile_trace=true`, and prints the top five ops. Each `next()` of the stream is marked
`stream.next (gather)`, the whole sync `sync`.
Peak extra device memory is measured over each sync (allocated bytes above the level before it)
and compared with the largest FSDP unit (one per decoder layer plus the root) + one bucket.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recipe.config import (
    FSDP_CHOICES,
    LORA_CHOICES,
    OFFLOAD_CHOICES,
    ConfigError,
    TrainConfig,
    UnsupportedError,
    validate,
)
from recipe.engine import Engine
from recipe.settings import Settings, device_of
from recipe.sync import WeightSync, WeightSyncError, trainer_names

REFERENCES = ("naive", "dcp_full_cpu", "dtensor_stream", "trl_colocate")
SINKS = ("auto", "copy", "vllm")
GB = 1e9
MiB = 2**20


@dataclass
class BenchSettings:
    strategies: List[str] = field(default_factory=lambda: ["all"])
    references: List[str] = field(default_factory=lambda: list(REFERENCES))
    reference_offloads: List[str] = field(default_factory=lambda: ["cpu", "none"])
    warm_iters: int = 5
    max_cell_s: float = 20.0
    sink: str = "auto"
    # The checkpoint the vLLM sink's engine starts from when bench_model is a random shape (written by
    # `python -m tools.make_random_model <shape> <dir>`); empty: model.path (tiny) on CPU only.
    engine_dir: str = ""
    limit_mb: int = 1024
    limit_reps: int = 10
    out_dir: str = "outputs/bench"
    out: str = "outputs/bench/sync_bench.json"
    # One more warm sync per strategy under torch.profiler; rank 0 writes its key_averages table
    # to <dir of bench.out>/profile/ (and a chrome trace with profile_trace: large on big models).
    profile: bool = False
    profile_trace: bool = False


@dataclass
class ShapeConfig:
    name: str = "tiny"
    # Qwen2Config keyword arguments of a random-weight model; empty = load `model.path`.
    qwen2: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)
    bench_model: ShapeConfig = field(default_factory=ShapeConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One row: a dispatch-table entry (strategy "auto") or a reference strategy on fsdp2."""

    fsdp: str
    offload: str
    lora: str
    strategy: str = "auto"

    @property
    def label(self) -> str:
        key = f"{self.fsdp}/{self.offload}/{self.lora}"
        return key if self.strategy == "auto" else f"{self.strategy}@{self.fsdp}/{self.offload}"

    @property
    def offloaded(self) -> bool:
        return self.offload != "none"


def select_cells(cfg: DictConfig) -> List[Cell]:
    """The cells named by `bench.strategies` / `bench.references`, checked against the choices."""
    table = [Cell(*key) for key in itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES)]
    wanted = list(cfg.bench.strategies)
    if wanted != ["all"]:
        labels = {c.label: c for c in table}
        unknown = [w for w in wanted if w not in labels]
        if unknown:
            raise ConfigError(
                f"bench.strategies has unknown entries {unknown}; choose 'all' or labels "
                f"fsdp/offload/lora such as {', '.join(list(labels)[:3])}, ..."
            )
        table = [labels[w] for w in wanted]
    for ref in cfg.bench.references:
        if ref not in REFERENCES:
            raise ConfigError(f"bench.references entry {ref!r} is not valid; choose from: {', '.join(REFERENCES)}")
    for off in cfg.bench.reference_offloads:
        if off not in OFFLOAD_CHOICES:
            raise ConfigError(
                f"bench.reference_offloads entry {off!r} is not valid; choose from: {', '.join(OFFLOAD_CHOICES)}"
            )
    # The naive reference mutates the model (model.to(device)) and may leave it broken: last.
    refs = sorted(cfg.bench.references, key=lambda r: r == "naive")
    return table + [Cell("fsdp2", off, "none", ref) for off in cfg.bench.reference_offloads for ref in refs]


def cell_cfg(cfg: DictConfig, cell: Cell) -> DictConfig:
    """The training config of one cell: the bench config with fsdp/offload/lora/strategy set."""
    out = copy.deepcopy(cfg)
    out.fsdp.name, out.offload.name, out.lora.name = cell.fsdp, cell.offload, cell.lora
    out.sync.strategy = "dtensor_stream" if cell.strategy == "trl_colocate" else cell.strategy
    # timed syncs move weights only; the digest-checked syncs after them turn the digest on; no probe
    # (random weights have no tokenizer)
    out.sync.digest, out.sync.probe_every = False, 0
    return out


# ----------------------------------------------------------------------------- device helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(values: List[float]) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64)  # CPU tensor: gloo on CPU and on CUDA worlds
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _timed(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up, slowest rank."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _max_over_ranks([statistics.median(times)])[0]


def measure_limits(device: torch.device, nbytes: int, reps: int, bucket_bytes: int) -> Dict[str, float]:
    """Copy and all-gather bandwidths (GB/s) in this process; see the module docstring."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = device.type == "cuda"
    n = nbytes // 2 // world * world  # bf16 elements, divisible by the world
    dev_a = torch.randn(n, device=device).to(torch.bfloat16)
    dev_b = torch.empty_like(dev_a)
    # On CPU "host-to-device" is a plain host copy: there is no device to reach.
    host = dev_a.cpu().pin_memory() if cuda else dev_a.clone()
    # (the lambdas run here, before the `del` below that ruff's F821 sees)
    h2d = nbytes_of(host) / _timed(lambda: dev_b.copy_(host, non_blocking=True), device, reps) / GB  # noqa: F821
    d2d = nbytes_of(dev_a) / _timed(lambda: dev_b.copy_(dev_a), device, reps) / GB  # noqa: F821

    def gather_bw(count: int) -> float:
        out = torch.empty(count, dtype=torch.bfloat16, device=device)
        shard = torch.randn(count // world, device=device).to(torch.bfloat16)
        t = _timed(lambda: dist.all_gather_into_tensor(out, shard), device, reps)
        return nbytes_of(out) / t / GB

    bucket = max(world, bucket_bytes // 2 // world * world)
    ag = gather_bw(n) if world > 1 else d2d
    ag_bucket = gather_bw(bucket) if world > 1 else d2d
    del host, dev_a, dev_b
    return {
        "h2d_gbps": h2d,
        "d2d_gbps": d2d,
        "allgather_gbps": ag,
        "allgather_bucket_gbps": ag_bucket,
        "probe_bytes": n * 2,
        "bucket_bytes": bucket * 2,
        "rank": rank,
    }


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def limit_times(nbytes: int, offloaded: bool, limits: Dict[str, float], world: int) -> Tuple[float, float]:
    """(t_limit, t_serial) in seconds for one sync of `nbytes`; see the module docstring."""
    t_ag = nbytes / (limits["allgather_gbps"] * GB)
    if not offloaded:
        return t_ag, t_ag
    t_h2d = nbytes / (world * limits["h2d_gbps"] * GB)
    return max(t_h2d, t_ag), t_h2d + t_ag


# ----------------------------------------------------------------------------- models and sinks


def build_base(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The unsharded HF model every cell starts from, in the trainer's master dtype (`model.master_dtype`,
    as the trainer holds it): random weights of `bench_model.qwen2` made directly on the device (GPU
    shapes: seconds, no disk), or the checkpoint of `model.path`."""
    from recipe.model import load_hf_model, torch_dtype

    if not cfg.bench_model.qwen2:
        from recipe.assets import ensure_model

        ensure_model(cfg.model)
        return load_hf_model(cfg.model, device, cfg.model.master_dtype)
    from transformers import AutoModelForCausalLM, Qwen2Config

    dtype = torch_dtype(cfg.model.master_dtype)
    config = Qwen2Config(**OmegaConf.to_container(cfg.bench_model.qwen2), dtype=dtype)
    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_policy_from(base: torch.nn.Module, cfg: DictConfig, ctx) -> Tuple[torch.nn.Module, int]:
    """`recipe.model.build_policy` on a copy of `base` (no reload from disk per cell), held in the
    trainer's `base_dtype` (a frozen LoRA base in `model.dtype`, as the trainer holds it); also
    returns the largest FSDP unit's bytes. Manual offload leaves the shards on the host, as
    the trainer does before a sync."""
    from recipe import model as policy
    from recipe.settings import Settings

    torch.manual_seed(cfg.trainer.seed)
    held = policy.torch_dtype(policy.base_dtype(cfg.model, cfg.lora))
    model = policy.apply_lora(copy.deepcopy(base).to(held), cfg.lora, cfg.model.master_dtype)
    unit = policy.largest_unit_bytes(model)
    model = policy.shard(model, Settings.from_cfg(cfg).policy, ctx.device)
    if cfg.offload.name == "manual":
        _train_like(model, ctx.device)
        policy.Residency(cfg.offload, model, None, ctx.device).to_host()
    return model, unit


def _train_like(model: torch.nn.Module, device: torch.device) -> None:
    """One forward/backward on two tokens, grads dropped: FSDP's lazy init has run and every unit
    is resharded, the state in which the trainer offloads before a sync."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


class CopySink(Engine):
    """An engine that holds preallocated weights laid out as a real engine's (an HF model's state dict
    on the device): `load_weights` copies each streamed tensor into its slot (a name it lacks is an
    error); `load_adapter` copies into adapter slots, allocated on first sight. Its digests are of
    what it holds, so WeightSync's digest check runs on it as on a real engine."""

    backend = "copy"

    def __init__(self, dest: Dict[str, torch.Tensor], device: torch.device):
        self.dest, self.device = dest, device
        self.adapter: Dict[str, torch.Tensor] = {}
        self.seen: set = set()

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            slot = self.dest.get(name)
            if slot is None:
                raise KeyError(f"the stream yielded {name!r}, which the engine's weights do not have")
            slot.copy_(tensor)
            self.seen.add(name)

    def load_adapter(self, tensors: Iterable[Tuple[str, torch.Tensor]], adapter_config: dict, version: int) -> None:
        for name, tensor in tensors:
            slot = self.adapter.get(name)
            if slot is None:
                slot = self.adapter[name] = torch.empty_like(tensor, device=self.device)
            slot.copy_(tensor)
        self.lora_version = version

    def weight_digests(self) -> Dict[str, Any]:
        return _held(self.dest, sorted(self.seen))

    def adapter_digests(self) -> Dict[str, Any]:
        return _held(self.adapter, sorted(self.adapter))

    def poison(self) -> None:
        """NaN in every destination weight: a weight the sync does not write cannot pass `wrong`."""
        for tensor in self.dest.values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))

    def wrong(self, expected: Dict[str, torch.Tensor]) -> List[str]:
        """Destination weights that differ from `expected` cast to the destination's dtype (bit for bit:
        the stream rounds float32 masters to the engine dtype the same way)."""
        return [n for n, t in self.dest.items() if not torch.equal(t, expected[n].to(t.dtype))]

    def missing(self) -> List[str]:
        """Destination weights no sync wrote (tied aliases of a written storage excepted)."""
        written = {self.dest[n].untyped_storage().data_ptr() for n in self.seen}
        return [n for n, t in self.dest.items() if n not in self.seen and t.untyped_storage().data_ptr() not in written]


def _held(tensors: Dict[str, torch.Tensor], names: List[str]) -> Dict[str, Any]:
    """{name: ((name,), Digest)}: each held tensor is one streamed tensor, held as streamed."""
    from recipe.digest import digests

    return {n: ((n,), d) for n, d in zip(names, digests([tensors[n] for n in names]))}


class TrlColocateSink(Engine):
    """TRL 1.16's colocate sync, rebuilt here to be timed beside ours: GRPOTrainer._move_model_to_vllm
    walks the FSDP2 state dict, makes each DTensor full (`.full_tensor()`, our `dtensor_stream`
    gather) and hands it to vLLM one parameter at a time, `llm_model.load_weights([(name, tensor)])`,
    with no check. The row measures that method on the in-process vLLM engine; TRL itself is not
    imported. It has no digests (TRL checks nothing): its row runs no digest-checked syncs."""

    backend = "trl_colocate"

    def __init__(self, engine):
        self._model = engine.llm.apply_model(lambda m: m)[0]  # in-process: the engine's module

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self._model.load_weights([(name, tensor)])


def resolve_sink(cfg: DictConfig, device: torch.device) -> str:
    if cfg.bench.sink not in SINKS:
        raise ConfigError(f"bench.sink={cfg.bench.sink!r} is not valid; choose one of: {', '.join(SINKS)}")
    sink = cfg.bench.sink
    if sink == "auto":
        sink = "vllm" if engine_dir(cfg) else "copy"
    if sink == "vllm" and not engine_dir(cfg):
        raise ConfigError(
            "bench.sink=vllm needs a checkpoint for the engine: bench_model=tiny on CPU, or "
            "bench.engine_dir=<python -m tools.make_random_model <shape> <dir>> for a random shape; "
            "or use bench.sink=copy"
        )
    return sink


def vllm_engine(cfg: DictConfig, ctx) -> Engine:
    """The trainer's own in-process vLLM engine (recipe.engine.VllmEngine): its `load_weights`
    consumes the stream, so the figure includes everything a training sync's load does."""
    from recipe.engine import EngineSpec, VllmEngine

    return VllmEngine(
        EngineSpec.of(Settings.from_cfg(cfg)), ctx, engine_dir(cfg), load=cfg.sync.load, digest=cfg.sync.digest
    )


def engine_dir(cfg: DictConfig) -> str:
    """The checkpoint the vLLM sink's engine is built from ("" when there is none)."""
    if cfg.bench.engine_dir:
        return cfg.bench.engine_dir
    return cfg.model.path if not cfg.bench_model.qwen2 and device_of(cfg.trainer.device) == "cpu" else ""


# ----------------------------------------------------------------------------- one cell


class BenchSync(WeightSync):
    """WeightSync whose update stream marks each `next()` (the gather's share) while profiling."""

    annotate = False

    def update_stream(self):
        stream = super().update_stream()
        return _annotated(stream) if self.annotate else stream


def _one_sync(sync: WeightSync, step: int, device: torch.device) -> Dict[str, Any]:
    """One WeightSync.sync after all ranks are idle and together; its `sync/*` metrics."""
    _sync(device)
    dist.barrier()
    return sync.sync(step)


def _annotated(stream: Iterable[Tuple[str, torch.Tensor]]):
    """The stream with each `next()` (the gather's share of the sync) marked in the profile."""
    from torch.profiler import record_function

    it = iter(stream)
    while True:
        with record_function("stream.next (gather)"):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def profile_paths(bench_cfg, label: str) -> Tuple[Path, Path]:
    """(table .txt, chrome trace .json) of one strategy's profiled sync, next to `bench.out`."""
    out = Path(bench_cfg.out)
    stem = f"{out.stem}__{label.replace('/', '_').replace('@', '_at_')}"
    folder = out.parent / "profile"
    return folder / f"{stem}.txt", folder / f"{stem}.trace.json"


def profile_sync(sync: BenchSync, step: int, ctx, label: str, bench_cfg) -> Optional[str]:
    """One warm sync under torch.profiler (CPU, and CUDA on a GPU), on every rank. Rank 0 writes
    the key_averages table (top 25 by self device time on CUDA, else self CPU time), optionally a
    chrome trace, prints a summary line and returns the table's path."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(ctx.device)
    dist.barrier()
    sync.annotate = True
    try:
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            with record_function("sync"):
                stats = sync.sync(step)
                _sync(ctx.device)
            seconds = time.perf_counter() - t0
    finally:
        sync.annotate = False
    if not ctx.is_main:
        return None
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table_path, trace_path = profile_paths(bench_cfg, label)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    gather = stats["sync/gather_s"]
    header = (
        f"# {label}: one warm sync under torch.profiler, rank 0; {seconds:.4f} s wall, gather (inside "
        f"next()) {gather:.4f} s, {stats['sync/bytes'] / 1e6:.1f} MB; sorted by {sort}\n"
    )
    table_path.write_text(header + events.table(sort_by=sort, row_limit=25) + "\n")
    if bench_cfg.profile_trace:
        prof.export_chrome_trace(str(trace_path))
    ops = sorted(
        (e for e in events if not e.key.startswith(("sync", "stream.next"))),
        key=lambda e: getattr(e, sort),
        reverse=True,
    )[:5]
    top = ", ".join(f"{e.key} {getattr(e, sort) / 1e3:.2f} ms" for e in ops)
    print(
        f"profile {label}: {seconds:.4f} s (gather {gather:.4f} s); top self "
        f"{'device' if cuda else 'CPU'} time: {top} -> {table_path}",
        flush=True,
    )
    return str(table_path)


def _add_digest(row: Dict[str, Any], sync: WeightSync, step: int, device: torch.device, runs: int) -> None:
    """Median over `runs` syncs with WeightSync's digest check of sync/digest_s / (gather + load);
    the slowest rank counts. A failed check (raised on every rank at once) becomes the row's problem."""
    sync.digest = True  # the timed syncs ran without it; WeightSync reads it at every sync
    try:
        stats = [_one_sync(sync, step + i, device) for i in range(runs)]
    except WeightSyncError as exc:
        row.update(digest_problems=[str(exc)[:500]])
        return
    finally:
        sync.digest = False
    digest, move = _max_over_ranks(
        [
            statistics.median(s["sync/digest_s"] for s in stats),
            statistics.median(s["sync/gather_s"] + s["sync/load_s"] for s in stats),
        ]
    )
    row.update(
        digest_s=digest,
        digest_move_s=move,
        digest_ratio=digest / move if move > 0 else None,
        digested_tensors=stats[-1]["sync/verified_tensors"],
        digest_problems=[],
    )


def _cell_sink(cell: Cell, ctx, dest, engine):
    """The engine a cell syncs into: the copy sink, the vLLM engine (full weights), TRL's method on it."""
    if cell.strategy == "trl_colocate":
        return TrlColocateSink(engine)
    if engine is None or cell.lora == "adapter":  # the vLLM engine here serves full weights only
        return CopySink(dest, ctx.device)
    return engine


def _time_syncs(row: Dict[str, Any], cfg: DictConfig, sync: WeightSync, sink, base, device) -> int:
    """A warm-up sync for lora=adapter (WeightSync loads the base on its first adapter sync), then one
    cold and up to `bench.warm_iters` warm syncs; fills the row's timings; returns the next step."""
    step = 1
    if sync.adapter:
        _one_sync(sync, step, device)
        step += 1
    check = isinstance(sink, CopySink) and not sync.adapter
    if check:
        sink.poison()
    runs = []
    for i in range(1 + cfg.bench.warm_iters):
        runs.append(_one_sync(sync, step, device))
        step += 1
        if i == 0 and check:
            row["wrong"] = sink.wrong(dict(base.state_dict()))[:5]
        if i >= 1 and sum(r["sync/total_s"] for r in runs) > cfg.bench.max_cell_s:
            break
    row["runs"] = runs
    return step


def _timings(row: Dict[str, Any], sink, cuda: bool) -> None:
    """Cold, median warm, gather and load seconds (slowest rank), bytes and peak of an `ok` row."""
    runs = row.pop("runs")
    warm = runs[1:]
    cold, med, gather, load = _max_over_ranks(
        [runs[0]["sync/total_s"]]
        + [statistics.median(r[key] for r in warm) for key in ("sync/total_s", "sync/gather_s", "sync/load_s")]
    )
    peak = int(_max_over_ranks([max(r["sync/peak_mem_bytes"] for r in runs)])[0]) if cuda else None
    row.update(
        bytes=runs[0]["sync/bytes"],
        cold_s=cold,
        warm_s=med,
        warm_runs=len(warm),
        gather_s=gather,
        load_s=load,
        peak_bytes=peak,
        missing=sink.missing()[:5] if isinstance(sink, CopySink) else [],
    )


def run_cell(cell: Cell, cfg: DictConfig, ctx, base, dest, engine, expected: List[str]) -> Dict[str, Any]:
    """Build the cell's policy and time WeightSync's syncs into its sink; a raising strategy becomes a
    `crashed` row.

    Full-weight rows on the copy sink are also checked: the destination is poisoned before the cold sync
    and must then equal the base weights bit for bit (merged rows too: peft starts B at zero, so
    W + BA = W); a mismatch makes the row `wrong`."""
    row: Dict[str, Any] = {
        "label": cell.label,
        "fsdp": cell.fsdp,
        "offload": cell.offload,
        "lora": cell.lora,
        "strategy": cell.strategy,
        "status": "ok",
        "error": "",
    }
    ccfg = cell_cfg(cfg, cell)
    try:
        validate(ccfg)
    except UnsupportedError as exc:
        return {**row, "status": "unsupported", "error": str(exc).split(". ")[0]}
    if cell.strategy == "trl_colocate" and (engine is None or ctx.device.type != "cuda"):
        return {
            **row,
            "status": "unsupported",
            "error": "needs the vLLM sink on CUDA (vLLM's CPU backend repacks the parameters TRL's method writes)",
        }
    sink = _cell_sink(cell, ctx, dest, engine)
    row["sink"] = "copy" if isinstance(sink, CopySink) else "vllm"
    model = None
    try:
        model, row["unit_bytes"] = build_policy_from(base, ccfg, ctx)
        sync = BenchSync(Settings.from_cfg(ccfg), ctx, model, sink, None, expected=expected)
        step = _time_syncs(row, cfg, sync, sink, base, ctx.device)
        if cfg.bench.profile:
            row["profile"] = profile_sync(sync, step, ctx, cell.label, cfg.bench)
            step += 1
        if cell.strategy != "trl_colocate":
            _add_digest(row, sync, step, ctx.device, max(1, min(3, cfg.bench.warm_iters)))
    except Exception as exc:  # noqa: BLE001  reported, not hidden: the row says crashed
        row.update(status="crashed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
        if os.environ.get("SYNC_BENCH_TRACEBACK"):
            traceback.print_exc()
    _agree_on_status(row)
    if row["status"] == "ok":
        _timings(row, sink, ctx.device.type == "cuda")
    row.pop("runs", None)
    del model
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _agree_on_status(row: Dict[str, Any]) -> None:
    """Every rank agrees on the outcome (and waits for the slowest) before the next cell."""
    failed = _max_over_ranks([float(row["status"] != "ok")])[0]
    if failed and row["status"] == "ok":
        row.update(status="crashed", error="another rank raised (see its row in the log)")
    if row["status"] == "ok" and _max_over_ranks([float(bool(row.get("wrong")))])[0]:
        row.update(status="wrong", error=f"engine weights differ from the policy's: {row.get('wrong')}")
    if row["status"] == "ok" and _max_over_ranks([float(bool(row.get("digest_problems")))])[0]:
        row.update(status="wrong", error=f"digest check failed: {row.get('digest_problems')}")


def add_limits(row: Dict[str, Any], limits: Dict[str, float], world: int, bucket_bytes: int) -> None:
    """Attach GB/s, the limit and the ratios (x limit = t_limit / t_warm) to an `ok` row."""
    if row["status"] != "ok":
        return
    t_lim, t_ser = limit_times(row["bytes"], row["offload"] != "none", limits, world)
    row.update(
        gbps=row["bytes"] / row["warm_s"] / GB,
        limit_s=t_lim,
        serial_s=t_ser,
        limit_gbps=row["bytes"] / t_lim / GB,
        x_limit=t_lim / row["warm_s"],
        x_serial=t_ser / row["warm_s"],
    )
    row["bound_bytes"] = row["unit_bytes"] + bucket_bytes


# ----------------------------------------------------------------------------- targets and output


def _check(target: str, value: Optional[float], threshold: float, higher_is_better: bool = True) -> Dict[str, Any]:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {
        "target": target,
        "value": value,
        "threshold": threshold,
        "op": ">=" if higher_is_better else "<=",
        "met": met,
    }


def evaluate(rows: List[Dict[str, Any]], world: int) -> List[Dict[str, Any]]:
    """The performance targets of docs/PERFORMANCE.md on this run's rows (value None = not run)."""
    ok = {r["label"]: r for r in rows if r["status"] == "ok"}

    def get(label: str, key: str) -> Optional[float]:
        return ok[label][key] if label in ok else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None else a / b

    # gather + load within 0.8x of the limit for the same bytes: every full-weight and merged entry.
    checks = [
        _check(f"{f}/{off}/{lora} x limit", get(f"{f}/{off}/{lora}", "x_limit"), 0.8)
        for f, off, lora in itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, ("none", "merged"))
    ]
    for off in OFFLOAD_CHOICES:  # faster than TRL's colocate sync of the same model, same process
        checks.append(
            _check(
                f"speed-up of fsdp2/{off}/none over trl_colocate@fsdp2/{off}",
                ratio(get(f"trl_colocate@fsdp2/{off}", "warm_s"), get(f"fsdp2/{off}/none", "warm_s")),
                1.0,
            )
        )
    checks.append(
        _check(
            "speed-up of fsdp2/cpu/none over dcp_full_cpu@fsdp2/cpu",
            ratio(get("dcp_full_cpu@fsdp2/cpu", "warm_s"), get("fsdp2/cpu/none", "warm_s")),
            30,
        )
    )
    for off in OFFLOAD_CHOICES:
        checks.append(
            _check(
                f"time fsdp1/{off}/none / fsdp2/{off}/none",
                ratio(get(f"fsdp1/{off}/none", "warm_s"), get(f"fsdp2/{off}/none", "warm_s")),
                1.2,
                False,
            )
        )
    for f, off in itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES):
        full = f"{f}/{off}/none"
        checks.append(
            _check(
                f"time {f}/{off}/merged / {full}",
                ratio(get(f"{f}/{off}/merged", "warm_s"), get(full, "warm_s")),
                1.1,
                False,
            )
        )
        # Proportional to bytes: the adapter's GB/s is at least half the full weights' GB/s.
        checks.append(
            _check(f"GB/s {f}/{off}/adapter / {full}", ratio(get(f"{f}/{off}/adapter", "gbps"), get(full, "gbps")), 0.5)
        )
    ratios = [r["digest_ratio"] for r in ok.values() if r.get("digest_ratio") is not None]
    checks.append(_check("max digest / (gather + load)", max(ratios) if ratios else None, 0.10, False))
    peaks = [r["peak_bytes"] / r["bound_bytes"] for r in ok.values() if r.get("peak_bytes") is not None]
    checks.append(_check("max peak extra memory / (largest unit + bucket)", max(peaks) if peaks else None, 1.0, False))
    return checks


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: List[Dict[str, Any]], checks: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lim = meta["limits"]
    lines = [
        f"sync_bench {meta['model']} world={meta['world_size']} device={meta['device_name']} "
        f"sink={meta['sink']}  limits GB/s: h2d/rank {lim['h2d_gbps']:.1f}  d2d {lim['d2d_gbps']:.1f}  "
        f"all-gather {lim['allgather_gbps']:.1f} (at one bucket {lim['allgather_bucket_gbps']:.1f})",
        f"{'strategy':<30} {'status':<11} {'MB':>9} {'cold s':>8} {'warm s':>8} {'gather s':>8} {'load s':>8} {'GB/s':>7} "
        f"{'lim GB/s':>8} {'x limit':>7} {'x serial':>8} {'peak MiB':>9} {'bound MiB':>9} "
        f"{'digest s':>8} {'x move':>6}",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<30} {r['status']:<11} {r['error']}")
            continue
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / MiB
        lines.append(
            f"{r['label']:<30} {'ok':<11} {r['bytes'] / 1e6:>9.1f} {r['cold_s']:>8.4f} {r['warm_s']:>8.4f} "
            f"{_fmt(r.get('gather_s'), '8.4f')} {_fmt(r.get('load_s'), '8.4f')} "
            f"{r['gbps']:>7.2f} {r['limit_gbps']:>8.1f} {r['x_limit']:>7.3f} {r['x_serial']:>8.3f} "
            f"{_fmt(peak, '9.0f')} {r['bound_bytes'] / MiB:>9.0f} "
            f"{_fmt(r.get('digest_s'), '8.4f')} {_fmt(r.get('digest_ratio'), '6.3f')}"
            + (f"  missing {r['missing']}" if r.get("missing") else "")
        )
    lines.append("targets:")
    for c in checks:
        verdict = {True: "met", False: "MISSED", None: "not run"}[c["met"]]
        lines.append(f"  {verdict:<7} {c['target']}: {_fmt(c['value'], '.3f')} ({c['op']} {c['threshold']})")
    return "\n".join(lines)


def write_json(path: str, meta, rows, checks) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=1))
    tmp.replace(out)


# ----------------------------------------------------------------------------- ranks and entry


def bench_rank(cfg: DictConfig, ctx) -> None:
    """Body of every rank (module level so spawn can pickle it)."""
    from recipe.model import torch_dtype

    cells = select_cells(cfg)
    sink_name = resolve_sink(cfg, ctx.device)
    bucket_bytes = cfg.sync.bucket_mb * MiB
    limits = measure_limits(ctx.device, cfg.bench.limit_mb * MiB, cfg.bench.limit_reps, bucket_bytes)
    base = build_base(cfg, ctx.device)
    engine_dtype = torch_dtype(cfg.model.dtype)  # the engine's weights, in the engine's dtype; tied ones stay one
    converted: Dict[int, torch.Tensor] = {}
    dest = {
        n: converted.setdefault(t.data_ptr(), t.to(ctx.device, engine_dtype, copy=True))
        for n, t in base.state_dict().items()
    }
    engine = vllm_engine(cfg, ctx) if sink_name == "vllm" else None
    expected = trainer_names(base)  # what a full load must cover (no checkpoint to read them from)
    meta = {
        "model": cfg.bench_model.name,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "sink": sink_name,
        "dtype": cfg.model.dtype,
        "limits": limits,
        "bucket_mb": cfg.sync.bucket_mb,
        "warm_iters": cfg.bench.warm_iters,
        "model_bytes": sum(nbytes_of(p) for p in base.parameters()),
    }
    rows: List[Dict[str, Any]] = []
    try:
        for cell in cells:
            row = run_cell(cell, cfg, ctx, base, dest, engine, expected)
            add_limits(row, limits, ctx.world_size, bucket_bytes)
            rows.append(row)
            if ctx.is_main:
                print(format_table([row], [], meta).splitlines()[-2], flush=True)
                write_json(cfg.bench.out, meta, rows, evaluate(rows, ctx.world_size))
    finally:
        if engine is not None:
            engine.close()
    if ctx.is_main:
        checks = evaluate(rows, ctx.world_size)
        write_json(cfg.bench.out, meta, rows, checks)
        print(format_table(rows, checks, meta), flush=True)
        print(f"wrote {cfg.bench.out}", flush=True)


def bench(cfg: DictConfig) -> None:
    """Validate, then start `trainer.world_size` ranks. Tests call this directly."""
    from recipe.dist import launch

    validate(cfg)
    resolve_sink(cfg, torch.device(device_of(cfg.trainer.device)))
    select_cells(cfg)
    launch(bench_rank, cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    main()
