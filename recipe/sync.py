"""One weight sync, trainer -> rollout engine: gather -> load -> digest check (-> probe), timed and checked.

    sync = WeightSync(settings, ctx, policy, engine, tokenizer)
    stats = sync.sync(step)     # every rank calls it; returns the `sync/*` metrics

Two checks (docs/SYNC.md): every sync, an exact digest of every tensor the engine holds against
the digests of what the trainer streamed, plus the name set (`sync.digest`); at the first sync
and every N-th, a logprob probe of the engine against the trainer (`sync.probe_every`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from recipe import digest as digest_mod
from recipe.digest import Digest, combined_hex
from recipe.dist import agree
from recipe.model import Residency, adapter_config, sequence_logprobs
from recipe.names import checkpoint_shapes, hf_name, is_lora_param, peft_name
from recipe.settings import Settings
from recipe.weights import MergeRounding, StreamSpec, measure_merge_rounding, stream_base_weights, stream_weights

log = logging.getLogger(__name__)

# Probe: fixed prompts in the task's style plus one fixed completion, so every sync scores
# exactly the same tokens (a change in the numbers is a change in the weights).
PROBE_PROMPTS = ["12+7=", "3*4=", "20-9=", "8+15=", "6*7=", "31-4=", "9+9=", "5*11="]
PROBE_COMPLETION = " the answer is 42."


class WeightSyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync."""


def probe_batch(tokenizer, num: int) -> List[List[int]]:
    """`num` fixed token sequences: a probe prompt + the fixed completion (cycled if num > 8)."""
    texts = [PROBE_PROMPTS[i % len(PROBE_PROMPTS)] + PROBE_COMPLETION for i in range(num)]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def probe_inputs(tokenizer, sync) -> List[List[int]]:
    """The probe's token sequences; none without a tokenizer, which only a run with the probe off may omit."""
    if tokenizer is not None:
        return probe_batch(tokenizer, sync.num_probe_prompts)
    if sync.probe_every != 0:
        raise ValueError(
            f"sync.probe_every={sync.probe_every} needs a tokenizer for the probe's prompts; "
            f"give one, or set sync.probe_every=0 (probe off)"
        )
    return []


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


def mean_gap(trainer: List[List[float]], engine: List[List[float]]) -> float:
    """Mean |diff| over all probe tokens (the probe's verdict); NaN, no tokens or a length mismatch is inf."""
    if len(trainer) != len(engine) or any(len(a) != len(b) for a, b in zip(trainer, engine)):
        return math.inf
    gaps = [abs(x - y) for a, b in zip(trainer, engine) for x, y in zip(a, b)]
    mean = sum(gaps) / len(gaps) if gaps else math.nan
    return math.inf if math.isnan(mean) else mean


def checkpoint_names(model_dir: str) -> List[str]:
    """Tensor names of the HF checkpoint the engine was built from (safetensors or `.bin`)."""
    return list(checkpoint_shapes(model_dir))


def trainer_names(model: torch.nn.Module) -> List[str]:
    """HF names of the trainer's base tensors, each tensor once (a tied head is its embedding: the
    first name by identity, as `named_parameters` gives it)."""
    return [hf_name(n) for n, _ in model.named_parameters() if not is_lora_param(n)]


def expected_names(model: torch.nn.Module, model_dir: str) -> List[str]:
    """What a full (or base) load must cover: the checkpoint's names that the trainer's model holds.
    A key the model legitimately ignores is not expected: a saved `lm_head.weight` beside a tied
    embedding, a saved `rotary_emb.inv_freq` (a buffer, not a parameter)."""
    held = set(trainer_names(model))
    return [n for n in checkpoint_names(model_dir) if n in held]


def check_streamed_names(model: torch.nn.Module, model_dir: str) -> None:
    """Refuse at start a model whose tensors the engine could not take by name: no weights the
    sync can read, or trainer tensors that are not checkpoint keys (transformers 5 converts some
    checkpoints at load, e.g. mixture-of-experts experts fused into one `experts.gate_up_proj`;
    vLLM loads checkpoint names, and with `sync.digest=false` would take such names unchecked)."""
    from recipe.config import ConfigError

    names = set(checkpoint_names(model_dir))
    if not names:
        raise ConfigError(
            f"model.path={model_dir}: no *.safetensors or *.bin weight files to read tensor names "
            f"from; the sync checks every load against them"
        )
    unknown = [n for n in trainer_names(model) if n not in names]
    if unknown:
        raise ConfigError(
            f"model.path={model_dir}: the trainer's model holds {len(unknown)} tensors under names the checkpoint "
            f"does not have (e.g. {_few(unknown, 3)}): transformers converted them when loading (a renamed or "
            f"fused layout, such as mixture-of-experts experts), and the engine loads checkpoint names, so a sync "
            f"could not place them. Models whose weights transformers converts at load are not supported."
        )


class WeightStream:
    """Iterator of (hf_name, tensor) that counts, times and (optionally) digests what it yields.

    Counts: `num_tensors`, `num_bytes`, `max_tensor_bytes`, `names`. Time: `seconds` spent
    producing tensors (inside `next()`: the FSDP all-gather, a LoRA merge, a host->device copy;
    everything else inside the consumer's loop is the consumer's). `peak_live_bytes`: the most
    bytes of yielded tensors alive at once (tracked with weakrefs), i.e. what the stream plus
    the consumer's buffering hold beyond the model. With `digest=True` each tensor is digested
    on its device as it is yielded (`recipe.digest`; `held_form(name, tensor)` maps it to the
    form the consumer will hold, e.g. a scaled LoRA B); `digest_seconds` is that time and
    `digests()` returns {name: Digest} after one host sync.
    """

    def __init__(
        self,
        pairs: Iterable[Tuple[str, torch.Tensor]],
        strategy: str = "",
        digest: bool = False,
        held_form: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
    ):
        self._pairs, self.strategy = iter(pairs), strategy
        self.num_tensors = self.num_bytes = self.max_tensor_bytes = 0
        self.names: List[str] = []
        self.seconds = self.digest_seconds = 0.0
        self._live = self.peak_live_bytes = 0
        self._digest, self._held_form = digest, held_form
        self._info: List[Tuple[int, int, str]] = []
        self._sums: List[Optional[torch.Tensor]] = []  # None: a small tensor, digested in a batch later
        self._small: List[Tuple[int, torch.Tensor]] = []

    def __iter__(self) -> "WeightStream":
        return self

    def __next__(self) -> Tuple[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():  # gathers write into fresh buffers; the trained params keep no history
                name, tensor = next(self._pairs)
        finally:
            self.seconds += time.perf_counter() - t0
        size = tensor.numel() * tensor.element_size()
        self.num_tensors += 1
        self.num_bytes += size
        self.max_tensor_bytes = max(self.max_tensor_bytes, size)
        self.names.append(name)
        self._live += size
        self.peak_live_bytes = max(self.peak_live_bytes, self._live)
        weakref.finalize(tensor, self._release, size)
        if self._digest:
            self._add_digest(name, tensor)
        return name, tensor

    def _release(self, size: int) -> None:
        self._live -= size

    @torch.no_grad()
    def _add_digest(self, name: str, tensor: torch.Tensor) -> None:
        """Large tensors are digested now (sums stay on the device); small ones are copied and
        digested in batches at `digests()` (a copy costs less than a handful of small ops)."""
        t0 = time.perf_counter()
        held = self._held_form(name, tensor) if self._held_form is not None else tensor
        if held.numel() * held.element_size() <= digest_mod.SMALL_BYTES:
            self._small.append((len(self._info), held.detach().clone() if held is tensor else held))
            self._info.append(digest_mod.shape_info(held))
            self._sums.append(None)
        else:
            self._info.append(digest_mod.shape_info(held))
            self._sums.append(digest_mod.digest_sums(held))
        self.digest_seconds += time.perf_counter() - t0

    def digests(self) -> Dict[str, "digest_mod.Digest"]:
        """{name: Digest} of everything yielded so far (one host sync; timed in `digest_seconds`)."""
        t0 = time.perf_counter()
        large = [i for i, s in enumerate(self._sums) if s is not None]
        done = dict(zip(large, digest_mod.finish([self._info[i] for i in large], [self._sums[i] for i in large])))
        done.update(zip([i for i, _ in self._small], digest_mod.digests([t for _, t in self._small])))
        out = {name: done[i] for i, name in enumerate(self.names) if i in done}
        self.digest_seconds += time.perf_counter() - t0
        return out


class WeightSync:
    """Moves the trainer's weights into this rank's engine and proves they arrived.

    Ordering contract, per training step (every rank, same order):
      1. ``optimizer.step()`` has finished on every rank (the stream all-gathers shards, the
         verdicts are all-gathered, and the probe runs a sharded forward: all collectives, so
         every rank must call ``sync``).
      2. ``sync(step)``: wakes the engine, streams ``recipe.weights.stream_weights`` into it
         (full weights via ``engine.load_weights``; for lora=adapter only the adapter, as a new
         version via ``engine.load_adapter``; the base once, on the first call), bumps
         ``weight_version``, compares the engine's digests with the streamed ones (``sync.digest``)
         and, when ``sync.probe_every`` says so, runs the logprob probe. The engine is left awake.
      3. Only then may the engine generate: every sample of step ``s`` comes from weights of
         version ``s + 1`` (the first call, before any update, makes version 1).
    A failed check raises ``WeightSyncError`` on every rank at once (the per-rank reports are
    all-gathered first), so no rank is left waiting in a collective.
    """

    def __init__(
        self,
        settings: Settings,
        ctx,
        model: torch.nn.Module,
        engine,
        tokenizer,
        residency: Optional[Residency] = None,
        *,
        expected: Optional[List[str]] = None,
    ):
        """`tokenizer` may be None when the probe is off (`sync.probe_every=0`). `expected`: the names a
        full (or base) load must cover; None reads them from the checkpoint at `model.path` (and refuses
        a model whose tensor names it lacks). A caller without a checkpoint (tools/sync_bench.py, random
        weights made in memory) gives them."""
        self.settings, self.ctx, self.model, self.engine = settings, ctx, model, engine
        self.spec = StreamSpec.of(settings)  # what the table's stream reads
        self.residency = residency if residency is not None else Residency(settings.offload, model, None, ctx.device)
        self.probe = probe_inputs(tokenizer, settings.sync)
        self.tolerance = settings.sync.tolerance  # sync.probe_tolerance, or the dtype-aware default
        self.adapter = settings.lora.name == "adapter"
        self.digest = settings.sync.digest
        if expected is None:
            check_streamed_names(model, settings.model.path)
            expected = expected_names(model, settings.model.path)
        self.expected = list(expected)  # what a full (or base) load must cover
        self.expected_adapter = sorted(peft_name(n) for n, _ in model.named_parameters() if is_lora_param(n))
        self.weight_version = 0
        self.num_syncs = 0
        self._base_loaded = False
        self._peak = 0
        # lora=merged into a narrower engine dtype: the rounding of W + s*B@A is measured every sync
        self.measure_rounding = settings.lora.name == "merged" and settings.model.dtype != "float32"
        if self.measure_rounding:
            log.info(
                "lora=merged with model.dtype=%s: the engine holds W + s*B@A rounded to %s, which can move it "
                "more than the LoRA update itself (logged as sync/merge_rounding_*); lora=adapter keeps W and "
                "the adapter apart and is exact",
                settings.model.dtype,
                settings.model.dtype,
            )

    # -- public
    def sync(self, step: int) -> Dict[str, object]:
        t0 = time.perf_counter()
        self.engine.wake()
        with measure_merge_rounding() if self.measure_rounding else contextlib.nullcontext() as rounding:
            loads = self._transfer()
        self.weight_version += 1
        self.num_syncs += 1
        checked = self._check_digests(loads, step) if self.digest else {}
        probed = self._probe(step) if self._should_probe() else {}
        stats = self._metrics(time.perf_counter() - t0, loads, checked, probed)
        if rounding is not None:
            stats.update(merge_rounding_metrics(rounding, self.ctx.device))
        return stats

    def _metrics(self, total_s: float, loads, checked: dict, probed: dict) -> Dict[str, object]:
        in_load = checked.get("in_load_s", 0.0)  # engine digests taken inside its load (vLLM CPU)
        gather_s = sum(s.seconds for s, _ in loads)
        load_s = sum(load for _, load in loads) - in_load
        nbytes = sum(s.num_bytes for s, _ in loads)
        move_s = gather_s + load_s
        return {
            "sync/total_s": total_s,
            "sync/gather_s": gather_s,
            "sync/load_s": load_s,
            "sync/digest_s": checked.get("seconds", 0.0),
            "sync/probe_s": probed.get("seconds", 0.0),
            "sync/bytes": nbytes,
            "sync/gbps": nbytes / move_s / 1e9 if move_s > 0 else 0.0,
            "sync/peak_mem_bytes": self._peak,
            "sync/strategy": self.strategy_name(),
            "sync/weight_version": self.weight_version,
            "sync/verified_tensors": checked.get("tensors", 0),
            "sync/verified_bytes": checked.get("bytes", 0),
            "sync/digest": checked.get("hex", ""),
            "sync/parity_max_abs_diff": probed.get("worst", float("nan")),
            "sync/parity_mean_abs_diff": probed.get("mean", float("nan")),
            "sync/fingerprint": probed.get("fingerprint", float("nan")),
        }

    def strategy_name(self) -> str:
        return self.spec.name

    # -- gather + load
    def update_stream(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """The (hf_name, tensor) pairs of this sync's update: the table's entry for the config."""
        return stream_weights(self.model, self.spec, self.ctx.device)

    def base_stream(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """The base-only stream for lora=adapter's first load (the lora=none entry of the same fsdp/offload)."""
        return stream_base_weights(self.model, self.spec, self.ctx.device)

    def _transfer(self) -> List[Tuple[WeightStream, float]]:
        """Stream into the engine; returns (stream, load seconds) per load call of this sync."""
        self._peak = 0
        cuda = self.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        loads = []
        for stream, load in self._loads():
            t0 = time.perf_counter()
            load(stream)
            if cuda:
                torch.cuda.synchronize()
            loads.append((stream, time.perf_counter() - t0 - stream.seconds - stream.digest_seconds))
            self._peak = max(self._peak, stream.peak_live_bytes)
        if cuda:
            self._peak = torch.cuda.max_memory_allocated() - base_mem
        if sum(s.num_bytes for s, _ in loads) == 0:
            raise WeightSyncError(
                f"sync {self.num_syncs + 1}: the weight stream yielded no tensors "
                f"(strategy {self.strategy_name()}); the engine would keep stale weights"
            )
        return loads

    def _wrap(self, source, held_form=None) -> WeightStream:
        return WeightStream(source, self.strategy_name(), digest=self.digest, held_form=held_form)

    def _loads(self):
        """(WeightStream, engine loader) pairs for this sync: the base once for adapters, then the weights."""
        weight_form = self.engine.weight_held_form() if self.digest else None
        if not self.adapter:
            yield self._wrap(self.update_stream(), weight_form), self.engine.load_weights
            return
        if not self._base_loaded:
            yield self._wrap(self.base_stream(), weight_form), self.engine.load_weights
            self._base_loaded = True
        config = adapter_config(self.settings.lora, self.settings.model.path)
        version = self.weight_version + 1
        held = self.engine.adapter_held_form(config) if self.digest else None
        yield self._wrap(self.update_stream(), held), lambda s: self.engine.load_adapter(s, config, version)

    # -- digest check
    def _check_digests(self, loads: List[Tuple[WeightStream, float]], step: int) -> Dict[str, object]:
        """Every tensor the engine holds == what was streamed (exact digests), and the name sets match."""
        t0 = time.perf_counter()
        problems: List[str] = []
        tensors = nbytes = 0
        combined: Dict[str, Digest] = {}
        in_load = 0.0
        for stream, _ in loads:
            adapter = self.adapter and stream.names and all(is_lora_param(n) for n in stream.names)
            expected = self.expected_adapter if adapter else self.expected
            streamed = stream.digests()
            problems += name_problems(expected, stream.names)
            held = self.engine.adapter_digests() if adapter else self.engine.weight_digests()
            in_load += 0.0 if adapter else self.engine.load_digest_seconds
            found, count = compare_digests(held, streamed)
            problems += found
            tensors += count
            nbytes += stream.num_bytes
            combined.update(streamed)
        self._agree(problems, step)
        seconds = time.perf_counter() - t0 + sum(s.digest_seconds for s, _ in loads) + in_load
        return {
            "tensors": tensors,
            "bytes": nbytes,
            "hex": combined_hex(combined),
            "in_load_s": in_load,
            "seconds": seconds,
        }

    def _agree(self, problems: List[str], step: int) -> None:
        """All ranks see every rank's problems, then all raise together (or none does)."""
        mine = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        agree(
            mine or None,
            lambda text: WeightSyncError(
                f"weight sync failed the digest check at step {step} (weight version {self.weight_version}, strategy "
                f"{self.strategy_name()}): the engine does not hold exactly what was streamed. " + text
            ),
        )

    # -- probe
    def _should_probe(self) -> bool:
        """sync.probe_every: 0 = off, -1 = the first sync only, N = the first sync, then every N-th."""
        every = int(self.settings.sync.probe_every)
        if every <= 0:
            return every == -1 and self.num_syncs == 1
        return (self.num_syncs - 1) % every == 0

    def _probe(self, step: int) -> Dict[str, float]:
        """The logprob probe: the engine's prompt logprobs against the trainer's (collective)."""
        t0 = time.perf_counter()
        engine_lps = self.engine.prompt_logprobs(self.probe)
        mean, worst = self._parity(engine_lps, step)
        return {
            "worst": worst,
            "mean": mean,
            "fingerprint": fingerprint(engine_lps),
            "seconds": time.perf_counter() - t0,
        }

    def _parity(self, engine_lps: List[List[float]], step: int) -> Tuple[float, float]:
        """Compare this rank's engine with the trainer; all ranks agree on the verdict before raising.
        Returns (the worst rank's mean gap, the worst token's gap over all ranks)."""
        with self.residency.on_device(optimizer=False):  # offload=manual: the probe's forward needs the shards
            trainer_lps = sequence_logprobs(self.model, self.probe, self.ctx.device)
        worst, row, pos = worst_token(trainer_lps, engine_lps)
        mine = {
            "rank": self.ctx.rank,
            "mean": mean_gap(trainer_lps, engine_lps),
            "worst": worst,
            "row": row,
            "pos": pos,
            "trainer": _at(trainer_lps, row, pos),
            "engine": _at(engine_lps, row, pos),
            "tokens": sum(len(r) for r in engine_lps),
        }
        reports = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, mine)
        bad = max(reports, key=lambda r: r["mean"])
        if not bad["mean"] <= self.tolerance:
            raise WeightSyncError(self._message(bad, step))
        return bad["mean"], max(r["worst"] for r in reports)

    def _message(self, report: dict, step: int) -> str:
        ids = self.probe[report["row"]] if report["row"] >= 0 else []
        token = ids[report["pos"]] if 0 <= report["pos"] < len(ids) else None
        where = (
            "every digest matched, so the engine holds what was streamed: the stream itself (gather, "
            "transform) or the engine's kernels are wrong"
            if self.digest
            else "digests are off (sync.digest)"
        )
        return (
            f"weight sync failed the parity probe at step {step} (weight version {self.weight_version}, "
            f"strategy {self.strategy_name()}): mean |logprob trainer - engine| over {report['tokens']} probe tokens = "
            f"{report['mean']:.3g} > tolerance {self.tolerance:g} ({self.settings.model.dtype}) on rank {report['rank']}; "
            f"its worst: probe {report['row']} token {report['pos']} (id {token}): trainer {report['trainer']:.6g} vs "
            f"engine {report['engine']:.6g}; {where}."
        )


def merge_rounding_metrics(rounding: MergeRounding, device: torch.device) -> Dict[str, float]:
    """`sync/merge_rounding_*` over every rank's merged rows (all ranks call it: two all-reduces).
    mean / max: |bf16(W + s*B@A) - (W + s*B@A)| per element; ratio: that summed over all merged
    elements, over the summed |s*B@A| (above 1: the rounding moves the weights more than the update)."""
    sums = rounding.sums if rounding.sums is not None else torch.zeros(3, dtype=torch.float64)
    worst = rounding.worst if rounding.worst is not None else torch.zeros((), dtype=torch.float64)
    sums, worst = sums.to(device), worst.to(device).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    err, update, count = sums.tolist()
    return {
        "sync/merge_rounding_mean": err / count if count else float("nan"),
        "sync/merge_rounding_max": float(worst.item()),
        "sync/merge_rounding_ratio": err / update if update else float("nan"),
    }


def name_problems(expected: List[str], streamed: List[str]) -> List[str]:
    """Names that a load must cover but the stream did not yield, unknown names, and repeats."""
    got = set(streamed)
    missing = [n for n in expected if n not in got]
    unknown = sorted(got - set(expected))
    repeated = sorted({n for n in streamed if streamed.count(n) > 1}) if len(got) < len(streamed) else []
    out = []
    if missing:
        out.append(f"not streamed: {_few(missing)}")
    if unknown:
        out.append(f"streamed under unexpected names: {_few(unknown)}")
    if repeated:
        out.append(f"streamed more than once: {_few(repeated)}")
    return out


def compare_digests(held: Dict[str, tuple], streamed: Dict[str, Digest]) -> Tuple[List[str], int]:
    """(problems, tensors checked): each engine tensor against the concatenation of its streamed parts."""
    problems: List[str] = []
    checked = 0
    for name, (parts, have) in sorted(held.items()):
        absent = [p for p in parts if p not in streamed]
        if absent:
            problems.append(f"{name}: held by the engine, but {_few(absent)} not streamed")
            continue
        want = Digest.concat([streamed[p] for p in parts])
        have = _orient(have, want)
        if have is None:
            problems.append(
                f"{name}: not loaded or not re-processed by the engine in this load (it keeps an "
                f"old kernel: a dropped tensor, or a tied head not refreshed)"
            )
        elif not _same(have, want, name):
            problems.append(f"{name}: engine {have.short()} != streamed {want.short()}")
        checked += 1
    covered = {p for parts, _ in held.values() for p in parts}
    unused = sorted(set(streamed) - covered)
    if unused:
        problems.append(f"streamed but held by no engine tensor: {_few(unused)}")
    return problems, checked


def _orient(have, want: Digest) -> Optional[Digest]:
    """The engine's digest in the streamed orientation (vLLM may hold a LoRA matrix transposed)."""
    if have is None or isinstance(have, Digest):
        return have
    return next((d for d in have if d.rows == want.rows), have[0])


def _same(have: Digest, want: Digest, name: str) -> bool:
    """Exact equality; vocab tables may carry padding rows (zeros add nothing to either sum)."""
    padded = ("embed_tokens" in name or "lm_head" in name) and have.numel >= want.numel
    sizes_ok = padded or (have.numel, have.rows) == (want.numel, want.rows)
    return sizes_ok and have.dtype == want.dtype and (have.total, have.weighted) == (want.total, want.weighted)


def _few(names: List[str], k: int = 5) -> str:
    return str(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


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
