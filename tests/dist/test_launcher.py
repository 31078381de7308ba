"""The launcher: a failing rank ends the world promptly with its error; a good world returns.

    .venv/bin/python -m pytest tests/dist/test_launcher.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from recipe.dist import RankError, launch
from tests.helpers import REPO, compose

TIMEOUT_S = 120  # the process-group timeout; a failure must surface long before it


def _cfg(tmp_path):
    return compose(["trainer.device=cpu", "trainer.world_size=2", f"trainer.timeout_s={TIMEOUT_S}",
                    f"run_dir={tmp_path}"])


def fail_on_rank1(cfg, ctx):
    if ctx.rank == 1:
        raise ValueError("rank one broke on purpose")
    dist.barrier()  # rank 0 waits here for a peer that never arrives


def write_rank_file(cfg, ctx):
    t = __import__("torch").tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    Path(cfg.run_dir, f"rank{ctx.rank}.txt").write_text(f"{ctx.world_size} {t.item()}")


def barriers_with_pid(cfg, ctx):
    Path(cfg.run_dir, f"pid{ctx.rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        dist.barrier()
        time.sleep(0.05)


def test_a_stopped_rank_is_named_as_the_hung_one(tmp_path):
    """Before: a SIGSTOPped rank was reported as the *other* rank's failure (a collective timeout), after the
    whole process-group timeout."""
    import threading

    cfg = compose(["trainer.device=cpu", "trainer.world_size=2", "trainer.timeout_s=60", f"run_dir={tmp_path}"])

    def stop_rank1():
        while not (tmp_path / "pid1").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGSTOP)

    threading.Thread(target=stop_rank1, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(RankError) as err:
        launch(barriers_with_pid, cfg)
    assert "rank 1 is hung" in str(err.value) and "stopped (SIGSTOP?)" in str(err.value), str(err.value)
    # Not a speed target: the peer's collective would give up only at the 60 s timeout and blame rank 0
    assert time.monotonic() - start < 60
    pid = int((tmp_path / "pid1").read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_failing_rank_is_reported_before_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankError) as err:
        launch(fail_on_rank1, _cfg(tmp_path))
    elapsed = time.monotonic() - start
    assert "rank 1 failed" in str(err.value)
    assert "ValueError: rank one broke on purpose" in str(err.value)
    # Not a speed target: rank 0 sits in a barrier, so only the launcher can end it; without
    # that the call would take the full process-group timeout (or hang).
    assert elapsed < TIMEOUT_S / 2, f"launch took {elapsed:.0f}s to report the failure"


def test_successful_world_returns(tmp_path):
    assert launch(write_rank_file, _cfg(tmp_path)) is None
    # all_reduce of (rank + 1) over 2 ranks: 1 + 2 = 3 on both
    assert [Path(tmp_path, f"rank{r}.txt").read_text() for r in range(2)] == ["2 3.0", "2 3.0"]


def test_train_cli_exits_nonzero_with_the_rank_error(tmp_path, tiny_model_dir):
    """A truncated weights file passes the config checks (the directory and its config.json
    exist), then every rank fails loading it: the command exits non-zero and shows the rank's error."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # a download cut short
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "recipe.train", "model=local", f"model.path={ckpt}", "model.dtype=float32",
         "trainer.device=cpu", "logger=none", f"trainer.timeout_s={TIMEOUT_S}", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "RankError: rank" in out.stderr and "failed" in out.stderr
    error = "SafetensorError: Error while deserializing header"  # the rank's own error, not just "failed"
    assert error in out.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and error in status["error"]
