"""Profile a few training steps with torch.profiler (`trainer.profile_steps` > 0).

    profiler = StepProfiler(cfg, ctx, start)  # off when trainer.profile_steps is 0; start: the loop's first step
    profiler.step_begins(step)             # at the top of each loop iteration
    with phase("update"): ...              # the loop marks its phases (always; free without a profiler)
    profiler.step_ends(step)               # at the bottom

Steps 2 .. 1 + profile_steps of this process run under the profiler (its first step pays for
warm-up: allocator, kernels, the engine's first batch; a resumed run counts from where it resumed).
Then rank 0 writes `<run dir>/profile/steps.txt`: the wall
seconds of each marked phase over the profiled steps, then the torch.profiler table of the top 30
operators by self device time (CUDA) or self CPU time (CPU). `trainer.profile_trace=true` also
writes a chrome trace per rank (`trace_rank<r>.json`; large on big models).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig

PHASES = ("rollout", "score", "advantage", "update", "sync", "log")


@contextlib.contextmanager
def phase(name: str):
    """A named range in the profile (torch.profiler.record_function); costs microseconds without one."""
    with torch.profiler.record_function(name):
        yield


class StepProfiler:
    def __init__(self, cfg: DictConfig, ctx, start: int = 0):
        self.steps = int(cfg.trainer.profile_steps)
        self.trace = bool(cfg.trainer.profile_trace)
        self.ctx = ctx
        self.folder = Path(cfg.run_dir) / "profile"
        self.first = start + 1  # 0-based loop step at which profiling starts: this process's second step
        self.prof: Optional[torch.profiler.profile] = None
        self.t0 = 0.0
        self.done = False

    def step_begins(self, step: int) -> None:
        if self.steps <= 0 or self.done or self.prof is not None or step < self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.ctx.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def step_ends(self, step: int, last: bool = False) -> Optional[Path]:
        """After the loop's step `step` (0-based); stops after profile_steps steps or at the run's last."""
        if self.prof is None or (step + 1 < self.first + self.steps and not last):
            return None
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        prof, self.prof, self.done = self.prof, None, True
        profiled = step + 1 - self.first
        if self.trace:
            self.folder.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.folder / f"trace_rank{self.ctx.rank}.json"))
        if not self.ctx.is_main:
            return None
        return self._write(prof, profiled, wall)

    def _write(self, prof, profiled: int, wall: float) -> Path:
        cuda = self.ctx.device.type == "cuda"
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = prof.key_averages()
        phases: Dict[str, float] = {e.key: e.cpu_time_total / 1e6 / profiled for e in events if e.key in PHASES}
        lines: List[str] = [f"# {profiled} steps (loop steps {self.first + 1}..{self.first + profiled}) under "
                            f"torch.profiler, rank 0: {wall / profiled:.4f} s wall per step (profiler overhead "
                            f"included)", "# phase wall seconds per step: " +
                            ", ".join(f"{p} {phases[p]:.4f}" for p in PHASES if p in phases),
                            f"# top operators by {sort}"]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "steps.txt"
        path.write_text("\n".join(lines) + "\n" + events.table(sort_by=sort, row_limit=30) + "\n")
        return path
