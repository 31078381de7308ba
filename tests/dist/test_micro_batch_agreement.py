"""Ranks whose completions differ in length cut their mini-batches into different numbers of
micro-batches (`trainer.micro_batch_tokens`), and every micro-batch is an FSDP forward and backward,
i.e. collectives: the ranks agree on the largest count and the shorter rank runs zero-weight
micro-batches (recipe/batch.py `agreed_micro_batches`).

    .venv/bin/python -m pytest tests/dist/test_micro_batch_agreement.py -q

World 2 (gloo, a 60 s process-group timeout): rank 0 holds three short sequences (4-5 tokens, one
micro-batch of at most 16 padded tokens), rank 1 four long ones (10-12 tokens, one micro-batch each).
The gradients of one mini-batch must equal those of world 1 with the whole global mini-batch in one
micro-batch, for FSDP1 and FSDP2 and both loss aggregations; the trainer's recomputation of the old
logprobs (`behaviour_logprobs`, the forward-only pass of `rollout.top_p < 1`) must finish too and give
the logprobs of one unsplit forward. Before the agreement, rank 0 left its single micro-batch while
rank 1 was in its second forward, and the ranks' collectives never matched.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_precision import GRAD_TOL, ROWS, _max_rel_diff, full_grads, rank_batch
from tests.helpers import compose, policy_of, run_world

MICRO_TOKENS = {1: 0, 2: 16}  # world -> trainer.micro_batch_tokens: world 1 unsplit, world 2 as above
# max |old logprob recomputed in split micro-batches - one unsplit forward|: float32 rounding of other
# padded widths; measured 1.4e-6.
LOGPROB_TOL = 1e-5


def split_counts(rank: int, world: int, model_dir: str) -> dict:
    """Gradients per (fsdp, loss_agg), and the old logprobs the trainer recomputes, of this rank."""
    from recipe.dist import DistContext
    from recipe.batch import agreed_micro_batches, micro_batches
    from recipe.model import build_policy
    from recipe.update import backward_mini_batch, behaviour_logprobs

    device = torch.device("cpu")
    ctx = DistContext(rank, world, rank, device)
    rows = ROWS[world][rank]
    mini = list(range(len(rows)))
    out = {"grads": {}}
    for fsdp in ("fsdp1", "fsdp2"):
        for agg in ("token_mean", "seq_mean"):
            cfg = compose([f"model.path={model_dir}", "model.builder=none", f"fsdp={fsdp}", "trainer.device=cpu",
                           f"algo.loss_agg={agg}", f"trainer.micro_batch_tokens={MICRO_TOKENS[world]}"])
            policy = build_policy(policy_of(cfg), ctx)
            batch = rank_batch(policy, rows, device)  # old logprobs = the policy's own, unsplit
            out["own"] = len(micro_batches(batch, mini, cfg.trainer.micro_batch_size, MICRO_TOKENS[world]))
            out["agreed"] = len(agreed_micro_batches(batch, mini, cfg.trainer))
            if fsdp == "fsdp2" and agg == "token_mean":
                recomputed, _ = behaviour_logprobs(policy, batch, [mini], cfg.trainer, cfg.rollout.temperature, device)
                out["logprob_diff"] = max(abs(a - b) for got, want in zip(recomputed, batch.old_logprobs)
                                          for a, b in zip(got, want))
                out["lengths_kept"] = [len(r) for r in recomputed] == [len(r) for r in batch.old_logprobs]
            backward_mini_batch(policy, batch, mini, cfg.algo, cfg.trainer, cfg.rollout.temperature, device, world)
            out["grads"][(fsdp, agg)] = full_grads(policy)
    return out


@pytest.fixture(scope="module")
def worlds(tiny_model_dir):
    return {world: run_world(split_counts, world, str(tiny_model_dir), timeout_s=60) for world in (1, 2)}


@pytest.mark.timeout(600)
def test_ranks_with_different_lengths_agree_on_the_micro_batch_count(worlds):
    two = worlds[2]
    assert [r["own"] for r in two] == [1, 4], "the batch no longer splits differently on the two ranks"
    assert [r["agreed"] for r in two] == [4, 4]
    assert worlds[1][0]["own"] == 1  # the reference: the whole global mini-batch in one micro-batch


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fsdp", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_gradients_with_unequal_splits_equal_the_unsplit_world1_ones(worlds, fsdp, agg):
    want = worlds[1][0]["grads"][(fsdp, agg)]
    for rank, result in enumerate(worlds[2]):
        diff = _max_rel_diff(want, result["grads"][(fsdp, agg)])
        print(f"{fsdp} {agg} rank {rank}: max |g1 - g2| / max |g1| = {diff:.2e}")
        assert diff <= GRAD_TOL, f"{fsdp} {agg}: unequal splits changed the gradient by {diff:.2e} (relative)"


@pytest.mark.timeout(600)
def test_recomputed_old_logprobs_with_unequal_splits(worlds):
    for rank, result in enumerate(worlds[2] + worlds[1]):
        print(f"max |recomputed - unsplit| logprob: {result['logprob_diff']:.2e}")
        assert result["lengths_kept"]
        assert result["logprob_diff"] <= LOGPROB_TOL, result["logprob_diff"]
