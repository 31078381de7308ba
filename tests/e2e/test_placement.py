"""rollout.placement=separate (recipe/remote.py): the engine in a process of its own, on CPU.

- on-policy, separate placement gives the same samples, rewards, losses and digests as colocated,
  bit for bit, over 3 steps of a real run (vLLM in the child), at world 1 and 2 (and at 2 under torchrun,
  whose ranks start their engine processes as the launcher's do); one step off-policy too
  (world 1), where the child generates the next batch during the update; at world 1 with
  rollout.transport=ipc too;
- lora=adapter into vLLM in the engine process passes the digest check (vLLM's held form of the
  adapter, a closure, comes back from the child with cloudpickle);
- the digest check across the process boundary catches a corruption injected in the engine process
  (one element one ulp off on rank 0's engine: both ranks raise, naming rank 0 and the tensor), with the
  weights over the process group and over the pipe (rollout.transport=ipc: shared memory on CPU);
- with ipc the trainer refills its staging buffer only once the engine has copied the bucket (an engine
  slow to copy still loads what was sent, over many small buckets);
- a killed engine, a hung one (SIGSTOP) and one that reports another weight version stop the caller
  within seconds with an error naming the engine and the request; close() reaps the child;
- in a run at world 2, an engine process that exits mid-run ends the whole run, naming it.

    .venv/bin/python -m pytest tests/e2e/test_placement.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_world

FAULT_NAME = "model.layers.1.mlp.down_proj.weight"
HOOK_ENV = "RECIPE_ENGINE_TEST_HOOK"
RUN = [
    "trainer.device=cpu",
    "trainer.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=4",
    "trainer.micro_batch_size=4",
    "sync.num_probe_prompts=2",
    "trainer.timeout_s=120",
    "trainer.steps=3",
    "rollout.max_model_len=128",
    "logger=none",
    "trainer.export=none",
]
# Per-step metrics that are timings, throughputs or memory readings: they differ between any two runs.
TIMED = (
    "time/",
    "perf/",
    "memory/",
    "sync/total_s",
    "sync/gather_s",
    "sync/load_s",
    "sync/digest_s",
    "sync/probe_s",
    "sync/gbps",
    "sync/peak_mem_bytes",
    "rollout/time_s",
    "rollout/tokens_per_s",
    "eval/time_s",
    "update/time",
)


# ----------------------------------------------------------------------------- hooks run in the engine process


def corrupt_rank0(server):
    """Rank 0's engine loads FAULT_NAME with one element one ulp off (after the trainer digested the stream)."""
    import torch

    if server.spec.rank != 0:
        return
    load = server.engine.load_weights

    def corrupted(weights):
        def one(name, t):
            if name == FAULT_NAME:
                t = t.clone()
                t.view(torch.int32).view(-1)[7] += 1
            return name, t

        load(one(n, t) for n, t in weights)

    server.engine.load_weights = corrupted


def version_ahead(server):
    """The engine counts one load too many while it generates (no load was sent)."""
    generate = server.engine.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        server.loads += 1
        return out

    server.engine.generate = counted


def slow_copy(server):
    """The engine takes 0.2 s before it copies each bucket that crossed by ipc (a trainer that refilled its
    staging buffer without waiting for the acknowledgement would have overwritten the bucket by then)."""
    from recipe import transport

    copy = transport.fresh_copy

    def slow(shared):
        time.sleep(0.2)
        return copy(shared)

    transport.fresh_copy = slow


def failing_copy(server):
    """The engine cannot copy the second bucket that crossed by ipc (a shared buffer it cannot read)."""
    from recipe import transport

    copy, calls = transport.fresh_copy, []

    def failing(shared):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: the shared bucket cannot be read")
        return copy(shared)

    transport.fresh_copy = failing


def exit_on_second_generate_rank1(server):
    """Rank 1's engine process exits (code 3) when asked for its second batch."""
    if server.spec.rank != 1:
        return
    generate, calls = server.engine.generate, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os._exit(3)
        return generate(*args, **kwargs)

    server.engine.generate = dying


# ----------------------------------------------------------------------------- helpers


def _cfg(model_dir, *extra):
    from tests.helpers import compose

    from recipe.settings import Settings

    return Settings.from_cfg(
        compose(
            [
                f"model.path={model_dir}",
                "trainer.device=cpu",
                "rollout.max_model_len=128",
                "rollout.placement=separate",
                *extra,
            ]
        )
    )


def _cli(model_dir, run_dir, *extra):
    return [sys.executable, "-m", "recipe.train", f"model.path={model_dir}", *RUN, f"hydra.run.dir={run_dir}", *extra]


def _run(model_dir, run_dir, *extra, env=None):
    return subprocess.run(
        _cli(model_dir, run_dir, *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def _compared(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in records]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _generate(engine):
    return engine.generate([[5, 6, 7]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("world,off,transport", [(1, 0, "auto"), (2, 0, "auto"), (1, 1, "auto"), (1, 0, "ipc")])
def test_separate_placement_matches_colocated_bit_for_bit(tiny_model_dir, tmp_path, world, off, transport):
    """On-policy, and one step off-policy (algo.off_policy_steps=1: the child generates batch k + 1 while the
    trainer updates on batch k, where the colocated engine generates it before the update, from the same
    weights), the two placements log the same steps bit for bit; the weights over the process group (auto
    on CPU) or over the pipe (ipc)."""
    runs = {}
    for placement in ("colocated", "separate"):
        result = _run(
            tiny_model_dir,
            tmp_path / placement,
            f"trainer.world_size={world}",
            f"rollout.placement={placement}",
            f"algo.off_policy_steps={off}",
            *([f"rollout.transport={transport}"] if placement == "separate" else []),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[placement] = _compared(tmp_path / placement)
    if world == 2:  # the ranks started by torchrun, not by the launcher: each still starts its engine process
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        result = subprocess.run(
            [*torchrun, *_cli(tiny_model_dir, tmp_path / "torchrun", "rollout.placement=separate")[1:]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert _compared(tmp_path / "torchrun") == runs["colocated"]
    assert len(runs["separate"]) == 3
    assert runs["separate"] == runs["colocated"]
    assert [r["rollout/staleness"] for r in runs["separate"]] == ([0, 1, 1] if off else [0, 0, 0])
    assert {"reward/mean", "sync/digest", "rollout/example"} <= set(runs["separate"][0])
    assert all(r["sync/verified_tensors"] > 0 for r in runs["separate"])


def _digest_fault(rank, world, model_dir, transport):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.model import build_policy
    from recipe.remote import place_engine
    from recipe.sync import WeightSync, WeightSyncError

    cfg = _cfg(model_dir, "rollout=hf", f"rollout.transport={transport}")
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    engine = place_engine(cfg, ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    assert engine.transport == ("ipc" if transport == "ipc" else "group")
    try:
        sync = WeightSync(cfg, ctx, build_policy(cfg.policy, ctx), engine, AutoTokenizer.from_pretrained(model_dir))
        try:
            sync.sync(0)
            return None
        except WeightSyncError as exc:
            return str(exc)
    finally:
        engine.close()


@pytest.mark.parametrize("transport", ["auto", "ipc"])
def test_digest_check_across_processes_catches_a_corruption_in_the_engine(tiny_model_dir, monkeypatch, transport):
    monkeypatch.setenv(HOOK_ENV, f"{__name__}:corrupt_rank0")
    for message in run_world(_digest_fault, 2, str(tiny_model_dir), transport):
        assert message is not None, "the corrupted load passed the digest check"
        assert "digest check" in message and FAULT_NAME in message, message
        assert "rank 0:" in message and "rank 1:" not in message, message


def _ipc_sync(rank, world, model_dir):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.engine import EngineSpec
    from recipe.model import build_policy
    from recipe.remote import RemoteEngine
    from recipe.sync import WeightSync

    cfg = _cfg(model_dir, "rollout=hf", "rollout.transport=ipc")
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    # 100 KiB buckets: the tiny model's small tensors share a bucket, its MLP matrices (128 KiB) go alone
    engine = RemoteEngine(
        EngineSpec.of(cfg), ctx, model_dir, load=cfg.sync.load, digest=True, timeout_s=60, bucket_bytes=100 * 2**10
    )
    try:
        policy = build_policy(cfg.policy, ctx)
        with torch.no_grad():  # weights the engine does not hold yet: a bucket left unread would show
            for param in policy.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        metrics = WeightSync(cfg, ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir)).sync(0)
        return metrics["sync/verified_tensors"], engine.buckets_sent
    finally:
        engine.close()


def test_ipc_trainer_refills_staging_only_after_the_engine_copied_the_bucket(tiny_model_dir, monkeypatch):
    """rollout.transport=ipc shares the trainer's staging buffer with the engine process; an engine slow to
    copy a bucket still loads exactly what was streamed (the digest check of every tensor passes)."""
    monkeypatch.setenv(HOOK_ENV, f"{__name__}:slow_copy")
    ((verified, buckets),) = run_world(_ipc_sync, 1, str(tiny_model_dir))
    assert buckets >= 8, buckets  # the staging buffer was refilled many times
    assert verified > 0


def test_ipc_a_bucket_the_engine_cannot_copy_stops_the_load_at_once_with_its_traceback(tiny_model_dir, monkeypatch):
    """The bucket is never acknowledged: the trainer must stop at the load's failed reply, not wait out
    trainer.timeout_s for the acknowledgement (nor the child for a bucket that will not come)."""
    import torch

    from recipe.dist import DistContext
    from recipe.engine import EngineSpec
    from recipe.names import checkpoint_tensors
    from recipe.remote import EngineError, RemoteEngine

    monkeypatch.setenv(HOOK_ENV, f"{__name__}:failing_copy")
    cfg = _cfg(tiny_model_dir, "rollout=hf", "rollout.transport=ipc")
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    engine = RemoteEngine(
        EngineSpec.of(cfg), ctx, tiny_model_dir, load="auto", digest=True, timeout_s=30, bucket_bytes=100 * 2**10
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            engine.load_weights(checkpoint_tensors(tiny_model_dir))
        took = time.monotonic() - t0
    finally:
        engine.close()
    assert "rank 0's rollout engine" in str(err.value) and "request 'load_weights'" in str(err.value)
    assert "injected: the shared bucket cannot be read" in str(err.value), str(err.value)
    assert engine.buckets_sent == 2
    assert took < 15, took  # not the timeout (30 s)


def _engine(model_dir, *extra):
    import torch

    from recipe.dist import DistContext
    from recipe.remote import place_engine

    cfg = _cfg(model_dir, "rollout=hf", *extra)
    return place_engine(
        cfg, DistContext(0, 1, 0, torch.device("cpu")), model_dir, load=cfg.sync.load, digest=cfg.sync.digest
    )


def test_a_killed_engine_stops_the_caller_within_seconds(tiny_model_dir):
    from recipe.remote import EngineError

    engine = _engine(tiny_model_dir)
    pid = engine.pid
    try:
        assert len(_generate(engine)) == 2
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            _generate(engine)
        took = time.monotonic() - t0
        with pytest.raises(EngineError):  # a failed engine stays failed
            engine.memory_stats()
    finally:
        engine.close()
    assert "rank 0's rollout engine" in str(err.value) and "request 'generate'" in str(err.value)
    assert "SIGKILL" in str(err.value), str(err.value)
    assert took < 10, took  # the timeout (trainer.timeout_s=120) is not what caught it
    assert not _alive(pid)


def test_a_hung_engine_stops_the_caller_after_the_timeout_and_is_reaped(tiny_model_dir):
    from recipe.remote import EngineError

    engine = _engine(tiny_model_dir, "trainer.timeout_s=3")
    pid = engine.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            engine.prompt_logprobs([[5, 6, 7]])
        took = time.monotonic() - t0
    finally:
        engine.close()
    assert "did not answer within trainer.timeout_s=3 s" in str(err.value) and "prompt_logprobs" in str(err.value)
    assert 3 <= took < 15, took
    assert not _alive(pid)


def test_an_engine_reporting_another_weight_version_stops_the_caller(tiny_model_dir, monkeypatch):
    from recipe.remote import EngineError

    monkeypatch.setenv(HOOK_ENV, f"{__name__}:version_ahead")
    engine = _engine(tiny_model_dir)
    try:
        with pytest.raises(EngineError) as err:
            _generate(engine)
    finally:
        engine.close()
    assert "reports weight version 1" in str(err.value) and "0 loads were sent" in str(err.value), str(err.value)


@pytest.mark.slow
def test_an_engine_process_that_exits_ends_the_run_at_world_2(tiny_model_dir, tmp_path):
    t0 = time.monotonic()
    result = _run(
        tiny_model_dir,
        tmp_path / "run",
        "trainer.world_size=2",
        "rollout=hf",
        "rollout.placement=separate",
        env={HOOK_ENV: f"{__name__}:exit_on_second_generate_rank1"},
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "rank 1's rollout engine" in text and "exited with code 3 during request 'generate'" in text, text[-3000:]
    assert time.monotonic() - t0 < 600


def _adapter_syncs(rank, world, model_dir):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.model import build_policy
    from recipe.remote import place_engine
    from recipe.sync import WeightSync

    cfg = _cfg(model_dir, "+lora=adapter")
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    engine = place_engine(cfg, ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        policy = build_policy(cfg.policy, ctx)
        sync = WeightSync(cfg, ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir))
        first = sync.sync(0)
        with torch.no_grad():  # B moves away from its zero init: a scaling left out would now show
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.add_(0.01)
        second = sync.sync(1)
        return first, second, engine.lora_version
    finally:
        engine.close()


@pytest.mark.slow
def test_adapter_sync_into_a_separate_vllm_engine_passes_the_digest_check(tiny_model_dir):
    """lora=adapter into vLLM in the engine process: the digest check needs vLLM's held form of the adapter
    (lora_B scaled in place), a closure made in the child and sent back with cloudpickle."""
    ((first, second, lora_version),) = run_world(_adapter_syncs, 1, str(tiny_model_dir))
    assert first["sync/verified_tensors"] > second["sync/verified_tensors"] > 0  # base + adapter, then the adapter
    assert second["sync/weight_version"] == lora_version == 2
    assert second["sync/parity_mean_abs_diff"] <= 1e-3


def _sync_other_model(rank, world, model_dir, transport):
    """An engine process (vLLM) for another architecture: the first sync, one optimizer step, a second sync."""
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy
    from recipe.remote import place_engine
    from recipe.sync import WeightSync
    from tests.e2e.test_rollout_sync import _train_step

    cfg = _cfg(model_dir, "fsdp=fsdp2", f"rollout.transport={transport}")
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    engine = place_engine(cfg, ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
    try:
        policy = build_policy(cfg.policy, ctx)
        optimizer = build_optimizer(policy, cfg.policy)
        sync = WeightSync(cfg, ctx, policy, engine, AutoTokenizer.from_pretrained(model_dir))
        first = sync.sync(0)
        _train_step(policy, optimizer, sync.probe)
        return first, sync.sync(1)
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("model,transport", [("llama", "ipc"), ("gpt2", "group")])
def test_other_architectures_sync_exactly_into_an_engine_process(tmp_path, model, transport):
    """An untied Llama (over the pipe) and GPT-2, whose Conv1D weights vLLM transposes on load (over the process
    group): the layout the engine process found comes back to the trainer's digest, and both syncs pass it."""
    from tests import tiny_models

    model_dir = tiny_models.llama(tmp_path / model) if model == "llama" else tiny_models.gpt2(tmp_path / model)
    (result,) = run_world(_sync_other_model, 1, model_dir, transport, timeout_s=600)
    first, second = result
    for stats in (first, second):
        assert stats["sync/verified_tensors"] > 0 and stats["sync/verified_bytes"] == stats["sync/bytes"]
    assert second["sync/digest"] != first["sync/digest"]
    assert second["sync/parity_mean_abs_diff"] <= 1e-3
