"""metrics.jsonl on resume: the records after the checkpoint's step go (the resumed run logs them
again), every earlier line stays byte for byte, a line cut short by a kill is dropped, and the
rewrite is atomic.

    .venv/bin/python -m pytest tests/unit/test_metrics.py
"""

import json

from recipe.grpo import summarize
from recipe.metrics import MetricsLogger
from tests.helpers import compose, policy_of


def _logger(tmp_path):
    return MetricsLogger(compose(["logger=none", "trainer.device=cpu"]).logger, str(tmp_path), rank=0)


def test_rewind_drops_later_steps_and_keeps_earlier_lines(tmp_path):
    logger = _logger(tmp_path)
    for step in range(1, 6):
        logger.log({"reward/mean": step / 10, "sync/total_s": 0.01 * step}, step=step)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # a kill in the middle of a write
    logger = _logger(tmp_path)
    logger.rewind(3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])  # byte for byte
    for step in (4, 5):
        logger.log({"reward/mean": 0.9, "sync/total_s": 0.02}, step=step)
    assert [r["step"] for r in logger.records()] == [1, 2, 3, 4, 5]
    assert summarize(logger.records())["steps"] == 5  # summary.json covers the whole run
    logger.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_rewind_keeps_a_damaged_line_that_is_not_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n')
    logger = _logger(tmp_path)
    logger.rewind(2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'
    assert [r["step"] for r in logger.records()] == [1, 2]
    logger.close()


def test_ranks_above_zero_write_nothing(tmp_path):
    logger = MetricsLogger(compose(["logger=none"]).logger, str(tmp_path), rank=1)
    logger.log({"a": 1}, step=1)
    logger.rewind(0)
    assert logger.records() == [] and not (tmp_path / "metrics.jsonl").exists()
    assert json.dumps(summarize([])) == "{}"


def test_throughput_and_mfu():
    from recipe.metrics import peak_flops, throughput, train_flops_per_token

    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None
    assert train_flops_per_token(1_000, 1_000) == 6_000  # full fine-tune: 6 x parameters
    assert train_flops_per_token(1_000, 10) == 4_020  # LoRA: the frozen base has no weight gradient
    perf = throughput(
        generated=4_096, trained=10_000, rollout_s=2.0, update_s=0.5, flops_per_token=6e9, devices=2, peak=1e15
    )
    assert perf == {
        "perf/generated_tokens_per_s": 2_048,
        "perf/trained_tokens_per_s": 20_000,
        "perf/mfu": 10_000 * 6e9 / 0.5 / 2e15,
    }
    assert "perf/mfu" not in throughput(1, 1, 1.0, 1.0, 6.0, 1, None)  # CPU: no peak, no MFU


def test_parameter_counts_on_the_meta_device(tiny_model_dir):
    from recipe.model import parameter_counts

    full = parameter_counts(policy_of(compose([f"model.path={tiny_model_dir}"])))
    lora = parameter_counts(policy_of(compose([f"model.path={tiny_model_dir}", "+lora=adapter"])))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert full == (sum(p.numel() for p in loaded.parameters()),) * 2  # the tied embedding once
    assert 0 < lora[1] == lora[0] - full[0]  # only the adapters train
