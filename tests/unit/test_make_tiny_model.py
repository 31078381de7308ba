"""The tiny model is reproducible from its seed, and its char-level tokenizer round-trips.

.venv/bin/python -m pytest tests/unit/test_make_tiny_model.py
"""

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tools.make_tiny_model import VOCAB_SIZE, build_model, build_tokenizer, make_tiny_model


def test_same_seed_gives_bit_identical_weights():
    a, b, c = build_model(seed=0).state_dict(), build_model(seed=0).state_dict(), build_model(seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters


def test_written_checkpoints_are_identical_and_idempotent(tmp_path):
    one, two = make_tiny_model(tmp_path / "one"), make_tiny_model(tmp_path / "two")
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(t.dtype == torch.float32 for t in w1.values())
    mtime = (one / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model(one) == one  # an existing directory is returned untouched
    assert (one / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # no temp dirs left


def test_tokenizer_round_trips(tmp_path):
    # `saved` is what the trainer and vLLM get: AutoTokenizer on the written directory.
    saved = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    for tok in (build_tokenizer(), saved):
        ids = tok("12+7=", add_special_tokens=False).input_ids
        assert len(ids) == 5  # one token per character
        assert tok.decode(ids) == "12+7="
        assert tok.decode(tok("3*4=12?-5,x.", add_special_tokens=False).input_ids) == "3*4=12?-5,x."
        assert tok.eos_token == "<eos>" and tok.eos_token_id == 1 and tok.pad_token_id == 0
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12+7="
        assert max(ids) < VOCAB_SIZE
    assert ids == build_tokenizer()("12+7=", add_special_tokens=False).input_ids  # same ids both ways
    built = build_tokenizer()
    assert len(built) == VOCAB_SIZE
    assert built.decode(built("what is 3*4? 12.", add_special_tokens=False).input_ids) == "what is 3*4? 12."


def test_saved_tokenizer_keeps_spaces(tmp_path):
    # transformers 5 loads any model_type=qwen2 tokenizer as the byte-level Qwen2Tokenizer: the
    # vocab spells the space "Ġ" so that it survives
    saved = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    assert saved.decode(saved("what is 3", add_special_tokens=False).input_ids) == "what is 3"


def test_random_model_shape_overrides(tmp_path):
    """tools/make_random_model: an override must name an entry of the shape; a directory written with
    other overrides is refused, not overwritten."""
    import json

    import pytest

    from tools.make_random_model import MARKER, make_random_model

    with pytest.raises(ValueError, match="vocab_sise.*valid:.*vocab_size"):
        make_random_model("qwen2_0p5b", tmp_path / "a", overrides={"vocab_sise": 4096})
    out = tmp_path / "b"
    out.mkdir()
    (out / MARKER).write_text(
        json.dumps({"shape": "qwen2_0p5b", "seed": 0, "dtype": "bfloat16", "overrides": {"vocab_size": 4096}})
    )
    with pytest.raises(FileExistsError):
        make_random_model("qwen2_0p5b", out, overrides={"vocab_size": 8192})
    assert make_random_model("qwen2_0p5b", out, overrides={"vocab_size": 4096}) == out.resolve()  # ours, as asked
