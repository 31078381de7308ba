"""Values that cannot work are refused at start, before any rank starts or any model is built,
with the field named: sampling and batch values (validate), and what needs the tokenizer, the
filesystem or the network (preflight).

    .venv/bin/python -m pytest tests/unit/test_bad_inputs.py
"""

import copy
import json
import math
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf, open_dict

from recipe.config import RANGES, ConfigError, numeric_fields, validate
from recipe.settings import Settings
from recipe.preflight import check_context_length, check_resume_config, check_run_dir, check_wandb, save_run_config
from tests.helpers import REPO, compose

CPU = "trainer.device=cpu"


@pytest.mark.parametrize(
    "overrides,field,hint",
    [
        (["rollout.temperature=0"], "rollout.temperature", "> 0"),
        (["rollout.temperature=-0.5"], "rollout.temperature", "> 0"),
        (["trainer.updates_per_batch=1000"], "trainer.updates_per_batch=1000", "samples per rank"),
        (
            ["trainer.prompts_per_step=2", "rollout.n=2", "trainer.updates_per_batch=5"],
            "trainer.updates_per_batch=5",
            "= 4",
        ),
        (["rollout.max_model_len=4"], "rollout.max_model_len=4", "rollout.max_new_tokens=8"),
        (["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints", ">= 0"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size", "> 0"),
        (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every", ">= 0"),
        (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization", "(0, 1)"),
        (["rollout.gpu_memory_utilization=0"], "rollout.gpu_memory_utilization", "got 0"),
        (["rollout.kv_cache_gb=0"], "rollout.kv_cache_gb", "> 0"),
        (["algo.entropy_tokens=-1"], "algo.entropy_tokens", ">= 0"),
        (["algo.off_policy_steps=2"], "algo.off_policy_steps", "in [0, 1]"),
        (["algo.is_cap=0.5"], "algo.is_cap", ">= 1"),
        (["algo.off_policy_steps=1", "rollout.top_p=0.9"], "algo.off_policy_steps=1 with rollout.top_p=0.9", "top_p=1"),
    ],
)
def test_bad_values_are_refused_with_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides + [CPU]))
    assert field in str(err.value) and hint in str(err.value)


def test_off_policy_settings_that_pass():
    validate(compose(["algo.off_policy_steps=1", "algo.is_cap=1", CPU]))  # a cap of 1: weights only shrink
    validate(compose(["algo.off_policy_steps=0", "rollout.top_p=0.9", CPU]))  # on-policy: top_p is free


NUMERIC = list(numeric_fields())
_BASE = []


def _base():
    if not _BASE:
        _BASE.append(compose([CPU]))
    return copy.deepcopy(_BASE[0])


def _refused(key, value):
    cfg = _base()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


def test_every_numeric_field_of_the_schema_has_a_range():
    assert len(NUMERIC) > 30  # the walk found the schema's fields
    assert sorted(k for k, _ in NUMERIC if k not in RANGES) == []
    assert sorted(k for k in RANGES if k not in dict(NUMERIC)) == []  # and no stale entry


@pytest.mark.parametrize("key", [k for k, kind in NUMERIC if kind is float])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_in_every_float_field(key, value):
    """Comparisons with NaN are false, so NaN used to pass every range check (a NaN gradient-clip limit
    switched clipping off); `trainer.lr=inf` was accepted."""
    msg = _refused(key, value)
    assert msg.startswith(f"{key}=") and "not a finite number" in msg and str(RANGES[key]) in msg, msg


def _outside(bound):
    """Values just outside a range (ints where the bound is an integer)."""
    out = []
    if bound.low != -math.inf:
        out.append(bound.low if bound.low_open else bound.low - 1)
    if bound.high != math.inf:
        out.append(bound.high if bound.high_open else bound.high + 1)
    return out


@pytest.mark.parametrize(
    "key,value", [(k, v) for k, kind in NUMERIC for v in _outside(RANGES[k]) if kind is float or float(v).is_integer()]
)
def test_every_numeric_field_refuses_values_outside_its_range(key, value):
    msg = _refused(key, value)
    assert msg.startswith(key) and str(RANGES[key]) in msg, msg


@pytest.mark.parametrize(
    "key,value,hint",
    [
        ("rollout.n", 16385, "VLLM_MAX_N_SEQUENCES"),
        ("trainer.seed", 2**32 - 1, "trainer.seed <= 4294967294"),  # rank 1's engine would take 2**32
        ("lora.dropout", 2.0, "[0, 1)"),
        ("trainer.seed", -1, "[0, 4294967295]"),
        ("sync.probe_tolerance", -0.1, ">= 0"),
    ],
)
def test_limits_of_the_engine_and_the_model_are_checked_at_start(key, value, hint):
    """Fields that used to fail late inside a rank with a library's message (a negative seed: numpy's
    127-line trace; a LoRA dropout of 2; more samples than vLLM takes) or at the first probe."""
    assert hint in _refused(key, value)


def test_updates_per_batch_equal_to_the_samples_passes():
    validate(compose(["trainer.prompts_per_step=2", "rollout.n=2", "trainer.updates_per_batch=4", CPU]))


def _run_cfg(tmp_path, overrides=()):
    cfg = compose([CPU, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    return cfg


def _check_context(cfg, model_dir):
    """check_context_length as train() calls it: with the task, trainer and rollout slices."""
    settings = Settings.from_cfg(cfg)
    check_context_length(settings.task, settings.trainer, settings.rollout, model_dir)


def test_context_shorter_than_longest_prompt_plus_new_tokens(tmp_path, tiny_model_dir):
    # "a+b=" prompts of the arith task are 4-5 tokens; 8 new tokens: 10 passes validate (> 8), fails here
    cfg = _run_cfg(tmp_path, ["rollout.max_model_len=10", f"model.path={tiny_model_dir}"])
    validate(cfg)
    with pytest.raises(ConfigError) as err:
        _check_context(cfg, tiny_model_dir)
    msg = str(err.value)
    assert "rollout.max_model_len=10" in msg and "longest prompt" in msg and "rollout.max_new_tokens=8" in msg
    _check_context(_run_cfg(tmp_path, ["rollout.max_model_len=64"]), tiny_model_dir)  # fits


def test_context_longer_than_the_model_allows(tmp_path, tiny_model_dir):
    cfg = _run_cfg(tmp_path, ["rollout.max_model_len=4096"])
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        _check_context(cfg, tiny_model_dir)


def test_unwritable_run_directory_is_refused(tmp_path):
    """The run directory cannot be made (its parent is a file), and, when not root, a read-only parent."""
    (tmp_path / "file").write_text("x")
    targets = [tmp_path / "file" / "run"]
    if os.geteuid() != 0:  # root writes through directory permissions
        (tmp_path / "locked").mkdir()
        (tmp_path / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)
        targets.append(tmp_path / "locked" / "run")
    try:
        for target in targets:
            cfg = compose([CPU])
            with open_dict(cfg):
                cfg.run_dir = str(target)
            with pytest.raises(ConfigError) as err:
                check_run_dir(cfg.run_dir, cfg.trainer.resume)
            assert f"run directory {str(target)!r} is not writable" in str(err.value)
            assert "hydra.run.dir" in str(err.value)
    finally:
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(stat.S_IRWXU)


def test_unwritable_run_directory_from_the_cli(tmp_path):
    """From the command line Hydra makes the run directory first, and fails naming it."""
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run"
    out = subprocess.run(
        [sys.executable, "-m", "recipe.train", f"hydra.run.dir={target}", "logger=none"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and f"Not a directory: '{target}'" in out.stderr, out.stderr[-2000:]


def test_fresh_run_into_a_directory_holding_a_run_is_refused(tmp_path):
    cfg = _run_cfg(tmp_path)
    check_run_dir(cfg.run_dir, cfg.trainer.resume)  # empty: fine
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=true"):
        check_run_dir(cfg.run_dir, cfg.trainer.resume)
    check_run_dir(tmp_path / "run", resume=True)


def test_resume_with_a_config_that_changes_the_math_is_refused(tmp_path):
    saved = _run_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    save_run_config(saved, tmp_path / "run" / "config.yaml")
    ok = _run_cfg(
        tmp_path,
        [
            "trainer.resume=true",
            "trainer.steps=99",
            "trainer.checkpoint_every=5",
            "trainer.keep_checkpoints=0",
            "logger=none",
            "trainer.export=every_checkpoint",
        ],
    )
    check_resume_config(ok)  # steps, checkpointing, exports and logging may change
    bad = _run_cfg(
        tmp_path,
        ["trainer.resume=true", "trainer.lr=0.5", "rollout.temperature=0.7", "trainer.world_size=1", "+lora=merged"],
    )
    with pytest.raises(ConfigError) as err:
        check_resume_config(bad)
    msg = str(err.value)
    for field in (
        "trainer.lr: 0.001 -> 0.5",
        "rollout.temperature: 1.0 -> 0.7",
        "trainer.world_size: 2 -> 1",
        "lora.name: 'none' -> 'merged'",
    ):
        assert field in msg, msg


def test_resume_without_a_saved_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        check_resume_config(_run_cfg(tmp_path, ["trainer.resume=true"]))


def test_online_wandb_without_a_server_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    cfg = _run_cfg(tmp_path, ["logger.mode=online"])
    start = time.monotonic()
    check_wandb(cfg.logger, cfg.run_dir)
    # Not a speed target: the bound, against wandb's own retries (minutes) after the models are built.
    assert time.monotonic() - start < 30
    assert cfg.logger.mode == "offline"
    assert "cannot be reached; logging offline" in capsys.readouterr().out


def _saved_run(tmp_path, steps_logged, checkpoint=None, overrides=()):
    """A run directory as a run leaves it: config.yaml, `steps_logged` records, a checkpoint folder."""
    cfg = _run_cfg(tmp_path, ["trainer.steps=8", *overrides])
    run = tmp_path / "run"
    run.mkdir()
    save_run_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in steps_logged)
    )
    if checkpoint is not None:
        (run / "checkpoints" / f"step_{checkpoint}").mkdir(parents=True)
    return run


def test_resume_with_a_cut_or_unreadable_config_yaml_is_refused(tmp_path):
    """A cut config.yaml lost its last fields, which then were not compared: the resume could change the math."""
    run = _saved_run(tmp_path, range(1, 9), checkpoint=8)
    text = (run / "config.yaml").read_text()
    resume = _run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=8"])
    for damaged in (text[: len(text) // 2], text[: -len("# end of config.yaml\n")], "model: [unclosed\n"):
        (run / "config.yaml").write_text(damaged)
        with pytest.raises(ConfigError, match="config.yaml (is damaged|cannot be parsed)") as err:
            check_resume_config(resume)
        assert "\n" not in str(err.value)
    (run / "config.yaml").write_text(text)
    check_resume_config(resume)  # intact: fine


def test_resume_with_a_cut_metrics_jsonl_is_refused(tmp_path, capsys):
    """Before: the resume of a finished run whose metrics.jsonl was cut rewrote summary.json with fewer
    steps and exited "ok"."""
    resume = _run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=8"])
    run = _saved_run(tmp_path, range(1, 4), checkpoint=8)
    with pytest.raises(ConfigError, match=r"metrics.jsonl does not hold steps 1..8 once each .*5 missing"):
        check_resume_config(resume)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')  # a damaged line inside
    with pytest.raises(ConfigError, match="metrics.jsonl line 2 is damaged"):
        check_resume_config(resume)
    # What is provably safe is repaired, and said: a cut last line, records after the checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 10)) + '{"st')
    check_resume_config(resume)
    out = capsys.readouterr().out
    assert "cut short by a kill, is dropped" in out and "1 records of" in out and "after step 8" in out


def test_resume_with_fewer_steps_than_done_is_refused(tmp_path):
    """Before: `trainer.resume=true trainer.steps=4` on an 8-step run did nothing but rewrite config.yaml."""
    _saved_run(tmp_path, range(1, 9), checkpoint=8)
    with pytest.raises(ConfigError, match=r"trainer.steps=4 is lower than the steps the run has done \(8"):
        check_resume_config(_run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=4"]))
    check_resume_config(_run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=12"]))


def test_a_run_stopped_before_its_first_checkpoint_restarts_in_place(tmp_path, capsys):
    """Before: neither resumable ("no checkpoint") nor reusable ("continue it with trainer.resume=true")."""
    _saved_run(tmp_path, [1, 2])
    with pytest.raises(
        ConfigError, match="no checkpoint yet: restart it in place from step 0 with trainer.resume=true"
    ):
        check_run_dir(tmp_path / "run", resume=False)
    check_resume_config(_run_cfg(tmp_path, ["trainer.resume=true"]))
    out = capsys.readouterr().out
    assert "no checkpoint yet: it restarts from step 0 in place" in out and "2 records of" in out


def test_online_wandb_without_an_api_key_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    """Before: wandb failed 20 s in, inside a rank, and left a directory that could be neither resumed nor
    reused. A server that listens (here a local socket) but no key anywhere wandb looks."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        cfg = _run_cfg(tmp_path, ["logger.mode=online"])
        check_wandb(cfg.logger, cfg.run_dir)
    assert cfg.logger.mode == "offline"
    assert "no API key" in capsys.readouterr().out
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from recipe.preflight import wandb_api_key_found

    assert wandb_api_key_found("127.0.0.1") and not wandb_api_key_found("api.wandb.ai")


@pytest.mark.parametrize("project", ["team/project", "a:b", "x" * 129])
def test_a_project_name_wandb_refuses_is_refused_at_start(tmp_path, project):
    with pytest.raises(ConfigError, match="logger.project=.* is not a name wandb accepts"):
        check_wandb(_run_cfg(tmp_path, ["logger.mode=offline", f"logger.project='{project}'"]).logger, tmp_path / "run")


def test_resume_at_another_world_size_under_torchrun_is_refused(tmp_path, monkeypatch):
    """torchrun's world wins over trainer.world_size; before, config.yaml kept the YAML's value on both sides,
    so a resume under torchrun at another world size was accepted."""
    from recipe.config import launcher_world

    run = _saved_run(tmp_path, range(1, 9), checkpoint=8)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    saved = _run_cfg(tmp_path, ["trainer.steps=8", "trainer.world_size=1"])  # as a torchrun run of 2 records itself
    launcher_world(saved.trainer)
    save_run_config(saved, run / "config.yaml")
    monkeypatch.setenv("WORLD_SIZE", "4")
    resume = _run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=8", "trainer.world_size=1"])
    launcher_world(resume.trainer)
    with pytest.raises(ConfigError, match=r"trainer.world_size: 2 -> 4.*torchrun --nproc-per-node=2"):
        check_resume_config(resume)
    monkeypatch.setenv("WORLD_SIZE", "2")
    same = _run_cfg(tmp_path, ["trainer.resume=true", "trainer.steps=8", "trainer.world_size=1"])
    launcher_world(same.trainer)
    check_resume_config(same)


def test_the_engine_runs_in_process_whatever_the_environment_says(tmp_path, monkeypatch, capsys):
    """Before: VLLM_ENABLE_V1_MULTIPROCESSING=1 in the user's environment crashed the engine."""
    from recipe.preflight import engine_in_process

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine_in_process(_run_cfg(tmp_path).rollout)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=1 in the environment is overridden with 0" in capsys.readouterr().out
    engine_in_process(_run_cfg(tmp_path).rollout)
    assert capsys.readouterr().out == ""  # already 0: nothing to say


@pytest.mark.parametrize(
    "overrides,field,hint",
    [
        (["rollout.placement=remote"], "rollout.placement='remote'", "colocated, separate"),
        (["rollout.num_engines=3", "trainer.world_size=2"], "rollout.num_engines=3", "choose one of: null, 2"),
        (["rollout.num_engines=0"], "rollout.num_engines", "> 0"),
        (["rollout.transport=shm", "rollout.placement=separate"], "rollout.transport='shm'", "auto, group, ipc"),
        (["rollout.transport=ipc"], "rollout.transport=ipc", "choose rollout.placement=separate"),
    ],
)
def test_placement_values_are_refused_with_the_field(overrides, field, hint):
    """rollout.placement=separate runs one engine process per trainer rank; other layouts are refused at start."""
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides + [CPU]))
    assert field in str(err.value) and hint in str(err.value), str(err.value)


def test_placement_devices_must_not_overlap_the_trainers(monkeypatch):
    """On CUDA the engines' devices are checked against the trainer's (rank r trains on cuda:r): a device of
    both only with rollout.transport ipc or auto (NCCL cannot pair two processes on one device)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    base = ["trainer.device=cuda", "trainer.world_size=2", "rollout.placement=separate"]
    group = "rollout.transport=group"
    for devices, extra, hint in (
        ("[1,2]", group, "overlaps the trainer's devices [0, 1] (cuda:1) with rollout.transport=group"),
        ("[0,1]", group, "NCCL cannot pair two processes on one device; use rollout.transport=ipc"),
        ("[2]", "rollout.transport=auto", "gives 1 devices for 2 engines"),
        ("[2,2]", "rollout.transport=auto", "names a device twice"),
        ("[1,1]", "rollout.transport=ipc", "names a device twice"),
        ("[2,4]", "rollout.transport=auto", "4 CUDA devices are visible"),
    ):
        with pytest.raises(ConfigError) as err:
            validate(compose([*base, f"rollout.devices={devices}", extra]))
        assert "rollout.devices" in str(err.value) and hint in str(err.value), str(err.value)
    validate(compose([*base, "rollout.devices=[2,3]"]))
    validate(compose([*base, "rollout.devices=[2,3]", group]))
    validate(compose([*base]))  # empty: devices 2 and 3
    validate(compose([*base, "rollout.devices=[1,0]"]))  # auto: ipc on the trainer's devices
    validate(compose([*base, "rollout.devices=[0,1]", "rollout.transport=ipc"]))


def test_placement_separate_on_one_gpu_needs_the_engine_on_the_trainers_device(monkeypatch):
    """One CUDA device: the engine process shares it (rollout.devices=[0], transport ipc or auto); the default
    device (cuda:1) is refused with that way out, and transport=group with the reason."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = ["trainer.device=cuda", "trainer.world_size=1", "rollout.placement=separate"]
    with pytest.raises(ConfigError) as err:
        validate(compose(base))
    assert "rollout.devices=[1] needs device 1 but 1 CUDA devices" in str(err.value), str(err.value)
    assert "rollout.devices=[0] with rollout.transport=ipc" in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(compose([*base, "rollout.devices=[0]", "rollout.transport=group"]))
    assert "NCCL cannot pair two processes on one device" in str(err.value), str(err.value)
    validate(compose([*base, "rollout.devices=[0]"]))
    validate(compose([*base, "rollout.devices=[0]", "rollout.transport=ipc"]))
