"""The loop at a real vocabulary: a random tiny-depth checkpoint with SmolLM2's 49,152-entry vocabulary
and the tiny tokenizer (64 ids, the first rows of the embedding), three GRPO steps with vLLM on CPU.
vLLM and the trainer take a config vocabulary larger than the tokenizer, random weights answer until
`rollout.max_new_tokens`, and the update's peak memory stays below one float32 [tokens x vocabulary]
logits tensor of its micro-batch, which the straightforward log-softmax needed several times over."""

import json
from pathlib import Path

import pytest
import torch

from recipe.settings import Settings
from tests.helpers import compose, peak_rss_above_start, run_world

VOCAB = 49_152
NEW_TOKENS = 112
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
)


def _three_steps(rank, world, model_dir, run_dir):
    from omegaconf import open_dict

    from recipe.batch import micro_batches
    from recipe.dist import DistContext
    from recipe.grpo import GRPOTrainer

    cfg = compose(
        [
            "model=local",
            f"model.path={model_dir}",
            "model.dtype=float32",
            "trainer.device=cpu",
            "trainer.steps=3",
            "trainer.prompts_per_step=2",
            "rollout.n=12",
            f"rollout.max_new_tokens={NEW_TOKENS}",
            "trainer.updates_per_batch=1",
            "logger=none",
            "sync.num_probe_prompts=2",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = run_dir
    trainer = GRPOTrainer(Settings.from_cfg(cfg), DistContext(rank, world, rank, torch.device("cpu")))
    update, peaks = trainer.update, []

    def measured(batch):
        widest = max(
            len(idx) * max(len(batch.input_ids[i]) for i in idx)
            for idx in micro_batches(
                batch,
                range(len(batch.input_ids)),
                cfg.trainer.micro_batch_size,
                trainer.settings.trainer.micro_batch_tokens,
            )
        )
        stats, extra = peak_rss_above_start(lambda: update(batch))
        peaks.append({"extra": extra, "logits": widest * VOCAB * 4})
        return stats

    trainer.update = measured
    trainer.run()
    trainer.close()
    return peaks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_three_steps_at_a_real_vocabulary(tmp_path):
    from tools.make_random_model import make_random_model

    model_dir = make_random_model("qwen2_0p5b", tmp_path / "model", dtype="float32", overrides=SHAPE)
    peaks = run_world(_three_steps, 1, str(model_dir), str(tmp_path / "run"), timeout_s=900)[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/response_length"] == NEW_TOKENS for r in rows)  # random weights: no early <eos>
    for r in rows:  # throughput: tokens per second of both phases; no MFU or GPU share on a CPU
        assert r["perf/generated_tokens_per_s"] == pytest.approx(24 * NEW_TOKENS / r["rollout/time_s"])
        assert (
            r["perf/trained_tokens_per_s"] > r["perf/generated_tokens_per_s"] * r["rollout/time_s"] / r["time/update_s"]
        )
        assert "perf/mfu" not in r and "perf/update_gpu_busy" not in r
    for step, peak in enumerate(peaks, 1):
        print(
            f"step {step}: update peak {peak['extra'] / 2**20:.0f} MiB above its start; one float32 logits "
            f"tensor of the micro-batch {peak['logits'] / 2**20:.0f} MiB"
        )
    assert len(peaks) == 3 and all(p["extra"] < p["logits"] for p in peaks), peaks
