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
- `HfEngine` generates with the sharded policy itself (ranks with different prompt counts)
  exactly what HF generate on the unsharded copy gives;
- the adapter path generates with the new adapter: its logprobs move with each version and
  differ from the base model's;
- faults (a skipped tensor, a stale tensor, a tensor under the wrong name) are caught by the
  parity probe with a WeightSyncError on both ranks, and a correct sync afterwards passes;
- the sync metrics reach metrics.jsonl and the offline wandb files.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers import run_world

pytestmark = pytest.mark.slow

COMBOS = [c for c in itertools.product(("fsdp1", "fsdp2"), ("none", "manual", "cpu"), ("none", "merged", "adapter"))
          if c[:2] != ("fsdp1", "cpu")]  # FSDP1 + CPU offload needs an accelerator (validate refuses it)
GEN_PROMPTS = ["12+7=", "3*4=", "20-9="]
SYNC_KEYS = {"sync/total_s", "sync/gather_s", "sync/load_s", "sync/verify_s", "sync/bytes", "sync/gbps",
             "sync/peak_mem_bytes", "sync/strategy", "sync/weight_version", "sync/parity_max_abs_diff",
             "sync/fingerprint"}
FAULT_NAME = "model.layers.1.mlp.down_proj.weight"


def _cfg(model_dir: str, fsdp="fsdp2", offload="none", lora="none", extra=()):
    from tests.helpers import compose

    return compose([f"fsdp={fsdp}", f"+offload={offload}", f"+lora={lora}", f"model.path={model_dir}",
                    "trainer.device=cpu", "rollout.max_model_len=128", *extra])


def _train_step(policy, optimizer, probe):
    """One AdamW step on a fixed batch (same on every rank), so the weights really change."""
    import torch

    ids = torch.tensor([p[:6] for p in probe])
    logits = policy(input_ids=ids).logits.float()
    loss = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _reference(policy, cfg):
    """Unsharded copy of the trained model via DCP's full state dict (independent of recipe.state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from recipe.model import apply_lora, load_hf_model

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    ref = apply_lora(load_hf_model(cfg), cfg)
    ref.load_state_dict(state)
    return ref.eval()


def _greedy(engine, ids):
    return [s.token_ids for s in engine.generate(ids, n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)]


def _max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _one_combo(combo, ctx, model_dir, engines, tok):
    from recipe.model import build_optimizer, build_policy
    from recipe.rollout import HfCopyEngine, HfEngine
    from recipe.sync import WeightSync

    fsdp, offload, lora = combo
    cfg = _cfg(model_dir, fsdp, offload, lora)
    engine = engines["lora" if lora == "adapter" else "plain"]
    policy = build_policy(cfg, ctx)
    optimizer = build_optimizer(policy, cfg)
    sync = WeightSync(cfg, ctx, policy, engine, tok)
    gen_ids = [tok(p, add_special_tokens=False).input_ids for p in GEN_PROMPTS]
    first = sync.sync(0)
    before = engine.prompt_logprobs(sync.probe)
    _train_step(policy, optimizer, sync.probe)
    second = sync.sync(1)
    after = engine.prompt_logprobs(sync.probe)
    ref = _reference(policy, cfg)
    hf = HfEngine(ref, ctx.device, tok.eos_token_id, tok.pad_token_id)
    out = {"first": first, "second": second, "engine_greedy": _greedy(engine, gen_ids),
           "hf_greedy": _greedy(hf, gen_ids), "engine_vs_ref": _max_gap(after, hf.prompt_logprobs(sync.probe)),
           "moved": _max_gap(before, after), "tolerance": sync.tolerance}
    # backend hf: generate with the sharded policy itself; ranks get different prompt counts
    rank_ids = gen_ids[:1 + 2 * (ctx.rank % 2)]
    out["hf_backend_greedy"] = _greedy(HfEngine(policy, ctx.device, tok.eos_token_id, tok.pad_token_id), rank_ids)
    out["hf_backend_ref"] = _greedy(hf, rank_ids)
    # backend hf (rollout=hf): the engine's own unsharded copy, loaded by name through the same sync
    copy = HfCopyEngine(cfg, ctx, model_dir)
    out["copy_sync"] = WeightSync(cfg, ctx, policy, copy, tok).sync(2)
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


def _faults(ctx, model_dir, engine, tok):
    """Break one sync in three ways; each must raise WeightSyncError (on every rank), then recover."""
    import torch

    from recipe.model import build_optimizer, build_policy
    from recipe.state_dict import stream_weights
    from recipe.sync import WeightSync, WeightSyncError

    cfg = _cfg(model_dir)
    policy = build_policy(cfg, ctx)
    optimizer = build_optimizer(policy, cfg)
    stale = {}

    def capture(model, cfg, device):  # the correct stream, remembering FAULT_NAME's pre-step value
        for name, t in stream_weights(model, cfg, device):
            if name == FAULT_NAME:
                stale[name] = t.clone()
            yield name, t

    faults = {
        "skip": lambda m, c, d: ((n, t) for n, t in stream_weights(m, c, d) if n != FAULT_NAME),
        "stale": lambda m, c, d: ((n, stale[n] if n == FAULT_NAME else t) for n, t in stream_weights(m, c, d)),
        "wrong_name": lambda m, c, d: ((n.replace("layers.1.mlp.down", "layers.0.mlp.down"), t)
                                       for n, t in stream_weights(m, c, d) if n != "model.layers.0.mlp.down_proj.weight"),
    }
    sync = WeightSync(cfg, ctx, policy, engine, tok, stream_fn=capture)
    sync.sync(0)
    _train_step(policy, optimizer, sync.probe)
    results = {}
    for kind, fn in faults.items():
        sync.stream_fn = fn
        try:
            sync.sync(1)
            results[kind] = None
        except WeightSyncError as exc:
            results[kind] = str(exc)
        sync.stream_fn = None
        results[kind + "_recovered"] = sync.sync(1)["sync/parity_max_abs_diff"]
    sync.stream_fn = lambda m, c, d: iter(())
    try:
        sync.sync(2)
        results["empty"] = None
    except WeightSyncError as exc:
        results["empty"] = str(exc)
    return results


def _log_metrics(ctx, model_dir, run_dir, records):
    from recipe.metrics import MetricsLogger

    cfg = _cfg(model_dir, extra=["logger=wandb", "logger.mode=offline"])
    logger = MetricsLogger(cfg, run_dir, ctx.rank)
    for step, record in enumerate(records, start=1):
        logger.log(record, step=step)
    files = str(logger.run_files_dir) if logger.run_files_dir else None
    logger.close()
    return files


def _world(rank, world, model_dir, run_dir):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.rollout import build_engine

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    engines = {"plain": build_engine(_cfg(model_dir), ctx, model_dir),
               "lora": build_engine(_cfg(model_dir, lora="adapter"), ctx, model_dir)}
    try:
        combos = {combo: _one_combo(combo, ctx, model_dir, engines, tok) for combo in COMBOS}
        faults = _faults(ctx, model_dir, engines["plain"], tok)
        records = [r[k] for r in combos.values() for k in ("first", "second")]
        files = _log_metrics(ctx, model_dir, run_dir, records)
        return {"combos": combos, "faults": faults, "wandb_files": files}
    finally:
        for engine in engines.values():
            engine.close()


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_world(_world, 2, str(tiny_model_dir), str(run_dir), timeout_s=300)
    return results, run_dir


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_engine_matches_trained_model(world, combo):
    results, _ = world
    for rank, res in enumerate(results):
        r = res["combos"][combo]
        assert set(r["second"]) == SYNC_KEYS
        assert r["second"]["sync/weight_version"] == r["first"]["sync/weight_version"] + 1
        assert r["second"]["sync/bytes"] > 0
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


@pytest.mark.parametrize("kind", ["skip", "stale", "wrong_name"])
def test_fault_is_caught_by_parity_probe(world, kind):
    results, _ = world
    for res in results:
        message = res["faults"][kind]
        assert message is not None, f"a {kind} sync passed the parity probe"
        assert "parity probe" in message and "token" in message
        if kind in ("skip", "wrong_name"):
            assert "not loaded" in message  # the probe names the tensor it can tell is missing
        assert res["faults"][kind + "_recovered"] <= 1e-3


def test_empty_sync_fails(world):
    results, _ = world
    for res in results:
        assert res["faults"]["empty"] is not None and "no tensors" in res["faults"]["empty"]


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
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7:pos + 7 + length])
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

    cfg = compose([f"model.path={tiny_model_dir}", "fsdp=fsdp1", "+lora=adapter", "sync.verify=2", "trainer.steps=3",
                   "trainer.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "logger.mode=offline"])
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
