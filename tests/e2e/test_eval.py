"""The held-out evaluation end to end on CPU at world 2 (launcher, one engine per rank): before
training, every `trainer.eval_every` steps and after the last step, over all ranks' prompts."""

import json

import pytest
from omegaconf import open_dict

from tests.helpers import compose


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_eval_before_every_n_steps_and_at_the_end(tiny_model_dir, tmp_path, backend):
    from recipe.train import train

    # operands to 99: the pool of 512 leaves thousands of questions for the held-out set; 5 prompts
    # split 3 + 2 over the ranks, so a count that is not all-reduced shows
    cfg = compose(
        [
            f"model.path={tiny_model_dir}",
            f"rollout={backend}",
            "trainer.steps=3",
            "trainer.prompts_per_step=2",
            "rollout.n=4",
            "rollout.max_new_tokens=4",
            "logger=none",
            "task.params.max_operand=99",
            "trainer.eval_every=2",
            "trainer.eval_prompts=5",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "reward/mean" not in rows[0]  # the record before training holds only the evaluation
    evals = [r for r in rows if "eval/exact" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]  # every 2 steps, and after the last
    for r in evals:
        assert r["eval/prompts"] == 5
        assert 0 <= r["eval/exact"] <= 1 and 0 <= r["eval/reward"] <= 1
        assert r["eval/exact"] * 5 == pytest.approx(round(r["eval/exact"] * 5))  # a count over 5 prompts
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (summary["eval/exact_first"], summary["eval/exact_last"]) == (
        evals[0]["eval/exact"],
        evals[-1]["eval/exact"],
    )
