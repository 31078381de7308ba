"""Checkpoints: sharded model + optimizer (torch.distributed.checkpoint), step, scheduler, RNG.

Layout: `<run_dir>/checkpoints/step_<N>/` holds the DCP shards and one `rank<R>.pt` per rank
(step, scheduler state, RNG states). A checkpoint is written to `step_<N>.tmp` and renamed
when every rank has finished, so a crash mid-save never leaves a checkpoint that looks whole.
Resume: `python -m recipe.train trainer.resume=true hydra.run.dir=<run dir>`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, model, optimizer, scheduler, step: int, ctx) -> Path:
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / f"rank{ctx.rank}.pt")
    dist.barrier()
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def latest(root: Path) -> Optional[Path]:
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def load(path: Path, model, optimizer, scheduler, ctx) -> int:
    """Load a checkpoint in place; returns its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{ctx.rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return int(extra["step"])
