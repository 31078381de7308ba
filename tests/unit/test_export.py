"""The export's faults and bad inputs (recipe/export.py, tools/export.py), in one in-process gloo
world of size 1: a full disk while writing says so and leaves nothing partial (an earlier export
stays as it was); a directory that is not an export of the run is refused untouched; the export
tool names what a directory lacks to be a checkpoint.

    .venv/bin/python -m pytest tests/unit/test_export.py
"""

import errno
import json
import os

import pytest
import torch
import torch.distributed as dist

from recipe.dist import DistContext
from recipe.export import ExportError, export
from recipe.files import write_error
from tests.helpers import compose, policy_of


@pytest.fixture
def ctx():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistContext(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


@pytest.fixture
def policy(ctx, tiny_model_dir):
    from recipe.model import build_policy

    cfg = compose([f"model.path={tiny_model_dir}", "+lora=merged", "trainer.world_size=1"])
    return cfg, build_policy(policy_of(cfg), ctx)


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_full_disk_during_export_says_so_and_leaves_nothing_partial(ctx, policy, tmp_path, monkeypatch):
    import safetensors.torch

    cfg, model = policy
    out = export(model, cfg, ctx, tmp_path / "export" / "step_1", 1, tmp_path)
    before = _tree(out)
    real_save = safetensors.torch.save_file

    def half_then_full(tensors, filename, *args, **kwargs):  # a shard half written, then the disk is full
        real_save(tensors, filename, *args, **kwargs)
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(ExportError, match=r"^no space left on device: .*\.step_1\..*\.tmp"):
        export(model, cfg, ctx, out, 1, tmp_path)
    with pytest.raises(ExportError, match="no space left on device"):
        export(model, cfg, ctx, tmp_path / "export" / "step_2", 2, tmp_path)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["step_1"], "a partial directory was left"
    assert _tree(out) == before, "the earlier export changed"


def test_safetensors_full_disk_text_is_recognised(tmp_path):
    from safetensors import SafetensorError

    assert (
        write_error(
            SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            ),
            tmp_path,
        )
        == f"no space left on device: {tmp_path}"
    )
    assert write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path).startswith(
        f"cannot write {tmp_path}"
    )


def test_export_into_a_directory_that_is_not_an_export_of_the_run_is_refused(ctx, policy, tmp_path):
    cfg, model = policy
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not an export of this run"):
        export(model, cfg, ctx, theirs, 1, tmp_path / "run")
    other_run = export(model, cfg, ctx, tmp_path / "other", 1, tmp_path / "run_a")
    with pytest.raises(ExportError, match="is not an export of this run"):
        export(model, cfg, ctx, other_run, 1, tmp_path / "run_b")
    assert _tree(theirs) == {"notes.txt": b"keep me"}
    assert json.loads((other_run / "export.json").read_text())["run_dir"] == str((tmp_path / "run_a").resolve())
    again = export(model, cfg, ctx, other_run, 2, tmp_path / "run_a")  # the run's own export is replaced
    assert json.loads((again / "export.json").read_text())["step"] == 2


def test_export_tool_names_what_a_directory_lacks(tmp_path):
    from tools.export import NotACheckpoint, locate

    with pytest.raises(
        NotACheckpoint,
        match=r"neither a run directory \(no checkpoints/ folder\) nor a checkpoint "
        r"\(no .metadata, no rank0.pt\)",
    ):
        locate(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(NotACheckpoint, match="holds no complete checkpoint"):
        locate(tmp_path)
    (tmp_path / "checkpoints" / "step_3").mkdir()
    with pytest.raises(NotACheckpoint, match="config.yaml is missing"):
        locate(tmp_path)


def test_export_tool_refuses_a_cut_config_yaml(tmp_path):
    from recipe.config import ConfigError
    from tools.export import export_checkpoint

    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("model:\n  path: /nowhere\n")  # no `# end of config.yaml`: cut short
    with pytest.raises(ConfigError, match="config.yaml is damaged"):
        export_checkpoint(tmp_path)


def test_export_tool_into_a_run_directory_in_use_is_refused(tmp_path):
    from recipe.preflight import RunDir
    from tools.export import NotACheckpoint, run_dir_lock

    run = RunDir(tmp_path)
    run.claim(resume=True)
    try:
        with pytest.raises(NotACheckpoint, match=f"in use by a run \\(pid {os.getpid()} .*export elsewhere with --out"):
            with run_dir_lock(tmp_path, tmp_path / "export" / "step_3"):
                pass
        with run_dir_lock(tmp_path, tmp_path.parent / "elsewhere"):  # outside the run directory: no lock taken
            pass
    finally:
        run.release()
    with run_dir_lock(tmp_path, tmp_path / "export" / "step_3"):  # the run ended: the export holds the lock
        with pytest.raises(Exception, match="in use by another run"):
            RunDir(tmp_path).claim(resume=True)


def test_export_tool_refuses_a_shard_size_not_above_zero(tmp_path, capsys):
    from tools.export import main

    for size in ("0", "-5", "nan"):
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--shard-mb", size])
        assert f"--shard-mb={float(size)}: give a size in MiB above 0" in capsys.readouterr().err
