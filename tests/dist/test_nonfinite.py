"""A non-finite gradient norm on one rank stops every rank together, before the optimizer step,
like a non-finite loss (grpo.py's `_check_finite` all-reduces the verdict first).

    .venv/bin/python -m pytest tests/dist/test_nonfinite.py
"""

import pytest
import torch

from tests.helpers import run_world


def nan_grad_norm_on_rank1(rank, world, model_dir, run_dir):
    from omegaconf import open_dict

    from recipe.dist import DistContext
    from recipe.grpo import GRPOTrainer, NonFiniteError
    from tests.helpers import compose

    cfg = compose([f"model.path={model_dir}", "rollout=hf", "trainer.device=cpu", "trainer.steps=2",
                   "trainer.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=4", "logger=none",
                   "trainer.micro_batch_size=4", "sync.num_probe_prompts=2"])
    with open_dict(cfg):
        cfg.run_dir = run_dir
    trainer = GRPOTrainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    if rank == 1:  # as if this rank's gradients held an inf: clip_grad_norm returns a non-finite norm
        import recipe.model

        real_clip = recipe.model.clip_grad_norm
        recipe.model.clip_grad_norm = lambda model, max_norm: real_clip(model, max_norm) * float("inf")
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
def test_nonfinite_grad_norm_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    for rank, result in enumerate(run_world(nan_grad_norm_on_rank1, 2, str(tiny_model_dir), str(tmp_path),
                                            timeout_s=300)):
        assert result["error"] is not None, f"rank {rank} kept training"
        assert "non-finite gradient norm at step 0" in result["error"], result["error"]
        assert result["unchanged"], f"rank {rank}: the optimizer stepped on a non-finite gradient"
