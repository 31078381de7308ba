"""Model directories: a built-in model is never built over a directory the project did not make;
a model directory the trainer cannot read is refused at start with what is missing.

    .venv/bin/python -m pytest tests/unit/test_assets.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import open_dict

from recipe.assets import check_model_dir, check_model_path, ensure_model
from recipe.config import ConfigError, validate
from tests.helpers import REPO, compose

CPU = "trainer.device=cpu"


def _start_checks(cfg):
    """What train() checks before anything is built: the config (validate) and the model directory."""
    settings = validate(cfg)
    check_model_path(settings.model)
    return settings


def _user_model(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "mine"}')
    (path / "model.safetensors").write_bytes(b"my weights")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _contents(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_builder_refuses_a_directory_it_did_not_build(tmp_path):
    """The issue's case: `model.path=/data/my_model` without `model=local` used to delete the directory."""
    from tools.make_tiny_model import make_tiny_model  # the CLI's import path, as before the fix

    mine = tmp_path / "my_model"
    before = _user_model(mine)
    with pytest.raises(ValueError, match="model=local"):
        make_tiny_model(mine)
    assert _contents(mine) == before  # nothing deleted or overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_model"]  # no stray temp dirs


def test_user_model_path_is_refused_at_start(tmp_path):
    mine = tmp_path / "my_model"
    before = _user_model(mine)
    cfg = compose([f"model.path={mine}", CPU])  # model=tiny (the default) keeps builder: tiny
    with pytest.raises(ConfigError) as err:
        _start_checks(cfg)
    msg = str(err.value)
    assert "model.path=" in msg and "without recipe_model.json" in msg
    assert f"model=local model.path={str(mine)!r}" in msg  # what to use instead
    with pytest.raises(ConfigError):
        ensure_model(cfg.model)  # the builder checks again even when validate is skipped
    assert _contents(mine) == before


@pytest.mark.slow  # python -m recipe.train in a subprocess
def test_user_model_path_from_the_cli_exits_with_the_message(tmp_path):
    """The issue's command, as a user types it: it exits non-zero at start and deletes nothing."""
    mine = tmp_path / "my_model"
    before = _user_model(mine)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe.train",
            f"model.path={mine}",
            "trainer.device=cpu",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "use model=local model.path=" in out.stderr, out.stderr[-2000:]
    assert _contents(mine) == before
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_checkout_as_model_path_is_refused(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("a checkout")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model=local"):
        _start_checks(compose(["model.path=.", CPU]))
    assert (tmp_path / "README.md").read_text() == "a checkout"


def test_a_file_or_another_builders_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        _start_checks(compose([f"model.path={tmp_path / 'file'}", CPU]))
    other = tmp_path / "smol"
    other.mkdir()
    (other / "recipe_model.json").write_text(json.dumps({"builder": "smollm2"}))
    with pytest.raises(ConfigError, match="built by 'smollm2'"):
        _start_checks(compose([f"model.path={other}", CPU]))
    assert (other / "recipe_model.json").exists()


def test_empty_directory_and_older_copy_of_ours_are_built(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose([f"model.path={empty}", CPU])
    _start_checks(cfg)
    assert (ensure_model(cfg.model) / "model.safetensors").is_file()
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    (old / "recipe_model.json").write_text(json.dumps({"builder": "tiny", "version": 1}))
    cfg = compose([f"model.path={old}", CPU])
    _start_checks(cfg)
    ensure_model(cfg.model)
    assert json.loads((old / "recipe_model.json").read_text())["version"] > 1  # rebuilt in place


@pytest.mark.parametrize(
    "remove,missing",
    [
        (["model.safetensors"], "lacks: weights"),
        (["tokenizer.json", "tokenizer_config.json"], "a tokenizer (tokenizer.json"),
        (["config.json"], "lacks: config.json"),
    ],
)
def test_model_directory_without_weights_or_tokenizer_is_refused(tmp_path, tiny_model_dir, remove, missing):
    local = tmp_path / "local"
    shutil.copytree(tiny_model_dir, local)
    os.remove(local / "recipe_model.json")
    for name in remove:
        os.remove(local / name)
    cfg = compose(["model=local", f"model.path={local}", CPU])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    _start_checks(cfg)
    with pytest.raises(ConfigError) as err:
        ensure_model(cfg.model)
    assert f"model.path={str(local)!r}" in str(err.value) and missing in str(err.value)
    check_model_dir(tiny_model_dir)  # the complete directory passes


def _local_copy(tmp_path, tiny_model_dir):
    local = tmp_path / "local"
    shutil.copytree(tiny_model_dir, local)
    os.remove(local / "recipe_model.json")
    return local


def test_a_tokenizer_that_encodes_nothing_is_refused(tmp_path, tiny_model_dir):
    """tokenizer.json gone, tokenizer_config.json still there: the tokenizer loads with an empty vocabulary
    and used to pass, for vLLM to fail 30 s later ("The decoder prompt cannot be empty")."""
    local = _local_copy(tmp_path, tiny_model_dir)
    os.remove(local / "tokenizer.json")
    with pytest.raises(ConfigError, match="encodes text to no tokens .*tokenizer.json missing"):
        check_model_dir(local)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "tokenizer.json"])
def test_a_damaged_json_file_is_named_in_one_line(tmp_path, tiny_model_dir, name):
    local = _local_copy(tmp_path, tiny_model_dir)
    (local / name).write_text((local / name).read_text()[:20])  # cut short
    with pytest.raises(ConfigError) as err:
        check_model_dir(local)
    msg = str(err.value)
    assert f"{name} cannot be parsed" in msg and "\n" not in msg, msg


def test_a_file_as_a_local_model_path_is_named_as_a_file(tmp_path):
    (tmp_path / "weights.safetensors").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        _start_checks(compose(["model=local", f"model.path={tmp_path / 'weights.safetensors'}", CPU]))


def test_a_config_error_at_the_cli_is_one_line(tmp_path, tiny_model_dir):
    local = _local_copy(tmp_path, tiny_model_dir)
    (local / "config.json").write_text('{"model_type": "qwen2", ')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe.train",
            "model=local",
            f"model.path={local}",
            CPU,
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.json cannot be parsed" in lines[0], out.stderr[-3000:]


def test_a_tilde_in_model_path_is_expanded_once_at_start(tmp_path, tiny_model_dir, monkeypatch):
    """`model.path=~/...` passed validation, then failed inside from_pretrained, which does not expand `~`."""
    from recipe.config import expand_paths
    from recipe.model import load_hf_model

    _local_copy(tmp_path, tiny_model_dir)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose(["model=local", "model.path='~/local'", CPU, "run_dir='~/run'"])
    expand_paths(cfg)
    assert cfg.model.path == str(tmp_path / "local") and cfg.run_dir == str(tmp_path / "run")
    _start_checks(cfg)
    assert ensure_model(cfg.model) == tmp_path / "local"
    assert load_hf_model(cfg.model, "cpu") is not None  # reads cfg.model.path as the ranks do
