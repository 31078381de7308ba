"""Profile a few training steps with torch.profiler (`trainer.profile_steps` > 0).

    profiler = StepProfiler(cfg, ctx, start)  # off when trainer.profile_steps is 0; start: the loop's first step
    profiler.step_begins(step)             # at the top of each loop iteration
    with phase("update"): ...              # the loop marks its phases (always; free without a profiler)
    profiler.step_ends(step)               # at the bottom
    busy = DeviceBusy(device)              # CUDA events around device work, without a profiler

Steps 2 .. 1 + profile_steps of this process run under the profiler (its first step pays for
warm-up: allocator, kernels, the engine's first batch; a resumed run counts from where it resumed).
Then rank 0 writes `<run dir>/profile/steps.txt`: the wall
seconds of each marked phase over the profiled steps (on CUDA also the device-busy seconds inside
each, `phase_times`), then the torch.profiler table of the top 30 operators by self device time
(CUDA) or self CPU time (CPU). `trainer.profile_trace=true` also
writes a chrome trace per rank (`trace_rank<r>.json`; large on big models).
"""

from __future__ import annotations

import bisect
import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from recipe.settings import Trainer

PHASES = ("rollout", "score", "advantage", "update", "sync", "log")


@contextlib.contextmanager
def phase(name: str):
    """A named range in the profile (torch.profiler.record_function); costs microseconds without one."""
    with torch.profiler.record_function(name):
        yield


class DeviceBusy:
    """The device time of a phase's spans, from CUDA events (no profiler): `with busy.span(): ...`
    around each piece of device work, `busy.seconds()` after (one synchronisation).

    A span's time runs from when the device reaches its start event to when it finishes the span's
    work, so the device sitting idle between spans (the host waiting on a sync, or running Python
    between optimizer steps) counts as not busy; idle gaps inside a span (kernel launches slower than
    the kernels) do not show here, only in the profile (trainer.profile_steps). No-op off CUDA."""

    def __init__(self, device: torch.device):
        self.enabled = torch.device(device).type == "cuda"
        self.device = device
        self.pairs: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self):
        if not self.enabled:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.pairs.append((start, end))

    def synchronize(self) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)

    def seconds(self) -> Optional[float]:
        """Summed device seconds of the spans (None off CUDA); waits for the device."""
        if not self.enabled:
            return None
        self.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.pairs) / 1e3


class StepProfiler:
    def __init__(self, trainer: Trainer, run_dir: str, ctx, start: int = 0):
        self.steps = int(trainer.profile_steps)
        self.trace = bool(trainer.profile_trace)
        self.ctx = ctx
        self.folder = Path(run_dir) / "profile"
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
        phases = phase_times(prof.events(), profiled)
        lines: List[str] = [
            f"# {profiled} steps (loop steps {self.first + 1}..{self.first + profiled}) under "
            f"torch.profiler, rank 0: {wall / profiled:.4f} s wall per step (profiler overhead "
            f"included)",
            "# phase wall seconds per step: " + ", ".join(f"{p} {t['wall_s']:.4f}" for p, t in phases.items()),
        ]
        if cuda:
            lines.append(
                "# phase device-busy seconds per step (kernels and copies that start inside the phase, "
                "summed over streams; share of the phase's wall): "
                + ", ".join(
                    f"{p} {t['device_s']:.4f} ({t['device_s'] / max(t['wall_s'], 1e-12):.0%})"
                    for p, t in phases.items()
                )
            )
        lines.append(f"# top operators by {sort}")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "steps.txt"
        path.write_text("\n".join(lines) + "\n" + prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
        return path


def phase_times(events, profiled: int) -> Dict[str, Dict[str, float]]:
    """Per marked phase, in PHASES order: `wall_s`, the host time inside its ranges, and `device_s`,
    the device time (kernels, copies) that starts inside them, each per profiled step.

    From torch.profiler's raw events. With CUDA, kineto lists every `record_function` range twice:
    the host range and a device-side twin (`gpu_user_annotation`, no CPU time); grouped by name the
    twin came last and every phase read 0 s. Only host ranges count as phases here, and device time
    is attributed by the host clock, not by the calling thread (autograd runs backward on a thread
    of its own on CUDA, outside the phase's range of op children)."""
    from torch.autograd import DeviceType

    spans: Dict[str, List[Tuple[float, float]]] = {}
    device: List[Tuple[float, float]] = []
    for e in events:
        if e.device_type == DeviceType.CPU:
            if e.name in PHASES:
                spans.setdefault(e.name, []).append((e.time_range.start, e.time_range.end))
        elif not getattr(e, "is_user_annotation", False):
            device.append((e.time_range.start, e.time_range.end - e.time_range.start))
    owner = sorted((start, end, name) for name, ranges in spans.items() for start, end in ranges)
    starts = [start for start, _, _ in owner]
    busy = dict.fromkeys(spans, 0.0)
    for start, duration in device:
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and start < owner[i][1]:
            busy[owner[i][2]] += duration
    return {
        p: {"wall_s": sum(e - s for s, e in spans[p]) / 1e6 / profiled, "device_s": busy[p] / 1e6 / profiled}
        for p in PHASES
        if p in spans
    }
