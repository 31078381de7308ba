"""`trainer.micro_batch_tokens=null` (the default): 4096 on CPU, as the fixed default was; on CUDA the
activations of the model's shape that fit in the device's share for them (recipe.model.auto_micro_batch_tokens),
computed here for an H200's memory with the device's properties replaced (no GPU needed)."""

import types

import pytest
import torch

from recipe.model import auto_micro_batch_tokens, micro_batch_tokens

H200_BYTES = 150_754_820_096  # torch.cuda.get_device_properties(...).total_memory of an H200 (143,771 MiB)
SHAPES = {  # conf/bench_model/*.yaml
    "q15": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28),
    "q7": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28),
}


def _cfg(tokens, device="cpu", path="unused", backend="vllm", share=0.3, placement="colocated"):
    """The settings `micro_batch_tokens` reads (device resolved, as `Settings.device` is)."""
    return types.SimpleNamespace(
        device=device,
        trainer=types.SimpleNamespace(micro_batch_tokens=tokens),
        model=types.SimpleNamespace(path=path),
        rollout=types.SimpleNamespace(backend=backend, gpu_memory_utilization=share, placement=placement),
    )


def _checkpoint(tmp_path, shape):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=151_936, **SHAPES[shape]).save_pretrained(tmp_path / shape)
    return str(tmp_path / shape)


def test_a_given_value_is_used_as_given():
    assert micro_batch_tokens(_cfg(1234)) == 1234
    assert micro_batch_tokens(_cfg(0, device="cuda")) == 0  # 0: no token limit, on any device


def test_null_on_cpu_is_the_former_default():
    assert micro_batch_tokens(_cfg(None)) == 4096


@pytest.mark.parametrize(
    "shape,share,expected", [("q15", 0.3, 8192), ("q7", 0.3, 4096), ("q15", 0.1, 16384), ("q15", 0.6, 4096)]
)
def test_null_on_cuda_scales_with_the_shape_and_the_engine_share(tmp_path, monkeypatch, shape, share, expected):
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=H200_BYTES)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    auto_micro_batch_tokens.cache_clear()
    assert micro_batch_tokens(_cfg(None, device="cuda", path=_checkpoint(tmp_path, shape), share=share)) == expected
    auto_micro_batch_tokens.cache_clear()


def test_null_on_cuda_beside_a_separate_engine_counts_no_engine_share(tmp_path, monkeypatch):
    """rollout.placement=separate: the engine is on devices of its own, so the trainer's device keeps its whole
    activation share (as rollout=hf does)."""
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=H200_BYTES)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    auto_micro_batch_tokens.cache_clear()
    path = _checkpoint(tmp_path, "q15")
    separate = micro_batch_tokens(_cfg(None, device="cuda", path=path, share=0.3, placement="separate"))
    alone = micro_batch_tokens(_cfg(None, device="cuda", path=path, share=0.0))
    assert separate == alone > micro_batch_tokens(_cfg(None, device="cuda", path=path, share=0.3))
    auto_micro_batch_tokens.cache_clear()
