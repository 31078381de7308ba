"""rollout.check_gpu_memory_split without a GPU (torch.cuda.mem_get_info stubbed): a split that does
not fit is refused naming the field and what would fit; one that fits returns the sizes.

    .venv/bin/python -m pytest tests/unit/test_memory_split.py -q
"""

import pytest
import torch

from recipe.config import ConfigError
from recipe.engine import check_gpu_memory_split
from tests.helpers import compose

GIB = 2**30


def test_a_split_that_does_not_fit_names_the_field_and_what_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * GIB, 100 * GIB))
    cfg = compose(["rollout.gpu_memory_utilization=0.5"])
    with pytest.raises(
        ConfigError,
        match=r"^rollout.gpu_memory_utilization=0.5 asks the engine for 50.0 GiB .* "
        r"30.0 GiB is free .* Lower it to at most 0.28",
    ):
        check_gpu_memory_split(cfg.rollout, torch.device("cuda", 0))
    sizes = check_gpu_memory_split(compose(["rollout.gpu_memory_utilization=0.2"]).rollout, torch.device("cuda", 0))
    assert sizes == {"free_gb": 30.0, "total_gb": 100.0, "engine_gb": 20.0}
