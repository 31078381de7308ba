"""Checkpoints with manual offload on CUDA: the shards live on the host between phases, and DCP's
get/set_state_dict want them on the compute device ("Expects tensor to be on the compute device
cuda:0, was on cpu"). recipe/checkpoint.py brings them to the device around the save and the
load, and back to the host after. The body is tests/dist/test_checkpoint_dist.py's.

    python -m pytest -m gpu tests/gpu/test_checkpoint_gpu.py -v     # world 2 with 2 CUDA devices, else 1

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_checkpoint_dist import check_checkpoint_round_trips

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
def test_checkpoint_with_manual_offload_on_cuda(tiny_model_dir, tmp_path, fsdp):
    world = min(2, torch.cuda.device_count())
    check_checkpoint_round_trips(tiny_model_dir, tmp_path, "cuda", world, "nccl", [(fsdp, "manual", "none")])
