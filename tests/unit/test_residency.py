"""recipe.model.Residency: the one owner of manual offload, without a GPU (the moves are recorded).

    .venv/bin/python -m pytest tests/unit/test_residency.py -q

The moves themselves run on CUDA in tests/gpu/test_checkpoint_gpu.py (save/load) and the GPU e2e runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import recipe.model as model_mod
from recipe.model import Residency


@pytest.fixture
def moves(monkeypatch):
    calls = []
    monkeypatch.setattr(model_mod, "load_to_device", lambda m, o, d: calls.append(("device", o, str(d))))
    monkeypatch.setattr(model_mod, "offload_to_cpu", lambda m, o: calls.append(("host", o)))
    return calls


def residency(offload: str, device: str) -> Residency:
    cfg = SimpleNamespace(offload=SimpleNamespace(name=offload))
    return Residency(cfg.offload, torch.nn.Linear(2, 2), "optim", torch.device(device))


def test_manual_on_gpu_moves_in_and_back_even_when_the_phase_fails(moves):
    r = residency("manual", "cuda:1")
    with pytest.raises(RuntimeError):
        with r.on_device():
            assert moves == [("device", "optim", "cuda:1")]
            raise RuntimeError("phase failed")
    assert moves == [("device", "optim", "cuda:1"), ("host", "optim")]


def test_probe_moves_parameters_without_the_optimizer_state(moves):
    with residency("manual", "cuda:0").on_device(optimizer=False):
        pass
    assert moves == [("device", None, "cuda:0"), ("host", None)]


@pytest.mark.parametrize("offload, device", [("none", "cuda:0"), ("cpu", "cuda:0"), ("manual", "cpu")])
def test_other_modes_and_cpu_runs_move_nothing(moves, offload, device):
    r = residency(offload, device)
    with r.on_device():
        pass
    r.to_device()
    r.to_host()
    assert moves == []
