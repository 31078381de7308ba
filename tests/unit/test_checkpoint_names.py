"""Names from the checkpoint and the trainer's model, not from name patterns (recipe/sync.py,
recipe/names.py): keys a model legitimately ignores are not expected in the stream, `.bin`
checkpoints are read, and a model whose tensors transformers renamed at load is refused at start."""

from __future__ import annotations

import pytest
import torch

from recipe.config import ConfigError
from recipe.names import checkpoint_shapes, checkpoint_tensors
from recipe.sync import check_streamed_names, expected_names
from tests import tiny_models


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_keys_a_tied_model_ignores_are_not_expected(tmp_path):
    model_dir = tiny_models.llama(tmp_path / "m", tied=True, edit=tiny_models.with_ignored_keys)
    saved = set(checkpoint_shapes(model_dir))
    assert "lm_head.weight" in saved and "model.layers.0.self_attn.rotary_emb.inv_freq" in saved
    model = _hf(model_dir)
    expected = expected_names(model, model_dir)
    assert "lm_head.weight" not in expected and not any("inv_freq" in n for n in expected)
    assert "model.embed_tokens.weight" in expected and len(expected) == len(saved) - 3
    check_streamed_names(model, model_dir)  # accepted


def test_an_untied_head_is_expected(tmp_path):
    model_dir = tiny_models.llama(tmp_path / "m", tied=False)
    assert "lm_head.weight" in expected_names(_hf(model_dir), model_dir)


def test_bin_only_checkpoints_are_read(tmp_path):
    model_dir = tiny_models.llama_bin(tmp_path / "m")
    shapes = checkpoint_shapes(model_dir)
    tensors = dict(checkpoint_tensors(model_dir))
    model = _hf(model_dir)
    assert set(shapes) == set(tensors) == set(dict(model.named_parameters()))
    assert all(torch.equal(tensors[n], p) for n, p in model.named_parameters())
    assert sorted(expected_names(model, model_dir)) == sorted(shapes)
    check_streamed_names(model, model_dir)


def test_a_model_transformers_converted_at_load_is_refused(tmp_path):
    model_dir = tiny_models.mixtral(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"model.path=.*names the checkpoint does not have.*experts"):
        check_streamed_names(_hf(model_dir), model_dir)


def test_a_directory_without_weight_files_is_refused(tmp_path):
    model_dir = tiny_models.llama(tmp_path / "m")
    model = _hf(model_dir)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match="no \\*.safetensors or \\*.bin"):
        check_streamed_names(model, model_dir)
