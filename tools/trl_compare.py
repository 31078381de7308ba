"""Side by side with TRL: the same tiny model, task, prompts and batch, trained by TRL's GRPOTrainer
and by this recipe; prints one table (a benchmark, not a test; nothing in recipe/ imports it).

    python -m tools.trl_compare                         # 60 steps each, then the table
    python -m tools.trl_compare --out docs/trl_compare.md --ours trainer.world_size=2

What is the same on both sides: the model (`.cache/models/tiny`, recipe/builtin_models.py), the
task and its reward (recipe.tasks.Arithmetic with conf/task/arith.yaml's seed, pool and params),
the prompts of every step (this recipe's rank r draws batch `step * world + r` of the pool; TRL gets
those prompts in that order, unshuffled), 8 completions per prompt (`--n`), `--max-new-tokens` new
tokens at temperature 1, `--updates` optimizer steps per rollout batch (TRL: steps_per_generation),
AdamW at `--lr` with 2 warm-up steps and gradient clip 1.0, no KL, the advantage scaling of
`algo.scale_by_std` (TRL: scale_rewards "group" or "none") and the token mean over the mini-batch
(TRL: loss_type "dapo"); with `--ours +lora=merged|adapter` TRL gets the same LoRA (rank, alpha,
dropout, target modules) as its `peft_config`. TRL has no entropy bonus: with `algo.entropy_coef` > 0 the two differ there.

With `--device cpu` (the default) TRL runs one process with HF generate on the CPU, in its own
virtual environment (`--trl-python`, default /work/trl-venv/bin/python or $TRL_PYTHON), since its
pins differ from the project's:
    python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 && \
    /work/trl-venv/bin/pip install trl==1.16.0 transformers==5.19.0 hydra-core==1.3.8 && \
    /work/trl-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
With `--device cuda` both sides run in bf16 on one GPU with a vLLM engine beside the trainer: TRL in
colocate mode (`use_vllm=True, vllm_mode="colocate"`, which reloads the engine's weights with
`load_weights` after every optimizer step, no check), in the current Python (`--trl-python` defaults
to it there: trl 1.16.0 installs beside vLLM 0.26), and this recipe with `trainer.device=cuda`
(its sync verified by digest unless `--ours sync.digest=false`). Pass the model with
`--ours model=local --ours model.path=DIR`; both sides read it from there:
    python -m tools.trl_compare --device cuda --steps 30 --prompts 16 --updates 1 \
        --ours model=local --ours model.path=/tmp/m/q15
The recipe runs `python -m recipe.train` with its defaults plus the settings above, `trainer.export=none`
(TRL saves no model), and `--ours`.
Columns: the training loop's wall time (TRL: `trainer.train()`; ours: the sum of time/step_s,
which is rollout + reward + update + sync), the same with process start-up, the mean and median
step (TRL: the time between reward calls, one per rollout batch), and
the mean reward and exact-answer rate of the first and last 10 steps. Below the table, ours: the
median phase times and the median throughput (generated and trained tokens/s, and on CUDA the
update's MFU and GPU-busy share; recipe/grpo.py's `perf/` metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_config(overrides):
    """The composed training config (conf/train.yaml) with `overrides`."""
    from hydra import compose, initialize_config_dir

    import recipe.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def step_prompts(cfg, steps: int, world: int, per_rank: int):
    """The prompts this recipe trains on, step by step, in rank order: [{text, answer, question}]."""
    from recipe.settings import Settings
    from recipe.tasks import build_task

    task = build_task(Settings.from_cfg(cfg).task)
    out = []
    for step in range(steps):
        for rank in range(world):
            out += [vars(p) for p in task.batch(step * world + rank, per_rank)]
    return out


def first_last(values, k: int = 10):
    k = min(k, len(values))
    return sum(values[:k]) / k, sum(values[-k:]) / k


# ----------------------------------------------------------------------------- TRL side


def trl_worker(spec_path: str, out_path: str) -> None:
    """Runs in the TRL environment: GRPOTrainer on the spec's prompts; writes per-step rewards and times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from recipe.tasks import Arithmetic, Prompt

    spec = json.loads(Path(spec_path).read_text())
    task = Arithmetic(seed=spec["task_seed"], num_prompts=spec["num_prompts"], **spec["task_params"])
    torch.manual_seed(0)
    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    data = Dataset.from_dict(
        {"prompt": [p["text"] for p in spec["prompts"]], "answer": [p["answer"] for p in spec["prompts"]]}
    )
    steps = []

    def arithmetic_reward(prompts, completions, answer, **_):
        pairs = [(Prompt(text=p, answer=a), c) for p, c, a in zip(prompts, completions, answer)]
        rewards = [task.reward(p, c) for p, c in pairs]
        exact = [float(task.correct(p, c)) for p, c in pairs]
        steps.append(
            {
                "t": time.perf_counter(),
                "reward": sum(rewards) / len(rewards),
                "exact": sum(exact) / len(exact),
                "n": len(rewards),
            }
        )
        return rewards

    batch = len(spec["prompts"]) // spec["steps"] * spec["n"]  # completions per rollout batch
    args = GRPOConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"] * spec["updates"],
        per_device_train_batch_size=batch // spec["updates"],
        gradient_accumulation_steps=1,
        steps_per_generation=spec["updates"],
        num_iterations=1,
        num_generations=spec["n"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=spec["warmup_steps"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards=spec["scale_rewards"],
        shuffle_dataset=False,
        use_cpu=not cuda,
        bf16=cuda,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=spec["updates"],
        disable_tqdm=True,
        **(
            dict(
                use_vllm=True,
                vllm_mode="colocate",
                vllm_gpu_memory_utilization=spec["gpu_memory_utilization"],
                vllm_max_model_length=spec["max_model_len"],
            )
            if cuda
            else {}
        ),
    )
    peft_config = None
    if spec.get("lora"):  # the same adapters as ours (`--ours +lora=adapter`): rank, alpha, targets
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **spec["lora"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    step_s = [b["t"] - a["t"] for a, b in zip([{"t": t0}] + steps[:-1], steps)]  # reward-to-reward
    import trl

    Path(out_path).write_text(
        json.dumps({"version": trl.__version__, "train_s": train_s, "steps": steps, "step_s": step_s})
    )


def run_trl(args, prompts, cfg) -> dict:
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        spec = {
            "model": str(Path(cfg.model.path).resolve()),
            "prompts": prompts,
            "steps": args.steps,
            "n": args.n,
            "max_new_tokens": args.max_new_tokens,
            "updates": args.updates,
            "lr": args.lr,
            "warmup_steps": int(cfg.trainer.warmup_steps),
            "task_seed": int(cfg.task.seed),
            "scale_rewards": "group" if cfg.algo.scale_by_std else "none",
            "num_prompts": int(cfg.task.num_prompts),
            "task_params": OmegaConf.to_container(cfg.task.params, resolve=True),
            "output_dir": str(Path(tmp) / "out"),
            "device": args.device,
            "gpu_memory_utilization": float(cfg.rollout.gpu_memory_utilization),
            "max_model_len": int(cfg.rollout.max_model_len),
            "lora": None
            if cfg.lora.name == "none"
            else {
                "r": int(cfg.lora.rank),
                "lora_alpha": float(cfg.lora.alpha),
                "lora_dropout": float(cfg.lora.dropout),
                "target_modules": list(cfg.lora.target_modules),
            },
        }
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false")
        if args.device == "cuda":  # TRL refuses a process that sees several GPUs (nn.DataParallel)
            env.setdefault("CUDA_VISIBLE_DEVICES", "0")
        log = Path(tmp) / "trl.log"  # TRL prints a dict per optimizer step; shown only on failure
        t0 = time.perf_counter()
        with open(log, "w") as f:
            done = subprocess.run(
                [args.trl_python, "-m", "tools.trl_compare", "--trl-worker", str(spec_path), str(out_path)],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        total = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"TRL run failed ({args.trl_python}):\n" + log.read_text()[-4000:])
        result = json.loads(out_path.read_text())
    rewards = [s["reward"] for s in result["steps"]]
    exact = [s["exact"] for s in result["steps"]]
    return {
        "wall_s": result["train_s"],
        "total_s": total,
        "step_s": result["train_s"] / len(rewards),
        "step_median_s": statistics.median(result["step_s"]),
        "reward": first_last(rewards),
        "exact": first_last(exact),
        "steps": len(rewards),
        "version": result["version"],
    }


# ----------------------------------------------------------------------------- this recipe


# Our per-step phase timings (metrics.jsonl keys), reported as medians over steps 2.. beside the table.
PHASES = {
    "rollout/time_s": "rollout",
    "time/update_s": "update",
    "sync/total_s": "sync",
    "sync/gather_s": "gather",
    "sync/load_s": "load",
    "sync/digest_s": "digest check",
    "sync/probe_s": "probe",
}


# Our per-step throughput (metrics.jsonl keys), medians over steps 2.. as well.
PERF = {
    "perf/generated_tokens_per_s": ("generated tok/s", "{:.0f}"),
    "perf/trained_tokens_per_s": ("trained tok/s", "{:.0f}"),
    "perf/mfu": ("update MFU", "{:.1%}"),
    "perf/update_gpu_busy": ("update GPU busy", "{:.0%}"),
    "memory/trainer_peak_gib": ("trainer peak GiB", "{:.1f}"),
}


def run_ours(args, overrides) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="ours-compare-"))
    cmd = [sys.executable, "-m", "recipe.train", *overrides, "logger.backend=none", f"hydra.run.dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    total = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "time/step_s" in r]  # training steps (not the step-0 held-out eval)
    step_s = [r["time/step_s"] for r in records]
    later = records[1:] or records  # the first step also pays for warm-up
    phases = {
        key: statistics.median(r[key] for r in later if key in r) for key in PHASES if any(key in r for r in later)
    }
    perf = {
        key: statistics.median(r[key] for r in later if r.get(key) is not None)
        for key in PERF
        if any(r.get(key) is not None for r in later)
    }
    return {
        "wall_s": sum(step_s),
        "total_s": total,
        "step_s": sum(step_s) / len(step_s),
        "step_median_s": statistics.median(step_s),
        "phases_median_s": phases,
        "perf_median": perf,
        "reward": first_last([r["reward/mean"] for r in records]),
        "exact": first_last([r["reward/accuracy"] for r in records]),
        "steps": len(records),
        "run_dir": str(run_dir),
    }


def table(rows, steps: int) -> str:
    lines = [
        f"| | wall for {steps} steps (with start-up) | step: mean (median) | reward first 10 -> last 10 "
        "| exact first 10 -> last 10 |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['wall_s']:.1f} s ({r['total_s']:.0f} s) | {r['step_s']:.3f} s ({r['step_median_s']:.3f} s) "
            f"| {r['reward'][0]:.3f} -> {r['reward'][1]:.3f} "
            f"| {100 * r['exact'][0]:.1f}% -> {100 * r['exact'][1]:.1f}% |"
        )
    for name, r in rows:
        if r.get("phases_median_s"):
            parts = ", ".join(f"{PHASES[k]} {v:.4f}" for k, v in r["phases_median_s"].items())
            lines.append(f"\n{name}, median s per step (steps 2..): {parts}")
        if r.get("perf_median"):
            parts = ", ".join(f"{PERF[k][0]} {PERF[k][1].format(v)}" for k, v in r["perf_median"].items())
            lines.append(f"{name}, median throughput per step (steps 2..): {parts}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=32, help="prompts per step, all ranks together")
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="extra Hydra override for this recipe's run (repeatable), e.g. trainer.world_size=2",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="one more run of this recipe with these space-separated overrides on top (repeatable), "
        "e.g. --also rollout=hf --also 'sync.probe_every=0 sync.digest=false'",
    )
    p.add_argument("--skip", choices=["trl", "ours"], action="append", default=[])
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: both sides in bf16 on one GPU with vLLM (TRL in colocate mode)",
    )
    p.add_argument(
        "--trl-python",
        default=os.environ.get("TRL_PYTHON"),
        help="the Python that runs TRL (default: /work/trl-venv/bin/python on cpu, this one on cuda)",
    )
    p.add_argument("--out", help="also write the table (markdown) and the raw numbers (.json beside it) here")
    p.add_argument("--trl-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        return trl_worker(*args.trl_worker)
    if args.trl_python is None:
        args.trl_python = sys.executable if args.device == "cuda" else "/work/trl-venv/bin/python"

    from recipe.assets import ensure_model
    from recipe.config import ConfigError, refuse_renamed

    try:  # an old key name gets the new one, not Hydra's "not in struct"
        refuse_renamed([*args.ours, *(o for extra in args.also for o in extra.split())])
    except ConfigError as exc:
        p.error(str(exc))
    cfg = project_config(args.ours)
    world = int(cfg.trainer.world_size)
    if args.prompts % world:
        raise SystemExit(f"--prompts={args.prompts} must divide by trainer.world_size={world}")
    # no export: TRL saves nothing (save_strategy "no"), and the process-start-up column would count it
    ours = [
        "trainer.export=none",
        f"trainer.steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts // world}",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"trainer.updates_per_batch={args.updates}",
        f"trainer.lr={args.lr}",
        *(["trainer.device=cuda", "model.dtype=bfloat16"] if args.device == "cuda" else []),
        *args.ours,
    ]
    cfg = project_config(ours)
    ensure_model(cfg.model)
    rows = []
    if "ours" not in args.skip:
        rows.append((f"this recipe (world {world}, {cfg.rollout.backend})", run_ours(args, ours)))
        for extra in args.also:
            rows.append((f"this recipe (world {world}) {extra}", run_ours(args, ours + extra.split())))
    if "trl" not in args.skip:
        prompts = step_prompts(cfg, args.steps, world, args.prompts // world)
        result = run_trl(args, prompts, cfg)
        how = "vLLM colocate, bf16" if args.device == "cuda" else "one process, HF generate"
        rows.append((f"TRL {result['version']} GRPOTrainer ({how})", result))
    text = table(rows, args.steps)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
