import os

import pytest

# vLLM on CPU: in-process engine (fast init) and a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model, built once per session (cached under .cache/ like a real run)."""
    from tests.helpers import REPO
    from recipe.builtin_models import make_tiny_model

    return make_tiny_model(os.environ.get("GRPO_CACHE", str(REPO / ".cache")) + "/models/tiny")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with the device tool: pytest -m gpu)")
    for item in items:
        # the marker itself: `"gpu" in item.keywords` also matched a directory named gpu above the
        # tests (a checkout at .../gpu/ skipped every test)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
