"""Build the tiny default model (the builder lives in recipe/builtin_models.py).

    python -m tools.make_tiny_model .cache/models/tiny

Only an absent or empty directory, or an older copy this project built, is (re)built.
"""

from __future__ import annotations

import argparse

from recipe.builtin_models import (  # noqa: F401  (re-exported)
    CHARS,
    SPECIALS,
    VOCAB_SIZE,
    VERSION,
    build_model,
    build_tokenizer,
    make_tiny_model,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=".cache/models/tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_model(args.out, args.seed))
