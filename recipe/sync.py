"""One weight sync, trainer -> rollout engine: gather -> load -> verify, timed and checked.

    sync = WeightSync(cfg, ctx, policy, engine, tokenizer)
    stats = sync.sync(step)     # every rank calls it; returns the `sync/*` metrics

See docs/SYNC.md for the measured numbers, the tolerances and how the fingerprint is defined.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from recipe.state_dict import adapter_config, stream_base_weights, stream_weights, strategy_name

# Max |logprob_trainer - logprob_engine| over the probe tokens when sync.tolerance is null.
# Measured on CPU (docs/SYNC.md): float32 noise <= 5e-5 on SmolLM2-135M, while one stale MLP
# tensor after one optimizer step shifts a probe token by 0.03 (tiny) to 0.11 (SmolLM2).
# bfloat16 noise reaches 0.25 on SmolLM2 (engine and trainer round every matmul differently),
# so its default sits at 2x that; it still catches a missed update on SmolLM2 (>= 0.76), but
# not a single stale tensor on the near-uniform tiny model: debug those in float32.
# float16 is not measured here: 0.1 follows from its 3 extra mantissa bits (8x finer than bf16).
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}

# Probe: fixed prompts in the task's style plus one fixed completion, so every sync scores
# exactly the same tokens (a change in the numbers is a change in the weights).
PROBE_PROMPTS = ["12+7=", "3*4=", "20-9=", "8+15=", "6*7=", "31-4=", "9+9=", "5*11="]
PROBE_COMPLETION = " the answer is 42."


class WeightSyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync."""


class TimedStream:
    """Wraps the weight stream: time spent producing tensors, bytes, names, peak live bytes.

    Producing a tensor (the FSDP all-gather, a LoRA merge, a host->device copy) happens inside
    `next()`; everything else inside the engine's load call is loading. `peak_live_bytes` is the
    most bytes of yielded tensors alive at once (tracked with weakrefs), i.e. what the stream
    plus the engine's buffering hold beyond the model itself.
    """

    def __init__(self, source: Iterable[Tuple[str, torch.Tensor]]):
        self._it = iter(source)
        self.seconds = 0.0
        self.bytes = 0
        self.names: List[str] = []
        self._live = 0
        self.peak_live_bytes = 0

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            name, tensor = next(self._it)
        finally:
            self.seconds += time.perf_counter() - t0
        size = tensor.numel() * tensor.element_size()
        self.bytes += size
        self.names.append(name)
        self._live += size
        self.peak_live_bytes = max(self.peak_live_bytes, self._live)
        weakref.finalize(tensor, self._release, size)
        return name, tensor

    def _release(self, size: int) -> None:
        self._live -= size


def probe_batch(tokenizer, num: int) -> List[List[int]]:
    """`num` fixed token sequences: a probe prompt + the fixed completion (cycled if num > 8)."""
    texts = [PROBE_PROMPTS[i % len(PROBE_PROMPTS)] + PROBE_COMPLETION for i in range(num)]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, batch: List[List[int]], device: torch.device) -> List[List[float]]:
    """logprob of token i given tokens < i, for i >= 1, from one (collective) forward of `model`.

    Right padding: with causal attention the real tokens never see the pad.
    """
    width = max(len(ids) for ids in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    finally:
        model.train(was_training)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
    return [lp[row, :len(seq) - 1].tolist() for row, seq in enumerate(batch)]


def worst_token(trainer: List[List[float]], engine: List[List[float]]) -> Tuple[float, int, int]:
    """(max |diff|, probe row, token position) over all probe tokens; NaN counts as infinitely bad."""
    best = (0.0, -1, -1)
    for row, (a, b) in enumerate(zip(trainer, engine)):
        if len(a) != len(b):
            return (math.inf, row, -1)
        for pos, (x, y) in enumerate(zip(a, b)):
            d = abs(x - y)
            d = math.inf if math.isnan(d) else d
            if d > best[0]:
                best = (d, row, pos + 1)
    return best


def checkpoint_names(model_dir: str) -> List[str]:
    """Tensor names of the HF checkpoint the engine was built from (what a full sync must cover)."""
    from safetensors import safe_open

    names: List[str] = []
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


class WeightSync:
    """Moves the trainer's weights into this rank's engine and proves they arrived.

    Ordering contract, per training step (every rank, same order):
      1. ``optimizer.step()`` has finished on every rank (the stream all-gathers shards, and the
         probe runs a sharded forward: both are collectives, so every rank must call ``sync``).
      2. ``sync(step)``: wakes the engine, streams ``recipe.state_dict.stream_weights`` into it
         (full weights via ``engine.load_weights``; for lora=adapter only the adapter, as a new
         version via ``engine.load_adapter``; the base once, on the first call), resets the
         prefix cache, bumps ``weight_version``, fingerprints the engine and, when
         ``sync.verify`` says so, runs the parity probe. The engine is left awake.
      3. Only then may the engine generate: every sample of step ``s`` comes from weights of
         version ``s + 1`` (the first call, before any update, makes version 1).
    A failed probe raises ``WeightSyncError`` on every rank at once (the worst gap is
    all-reduced first), so no rank is left waiting in a collective.
    """

    def __init__(self, cfg: DictConfig, ctx, model: torch.nn.Module, engine, tokenizer,
                 stream_fn: Optional[Callable] = None, base_stream_fn: Optional[Callable] = None):
        self.cfg, self.ctx, self.model, self.engine = cfg, ctx, model, engine
        self.stream_fn = stream_fn
        self.base_stream_fn = base_stream_fn
        self.probe = probe_batch(tokenizer, cfg.sync.num_probe_prompts)
        self.tolerance = cfg.sync.tolerance if cfg.sync.tolerance is not None else DEFAULT_TOLERANCE[cfg.model.dtype]
        self.adapter = cfg.lora.name == "adapter"
        self.expected: Optional[List[str]] = None if self.adapter else checkpoint_names(cfg.model.path)
        self.weight_version = 0
        self.num_syncs = 0
        self._base_loaded = False

    # -- public
    def sync(self, step: int) -> Dict[str, object]:
        t0 = time.perf_counter()
        self.engine.wake()
        gather_s, load_s, nbytes, peak, names = self._transfer()
        self.weight_version += 1
        self.num_syncs += 1
        verify = self._should_verify()
        t1 = time.perf_counter()
        engine_lps = self.engine.prompt_logprobs(self.probe)
        diff = self._parity(engine_lps, names, step) if verify else float("nan")
        verify_s = time.perf_counter() - t1 if verify else 0.0
        move_s = gather_s + load_s
        return {
            "sync/total_s": time.perf_counter() - t0,
            "sync/gather_s": gather_s,
            "sync/load_s": load_s,
            "sync/verify_s": verify_s,
            "sync/bytes": nbytes,
            "sync/gbps": nbytes / move_s / 1e9 if move_s > 0 else 0.0,
            "sync/peak_mem_bytes": peak,
            "sync/strategy": self.strategy_name(),
            "sync/weight_version": self.weight_version,
            "sync/parity_max_abs_diff": diff,
            "sync/fingerprint": fingerprint(engine_lps),
        }

    def strategy_name(self) -> str:
        if self.engine.shares_policy:
            return "shared"  # the engine is the policy: nothing moves
        return strategy_name(self.cfg)

    # -- gather + load
    def _streams(self):
        return self.stream_fn if self.stream_fn is not None else stream_weights

    def _transfer(self) -> Tuple[float, float, int, int, List[str]]:
        """Stream into the engine; returns (gather_s, load_s, bytes, peak_bytes, names)."""
        if self.engine.shares_policy:
            return 0.0, 0.0, 0, 0, []
        cuda = self.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        gather_s = load_s = 0.0
        nbytes = peak = 0
        names: List[str] = []
        for stream, load in self._loads():
            t0 = time.perf_counter()
            load(stream)
            if cuda:
                torch.cuda.synchronize()
            load_s += time.perf_counter() - t0 - stream.seconds
            gather_s += stream.seconds
            nbytes += stream.bytes
            peak = max(peak, stream.peak_live_bytes)
            names += stream.names
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base_mem
        if nbytes == 0:
            raise WeightSyncError(f"sync {self.num_syncs + 1}: the weight stream yielded no tensors "
                                  f"(strategy {self.strategy_name()}); the engine would keep stale weights")
        return gather_s, load_s, nbytes, peak, names

    def _loads(self):
        """(TimedStream, engine loader) pairs for this sync: the base once for adapters, then the weights."""
        stream = self._streams()
        if not self.adapter:
            yield TimedStream(stream(self.model, self.cfg, self.ctx.device)), self.engine.load_weights
            return
        if not self._base_loaded:
            base = self._base_stream()
            yield TimedStream(base(self.model, self.cfg, self.ctx.device)), self.engine.load_weights
            self._base_loaded = True
        config = adapter_config(self.cfg)
        version = self.weight_version + 1
        yield TimedStream(stream(self.model, self.cfg, self.ctx.device)), \
            lambda s: self.engine.load_adapter(s, config, version)

    def _base_stream(self):
        """The base-only stream for lora=adapter (the lora=none entry of the same fsdp/offload)."""
        return self.base_stream_fn if self.base_stream_fn is not None else stream_base_weights

    # -- verify
    def _should_verify(self) -> bool:
        mode = str(self.cfg.sync.verify)
        if mode == "every":
            return True
        if mode == "first":
            return self.num_syncs == 1
        if mode == "off":
            return False
        return (self.num_syncs - 1) % int(mode) == 0  # the first sync, then every N-th

    def _parity(self, engine_lps: List[List[float]], names: List[str], step: int) -> float:
        """Compare this rank's engine with the trainer; all ranks agree on the verdict before raising."""
        with self._trainer_on_device():
            trainer_lps = trainer_logprobs(self.model, self.probe, self.ctx.device)
        diff, row, pos = worst_token(trainer_lps, engine_lps)
        mine = {"rank": self.ctx.rank, "diff": diff, "row": row, "pos": pos,
                "trainer": _at(trainer_lps, row, pos), "engine": _at(engine_lps, row, pos),
                "tensors": self._name_report(names)}
        reports = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, mine)
        worst = max(reports, key=lambda r: r["diff"])
        if not worst["diff"] <= self.tolerance:
            raise WeightSyncError(self._message(worst, step))
        return worst["diff"]

    @contextlib.contextmanager
    def _trainer_on_device(self):
        """Manual offload keeps shards on the host between phases; the probe forward needs them on the device."""
        manual = self.cfg.offload.name == "manual" and self.ctx.device.type == "cuda"
        if manual:
            from recipe.model import load_to_device

            load_to_device(self.model, None, self.ctx.device)
        try:
            yield
        finally:
            if manual:
                from recipe.model import offload_to_cpu

                offload_to_cpu(self.model, None)

    def _name_report(self, names: List[str]) -> str:
        """Which tensors look wrong by name: expected-but-not-loaded and loaded-but-unknown."""
        if self.expected is None:
            self.expected = list(names)  # adapter: the first sync defines the set
            return ""
        got = set(names)
        missing = [n for n in self.expected if n not in got]
        unknown = sorted(got - set(self.expected))
        parts = []
        if missing:
            parts.append(f"not loaded: {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unknown:
            parts.append(f"unexpected names: {unknown[:5]}")
        return "; ".join(parts)

    def _message(self, worst: dict, step: int) -> str:
        ids = self.probe[worst["row"]] if worst["row"] >= 0 else []
        token = ids[worst["pos"]] if 0 <= worst["pos"] < len(ids) else None
        where = worst["tensors"] or ("every expected tensor name was loaded, so a value is wrong "
                                     "(stale, mis-gathered or loaded under another name)")
        return (f"weight sync failed the parity probe at step {step} (weight version {self.weight_version}, "
                f"strategy {self.strategy_name()}): max |logprob trainer - engine| = {worst['diff']:.3g} > "
                f"tolerance {self.tolerance:g} ({self.cfg.model.dtype}) on rank {worst['rank']}, probe {worst['row']} "
                f"token {worst['pos']} (id {token}): trainer {worst['trainer']:.6g} vs engine {worst['engine']:.6g}. "
                f"Tensors: {where}.")


def _at(lps: List[List[float]], row: int, pos: int) -> float:
    try:
        return lps[row][pos - 1]
    except IndexError:
        return float("nan")


def fingerprint(engine_lps: List[List[float]]) -> float:
    """Sum of the engine's probe logprobs: one number that changes whenever the engine's weights do.

    Read from the engine's outputs rather than its parameters because vLLM's CPU backend repacks
    linear weights (their `weight` tensors no longer hold the values the kernels use).
    """
    return round(float(sum(sum(row) for row in engine_lps)), 6)
