"""bf16 compute over float32 masters on GPUs: every combination, 3 GRPO steps, world 2, the 1.5B shape.

    python -m pytest -m gpu tests/gpu/test_precision_gpu.py -v -s    # needs 2 CUDA devices and vLLM

The same run by hand (docs: the table of the on-policy logprob gap):
    python -m tools.make_random_model qwen2_1p5b /tmp/models/qwen2_1p5b --device cuda
    python -m tools.combo_matrix --isolate --steps 3 --root /tmp/prec --out /tmp/prec.json model=local \
        model.path=/tmp/models/qwen2_1p5b model.master_dtype=float32 trainer.device=cuda trainer.world_size=2 \
        rollout.sleep=true
    (then the max of train/logprob_gap and train/logprob_gap_max in /tmp/prec/*/metrics.jsonl)

`model=local` is bf16 compute and engine over float32 masters (conf/model/local.yaml). The
on-policy gap `train/logprob_gap` is the mean |log pi_trainer - log pi_engine| over the first
mini-batch's completion tokens, `train/logprob_gap_max` its largest token; both sides compute in
bf16, so the gap measures kernel differences, not weights lost in the sync.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.gpu

MEAN_GAP_LIMIT = 0.1  # mean |logprob gap| of one step; bf16 kernels differ by far less


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA devices")
    pytest.importorskip("vllm")


def _gaps(run_dir: Path) -> tuple:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["train/logprob_gap"] for r in rows), max(r["train/logprob_gap_max"] for r in rows), len(rows)


def test_every_combination_trains_in_bf16_over_float32_masters(tmp_path):
    _needs(2)
    model_dir = tmp_path / "qwen2_1p5b"
    subprocess.run(
        [sys.executable, "-m", "tools.make_random_model", "qwen2_1p5b", str(model_dir), "--device", "cuda"],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    out, root = tmp_path / "matrix.json", tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "tools.combo_matrix",
        "--isolate",
        "--steps",
        "3",
        "--out",
        str(out),
        "--root",
        str(root),
        "model=local",
        f"model.path={model_dir}",
        "model.master_dtype=float32",
        "trainer.device=cuda",
        "trainer.world_size=2",
        "rollout.sleep=true",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=3600)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 18
    bad = [(r["combo"], r["status"], r["error"]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    print("| combination | steps | train/logprob_gap (max over steps) | train/logprob_gap_max (max over steps) |")
    print("|---|---|---|---|")
    for r in rows:
        mean_gap, max_gap, steps = _gaps(root / r["combo"].replace("/", "-"))
        print(f"| {r['combo']} | {steps} | {mean_gap:.4g} | {max_gap:.4g} |")
        assert steps == 3 and math.isfinite(mean_gap) and math.isfinite(max_gap), r["combo"]
        assert mean_gap < MEAN_GAP_LIMIT, f"{r['combo']}: on-policy logprob gap {mean_gap:.3g}"
