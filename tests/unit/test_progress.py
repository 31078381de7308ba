"""The console: the rank-0 bar shows reward, accuracy, step time and sync time; the libraries'
start-up notes stay off it unless `logger.verbose`.

    .venv/bin/python -m pytest tests/unit/test_progress.py
"""

import os
import subprocess
import sys

import pytest

from recipe.progress import Progress, console_env

METRICS = {
    "reward/mean": 0.5,
    "reward/accuracy": 0.25,
    "time/step_s": 0.41,
    "sync/total_s": 0.066,
    "rollout/tokens_per_s": 7499.0,
}


def test_bar_shows_reward_accuracy_step_and_sync_time(capsys):
    bar = Progress(10)
    bar.update(METRICS)
    bar.close()
    shown = capsys.readouterr().err
    for field in ("1/10", "reward=0.500", "acc=0.25", "step_s=0.41", "sync_s=0.066", "tok_s=7499"):
        assert field in shown


def test_bar_is_off_on_other_ranks(capsys):
    bar = Progress(10, enabled=False)
    bar.update(METRICS)
    bar.close()
    assert capsys.readouterr().err == ""


# What vLLM's CPU worker calls at start-up: it prints a NUMA-binding note through torch's C++ logger.
NUMA_NOTE = (
    "import torch, vllm._custom_ops\n"
    "if not hasattr(torch.ops._C, 'init_cpu_memory_env'): raise SystemExit(3)\n"
    "torch.ops._C.init_cpu_memory_env([0])\n"
)


@pytest.mark.slow  # a subprocess that imports vLLM
@pytest.mark.parametrize("verbose", [False, True])
def test_vllm_cpu_start_up_note_only_when_verbose(monkeypatch, verbose):
    for key in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "WANDB_SILENT", "PYTHONWARNINGS"):
        monkeypatch.delenv(key, raising=False)
    console_env(verbose)
    done = subprocess.run(
        [sys.executable, "-c", NUMA_NOTE], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    if done.returncode == 3:
        pytest.skip("this vLLM build has no CPU worker op (a CUDA build)")
    assert done.returncode == 0, done.stderr
    assert ("NUMA binding" in done.stderr) == verbose, done.stderr


def test_quiet_console_keeps_the_users_settings(monkeypatch):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    console_env(False)
    console_env(False)  # twice (launcher, then rank): the filter is added once
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    assert (
        os.environ["PYTHONWARNINGS"] == "error::DeprecationWarning,ignore::UserWarning:multiprocessing.resource_tracker"
    )
