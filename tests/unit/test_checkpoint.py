"""Checkpoints survive faults: a round trip restores everything bit for bit; a kill or a full disk
while saving leaves the previous checkpoint loadable; a truncated, corrupted or planted file gives
a clear error naming it; only complete checkpoints count, and old ones go only after a newer one
is complete. One in-process gloo world of size 1 (DCP and the rank agreement need a process group).

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py
"""

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from recipe import checkpoint
from recipe.checkpoint import CheckpointError, latest, load, save
from recipe.dist import DistContext
from tests.helpers import REPO


@pytest.fixture
def ctx():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistContext(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


def _objects(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps=1):
    for _ in range(steps):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def _snapshot(model, optimizer):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = {(i, k): v.clone() for i, s in enumerate(optimizer.state.values()) for k, v in s.items()}
    return params, optim


def _equal(a, b):
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


def _saved_step(tmp_path, ctx, step=1):
    model, optimizer, scheduler = _objects()
    _train(model, optimizer, scheduler, step)
    save(tmp_path / "ckpt", model, optimizer, scheduler, step, ctx, state={"weight_version": step + 1})
    return _snapshot(model, optimizer)


def test_round_trip_restores_model_optimizer_scheduler_rng_and_state(tmp_path, ctx):
    model, optimizer, scheduler = _objects()
    _train(model, optimizer, scheduler, 2)
    random.seed(7)
    torch.manual_seed(7)
    path = save(tmp_path / "ckpt", model, optimizer, scheduler, 2, ctx, state={"weight_version": 3, "num_syncs": 3})
    saved = _snapshot(model, optimizer)
    expect = (random.random(), torch.rand(3), scheduler.last_epoch)
    fresh, fresh_opt, fresh_sched = _objects(seed=1)
    _train(fresh, fresh_opt, fresh_sched, 5)
    loaded = load(path, fresh, fresh_opt, fresh_sched, ctx)
    assert loaded == {"step": 2, "state": {"weight_version": 3, "num_syncs": 3}}
    assert _equal(_snapshot(fresh, fresh_opt), saved)
    assert (random.random(), fresh_sched.last_epoch) == (expect[0], expect[2]) and torch.equal(torch.rand(3), expect[1])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_2"]


def test_planted_rank_file_is_refused_without_running_it(tmp_path, ctx):
    """torch.load(weights_only=False) would run the payload; weights_only refuses it."""
    path = tmp_path / "ckpt" / "step_1"
    _saved_step(tmp_path, ctx)
    ran = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    with open(path / "rank0.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path / 'rank0.pt'} cannot be read"):
        load(path, *_objects(), ctx)
    assert not ran.exists()


@pytest.mark.parametrize(
    "damage", ["truncate rank0.pt", "truncate shard", "flip a byte in shard", "truncate .metadata", "delete shard"]
)
def test_truncated_or_corrupted_checkpoint_names_the_file(tmp_path, ctx, damage):
    _saved_step(tmp_path, ctx)
    path = tmp_path / "ckpt" / "step_1"
    verb, name = damage.split(" ", 1)[0], damage.rsplit(" ", 1)[1]
    file = path / {"rank0.pt": "rank0.pt", "shard": "__0_0.distcp", ".metadata": ".metadata"}[name]
    data = file.read_bytes()
    if verb == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif verb == "flip":
        file.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:
        file.unlink()
    with pytest.raises(CheckpointError) as err:
        load(path, *_objects(), ctx)
    assert str(file) in str(err.value)


@pytest.mark.parametrize("where", ["rank file", "shards"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, ctx, monkeypatch, where):
    saved = _saved_step(tmp_path, ctx, step=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "rank file":  # half the file written, then the disk is full
        real_save = torch.save

        def half_then_full(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if isinstance(f, (str, os.PathLike)):  # the rank file (DCP also saves into buffers)
                os.truncate(f, os.path.getsize(f) // 2)
                full()

        monkeypatch.setattr(checkpoint.torch, "save", half_then_full)
    else:  # DCP's writer syncs every shard file it wrote
        monkeypatch.setattr(os, "fsync", full)
    model, optimizer, scheduler = _objects()
    _train(model, optimizer, scheduler, 2)
    for step in (2, 1):  # a new step, and the same step again (a finished run resumed)
        with pytest.raises(CheckpointError, match=f"no space left on device: .*step_{step}.tmp") as err:
            save(tmp_path / "ckpt", model, optimizer, scheduler, step, ctx)
        assert f"step_{step}.tmp" in str(err.value) and "previous checkpoints are untouched" in str(err.value)
        assert latest(tmp_path / "ckpt") == tmp_path / "ckpt" / "step_1"
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_1"]  # no partial checkpoint
    monkeypatch.undo()
    fresh, fresh_opt, fresh_sched = _objects(seed=3)
    assert load(tmp_path / "ckpt" / "step_1", fresh, fresh_opt, fresh_sched, ctx)["step"] == 1
    assert _equal(_snapshot(fresh, fresh_opt), saved)


def test_saving_the_same_step_again_replaces_it_only_when_complete(tmp_path, ctx):
    _saved_step(tmp_path, ctx, step=1)
    model, optimizer, scheduler = _objects(seed=5)
    _train(model, optimizer, scheduler, 3)
    save(tmp_path / "ckpt", model, optimizer, scheduler, 1, ctx)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_1"]
    fresh, fresh_opt, fresh_sched = _objects(seed=3)
    load(tmp_path / "ckpt" / "step_1", fresh, fresh_opt, fresh_sched, ctx)
    assert _equal(_snapshot(fresh, fresh_opt), _snapshot(model, optimizer))


def test_keep_checkpoints_removes_old_ones_after_a_newer_is_complete(tmp_path, ctx):
    model, optimizer, scheduler = _objects()
    for step in range(1, 6):
        save(tmp_path / "keep2", model, optimizer, scheduler, step, ctx, keep=2)
        save(tmp_path / "all", model, optimizer, scheduler, step, ctx, keep=0)
    assert sorted(p.name for p in (tmp_path / "keep2").iterdir()) == ["step_4", "step_5"]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"step_{s}" for s in range(1, 6)]
    (tmp_path / "keep2" / "user_notes.txt").write_text("mine")  # not ours: never removed
    save(tmp_path / "keep2", model, optimizer, scheduler, 6, ctx, keep=2)
    assert sorted(p.name for p in (tmp_path / "keep2").iterdir()) == ["step_5", "step_6", "user_notes.txt"]


# A separate process saves step 1, then is SIGKILLed at a chosen point of the next save.
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from recipe import checkpoint
    from recipe.dist import DistContext
    from tests.unit.test_checkpoint import _objects, _train
    root, step, where = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    model, optimizer, scheduler = _objects()
    _train(model, optimizer, scheduler, 1)
    checkpoint.save(root, model, optimizer, scheduler, 1, ctx)
    _train(model, optimizer, scheduler, 1)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "writing":  # the rank file half written (DCP also saves into buffers: left alone)
        real_save = torch.save
        def save(obj, f, *a, **k):
            if not isinstance(f, (str, os.PathLike)):
                return real_save(obj, f, *a, **k)
            Path(f).write_bytes(b"half a file")
            kill()
        checkpoint.torch.save = save
    else:  # between moving the old copy aside and renaming the new one into place
        rename = Path.rename
        def renamed(self, target):
            out = rename(self, target)
            if str(target).endswith(".old"):
                kill()
            return out
        Path.rename = renamed
    checkpoint.save(root, model, optimizer, scheduler, step, ctx)
    print("not killed")
""")


@pytest.mark.slow  # a killed subprocess per case
@pytest.mark.parametrize(
    "step,where,left",
    [
        (2, "writing", ["step_1", "step_2.tmp"]),
        (1, "publishing", ["step_1.old", "step_1.tmp"]),  # saving step 1 again, killed between the renames
    ],
)
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, ctx, step, where, left):
    root = tmp_path / "ckpt"
    out = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(root), str(step), where],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert sorted(p.name for p in root.iterdir()) == left
    model, optimizer, scheduler = _objects()
    _train(model, optimizer, scheduler, 1)  # what the killed process saved as step 1
    expected = _snapshot(model, optimizer)
    path = latest(root)
    assert path == root / left[0]
    fresh, fresh_opt, fresh_sched = _objects(seed=9)
    assert load(path, fresh, fresh_opt, fresh_sched, ctx)["step"] == 1
    assert _equal(_snapshot(fresh, fresh_opt), expected)
    save(root, fresh, fresh_opt, fresh_sched, 2, ctx)  # the next save tidies up what the kill left
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]


def test_files_and_renames_reach_the_disk_before_older_checkpoints_are_pruned(tmp_path, ctx, monkeypatch):
    """Without fsync a power cut after the prune could leave the new checkpoint's files or its rename only
    in the page cache, and the old checkpoint already gone."""
    model, optimizer, scheduler = _objects()
    save(tmp_path / "ckpt", model, optimizer, scheduler, 1, ctx, keep=1)
    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, checkpoint.shutil.rmtree
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(
        checkpoint.shutil, "rmtree", lambda p, *a, **k: (events.append(("rmtree", str(p))), real_rmtree(p, *a, **k))[1]
    )
    _train(model, optimizer, scheduler)
    save(tmp_path / "ckpt", model, optimizer, scheduler, 2, ctx, keep=1)
    root, tmp, final = tmp_path / "ckpt", tmp_path / "ckpt" / "step_2.tmp", tmp_path / "ckpt" / "step_2"
    prune = events.index(("rmtree", str(root / "step_1")))
    publish = events.index(("rename", str(tmp), str(final)))
    synced = [e[1] for e in events[:publish] if e[0] == "fsync"]
    for name in sorted(p.name for p in final.iterdir()):  # shards, .metadata, rank0.pt
        assert {str(tmp / name), str(tmp / name) + ".tmp"} & set(synced), f"{name} not fsync'd before the publish"
    assert ("fsync", str(tmp)) in events[:publish]  # the directory's entries, before it is renamed
    assert ("fsync", str(root)) in events[publish:prune]  # the rename, before the prune


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path, ctx):
    """Before: a world of 1 loaded a 2-rank checkpoint from rank0.pt alone, without a word."""
    _saved_step(tmp_path, ctx, step=1)
    path = tmp_path / "ckpt" / "step_1"
    (path / "rank1.pt").write_bytes((path / "rank0.pt").read_bytes())  # as if saved by 2 ranks
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 1: resume with 2 ranks"):
        load(path, *_objects(seed=3), ctx)
