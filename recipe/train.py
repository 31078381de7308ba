"""Hydra entry point: parse, build, run, close.

    python -m recipe.train                          # default GRPO run (tiny model, FSDP2, world 2)
    python -m recipe.train +offload=cpu +lora=merged
    python -m recipe.train --cfg job                # print the composed config
    python -m recipe.train -m fsdp=fsdp1,fsdp2 +offload=none,manual,cpu +lora=none,merged,adapter

Each run writes `status.json` into its run directory. In a multirun sweep a failing job is
recorded there (status "failed" or "unsupported", with the error) and the sweep goes on; a
single run re-raises so the command exits non-zero.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.config import UnsupportedError, validate  # (importing it registers the ConfigStore schema)


def run_rank(cfg: DictConfig, ctx) -> None:
    """Body of every rank (module level so spawn can pickle it)."""
    from recipe.grpo import run

    run(cfg, ctx)


def train(cfg: DictConfig) -> None:
    """Validate, make the model directory if needed, check what needs I/O, start the ranks.
    Tests call this directly."""
    from recipe.assets import ensure_model
    from recipe.dist import launch
    from recipe.preflight import check_context_length, preflight
    from recipe.progress import console_env

    validate(cfg)
    console_env(cfg.logger.verbose)  # before the ranks start: their torch reads it at import
    preflight(cfg)  # run directory, resumed config, wandb: before anything is built or downloaded
    check_context_length(cfg, ensure_model(cfg))
    saved = Path(cfg.run_dir) / "config.yaml"
    OmegaConf.save(cfg, saved.with_suffix(".yaml.tmp"), resolve=True)
    os.replace(saved.with_suffix(".yaml.tmp"), saved)  # a resumed run compares against this file
    launch(run_rank, cfg)


def _write_status(run_dir: Path, status: str, error: str = "") -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "status.json").write_text(json.dumps({"status": status, "error": error}, indent=1))
    except OSError as exc:  # an unwritable run directory: the run's own error is the one to show
        print(f"warning: cannot write {run_dir / 'status.json'}: {exc}", flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir
    run_dir = Path(cfg.run_dir)
    try:
        train(cfg)
    except Exception as exc:
        status = "unsupported" if isinstance(exc, UnsupportedError) else "failed"
        _write_status(run_dir, status, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(f"[job {hydra_cfg.job.num}] {status}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            return
        raise
    _write_status(run_dir, "ok")


if __name__ == "__main__":
    main()
