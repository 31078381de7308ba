"""`rollout.top_p < 1`: the engine's logprobs are of the truncated, renormalised distribution, so the
trainer recomputes the old (behaviour) logprobs itself before the update (recipe/update.py
`behaviour_logprobs`, as verl and TRL do); with top_p = 1 it keeps the engine's.

    .venv/bin/python -m pytest tests/dist/test_behaviour_logprobs.py -q

One GRPOTrainer per top_p (world 1, FSDP2, rollout=hf, the tiny model), one rollout and one update of
one mini-batch, before any optimizer step: at top_p 0.5 the ratio of every completion token is
exactly 1 and nothing is clipped, while the engine's own logprobs sit far from the trainer's (the
truncation); at top_p 1 the engine's logprobs are the old ones, as sampled.
"""

from __future__ import annotations

import pytest
import torch

from recipe.settings import Settings
from tests.helpers import run_world

# max |trainer - engine| mean logprob gap at top_p 1 (float32 on both sides, same weights): the
# drift; measured 5.1e-7.
DRIFT_TOL = 1e-4


def first_update(rank, world, model_dir, run_dir):
    from omegaconf import open_dict

    import recipe.grpo as grpo
    import recipe.update as update
    from recipe.dist import DistContext
    from tests.helpers import compose

    deviation = []
    real = update.clipped_surrogate

    def recording(logp, old_logp, adv, mask, *args, **kwargs):
        deviation.append(((logp.detach() - old_logp).abs() * mask).max().item())  # |log ratio| of real tokens
        return real(logp, old_logp, adv, mask, *args, **kwargs)

    update.clipped_surrogate = recording
    out = {}
    for top_p in (0.5, 1.0):
        cfg = compose([f"model.path={model_dir}", "model.builder=none", "rollout=hf", "trainer.device=cpu",
                       "trainer.steps=1", "trainer.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=6",
                       "logger=none", "trainer.updates_per_batch=1", f"rollout.top_p={top_p}",
                       "sync.num_probe_prompts=2"])
        with open_dict(cfg):
            cfg.run_dir = run_dir
        trainer = grpo.GRPOTrainer(Settings.from_cfg(cfg), DistContext(rank, world, rank, torch.device("cpu")))
        prompts, samples = trainer.rollout(0)
        rewards, correct, _ = trainer.score(prompts, samples)
        batch = trainer.make_batch(samples, rewards, correct)
        engine = [list(lps) for lps in batch.old_logprobs]
        deviation.clear()
        metrics = trainer.update(batch)
        trainer.close()
        out[top_p] = dict(metrics=metrics, max_log_ratio=max(deviation), kept=batch.old_logprobs == engine,
                          tokens=sum(len(lps) for lps in engine))
    return out


@pytest.fixture(scope="module")
def updates(tiny_model_dir, tmp_path_factory):
    return run_world(first_update, 1, str(tiny_model_dir), str(tmp_path_factory.mktemp("run")), timeout_s=300)[0]


@pytest.mark.timeout(600)
def test_top_p_below_one_recomputes_old_logprobs_so_the_first_ratio_is_one(updates):
    got = updates[0.5]
    m = got["metrics"]
    print(f"top_p 0.5: engine-trainer gap {m['train/logprob_gap']:.3f} (max {m['train/logprob_gap_max']:.3f}), "
          f"clip_frac {m['train/clip_frac']}, max |log ratio| {got['max_log_ratio']}")
    assert m["train/clip_frac"] == 0.0
    assert got["max_log_ratio"] == 0.0, "the first update's ratio is not exactly 1"
    assert got["tokens"] > 0 and not got["kept"], "the engine's logprobs were kept at top_p 0.5"
    assert m["train/logprob_gap"] > 0.1  # what the engine's truncated logprobs would have put in the ratio
    assert "time/old_logprobs_s" in m


@pytest.mark.timeout(600)
def test_top_p_one_keeps_the_engine_logprobs(updates):
    got = updates[1.0]
    m = got["metrics"]
    print(f"top_p 1: engine-trainer gap {m['train/logprob_gap']:.2e}")
    assert got["kept"] and "time/old_logprobs_s" not in m
    assert m["train/logprob_gap"] < DRIFT_TOL and m["train/clip_frac"] == 0.0
    assert "train/entropy" not in m  # algo.entropy_coef=0: not computed, not logged
