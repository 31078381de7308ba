"""A full disk, on a real small filesystem (a 8 MiB tmpfs mounted for the test; skipped where mounting
is not permitted, e.g. not root: tests/unit/test_checkpoint.py simulates ENOSPC there): every write of
the run's own files says `no space left on device: <path>`, leaves no partial file and keeps what was
there before (the previous checkpoints, status.json, metrics.jsonl's earlier lines).

    .venv/bin/python -m pytest tests/unit/test_disk_full.py
"""

import errno
import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
from omegaconf import open_dict

from recipe.checkpoint import CheckpointError, latest, load, save
from recipe.dist import DistContext
from recipe.files import DiskFullError, write_atomic
from tests.helpers import compose


@pytest.fixture
def small_fs(tmp_path):
    where = tmp_path / "fs"
    where.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {out.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs, leave: int = 0):
    """Fill the filesystem up to `leave` bytes free (0: completely) with a ballast file."""
    ballast = fs / "ballast"
    with open(ballast, "ab") as f:
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - leave
        try:
            while free > 0:
                f.write(b"\0" * min(free, 1 << 20))
                f.flush()
                free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - leave
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


@pytest.fixture
def ctx():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistContext(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


def _objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))  # ~0.8 MB with AdamW's state
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(small_fs, ctx):
    """Before: `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598`, and
    the half-written step_<N>.tmp stayed behind."""
    model, optimizer, scheduler = _objects()
    root = small_fs / "ckpt"
    save(root, model, optimizer, scheduler, 1, ctx)
    fill(small_fs, leave=200_000)  # room for part of the next checkpoint only
    for step in (2, 1):  # a new step, and the same step again (a finished run resumed)
        with pytest.raises(CheckpointError) as err:
            save(root, model, optimizer, scheduler, step, ctx)
        assert f"no space left on device: {root / f'step_{step}.tmp'}" in str(err.value), str(err.value)
        assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no partial checkpoint
        assert not list(small_fs.glob("**/.space-probe-*"))
    assert latest(root) == root / "step_1"
    assert load(root / "step_1", *_objects(), ctx)["step"] == 1


def test_a_full_disk_leaves_status_json_as_it_was(small_fs):
    """Before: status.json was left empty."""
    from recipe.preflight import RunDir
    from recipe.train import _record

    run = RunDir(small_fs / "run")
    run.claim(resume=False)
    try:
        _record(run, "ok")
        before = (small_fs / "run" / "status.json").read_bytes()
        fill(small_fs)
        _record(run, "failed", "x" * 100_000)  # warns, does not raise: the run's own error is the one to show
        assert (small_fs / "run" / "status.json").read_bytes() == before
        assert sorted(p.name for p in (small_fs / "run").iterdir()) == [".lock", "status.json"]
    finally:
        run.release()


def test_write_atomic_on_a_full_disk(small_fs):
    (small_fs / "config.yaml").write_text("old\n")
    fill(small_fs)
    with pytest.raises(DiskFullError, match=f"^no space left on device: {small_fs / 'config.yaml'}$"):
        write_atomic(small_fs / "config.yaml", "new\n" * 100_000)
    assert (small_fs / "config.yaml").read_text() == "old\n"
    assert sorted(p.name for p in small_fs.iterdir()) == ["ballast", "config.yaml"]


def test_a_metrics_line_is_written_whole_or_not_at_all(small_fs):
    from recipe.metrics import MetricsLogger

    cfg = compose(["logger=none"])
    with open_dict(cfg):
        cfg.run_dir = str(small_fs / "run")
    logger = MetricsLogger(cfg.logger, cfg.run_dir, rank=0)
    logger.log({"reward/mean": 0.5}, step=1)
    fill(small_fs)
    with pytest.raises(DiskFullError, match="no space left on device: .*metrics.jsonl"):
        logger.log({"rollout/example": "y" * 100_000}, step=2)
    logger.close()
    lines = (small_fs / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == [1] and lines[0].endswith("\n")
