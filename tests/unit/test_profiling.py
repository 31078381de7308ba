"""recipe/profiling.py: which steps run under the profiler, on a fresh and on a resumed run."""

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from recipe.profiling import StepProfiler, phase


def _profiler(tmp_path, start):
    cfg = OmegaConf.create({"trainer": {"profile_steps": 1, "profile_trace": False}, "run_dir": str(tmp_path)})
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0, is_main=True)
    return StepProfiler(cfg.trainer, cfg.run_dir, ctx, start)


def _run(profiler, steps):
    written = []
    for step in steps:
        profiler.step_begins(step)
        with phase("update"):
            torch.ones(4).sum()
        written.append(profiler.step_ends(step, last=step == steps[-1]))
    return written


def test_the_first_step_of_a_fresh_run_is_not_profiled(tmp_path):
    written = _run(_profiler(tmp_path, 0), [0, 1, 2])
    assert written[0] is None and written[1] is not None and written[2] is None
    assert written[1].read_text().startswith("# 1 steps (loop steps 2..2)")


def test_a_resumed_run_skips_its_own_first_step(tmp_path):
    """Resumed at step 5: step 6 (its warm-up) is not profiled, step 7 is."""
    written = _run(_profiler(tmp_path, 5), [5, 6, 7])
    assert written[:1] == [None] and written[1] is not None
    text = written[1].read_text()
    assert text.startswith("# 1 steps (loop steps 7..7)") and "update" in text.splitlines()[1]


def _event(name, device, start, end, annotation=False):
    from torch.autograd import DeviceType

    return SimpleNamespace(
        name=name,
        device_type=DeviceType.CUDA if device else DeviceType.CPU,
        time_range=SimpleNamespace(start=start, end=end),
        is_user_annotation=annotation,
    )


def test_cuda_phases_read_their_host_time_and_the_device_time_inside():
    """A CUDA profile lists each phase twice, the host range and a device twin without CPU time;
    the phase table used to take the twin and print 0.0000 for every phase. Times in microseconds,
    2 profiled steps."""
    from recipe.profiling import phase_times

    events = [
        _event("update", False, 0, 1_000_000),
        _event("update", True, 10, 900_000, annotation=True),
        _event("sync", False, 1_000_000, 1_200_000),
        _event("sync", True, 1_000_010, 1_150_000, annotation=True),
        _event("update", False, 2_000_000, 3_000_000),
        _event("aten::mm", False, 100, 200),  # a host op: neither a phase nor device time
        _event("gemm_kernel", True, 500, 300_500),
        _event("gemm_kernel", True, 2_100_000, 2_500_000),
        _event("backward_kernel", True, 600_000, 700_000),  # launched from autograd's thread: by time
        _event("nccl_kernel", True, 1_050_000, 1_100_000),
        _event("late_kernel", True, 1_500_000, 1_600_000),  # between phases: nobody's
    ]
    times = phase_times(events, profiled=2)
    assert list(times) == ["update", "sync"]
    assert times["update"] == {"wall_s": 1.0, "device_s": 0.4}
    assert times["sync"] == {"wall_s": 0.1, "device_s": 0.025}


def test_cuda_profile_table_has_nonzero_phases(tmp_path):
    """The written table on a CUDA run (a stand-in profile whose events are as above)."""
    profiler = _profiler(tmp_path, 0)
    profiler.ctx.device = torch.device("cuda")
    events = [
        _event("update", False, 0, 500_000),
        _event("update", True, 0, 400_000, annotation=True),
        _event("k", True, 10, 250_010),
    ]

    class Averages(list):  # key_averages(): one entry per (name, device type), the device twin last
        def table(self, **_):
            return "(table)"

    averages = Averages(
        [
            SimpleNamespace(key="update", cpu_time_total=500_000, device_type=events[0].device_type),
            SimpleNamespace(key="update", cpu_time_total=0, device_type=events[1].device_type),
        ]
    )
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: averages)
    lines = profiler._write(prof, profiled=1, wall=0.6).read_text().splitlines()
    assert lines[1] == "# phase wall seconds per step: update 0.5000"
    assert lines[2].endswith("update 0.2500 (50%)")
