"""Smoke runs of the sync benchmark on CPU (tools/sync_bench.py): the command works end to end and
reports every strategy. No timing is asserted (benchmarks print numbers; tests check behaviour).

    pytest tests/e2e/test_sync_bench_smoke.py
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from recipe.config import FSDP_CHOICES, LORA_CHOICES, OFFLOAD_CHOICES
from tests.helpers import REPO

REFERENCES = ("naive", "dcp_full_cpu", "dtensor_stream")


def run_bench(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "tools.sync_bench",
        f"hydra.run.dir={tmp_path}/run",
        f"bench.out_dir={tmp_path}",
        "bench.limit_mb=16",
        "bench.limit_reps=2",
        *overrides,
    ]
    env = {**os.environ, "GRPO_CACHE": os.environ.get("GRPO_CACHE", str(REPO / ".cache"))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"sync_bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_every_cpu_strategy_is_reported_at_world_2(tiny_model_dir, tmp_path):
    proc = run_bench(tmp_path, "trainer.world_size=2", "bench.sink=copy", "bench.warm_iters=1")
    result = json.loads((tmp_path / "sync_bench_tiny_w2.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    table = [f"{f}/{o}/{lo}" for f, o, lo in itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES)]
    refs = [f"{ref}@fsdp2/{off}" for ref in REFERENCES for off in ("cpu", "none")]
    assert sorted(rows) == sorted(table + refs)
    full_bytes = result["meta"]["model_bytes"]
    for label in table:
        row = rows[label]
        assert label in proc.stdout
        if row["fsdp"] == "fsdp1" and row["offload"] == "cpu":  # needs an accelerator (validate)
            assert row["status"] == "unsupported" and "accelerator" in row["error"]
            continue
        assert row["status"] == "ok", f"{label}: {row['error']}"
        assert row["missing"] == [], f"{label} left engine weights unwritten: {row['missing']}"
        assert row.get("wrong", []) == [] and ("wrong" in row) == (row["lora"] != "adapter")
        assert row["bytes"] > 0 and row["warm_s"] > 0 and row["x_limit"] > 0
        if row["lora"] == "adapter":
            assert row["bytes"] < full_bytes / 2
        else:
            # Tied embeddings: the head is not sent, the engine ties it itself.
            assert row["bytes"] == full_bytes
    for label in refs:
        row = rows[label]
        assert row["status"] in ("ok", "crashed")
        assert row["bytes"] > 0 if row["status"] == "ok" else row["error"]
    assert {c["target"] for c in result["checks"]} >= {"fsdp2/cpu/none x limit"}
    assert result["meta"]["limits"]["allgather_gbps"] > 0


def test_vllm_sink_loads_the_stream_into_the_engine(tiny_model_dir, tmp_path):
    run_bench(
        tmp_path,
        "trainer.world_size=1",
        "bench.sink=vllm",
        "bench.warm_iters=1",
        "bench.strategies=[fsdp2/cpu/merged,fsdp2/manual/adapter]",
        "bench.references=[]",
    )
    rows = json.loads((tmp_path / "sync_bench_tiny_w1.json").read_text())["rows"]
    assert [(r["label"], r["status"], r["sink"]) for r in rows] == [
        ("fsdp2/cpu/merged", "ok", "vllm"),
        ("fsdp2/manual/adapter", "ok", "copy"),
    ]
    assert all(r["bytes"] > 0 for r in rows)
    # the digest cost: every engine tensor digest-checked (the tied head too), with its time and ratio
    assert rows[0]["digested_tensors"] == 17 and rows[0]["digest_problems"] == []
    assert all(r["digest_s"] > 0 and r["digest_ratio"] > 0 for r in rows)
    checks = json.loads((tmp_path / "sync_bench_tiny_w1.json").read_text())["checks"]
    assert "max digest / (gather + load)" in {c["target"] for c in checks}


def test_bad_choice_names_the_field(tmp_path):
    cmd = [sys.executable, "-m", "tools.sync_bench", f"hydra.run.dir={tmp_path}", "bench.strategies=[fsdp3/none/none]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bench.strategies" in proc.stderr and "fsdp3/none/none" in proc.stderr


def test_copy_sink_catches_unwritten_and_wrong_weights():
    import torch

    from tools.sync_bench import CopySink

    expected = {"a": torch.ones(3), "b": torch.zeros(2)}
    sink = CopySink({n: t.clone() for n, t in expected.items()}, torch.device("cpu"))
    sink.poison()
    sink.load_weights(iter([("a", torch.ones(3))]))  # "b" never written
    assert sink.wrong(expected) == ["b"] and sink.missing() == ["b"]
    sink.load_weights(iter([("b", torch.ones(2))]))  # written, but with the wrong values
    assert sink.wrong(expected) == ["b"] and sink.missing() == []
    with pytest.raises(KeyError, match="'c'"):
        sink.load_weights(iter([("c", torch.ones(1))]))


def test_copy_sink_digest_check_names_a_wrong_weight():
    import torch

    from recipe.digest import digest
    from recipe.sync import compare_digests
    from tools.sync_bench import CopySink

    sink = CopySink({"a": torch.zeros(3), "b": torch.zeros(2)}, torch.device("cpu"))
    sink.load_weights(iter([("a", torch.ones(3)), ("b", torch.ones(2))]))
    streamed = {"a": digest(torch.ones(3)), "b": digest(torch.ones(2))}
    assert compare_digests(sink.weight_digests(), streamed) == ([], 2)
    sink.dest["b"][1] = 2.0
    problems, _ = compare_digests(sink.weight_digests(), streamed)
    assert len(problems) == 1 and problems[0].startswith("b: engine")
    sink.load_adapter(iter([("x.lora_A.weight", torch.ones(2, 3))]), {}, version=1)  # slot made on first sight
    assert compare_digests(sink.adapter_digests(), {"x.lora_A.weight": digest(torch.ones(2, 3))}) == ([], 1)


def test_profile_writes_a_table_per_strategy(tiny_model_dir, tmp_path):
    proc = run_bench(
        tmp_path,
        "trainer.world_size=2",
        "bench.sink=copy",
        "bench.warm_iters=1",
        "bench.profile=true",
        "bench.profile_trace=true",
        "bench.strategies=[fsdp2/none/merged,fsdp1/none/none]",
        "bench.references=[]",
    )
    rows = json.loads((tmp_path / "sync_bench_tiny_w2.json").read_text())["rows"]
    for row, stem in zip(rows, ("fsdp2_none_merged", "fsdp1_none_none")):
        table = tmp_path / "profile" / f"sync_bench_tiny_w2__{stem}.txt"
        assert row["status"] == "ok" and row["profile"] == str(table)
        text = table.read_text()
        assert "Self CPU" in text and "stream.next (gather)" in text and "aten::" in text
        assert f"profile {row['label']}: " in proc.stdout
        trace = json.loads(table.with_name(f"sync_bench_tiny_w2__{stem}.trace.json").read_text())
        assert trace["traceEvents"]
