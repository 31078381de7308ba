"""Real vLLM (CPU) <- FSDP weight sync at world 2, every CPU-runnable combination.

    .venv/bin/python -m pytest tests/e2e/test_rollout_sync.py -v

One 2-rank world runs everything (engines are created once per rank: one plain, one with
LoRA enabled) and the tests below assert on what it returns:
- for each of the 15 (fsdp, offload, lora) combinations: an optimizer step changes the
  weights, `WeightSync.sync` moves them, and the engine's greedy output equals HF generate on
  an unsharded copy of the trained model (taken through torch.distributed.checkpoint, a path
  independent of the sync), with prompt logprobs within the fp32 tolerance;
- rollout=hf (`HfCopyEngine`, an own unsharded copy loaded by name) passes the same sync and
  generates what the reference does;
- `PolicyEngine` (tests/doubles.py) generates with the sharded policy itself (ranks with different prompt counts)
  exactly what HF generate on the unsharded copy gives;
- the adapter path generates with the new adapter: its logprobs move with each version and
  differ from the base model's;
- engine-side faults (a skipped tensor, a stale one, one under another name, one element one
  ulp off on one rank, a tensor scaled by 1 + 2^-7, a transposed square tensor, the tied head
  not refreshed; LoRA B not scaled or scaled twice) are caught by the digest check on both
  ranks, naming the tensor, in float32 and bfloat16 (separate bf16 engines); a correct sync
  afterwards passes; 100 correct syncs (20 for adapters) with an update before each are never
  flagged;
- stream faults: a missing name fails the name check, a stale value in the stream itself
  passes the digest and is caught by the probe (float32);
- the sync metrics reach metrics.jsonl and the offline wandb files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.settings import Settings

from tests.helpers import engine_spec, policy_of, run_world

pytestmark = pytest.mark.slow

COMBOS = [
    c
    for c in itertools.product(("fsdp1", "fsdp2"), ("none", "manual", "cpu"), ("none", "merged", "adapter"))
    if c[:2] != ("fsdp1", "cpu")
]  # FSDP1 + CPU offload needs an accelerator (validate refuses it)
GEN_PROMPTS = ["12+7=", "3*4=", "20-9="]
SYNC_KEYS = {
    "sync/total_s",
    "sync/gather_s",
    "sync/load_s",
    "sync/digest_s",
    "sync/probe_s",
    "sync/bytes",
    "sync/gbps",
    "sync/peak_mem_bytes",
    "sync/strategy",
    "sync/weight_version",
    "sync/verified_tensors",
    "sync/verified_bytes",
    "sync/digest",
    "sync/parity_max_abs_diff",
    "sync/parity_mean_abs_diff",
    "sync/fingerprint",
}
FAULT_NAME = "model.layers.1.mlp.down_proj.weight"
SQUARE_NAME = "model.layers.1.self_attn.o_proj.weight"  # 128 x 128
DTYPES = ("float32", "bfloat16")
# Faults injected between the trainer's stream (which digests what it yields) and the engine, i.e.
# the engine ends up holding something else than was streamed; each must be caught by the digest
# check on both ranks, naming the tensor. "<kind>@0": injected on rank 0 only (the ranks agree).
WEIGHT_FAULTS = {
    "skip": FAULT_NAME,
    "stale": FAULT_NAME,
    "wrong_name": FAULT_NAME,
    "ulp@0": FAULT_NAME,
    "scale": FAULT_NAME,
    "transpose": SQUARE_NAME,
    "head_not_refreshed": "lm_head.weight",
}
ADAPTER_FAULTS = {"b_not_scaled": "lora_B.weight", "b_scaled_twice": "lora_B.weight"}
NUM_CLEAN_SYNCS = 100


def _cfg(model_dir: str, fsdp="fsdp2", offload="none", lora="none", extra=()):
    from tests.helpers import compose

    return compose(
        [
            f"fsdp={fsdp}",
            f"+offload={offload}",
            f"+lora={lora}",
            f"model.path={model_dir}",
            "trainer.device=cpu",
            "rollout.max_model_len=128",
            *extra,
        ]
    )


def remembering_stream(stale: dict):
    """The correct stream, keeping a copy of each tensor's first value in `stale` (for the stale-tensor fault)."""
    from recipe.weights import stream_weights

    def stream(model, spec, device):
        for name, t in stream_weights(model, spec, device):
            stale.setdefault(name, t.clone())
            yield name, t

    return stream


def _train_step(policy, optimizer, probe, device="cpu"):
    """One AdamW step on a fixed batch (same on every rank), so the weights really change."""
    import torch

    ids = torch.tensor([p[:6] for p in probe], device=device)
    logits = policy(input_ids=ids).logits.float()
    loss = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _reference(policy, cfg):
    """Unsharded copy of the trained model via DCP's full state dict (independent of recipe.weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from recipe.model import apply_lora, load_hf_model

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    ref = apply_lora(load_hf_model(cfg.model), cfg.lora, cfg.model.master_dtype)
    ref.load_state_dict(state)
    return ref.eval()


def _greedy(engine, ids):
    return [s.token_ids for s in engine.generate(ids, n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)]


def _max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _one_combo(combo, ctx, model_dir, engines, tok):
    from recipe.model import build_optimizer, build_policy
    from recipe.engine import HfCopyEngine, HfEngine
    from tests.doubles import PolicyEngine
    from recipe.sync import WeightSync

    fsdp, offload, lora = combo
    cfg = _cfg(model_dir, fsdp, offload, lora)
    engine = engines["lora" if lora == "adapter" else "plain"]
    policy = build_policy(policy_of(cfg), ctx)
    optimizer = build_optimizer(policy, policy_of(cfg))
    sync = WeightSync(Settings.from_cfg(cfg), ctx, policy, engine, tok)
    gen_ids = [tok(p, add_special_tokens=False).input_ids for p in GEN_PROMPTS]
    first = sync.sync(0)
    before = engine.prompt_logprobs(sync.probe)
    _train_step(policy, optimizer, sync.probe)
    second = sync.sync(1)
    after = engine.prompt_logprobs(sync.probe)
    ref = _reference(policy, cfg)
    hf = HfEngine(ref, ctx.device, tok.eos_token_id, tok.pad_token_id)
    out = {
        "first": first,
        "second": second,
        "engine_greedy": _greedy(engine, gen_ids),
        "hf_greedy": _greedy(hf, gen_ids),
        "engine_vs_ref": _max_gap(after, hf.prompt_logprobs(sync.probe)),
        "moved": _max_gap(before, after),
        "tolerance": sync.tolerance,
    }
    # backend hf: generate with the sharded policy itself; ranks get different prompt counts
    rank_ids = gen_ids[: 1 + 2 * (ctx.rank % 2)]
    out["hf_backend_greedy"] = _greedy(PolicyEngine(policy, ctx.device, tok.eos_token_id, tok.pad_token_id), rank_ids)
    out["hf_backend_ref"] = _greedy(hf, rank_ids)
    # backend hf (rollout=hf): the engine's own unsharded copy, loaded by name through the same sync
    copy = HfCopyEngine(engine_spec(cfg), ctx, model_dir)
    out["copy_sync"] = WeightSync(Settings.from_cfg(cfg), ctx, policy, copy, tok).sync(2)
    out["copy_greedy"] = _greedy(copy, gen_ids)
    if lora == "adapter":
        out["lora_version"] = engine.lora_version
        out["base_vs_adapter"] = _base_gap(engine, sync.probe, after)
    return out


def _base_gap(engine, probe, with_adapter):
    """Gap between the engine's logprobs with and without the live adapter (0 = adapter not applied)."""
    saved, engine._lora = engine._lora, None
    try:
        return _max_gap(engine.prompt_logprobs(probe), with_adapter)
    finally:
        engine._lora = saved


def _stream_faults(ctx, model_dir, engine, tok):
    """Faults in the stream itself (what the trainer yields is wrong): a missing name fails the name
    check; a stale value streamed as if current passes the digest (the engine holds what was
    streamed) and is caught by the logprob probe (float32)."""
    from recipe.model import build_optimizer, build_policy
    from recipe.weights import stream_weights
    from tests.doubles import HookedSync

    cfg = _cfg(model_dir)
    policy = build_policy(policy_of(cfg), ctx)
    optimizer = build_optimizer(policy, policy_of(cfg))
    stale = {}

    def capture(model, spec, device):  # the correct stream, remembering FAULT_NAME's pre-step value
        for name, t in stream_weights(model, spec, device):
            if name == FAULT_NAME:
                stale[name] = t.clone()
            yield name, t

    faults = {
        "skip": lambda m, c, d: ((n, t) for n, t in stream_weights(m, c, d) if n != FAULT_NAME),
        "stale": lambda m, c, d: ((n, stale[n] if n == FAULT_NAME else t) for n, t in stream_weights(m, c, d)),
    }
    sync = HookedSync(Settings.from_cfg(cfg), ctx, policy, engine, tok, stream_fn=capture)
    sync.sync(0)
    _train_step(policy, optimizer, sync.probe)
    results = {}
    for kind, fn in faults.items():
        sync.stream_fn = fn
        results[kind] = _error_of(sync, 1)
        sync.stream_fn = None
        results[kind + "_recovered"] = sync.sync(1)["sync/parity_max_abs_diff"]
    sync.stream_fn = lambda m, c, d: iter(())
    results["empty"] = _error_of(sync, 2)
    return results


def _error_of(sync, step):
    from recipe.sync import WeightSyncError

    try:
        sync.sync(step)
        return None
    except WeightSyncError as exc:
        return str(exc)


def _corrupt(kind, stale):
    """The engine-side fault `kind`: a generator transform of the (already digested) stream."""
    import torch

    layer0 = FAULT_NAME.replace("layers.1.", "layers.0.")

    def one(name, t):
        if kind == "skip" and name == FAULT_NAME:
            return []
        if kind == "stale" and name == FAULT_NAME:
            return [(name, stale[name])]
        if kind == "wrong_name" and name in (FAULT_NAME, layer0):
            return [(layer0, t)] if name == FAULT_NAME else []
        if kind == "ulp" and name == FAULT_NAME:
            t = t.clone()
            t.view(torch.int16 if t.element_size() == 2 else torch.int32).view(-1)[7] += 1
        if kind == "scale" and name == FAULT_NAME:
            t = (t.float() * (1 + 2**-7)).to(t.dtype)
        if kind == "transpose" and name == SQUARE_NAME:
            t = t.t().contiguous()
        return [(name, t)]

    return lambda weights: (pair for name, t in weights for pair in one(name, t))


def _engine_fault(engine, kind, stale, rank):
    """Context: the engine holds something else than was streamed, in the way `kind` says."""
    import contextlib
    import unittest.mock as mock

    import recipe.engine.vllm

    base, _, where = kind.partition("@")
    if where and int(where) != rank:
        return contextlib.nullcontext()
    if base == "head_not_refreshed":  # vLLM CPU: the tied head keeps its old packed kernel
        return mock.patch.object(recipe.engine.vllm, "refresh_embedding_kernels", lambda model: 0)
    corrupt, load = _corrupt(base, stale), engine.load_weights
    return mock.patch.object(engine, "load_weights", lambda weights: load(corrupt(weights)))


def _faults(ctx, model_dir, dtype, engine, tok):
    """Each engine-side fault raises WeightSyncError on every rank naming the tensor; a correct sync
    afterwards passes both checks."""
    from recipe.model import build_optimizer, build_policy
    from tests.doubles import HookedSync

    cfg = _cfg(model_dir, extra=[f"model.dtype={dtype}", "sync.probe_tolerance=0.5"])
    policy = build_policy(policy_of(cfg), ctx)
    optimizer = build_optimizer(policy, policy_of(cfg))
    stale = {}
    sync = HookedSync(Settings.from_cfg(cfg), ctx, policy, engine, tok, stream_fn=remembering_stream(stale))
    sync.sync(0)
    sync.stream_fn = None
    _train_step(policy, optimizer, sync.probe)
    results = {}
    for kind in WEIGHT_FAULTS:
        with _engine_fault(engine, kind, stale, ctx.rank):
            results[kind] = _error_of(sync, 1)
        after = sync.sync(1)
        results[kind + "_recovered"] = (after["sync/verified_tensors"], after["sync/parity_max_abs_diff"])
    return results


def _adapter_fault(kind):
    """vLLM folds the LoRA scaling into lora_b (LoRALayerWeights.optimize): skip it, or do it twice."""
    import unittest.mock as mock

    from vllm.lora.lora_weights import LoRALayerWeights

    def optimize(self):
        if self.scaling != 1:
            for _ in range(0 if kind == "b_not_scaled" else 2):
                self.lora_b *= self.scaling
            self.scaling = 1
        return self

    return mock.patch.object(LoRALayerWeights, "optimize", optimize)


def _adapter_faults(ctx, model_dir, dtype, engine, tok):
    from recipe.model import build_optimizer, build_policy
    from recipe.sync import WeightSync

    cfg = _cfg(model_dir, lora="adapter", extra=[f"model.dtype={dtype}", "sync.probe_tolerance=0.5"])
    policy = build_policy(policy_of(cfg), ctx)
    optimizer = build_optimizer(policy, policy_of(cfg))
    sync = WeightSync(Settings.from_cfg(cfg), ctx, policy, engine, tok)
    sync.sync(0)
    _train_step(policy, optimizer, sync.probe)  # B moves away from its zero init
    results = {}
    for kind in ADAPTER_FAULTS:
        with _adapter_fault(kind):
            results[kind] = _error_of(sync, 1)
        after = sync.sync(1)
        results[kind + "_recovered"] = (after["sync/verified_tensors"], after["sync/parity_max_abs_diff"])
    return results


def _clean_syncs(ctx, model_dir, dtype, engine, tok, lora, count):
    """`count` syncs with an optimizer step before each: none may be flagged (probe at the first only)."""
    import time

    from recipe.model import build_optimizer, build_policy
    from recipe.sync import WeightSync

    cfg = _cfg(model_dir, lora=lora, extra=[f"model.dtype={dtype}", "sync.probe_every=-1"])
    policy = build_policy(policy_of(cfg), ctx)
    optimizer = build_optimizer(policy, policy_of(cfg))
    sync = WeightSync(Settings.from_cfg(cfg), ctx, policy, engine, tok)
    t0 = time.perf_counter()
    digests, flagged, digest_s, move_s = set(), [], 0.0, 0.0
    for step in range(count):
        _train_step(policy, optimizer, sync.probe)
        error = _error_of_stats(sync, step)
        if isinstance(error, str):
            flagged.append((step, error[:300]))
            continue
        digests.add(error["sync/digest"])
        digest_s += error["sync/digest_s"]
        move_s += error["sync/gather_s"] + error["sync/load_s"]
    return {
        "flagged": flagged,
        "distinct_digests": len(digests),
        "seconds": time.perf_counter() - t0,
        "digest_s": digest_s,
        "move_s": move_s,
    }


def _error_of_stats(sync, step):
    from recipe.sync import WeightSyncError

    try:
        return sync.sync(step)
    except WeightSyncError as exc:
        return str(exc)


def _log_metrics(ctx, model_dir, run_dir, records):
    from recipe.metrics import MetricsLogger

    cfg = _cfg(model_dir, extra=["logger=wandb", "logger.mode=offline"])
    logger = MetricsLogger(cfg.logger, run_dir, ctx.rank, config=OmegaConf.to_container(cfg, resolve=True))
    for step, record in enumerate(records, start=1):
        logger.log(record, step=step)
    files = str(logger.run_files_dir) if logger.run_files_dir else None
    logger.close()
    return files


def _world(rank, world, model_dir, run_dir):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {"faults": {}, "adapter_faults": {}, "clean": {}}
    with _engines(ctx, model_dir, "float32") as engines:
        out["combos"] = {combo: _one_combo(combo, ctx, model_dir, engines, tok) for combo in COMBOS}
        out["stream_faults"] = _stream_faults(ctx, model_dir, engines["plain"], tok)
        out["long_batch"] = _long_batch(engines["plain"])
        records = [r[k] for r in out["combos"].values() for k in ("first", "second")]
        out["wandb_files"] = _log_metrics(ctx, model_dir, run_dir, records)
        _digest_checks(out, ctx, model_dir, "float32", engines, tok)
    with _engines(ctx, model_dir, "bfloat16") as engines:
        _digest_checks(out, ctx, model_dir, "bfloat16", engines, tok)
    return out


def _long_batch(engine):
    """128 seeded samples of 60-token prompts: 7,680 prompt tokens, more than one engine step takes
    (4,096). With chunked prefill vLLM's CPU backend split a prefill and crashed ("CPU Generator does
    not use offset"); the engine now prefills whole prompts. Returns (samples, same on a repeat)."""
    prompts = [[2 + (i * 7 + j) % 60 for j in range(60)] for i in range(16)]
    first = engine.generate(prompts, n=8, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=5)
    again = engine.generate(prompts, n=8, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=5)
    return len(first), [s.token_ids for s in first] == [s.token_ids for s in again]


def _digest_checks(out, ctx, model_dir, dtype, engines, tok):
    out["faults"][dtype] = _faults(ctx, model_dir, dtype, engines["plain"], tok)
    out["adapter_faults"][dtype] = _adapter_faults(ctx, model_dir, dtype, engines["lora"], tok)
    out["clean"][dtype] = {
        "none": _clean_syncs(ctx, model_dir, dtype, engines["plain"], tok, "none", NUM_CLEAN_SYNCS),
        "adapter": _clean_syncs(ctx, model_dir, dtype, engines["lora"], tok, "adapter", 20),
    }


@contextlib.contextmanager
def _engines(ctx, model_dir, dtype):
    """One plain and one LoRA-enabled vLLM engine of `dtype` on this rank, closed after use."""
    from recipe.engine import build_engine

    plain, lora = (
        _cfg(model_dir, extra=[f"model.dtype={dtype}"]),
        _cfg(model_dir, lora="adapter", extra=[f"model.dtype={dtype}"]),
    )
    engines = {
        "plain": build_engine(engine_spec(plain), ctx, model_dir, load=plain.sync.load, digest=plain.sync.digest),
        "lora": build_engine(engine_spec(lora), ctx, model_dir, load=lora.sync.load, digest=lora.sync.digest),
    }
    try:
        yield engines
    finally:
        for engine in engines.values():
            engine.close()


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_world(_world, 2, str(tiny_model_dir), str(run_dir), timeout_s=1200)
    return results, run_dir


def test_long_seeded_batch_generates_on_cpu(world):
    results, _ = world
    for rank, r in enumerate(results):
        assert r["long_batch"] == (128, True), f"rank {rank}: {r['long_batch']}"


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_engine_matches_trained_model(world, combo):
    results, _ = world
    for rank, res in enumerate(results):
        r = res["combos"][combo]
        assert set(r["second"]) == SYNC_KEYS
        assert r["second"]["sync/weight_version"] == r["first"]["sync/weight_version"] + 1
        assert r["second"]["sync/bytes"] > 0
        # every tensor was digest-checked, and the digest moved with the update
        assert (
            r["second"]["sync/verified_tensors"] > 0 and r["second"]["sync/verified_bytes"] == r["second"]["sync/bytes"]
        )
        assert r["second"]["sync/digest"] != r["first"]["sync/digest"]
        # the step changed the engine's weights, and they now equal the trained model's
        assert r["moved"] > r["tolerance"], f"rank {rank}: the engine did not change after the update"
        assert r["second"]["sync/fingerprint"] != r["first"]["sync/fingerprint"]
        assert r["second"]["sync/parity_max_abs_diff"] <= r["tolerance"]
        assert r["engine_vs_ref"] <= r["tolerance"], f"rank {rank}: engine vs unsharded reference {r['engine_vs_ref']}"
        assert r["engine_greedy"] == r["hf_greedy"], f"rank {rank}: greedy outputs differ"


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_hf_backend_generates_with_sharded_policy(world, combo):
    results, _ = world
    for res in results:
        r = res["combos"][combo]
        assert r["hf_backend_greedy"] == r["hf_backend_ref"]


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_hf_copy_engine_syncs_by_name(world, combo):
    results, _ = world
    for res in results:
        r = res["combos"][combo]
        assert r["copy_sync"]["sync/parity_max_abs_diff"] <= r["tolerance"]
        assert r["copy_sync"]["sync/verified_tensors"] > 0
        if combo[2] == "adapter":  # the copy's first sync loads the base, then the adapter
            assert r["copy_sync"]["sync/bytes"] > r["second"]["sync/bytes"]
        else:
            assert r["copy_sync"]["sync/bytes"] == r["second"]["sync/bytes"]
        assert r["copy_greedy"] == r["hf_greedy"]


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] == "adapter"], ids=lambda c: "-".join(c))
def test_adapter_generates_with_latest_version(world, combo):
    results, _ = world
    for res in results:
        r = res["combos"][combo]
        assert r["lora_version"] == r["second"]["sync/weight_version"]
        assert r["base_vs_adapter"] > r["tolerance"], "the adapter does not change the engine's outputs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(WEIGHT_FAULTS))
def test_engine_fault_is_caught_by_digest(world, kind, dtype):
    results, _ = world
    for res in results:
        message = res["faults"][dtype][kind]
        assert message is not None, f"{kind} ({dtype}) passed the digest check"
        assert "digest check" in message and WEIGHT_FAULTS[kind] in message, message
        if "@" in kind:  # injected on rank 0 only: both ranks raise, naming rank 0
            assert "rank 0:" in message and "rank 1:" not in message
        tensors, diff = res["faults"][dtype][kind + "_recovered"]
        assert tensors > 0 and diff <= 0.5  # the next correct sync passes both checks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(ADAPTER_FAULTS))
def test_adapter_fault_is_caught_by_digest(world, kind, dtype):
    results, _ = world
    for res in results:
        message = res["adapter_faults"][dtype][kind]
        assert message is not None, f"{kind} ({dtype}) passed the digest check"
        assert "digest check" in message and ADAPTER_FAULTS[kind] in message, message
        assert res["adapter_faults"][dtype][kind + "_recovered"][0] > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", ["none", "adapter"])
def test_correct_syncs_are_never_flagged(world, dtype, lora):
    results, _ = world
    for res in results:
        clean = res["clean"][dtype][lora]
        assert clean["flagged"] == []
        assert clean["distinct_digests"] == (NUM_CLEAN_SYNCS if lora == "none" else 20)  # every update moved it


def test_stream_faults(world):
    """A stream that skips a name fails the name check; a stale value in the stream itself is what
    the probe is for (the engine holds exactly what was streamed)."""
    results, _ = world
    for res in results:
        faults = res["stream_faults"]
        assert "digest check" in faults["skip"] and f"not streamed: ['{FAULT_NAME}']" in faults["skip"]
        assert "parity probe" in faults["stale"] and "every digest matched" in faults["stale"]
        assert faults["skip_recovered"] <= 1e-3 and faults["stale_recovered"] <= 1e-3


def test_empty_sync_fails(world):
    results, _ = world
    for res in results:
        assert res["stream_faults"]["empty"] is not None and "no tensors" in res["stream_faults"]["empty"]


def read_wandb_history(path: Path) -> list:
    """History rows of an offline `.wandb` file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, chunks = path.read_bytes(), [], []
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block = 7, 32768  # 7-byte file header; records never straddle a 32 KiB block
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record is buffered
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == 0:
            break
    return rows


def test_sync_metrics_in_jsonl_and_wandb(world):
    results, run_dir = world
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(COMBOS)
    assert all(SYNC_KEYS <= set(line) and "step" in line for line in lines)
    assert results[1]["wandb_files"] is None  # rank 1 logs nothing
    run_files = list(Path(results[0]["wandb_files"]).parent.glob("*.wandb"))
    assert len(run_files) == 1, "no offline .wandb file"
    history = read_wandb_history(run_files[0])
    assert len(history) == len(lines)
    for row, line in zip(history, lines):
        assert row["_step"] == line["step"]
        for key in SYNC_KEYS:
            assert row.get(key) == line[key], key  # JSON null (not verified) is left out of wandb


def test_short_run_wandb_file_holds_sync_metrics(tiny_model_dir, tmp_path):
    """A real 3-step GRPO run (launcher, vLLM, adapter sync, verify every 2nd sync): the offline
    .wandb history carries every sync metric of metrics.jsonl, step by step."""
    from omegaconf import open_dict

    from recipe.train import train
    from tests.helpers import compose

    cfg = compose(
        [
            f"model.path={tiny_model_dir}",
            "fsdp=fsdp1",
            "+lora=adapter",
            "sync.probe_every=2",
            "trainer.steps=3",
            "trainer.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "logger.mode=offline",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    # syncs 2, 3, 4 (the 1st is the initial load): verify=2 checks the 3rd only
    assert [line["sync/parity_max_abs_diff"] is None for line in lines] == [True, False, True]
    history = read_wandb_history(next((tmp_path / "wandb").rglob("*.wandb")))
    assert [row["_step"] for row in history] == [1, 2, 3]
    for row, line in zip(history, lines):
        for key in SYNC_KEYS:
            assert row.get(key) == line[key], key
        assert row["sync/strategy"] == "fsdp1/none/adapter"
