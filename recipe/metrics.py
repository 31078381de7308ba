"""Metrics: `metrics.jsonl` in the run directory plus wandb (offline by default), rank 0 only.

    logger = MetricsLogger(cfg, run_dir, rank)
    logger.log({"reward/mean": 0.5, "sync/total_s": 0.01}, step=3)
    logger.close()

Ranks > 0 get the same object with every method a no-op, so the loop calls `log()`
unconditionally. `logger.backend=none` writes only the JSONL file. With `logger.mode=offline`
wandb writes its files under `<run_dir>/wandb/` (sync them later with `wandb sync`);
`logger.mode=online` sends the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; "not measured this time" reads as null
    return value


class MetricsLogger:
    """One JSON object per `log()` call (with "step") in metrics.jsonl, and the same dict to wandb."""

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int):
        self.enabled = rank == 0
        self.run = None
        self._file = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)  # line-buffered: readable while the run goes on
        if cfg.logger.backend == "wandb" and cfg.logger.mode != "disabled":
            import wandb

            self.run = wandb.init(dir=str(run_dir), mode=cfg.logger.mode, project=cfg.logger.project,
                                  config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    @property
    def run_files_dir(self) -> Optional[Path]:
        """The wandb run's `files/` folder (summary and config live there), or None."""
        return Path(self.run.dir) if self.run is not None else None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        if self._file is not None:
            self._file.close()
            self._file = None
