"""A run directory has one owner: a start refused for it writes nothing into it (not status.json, not
Hydra's `.hydra/`), and a second run into a directory another run holds is refused while the first runs.

    .venv/bin/python -m pytest tests/unit/test_run_dir.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import open_dict

from recipe.config import ConfigError
from recipe.preflight import LOCK, RunDir, RunDirBusy
from tests.helpers import REPO, compose

CPU = "trainer.device=cpu"


def _snapshot(path):
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
        if p.name != LOCK
    }


def _finished_run(tmp_path, tiny_model_dir):
    """A directory as a finished run leaves it: config, metrics, a checkpoint, status "ok", Hydra's record."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "step_2" / "rank0.pt").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "status.json").write_text(json.dumps({"status": "ok", "error": ""}))
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        (run / ".hydra" / name).write_text(f"the finished run's {name}\n")
    cfg = compose([CPU, f"model.path={tiny_model_dir}", "trainer.steps=2", "logger=none"])
    with open_dict(cfg):
        cfg.run_dir = str(run)
    from recipe.preflight import save_run_config

    save_run_config(cfg, run / "config.yaml")
    return run


def _cli(run, model_dir, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe.train",
            f"model.path={model_dir}",
            CPU,
            "logger=none",
            "trainer.steps=2",
            f"hydra.run.dir={run}",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "extra,refusal",
    [
        ((), "already holds a run"),
        (("trainer.resume=true", "trainer.lr=0.5"), "changes the run's math"),
    ],
)
def test_a_refused_start_writes_nothing_into_the_run_it_was_refused_for(tmp_path, tiny_model_dir, extra, refusal):
    """Before: both refusals overwrote the run's status.json ("ok" -> "failed") and its .hydra/*.yaml."""
    run = _finished_run(tmp_path, tiny_model_dir)
    before = _snapshot(run)
    out = _cli(run, tiny_model_dir, *extra)
    assert out.returncode != 0 and refusal in out.stderr, out.stderr[-3000:]
    assert _snapshot(run) == before
    own = out.stderr.rsplit("this start's status is in ", 1)[1].split(")")[0]
    assert json.loads(open(own).read())["status"] == "failed"  # its own record, outside the directory
    os.remove(own)


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path, tiny_model_dir):
    """Two starts into one directory both passed the "already holds a run" check (nothing was written
    yet); one then deleted the other's checkpoint in progress."""
    first = RunDir(tmp_path / "run")
    first.claim(resume=False)
    try:
        assert first.owned
        with pytest.raises(RunDirBusy, match=f"in use by another run \\(pid {os.getpid()} "):
            RunDir(tmp_path / "run").claim(resume=False)
        out = _cli(tmp_path / "run", tiny_model_dir)
        assert out.returncode != 0 and "is in use by another run" in out.stderr, out.stderr[-3000:]
        assert _snapshot(tmp_path / "run") == {}  # the refused start wrote nothing (no status.json, no .hydra)
    finally:
        first.release()
    second = RunDir(tmp_path / "run")
    second.claim(resume=False)  # released: free again
    second.release()


def test_the_lock_goes_with_its_holder_however_it_ends(tmp_path):
    code = (
        "import sys, time; from recipe.preflight import RunDir; RunDir(sys.argv[1]).claim(resume=False); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy):
            RunDir(tmp_path / "run").claim(resume=False)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    deadline = time.monotonic() + 10
    while True:
        try:
            RunDir(tmp_path / "run").claim(resume=False)
            break
        except RunDirBusy:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.1)


def test_a_fresh_start_into_a_run_is_refused_before_the_lock_is_made(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir(tmp_path / "run").claim(resume=False)
    assert not (tmp_path / "run" / LOCK).exists()
