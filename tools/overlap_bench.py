"""Step time and throughput of the three ways a step can run: the engine in the rank's process (colocated,
on-policy), in a process of its own (separate, on-policy) and in a process of its own one step off-policy
(separate, `algo.off_policy_steps=1`, where the engine generates batch k+1 while the trainer updates on k).

    python -m tools.overlap_bench --steps 12 --warmup 2 -- experiment=default_tiny rollout.max_new_tokens=64
    python -m tools.overlap_bench --modes separate,off -- model=local model.path=/m/q15 trainer.device=cuda \
        trainer.world_size=1 rollout.devices=[1] rollout.max_new_tokens=512

Each mode is a whole run of `python -m recipe.train` (its own run directory under `--out`) with the
overrides after `--`; the table is read from the runs' metrics.jsonl, the first `--warmup` steps left
out (engine start, compilation, the first batch that one step off samples before it can overlap). Per
mode: the median step time, the generated tokens per second of wall time (completion tokens of the
steps over the sum of their step times), the median seconds the step waited for its samples
(`time/rollout_wait_s`), the median update time, and the throughput over the first mode's. The runs
are sequential, in one invocation, so the ratios come from one machine in one state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent

MODES: Dict[str, List[str]] = {
    "colocated": ["rollout.placement=colocated", "algo.off_policy_steps=0"],
    "separate": ["rollout.placement=separate", "algo.off_policy_steps=0"],
    "off": ["rollout.placement=separate", "algo.off_policy_steps=1"],
}


def summarize(rows: List[dict], warmup: int, samples_per_step: int) -> Dict[str, float]:
    """The table's cells of one run: `rows` are its metrics records (training steps only)."""
    kept = [r for r in rows if "time/step_s" in r and r["step"] > warmup]
    if not kept:
        raise SystemExit(f"no step after the {warmup} warm-up steps: raise --steps")
    step_s = [r["time/step_s"] for r in kept]
    tokens = sum(r["rollout/response_length"] * samples_per_step for r in kept)
    return {
        "steps": len(kept),
        "step_s": statistics.median(step_s),
        "tokens_per_s": tokens / sum(step_s),
        "wait_s": statistics.median(r.get("time/rollout_wait_s", 0.0) for r in kept),
        "update_s": statistics.median(r["time/update_s"] for r in kept),
        "reward_last": kept[-1]["reward/mean"],
    }


def run_mode(mode: str, overrides: List[str], steps: int, out: Path) -> List[dict]:
    run_dir = out / mode
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: give --out a new directory (runs are never overwritten)")
    command = [
        sys.executable,
        "-m",
        "recipe.train",
        *overrides,
        *MODES[mode],
        f"trainer.steps={steps}",
        "trainer.export=none",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    print(f"[{mode}] {' '.join(command[2:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"[{mode}] {time.perf_counter() - t0:.1f} s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def samples_per_step(overrides: List[str]) -> int:
    """Completions per step (all ranks) of the composed config the runs use."""
    from hydra import compose, initialize_config_dir

    import recipe.config  # noqa: F401  registers the schema
    from recipe.settings import Settings

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    settings = Settings.from_cfg(cfg)
    return settings.trainer.prompts_per_step * settings.rollout.n * settings.world_size


def table(results: Dict[str, Dict[str, float]]) -> str:
    first = next(iter(results.values()))["tokens_per_s"]
    lines = [
        "| mode | steps | step s (median) | generated tokens/s | wait for samples s | update s | throughput vs first |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['steps']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | {r['wait_s']:.3f} | "
            f"{r['update_s']:.3f} | {r['tokens_per_s'] / first:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the table")
    parser.add_argument("--modes", default="colocated,separate,off", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--out", default=None, help="a new directory for the runs (default: a fresh one in /tmp)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes {args.modes!r}: choose from {list(MODES)}")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    out = Path(args.out) if args.out else Path(f"/tmp/overlap_bench_{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    per_step = samples_per_step(args.overrides)
    results = {}
    for mode in modes:
        rows = run_mode(mode, args.overrides, args.steps, out)
        results[mode] = summarize(rows, args.warmup, per_step)
    print(table(results))


if __name__ == "__main__":
    main()
