"""The 18-job Hydra multirun over fsdp x offload x lora, and the report of it."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_sweep_of_all_18_combinations_and_report(tiny_model_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "recipe.train",
        "-m",
        "experiment=sweep",
        "fsdp=fsdp1,fsdp2",
        "+offload=none,manual,cpu",
        "+lora=none,merged,adapter",
        # as few steps as prove every job ran sync and verify; the HF engine keeps it quick
        "rollout=hf",
        "trainer.steps=1",
        "trainer.prompts_per_step=2",
        "rollout.n=2",
        "rollout.max_new_tokens=4",
        "sync.num_probe_prompts=2",
        f"model.path={tiny_model_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = subprocess.run(
        [sys.executable, "-m", "tools.sweep_report", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    from tools.sweep_report import collect

    rows = collect(sweep_dir)
    assert len(rows) == 18
    combos = {(r["fsdp"], r["offload"], r["lora"]) for r in rows}
    assert len(combos) == 18
    unsupported = [r for r in rows if r["status"] == "unsupported"]
    assert {(r["fsdp"], r["offload"]) for r in unsupported} == {("fsdp1", "cpu")} and len(unsupported) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 15, [(r["job"], r["status"], r["error"]) for r in rows if r["status"] != "ok"]
    for r in ok:
        assert r["sync_total_s"] is not None and r["sync_total_s"] > 0
        assert r["parity_max_diff"] is not None and math.isfinite(r["parity_max_diff"])
    for r in unsupported:
        status = json.loads((sweep_dir / r["job"] / "status.json").read_text())
        assert "needs an accelerator" in status["error"]
    assert (sweep_dir / "report.md").read_text().count("\n| ") == 19  # header + 18 rows
    assert (sweep_dir / "report.png").stat().st_size > 0
