"""Shared test helpers: multi-rank worlds on CPU (gloo) or GPU (NCCL), config composition."""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recipe.dist import free_port

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def compose(overrides: Sequence[str] = ()):
    """Compose conf/train.yaml with overrides, as `python -m recipe.train` would (no run dir).
    Tests probe every sync (`sync.probe_every=1`, the default being every 10th) unless they say otherwise."""
    from hydra import compose as hydra_compose, initialize_config_dir

    if not any(o.startswith("sync.probe_every=") for o in overrides):
        overrides = ["sync.probe_every=1", *overrides]

    import recipe.config  # noqa: F401  registers the schema

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def typed(overrides: Sequence[str] = ()):
    """`compose(overrides)` as the typed settings a run's components are given (recipe.settings)."""
    from recipe.settings import Settings

    return Settings.from_cfg(compose(overrides))


def engine_spec(cfg):
    """The engine's spec of a composed config (recipe.engine.EngineSpec), as the loop builds it."""
    from recipe.engine import EngineSpec
    from recipe.settings import Settings

    return EngineSpec.of(Settings.from_cfg(cfg))


def policy_of(cfg):
    """The policy slices of a composed config, as recipe.model's builders take them (Settings.policy)."""
    from recipe.settings import Settings

    return Settings.from_cfg(cfg).policy


def _rank_main(
    rank: int, fn: Callable, world: int, port: int, out_dir: str, backend: str, timeout_s: int, args: tuple
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
    )
    try:
        result = fn(rank, world, *args)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # Done and the result written: leave without the interpreter's teardown, as recipe.dist's ranks do
    # (a finished rank once aborted there with SIGABRT, in CI on this test helper too).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(fn: Callable[..., Any], world: int = 2, *args, backend: str = "gloo", timeout_s: int = 120) -> List[Any]:
    """Run `fn(rank, world, *args)` on `world` spawned ranks; return each rank's result.

    `fn` must be a module-level function. A failure on any rank terminates the others and
    re-raises here with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main,
            args=(fn, world, free_port(), out_dir, backend, timeout_s, args),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        results = []
        for r in range(world):
            with open(Path(out_dir) / f"rank{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def peak_rss_above_start(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """(fn(), the peak resident memory while it ran minus the resident memory before, in bytes).
    Linux: the peak (VmHWM) is reset through /proc/self/clear_refs, so earlier peaks do not count."""
    import gc
    import re

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    result = fn()
    return result, status("VmHWM") - before
