"""GRPO end to end on CPU at world 2: every CPU combination trains, syncs and verifies; resume
continues with identical state; the default vLLM run writes its metrics."""

import json
import math
from pathlib import Path

import pytest
import torch

from recipe.settings import Settings
from tests.helpers import compose, run_world

CPU_COMBOS = [
    (f, o, lora)
    for f in ("fsdp1", "fsdp2")
    for o in ("none", "manual", "cpu")
    for lora in ("none", "merged", "adapter")
    if not (f == "fsdp1" and o == "cpu")
]
SMALL = [
    "trainer.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=4",
    "logger=none",
    "trainer.micro_batch_size=4",
    "sync.num_probe_prompts=2",
]


def _cfg(model_dir, run_dir, combo=("fsdp2", "none", "none"), extra=()):
    fsdp, offload, lora = combo
    from omegaconf import open_dict

    cfg = compose([f"fsdp={fsdp}", f"+offload={offload}", f"+lora={lora}", f"model.path={model_dir}", *SMALL, *extra])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def _local_params(model):
    """This rank's trainable shards, as plain tensors (DTensor -> local)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.to_local() if hasattr(p, "to_local") else p
            out[name] = t.detach().clone().cpu()
    return out


def _three_steps(rank, world, model_dir, root):
    from recipe.dist import DistContext
    from recipe.grpo import GRPOTrainer

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    results = {}
    for combo in CPU_COMBOS:
        cfg = _cfg(model_dir, Path(root) / "_".join(combo), combo, ["rollout=hf", "trainer.steps=3"])
        trainer = GRPOTrainer(Settings.from_cfg(cfg), ctx)
        before = _local_params(trainer.policy)
        trainer.run()
        after = _local_params(trainer.policy)
        rows = (
            [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
            if rank == 0
            else []
        )
        trainer.close()
        changed = sum(not torch.equal(before[k], after[k]) for k in before)
        results[combo] = {"changed": changed, "n_params": len(before), "rows": rows}
    return results


@pytest.mark.slow
def test_three_grpo_steps_every_cpu_combination(tiny_model_dir, tmp_path):
    results = run_world(_three_steps, 2, str(tiny_model_dir), str(tmp_path), timeout_s=600)
    for combo in CPU_COMBOS:
        for rank in (0, 1):
            r = results[rank][combo]
            assert r["changed"] > 0, f"{combo} rank {rank}: no trainable parameter changed in 3 steps"
        rows = results[0][combo]["rows"]
        assert [r["step"] for r in rows] == [1, 2, 3], combo
        for r in rows:
            assert math.isfinite(r["train/loss"]), (combo, r["train/loss"])
            # every sync was verified by the parity probe and passed (a failure raises)
            assert math.isfinite(r["sync/parity_max_abs_diff"]), combo
            assert r["sync/bytes"] > 0 and r["sync/strategy"] == "/".join(combo)
        assert rows[-1]["sync/weight_version"] == 4, combo  # initial sync + one per step


def _final_state(rank, world, model_dir, run_dir, steps, resume, checkpoint_every):
    from recipe.dist import DistContext
    from recipe.grpo import GRPOTrainer

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    cfg = _cfg(
        model_dir,
        run_dir,
        ("fsdp2", "none", "none"),
        [
            "rollout=hf",
            f"trainer.steps={steps}",
            f"trainer.resume={str(resume).lower()}",
            f"trainer.checkpoint_every={checkpoint_every}",
        ],
    )
    trainer = GRPOTrainer(Settings.from_cfg(cfg), ctx)
    trainer.maybe_resume()
    start = trainer.step
    trainer.run()
    trainer.export()  # as recipe.grpo.run does after the last step
    state = {
        "start": start,
        "params": _local_params(trainer.policy),
        "optim": {
            k: v.to_local().clone() if hasattr(v, "to_local") else v
            for s in trainer.optimizer.state.values()
            for k, v in s.items()
            if k == "exp_avg_sq"
        },
        "step": trainer.step,
    }
    trainer.close()
    return state


@pytest.mark.slow
def test_resume_continues_from_saved_step_with_identical_state(tiny_model_dir, tmp_path):
    straight = run_world(_final_state, 2, str(tiny_model_dir), str(tmp_path / "a"), 4, False, 2, timeout_s=300)
    run_world(_final_state, 2, str(tiny_model_dir), str(tmp_path / "b"), 2, False, 2, timeout_s=300)
    resumed = run_world(_final_state, 2, str(tiny_model_dir), str(tmp_path / "b"), 4, True, 2, timeout_s=300)
    for rank in (0, 1):
        assert resumed[rank]["start"] == 2 and resumed[rank]["step"] == 4
        for name, value in straight[rank]["params"].items():
            assert torch.equal(value, resumed[rank]["params"][name]), f"rank {rank} {name} differs after resume"
    assert (tmp_path / "b" / "checkpoints" / "step_4").is_dir()
    # The resumed run exports the same bytes as the uninterrupted one (the manifest names its run).
    straight_files, resumed_files = (
        json.loads((tmp_path / run / "export" / "step_4" / "export.json").read_text())["files"] for run in ("a", "b")
    )
    assert straight_files == resumed_files and any(f.endswith(".safetensors") for f in straight_files)


@pytest.mark.slow
def test_default_vllm_run_writes_sync_metrics(tiny_model_dir, tmp_path):
    """The `make train` path (launcher, vLLM engines, wandb offline) for a few steps."""
    from omegaconf import open_dict

    from recipe.train import train

    # temperature != 1: the engine must report the logprobs of the distribution it sampled from,
    # the one the trainer's importance ratio divides by
    cfg = compose(
        [
            f"model.path={tiny_model_dir}",
            "trainer.steps=3",
            "trainer.prompts_per_step=2",
            "rollout.n=4",
            "rollout.temperature=0.7",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sync/strategy"] == "fsdp2/none/none" and r["sync/bytes"] > 0
        assert math.isfinite(r["sync/parity_max_abs_diff"]) and math.isfinite(r["train/loss"])
        assert r["train/logprob_gap"] < 1e-4, r["train/logprob_gap"]  # fp32 engine vs trainer drift
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3
    wandb_files = list((tmp_path / "wandb").rglob("*.wandb"))
    assert wandb_files, "no offline wandb run files under the run directory"


@pytest.mark.slow
def test_world_one_adapter_sync_leaves_the_trainer_weights_alone(tiny_model_dir, tmp_path):
    """At world 1 the FSDP2 stream yields the trainer's own LoRA tensors, and vLLM folds the LoRA
    scaling into lora_b in place: unless the engine copies them, each sync would double the
    trainer's B, which the parity probe reports at the next sync."""
    from omegaconf import open_dict

    from recipe.train import train

    cfg = compose(
        [
            f"model.path={tiny_model_dir}",
            "+lora=adapter",
            "trainer.world_size=1",
            "trainer.steps=2",
            "trainer.prompts_per_step=2",
            "rollout.n=4",
            "logger=none",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    train(cfg)  # raises RankError(WeightSyncError) if the adapter sync corrupted the trainer
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/parity_max_abs_diff"] < 1e-4 for r in rows)


def test_profile_steps_writes_phase_times_and_operators(tiny_model_dir, tmp_path):
    """trainer.profile_steps=2 on a 4-step run: steps 2-3 under torch.profiler; rank 0 writes the
    phase times per step and the operator table; the run's metrics are unaffected in form."""
    from recipe.train import train

    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        extra=[
            "trainer.world_size=1",
            "rollout=hf",
            "trainer.steps=4",
            "trainer.profile_steps=2",
            "trainer.profile_trace=true",
        ],
    )
    train(cfg)
    text = (tmp_path / "profile" / "steps.txt").read_text()
    assert text.startswith("# 2 steps (loop steps 2..3)"), text[:200]
    phases = dict(p.split() for p in text.splitlines()[1].split(": ", 1)[1].split(", "))
    assert {"rollout", "score", "advantage", "update", "sync", "log"} <= set(phases)
    assert all(float(v) > 0 for v in phases.values()) and float(phases["update"]) < 60
    assert "Self CPU" in text and "aten::" in text  # the operator table
    assert json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
