"""Write a random-weight Qwen2-shaped checkpoint of a real size, with the tiny model's tokenizer.

    python -m tools.make_random_model qwen2_1p5b /tmp/models/qwen2_1p5b      # shape from conf/bench_model/
    python -m tools.make_random_model qwen2_7b /tmp/models/qwen2_7b --device cuda

    python -m tools.make_random_model qwen2_0p5b /tmp/m/v49k --set vocab_size=49152 --set num_hidden_layers=2

The GPU runs (tests/gpu, tools/combo_matrix.py, tools/trl_compare.py, docs/GPU.md) train and sync
models of 1.5B and 7B parameters with nothing downloaded: the shape is the real model's
(conf/bench_model/<shape>.yaml), vocabulary included (151,936 or 152,064 entries), the weights are
random (seeded), the tokenizer is the tiny model's: its 64 ids are the first rows of the embedding
and the output layer, vLLM and the trainer take a config vocabulary larger than the tokenizer, and
an id past it decodes to nothing. So the logprobs and the update run at the real vocabulary, and
random weights, which almost never sample the end-of-sequence id (1 in 151,936), answer until
`rollout.max_new_tokens`: real answer lengths. `--set key=value` replaces an entry of the shape
(tests: the real vocabulary on a tiny-depth model). The directory must not exist yet, or hold a
checkpoint this tool wrote with the same arguments. The vocabulary-64 tiny model stays for tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKER = "random_model.json"


def make_random_model(
    shape: str,
    out: str | Path,
    device: str = "cpu",
    seed: int = 0,
    dtype: str = "bfloat16",
    overrides: dict | None = None,
) -> Path:
    """The checkpoint of `shape` (a file under conf/bench_model/) with random weights at `out`;
    `overrides` replace entries of the shape (tests: the real vocabulary on a tiny-depth model)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, Qwen2Config

    from recipe.builtin_models import build_tokenizer

    out = Path(out).expanduser().resolve()
    overrides = dict(overrides or {})
    marker = {"shape": shape, "seed": seed, "dtype": dtype, **({"overrides": overrides} if overrides else {})}
    if out.exists():
        try:
            if json.loads((out / MARKER).read_text()) == marker:
                return out
        except (OSError, ValueError):
            pass
        raise FileExistsError(
            f"{out} exists and was not written by make_random_model with {marker}; give a new directory"
        )
    conf = Path(__file__).resolve().parents[1] / "conf" / "bench_model" / f"{shape}.yaml"
    if not conf.exists():
        choices = sorted(p.stem for p in conf.parent.glob("*.yaml"))
        raise ValueError(f"shape={shape!r} is not valid; choose one of: {', '.join(choices)}")
    qwen2 = OmegaConf.to_container(OmegaConf.load(conf).bench_model.qwen2)
    if not qwen2:
        raise ValueError(f"conf/bench_model/{shape}.yaml has no qwen2 shape")
    unknown = sorted(set(overrides) - set(qwen2))
    if unknown:
        raise ValueError(f"overrides {unknown} are not keys of conf/bench_model/{shape}.yaml; valid: {sorted(qwen2)}")
    qwen2.update(overrides)
    torch_dtype = getattr(torch, dtype)
    config = Qwen2Config(**qwen2, dtype=torch_dtype, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    (out / MARKER).write_text(json.dumps(marker))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a file name under conf/bench_model/ (qwen2_1p5b, qwen2_7b)")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="replace an entry of the shape, e.g. vocab_size=49152 (repeatable)",
    )
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            parser.error(f"--set {item!r}: give KEY=INTEGER, e.g. vocab_size=49152")
        overrides[key] = int(value)
    print(make_random_model(args.shape, args.out, args.device, args.seed, args.dtype, overrides))
