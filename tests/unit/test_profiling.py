"""recipe/profiling.py: which steps run under the profiler, on a fresh and on a resumed run."""

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from recipe.profiling import StepProfiler, phase


def _profiler(tmp_path, start):
    cfg = OmegaConf.create({"trainer": {"profile_steps": 1, "profile_trace": False}, "run_dir": str(tmp_path)})
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0, is_main=True)
    return StepProfiler(cfg, ctx, start)


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
