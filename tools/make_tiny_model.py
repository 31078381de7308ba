"""Build the tiny default model: Qwen2-shaped (head dim 64, tied embeddings) with a
character-level tokenizer, made locally with a fixed seed. No download.

    python -m tools.make_tiny_model .cache/models/tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

SPECIALS = ["<pad>", "<eos>"]
# Byte-level spelling (GPT-2/Qwen2 style): a space is the token "Ġ". transformers loads any
# model_type=qwen2 tokenizer as the byte-level Qwen2Tokenizer, so a plain " " would be lost.
CHARS = list("0123456789+-*=?.,Ġ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB_SIZE = 64  # tokenizer vocab is padded with unused tokens to exactly the model's vocab
# Bumped whenever the model or tokenizer changes, so a cached copy is rebuilt.
# 2: initializer_range 0.1 (the tied embedding bounds the logits a LoRA can reach: at 0.02
#    a rank-8 LoRA on this random base barely moved the reward in 60 GRPO steps).
# 3: space spelled "Ġ" (byte-level), so it survives the Qwen2Tokenizer transformers forces.
VERSION = 3


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + CHARS
    tokens += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # " " -> "Ġ"
        pre_tokenizers.Split(Regex("."), behavior="isolated"),  # one token per character
    ])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>", bos_token=None
    )


def build_model(seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head dim 64: vLLM's CPU attention refuses 16
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        torch_dtype="float32",
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def make_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Write the model to `out` atomically (a temp dir renamed into place); idempotent."""
    out = Path(out).expanduser().resolve()
    if _built_version(out) == VERSION:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    try:
        model = build_model(seed)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        (tmp / "recipe_model.json").write_text(json.dumps({"builder": "tiny", "seed": seed, "version": VERSION}))
        if out.exists():  # an older version: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-stale-"))
            out.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # another rank/process won the race
            if _built_version(out) != VERSION:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _built_version(out: Path):
    """The VERSION a cached model was built with (None: absent or not built here)."""
    try:
        return json.loads((out / "recipe_model.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default=".cache/models/tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_model(args.out, args.seed))
