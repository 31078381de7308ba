"""tools/overlap_bench.py: the table's arithmetic on given records, its refusals, and one smoke run of two
modes on CPU. No timing is asserted (benchmarks print numbers; tests check behaviour).

    pytest tests/e2e/test_overlap_bench.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO
from tools.overlap_bench import main, summarize, table


def _rows():
    return [
        {"step": 1, "time/step_s": 9.0, "rollout/response_length": 1.0, "time/update_s": 5.0, "reward/mean": 0.1},
        {
            "step": 2,
            "time/step_s": 2.0,
            "rollout/response_length": 4.0,
            "time/update_s": 1.0,
            "reward/mean": 0.2,
            "time/rollout_wait_s": 0.5,
        },
        {
            "step": 3,
            "time/step_s": 4.0,
            "rollout/response_length": 2.0,
            "time/update_s": 3.0,
            "reward/mean": 0.3,
            "time/rollout_wait_s": 0.1,
        },
        {"step": 3, "eval/accuracy": 0.5},  # an evaluation record: not a step
    ]


def test_summary_leaves_out_the_warm_up_and_counts_tokens_over_wall_time():
    s = summarize(_rows(), warmup=1, samples_per_step=8)
    assert s["steps"] == 2 and s["step_s"] == 3.0 and s["update_s"] == 2.0 and s["reward_last"] == 0.3
    assert s["tokens_per_s"] == (4.0 * 8 + 2.0 * 8) / (2.0 + 4.0)
    assert s["wait_s"] == pytest.approx(0.3)
    text = table({"colocated": s, "off": {**s, "tokens_per_s": 2 * s["tokens_per_s"]}})
    assert "| colocated | 2 | 3.000 | 8.0 |" in text and text.rstrip().endswith("| 2.00x |")


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match="no step after the 3 warm-up steps"):
        summarize(_rows(), warmup=3, samples_per_step=8)
    with pytest.raises(SystemExit, match="choose from"):
        main(["--modes", "colocated,fast"])
    with pytest.raises(SystemExit, match="must exceed --warmup"):
        main(["--steps", "2", "--warmup", "2"])


@pytest.mark.slow
def test_two_modes_run_and_print_one_table(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "tools.overlap_bench",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--modes",
        "colocated,off",
        "--out",
        str(out),
        "--",
        f"model.path={tiny_model_dir}",
        "rollout=hf",
        "trainer.device=cpu",
        "trainer.world_size=1",
        "trainer.prompts_per_step=2",
        "rollout.n=4",
        "rollout.max_new_tokens=4",
        "sync.num_probe_prompts=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| colocated |", "| off |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |"), proc.stdout[-2000:]
    assert (out / "colocated" / "metrics.jsonl").exists() and (out / "off" / "metrics.jsonl").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # never over a run
    assert again.returncode != 0 and "exists" in again.stderr
