"""Every (fsdp, offload, lora) combination through the real GRPO loop, in one world, as a table.

    python -m tools.combo_matrix trainer.device=cpu                                   # the 15 CPU combinations, tiny model
    python -m tools.combo_matrix --combos fsdp2/cpu/adapter,fsdp1/manual/none --resume trainer.device=cuda
    python -m tools.combo_matrix --isolate --resume --out gpu.json model=local model.path=/tmp/qwen2_1p5b \
        trainer.device=cuda trainer.world_size=2 rollout.sleep=true                   # docs/GPU.md

The ranks start once; each combination then runs `recipe.grpo.run` (build, `--steps` GRPO steps with
every sync checked, final checkpoint, close), and with `--resume` a second run that resumes from that
checkpoint and makes one more step. Rank 0 prints one row per combination (status, median step time,
median sync gather / load / digest seconds, the worst probe gap, the on-policy logprob gap, free GPU
memory before the engine, with the engine asleep and awake) and writes them as JSON to `--out`.
Arguments after the options are Hydra overrides of conf/train.yaml.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import tempfile
import traceback
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from omegaconf import DictConfig, open_dict

from recipe.config import ConfigError, UnsupportedError, refuse_renamed, validate

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
MEDIANS = {"step_s": "time/step_s", "gather_s": "sync/gather_s", "load_s": "sync/load_s", "digest_s": "sync/digest_s"}
MAXIMA = {
    "parity_max": "sync/parity_max_abs_diff",
    "logprob_gap_max": "train/logprob_gap",
    "logprob_gap_token_max": "train/logprob_gap_max",
}
MEMORY = {
    "free_gb_before_engine": "rollout/mem_free_before_engine_gb",
    "free_gb_asleep": "rollout/mem_free_asleep_gb",
    "free_gb_awake": "rollout/mem_free_awake_gb",
}


def compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def all_combos() -> List[str]:
    from recipe.weights import all_keys

    return ["/".join(key) for key in all_keys()]


def combo_cfg(overrides: Sequence[str], combo: str, run_dir: Path, steps: int, resume: bool) -> DictConfig:
    fsdp, offload, lora = combo.split("/")
    cfg = compose(
        [
            *overrides,
            f"fsdp={fsdp}",
            f"+offload={offload}",
            f"+lora={lora}",
            f"trainer.steps={steps}",
            f"trainer.resume={str(resume).lower()}",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def _records(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summarize(records: List[dict]) -> Dict[str, float]:
    def values(key):
        return [r[key] for r in records if isinstance(r.get(key), (int, float))]

    row = {name: statistics.median(values(key)) if values(key) else None for name, key in MEDIANS.items()}
    row.update({name: max(values(key)) if values(key) else None for name, key in MAXIMA.items()})
    row.update({name: values(key)[-1] if values(key) else None for name, key in MEMORY.items()})
    return row


def one_combo(ctx, overrides: Sequence[str], combo: str, root: Path, steps: int, resume: bool) -> dict:
    from recipe.grpo import run
    from recipe.settings import Settings

    run_dir = root / combo.replace("/", "-")
    row: Dict[str, object] = {"combo": combo, "status": "ok", "error": "", "resumed": None}
    try:
        cfg = combo_cfg(overrides, combo, run_dir, steps, False)
        run(validate(cfg), ctx)  # (validate returns the typed settings the ranks run with)
        if resume:
            run(Settings.from_cfg(combo_cfg(overrides, combo, run_dir, steps + 1, True)), ctx)
            row["resumed"] = True
    except UnsupportedError as exc:
        row.update(status="unsupported", error=str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001  (a row of the table, the next combination goes on)
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if ctx.is_main:
            traceback.print_exc()
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row.update(summarize(_records(run_dir)) if ctx.is_main else {})
    return row


def _row_file(root: Path, combo: str) -> Path:
    return root / f"{combo.replace('/', '-')}.row.json"


def write_rows(root: Path, combos: Sequence[str], cfg: DictConfig, steps: int, out: str) -> List[dict]:
    """The rows finished so far, in `combos` order; rewritten to `out` after every combination, so a run
    stopped by a time limit still leaves the rows it finished."""
    rows = [json.loads(_row_file(root, c).read_text()) for c in combos if _row_file(root, c).exists()]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(
                {
                    "world_size": cfg.trainer.world_size,
                    "model": cfg.model.path,
                    "dtype": cfg.model.dtype,
                    "steps": steps,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return rows


def rank_main(
    cfg: DictConfig,
    ctx,
    overrides: Sequence[str],
    combos: Sequence[str],
    steps: int,
    resume: bool,
    root: str,
    all_combos: Sequence[str],
    out: str,
    keep_runs: bool,
) -> None:
    import shutil

    import torch.distributed as dist

    for combo in combos:
        row = one_combo(ctx, overrides, combo, Path(root), steps, resume)
        dist.barrier()  # every rank is done with the run directory
        if ctx.is_main:
            _row_file(Path(root), combo).write_text(json.dumps(row))
            write_rows(Path(root), all_combos, cfg, steps, out)
            if not keep_runs:  # this tool made it; the checkpoints of a large model fill a disk fast
                shutil.rmtree(Path(root) / combo.replace("/", "-"), ignore_errors=True)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def table(rows: List[dict], cfg: DictConfig) -> str:
    head = (
        "| combination | status | step s | gather s | load s | digest s | probe max gap | logprob gap max "
        "| token gap max | resumed | free GiB before engine / asleep / awake |"
    )
    lines = [
        f"model {cfg.model.path} ({cfg.model.dtype}), world {cfg.trainer.world_size}, device {cfg.trainer.device}",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        mem = " / ".join(_fmt(r.get(k), 1) for k in MEMORY)
        status = r["status"] + (f" ({r['error'][:80]})" if r["error"] else "")
        lines.append(
            f"| {r['combo']} | {status} | {_fmt(r.get('step_s'))} | {_fmt(r.get('gather_s'), 4)} "
            f"| {_fmt(r.get('load_s'), 4)} | {_fmt(r.get('digest_s'), 4)} | {_fmt(r.get('parity_max'), 4)} "
            f"| {_fmt(r.get('logprob_gap_max'), 4)} | {_fmt(r.get('logprob_gap_token_max'), 4)} "
            f"| {_fmt(r.get('resumed'))} | {mem} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from recipe.dist import launch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combos", default="all", help="comma-separated fsdp/offload/lora keys, or 'all'")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="also resume each run from its checkpoint for one step")
    parser.add_argument("--out", default="", help="JSON file for the rows")
    parser.add_argument("--root", default="", help="run directories go here (default: a new temporary directory)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="start fresh ranks for every combination (needed with rollout.sleep=true on CUDA: vLLM's "
        "sleep-mode allocator serves one engine per process)",
    )
    parser.add_argument("--keep-runs", action="store_true", help="keep each combination's run directory")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    combos = all_combos() if args.combos == "all" else args.combos.split(",")
    unknown = sorted(set(combos) - set(all_combos()))
    if unknown:
        parser.error(f"--combos: {unknown} are not fsdp/offload/lora keys; choose from: {', '.join(all_combos())}")
    try:
        refuse_renamed(args.overrides)  # an old key name gets the new one, not Hydra's "not in struct"
    except ConfigError as exc:
        parser.error(str(exc))
    # every sync probed as well as digested (the trainer default probes every 10th); an override can change it
    base = ["sync.probe_every=1", *args.overrides, "logger.backend=none", "logger.mode=disabled"]
    cfg = compose(base)
    from recipe.assets import ensure_model

    ensure_model(cfg.model)
    root = Path(args.root or tempfile.mkdtemp(prefix="combo-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    for batch in [[c] for c in combos] if args.isolate else [combos]:
        launch(
            functools.partial(
                rank_main,
                overrides=base,
                combos=batch,
                steps=args.steps,
                resume=args.resume,
                root=str(root),
                all_combos=combos,
                out=args.out,
                keep_runs=args.keep_runs,
            ),
            cfg,
        )
    print(table(write_rows(root, combos, cfg, args.steps, args.out), cfg), flush=True)


if __name__ == "__main__":
    main()
