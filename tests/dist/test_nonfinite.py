"""A non-finite reward, loss or gradient norm on one rank stops every rank together, before the
optimizer step (grpo.py's `_check_finite` goes through recipe.dist.agree, so no rank hangs), and
every rank's error names the rank whose value it was.

    .venv/bin/python -m pytest tests/dist/test_nonfinite.py
"""

import pytest
import torch

from recipe.settings import Settings
from tests.helpers import run_world


def _poison(trainer, what: str) -> None:
    """Make this rank's `what` non-finite."""
    import recipe.model
    import recipe.update

    inf = float("inf")
    if what == "reward":
        trainer.task.reward = lambda prompt, text: float("nan")
    elif what == "loss":
        real_loss = recipe.update.clipped_surrogate
        recipe.update.clipped_surrogate = lambda *a, **k: (lambda s, st: (s * inf, st))(*real_loss(*a, **k))
    else:  # as if this rank's gradients held an inf: clip_grad_norm returns a non-finite norm
        real_clip = recipe.model.clip_grad_norm
        recipe.model.clip_grad_norm = lambda model, max_norm: real_clip(model, max_norm) * inf


def nonfinite_on_rank1(rank, world, model_dir, run_dir, what):
    from omegaconf import open_dict

    from recipe.dist import DistContext
    from recipe.grpo import GRPOTrainer, NonFiniteError
    from tests.helpers import compose

    cfg = compose([f"model.path={model_dir}", "rollout=hf", "trainer.device=cpu", "trainer.steps=2",
                   "trainer.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=4", "logger=none",
                   "trainer.micro_batch_size=4", "sync.num_probe_prompts=2"])
    with open_dict(cfg):
        cfg.run_dir = run_dir
    trainer = GRPOTrainer(Settings.from_cfg(cfg), DistContext(rank, world, rank, torch.device("cpu")))
    if rank == 1:
        _poison(trainer, what)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    try:
        trainer.run()
        error = None
    except NonFiniteError as exc:
        error = str(exc)
    after = {n: p.detach() for n, p in trainer.policy.named_parameters()}
    trainer.close()
    return {"error": error, "unchanged": all(torch.equal(before[n], after[n]) for n in before)}


@pytest.mark.slow
@pytest.mark.parametrize("what,named", [("reward", "reward"), ("loss", "loss"), ("grad_norm", "gradient norm")])
def test_nonfinite_value_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path, what, named):
    results = run_world(nonfinite_on_rank1, 2, str(tiny_model_dir), str(tmp_path), what, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} kept training"
        assert result["error"].startswith(f"rank 1: non-finite {named} at step 0"), result["error"]
        assert result["unchanged"], f"rank {rank}: the optimizer stepped on a non-finite {named}"
