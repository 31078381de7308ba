"""Metrics: `metrics.jsonl` in the run directory plus wandb (offline by default), rank 0 only.

    logger = MetricsLogger(settings.logger, run_dir, rank, resume=settings.trainer.resume, config=settings.source)
    logger.log({"reward/mean": 0.5, "sync/total_s": 0.01}, step=3)
    logger.close()

Ranks > 0 get the same object with every method a no-op, so the loop calls `log()`
unconditionally. `logger.backend=none` writes only the JSONL file. With `logger.mode=offline`
wandb writes its files under `<run_dir>/wandb/` (sync them later with `wandb sync`);
`logger.mode=online` sends the run.

Resume (`trainer.resume=true`): the wandb run continues under the id kept in
`<run_dir>/wandb_run_id`, and `rewind(step)` drops the records after the checkpoint's step
from metrics.jsonl (rewritten atomically; earlier lines are kept as they are), so the file
holds every step once and `records()` covers the whole run.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from recipe.files import DiskFullError, disk_full, write_atomic
from recipe.settings import Logger


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; "not measured this time" reads as null
    return value


# Dense bf16 peak FLOP/s by GPU name (a substring of torch.cuda.get_device_name), for `mfu`.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name: str) -> Optional[float]:
    """The table's peak for `device_name` (None: not in the table, or a CPU)."""
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def train_flops_per_token(params: int, trainable: int) -> float:
    """Forward + backward FLOPs per token: 2 per parameter forward, 2 backward for the activations'
    gradient, 2 more for a trainable parameter's own gradient (6 x parameters for a full fine-tune;
    a LoRA's frozen base counts 4). Attention's own FLOPs and recomputation are not counted."""
    return 4.0 * params + 2.0 * trainable


def throughput(
    generated: float,
    trained: float,
    rollout_s: float,
    update_s: float,
    flops_per_token: float,
    devices: int,
    peak: Optional[float],
) -> Dict[str, float]:
    """Per-step throughput metrics of all ranks together: tokens generated and trained per second, and
    the update's model FLOPs utilisation (trained tokens x FLOPs per token / update time / the peak of
    `devices` GPUs; absent without a peak)."""
    out = {
        "perf/generated_tokens_per_s": generated / max(rollout_s, 1e-9),
        "perf/trained_tokens_per_s": trained / max(update_s, 1e-9),
    }
    if peak:
        out["perf/mfu"] = trained * flops_per_token / max(update_s, 1e-9) / (peak * devices)
    return out


class MetricsLogger:
    """One JSON object per `log()` call (with "step") in metrics.jsonl, and the same dict to wandb (which
    records `config`, the run's composed config, and resumes its own run when `resume`)."""

    def __init__(
        self, logger: Logger, run_dir: str, rank: int, resume: bool = False, config: Optional[Dict[str, Any]] = None
    ):
        self.enabled = rank == 0
        self.run = None
        self._file = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: readable while the run goes on
        if logger.backend == "wandb" and logger.mode != "disabled":
            import wandb

            self.run = wandb.init(
                dir=str(run_dir),
                mode=logger.mode,
                project=logger.project,
                config=config or {},
                id=_run_id(run_dir, resume),
                resume="allow",
            )

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._append(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def _append(self, line: str) -> None:
        """One whole line, or none: a write that fails (a full disk) is cut back to the previous line."""
        data, end = line.encode(), self._file.tell()
        try:
            view = memoryview(data)
            while view:  # a write may take only part of the bytes (the disk filling up), then fail
                view = view[self._file.write(view) :]
        except OSError as exc:
            os.truncate(self.path, end)
            if disk_full(exc, self.path):
                raise DiskFullError(self.path) from exc
            raise

    def rewind(self, step: int) -> None:
        """Keep only the records of steps <= `step` (a resumed run logs the later ones again)."""
        if not self.enabled:
            return
        self._file.close()
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for i, line in enumerate(lines) if _keep(line, step, last=i == len(lines) - 1)]
        if kept != lines:
            write_atomic(self.path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
        self._file = open(self.path, "ab", buffering=0)

    def records(self) -> List[Dict[str, Any]]:
        """Every record in metrics.jsonl (the whole run, across resumes); [] on ranks > 0."""
        if not self.enabled:
            return []
        self._file.flush()
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
        return out

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


def check_history(path: Path, step: int) -> List[str]:
    """Does metrics.jsonl hold each of the steps 1..`step` once, in order (what a resume from checkpoint
    `step` keeps)? Raises ValueError naming the file and what is wrong; returns notes on what `rewind`
    will drop, which is safe: a last line cut short by a kill (it never reached a checkpoint), records
    of steps after `step`."""
    if not path.exists():
        if step == 0:
            return []
        raise ValueError(f"{path} is missing, while the run has a checkpoint at step {step}")
    lines = path.read_text(errors="replace").splitlines()
    steps, notes = [], []
    for i, line in enumerate(lines):
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                notes.append(f"the last line of {path}, cut short by a kill, is dropped")
                continue
            raise ValueError(f"{path} line {i + 1} is damaged (not a JSON record with a step)") from None
        steps.append(record_step)
    later = sum(1 for s in steps if s > step)
    if later:
        notes.append(f"{later} records of {path} after step {step} (the checkpoint the run continues from) are dropped")
    kept = [s for s in steps if 1 <= s <= step]
    if kept != list(range(1, step + 1)):
        missing = sorted(set(range(1, step + 1)) - set(kept))
        extra = "; some step appears twice" if len(set(kept)) != len(kept) else ""
        raise ValueError(
            f"{path} does not hold steps 1..{step} once each (the run's checkpoint is at step {step}; "
            f"{len(missing)} missing{', e.g. ' + str(missing[:5]) if missing else ''}{extra}: cut or "
            "edited?)"
        )
    return notes


def _keep(line: str, step: int, last: bool) -> bool:
    """A record of a step <= `step`; a last line cut short by a kill is dropped, any other line kept."""
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return not last


def _run_id(run_dir: Path, resume: bool) -> str:
    """The wandb run id of this run directory: kept in `wandb_run_id`, reused on resume."""
    path = run_dir / "wandb_run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb's own ids: 8 characters of [a-z0-9]
    write_atomic(path, run_id)
    return run_id
