"""tools/combo_matrix.py on CPU: the GPU table's tool runs a combination, resumes it and writes its row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_matrix_runs_resumes_and_reports(tiny_model_dir, tmp_path):
    out = tmp_path / "matrix.json"
    cmd = [
        sys.executable,
        "-m",
        "tools.combo_matrix",
        "--combos",
        "fsdp2/manual/merged",
        "--steps",
        "2",
        "--resume",
        "--out",
        str(out),
        "--root",
        str(tmp_path / "runs"),
        f"model.path={tiny_model_dir}",
        "trainer.device=cpu",
        "debug=tiny",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["combo"], row["status"], row["resumed"]) == ("fsdp2/manual/merged", "ok", True), row
    assert row["gather_s"] > 0 and row["load_s"] > 0 and row["parity_max"] < 1e-3
    assert "| fsdp2/manual/merged | ok |" in proc.stdout
    assert not (tmp_path / "runs" / "fsdp2-manual-merged").exists()  # the tool's own run directory is removed
