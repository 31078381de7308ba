"""The GRPO math in recipe/grpo.py, checked against hand-computed values."""

import math

import pytest
import torch

from recipe.grpo import (Batch, clipped_surrogate, group_advantages, local_count, micro_batch_tensors, token_logprobs,
                         warmup_lambda)


def test_group_advantages_centre_and_scale_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])  # 2 groups of 3
    adv = group_advantages(rewards, 3, scale_by_std=False)
    assert torch.allclose(adv[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert torch.allclose(adv[3:], torch.tensor([1 / 3, -1 / 6, -1 / 6]))
    scaled = group_advantages(rewards, 3, scale_by_std=True)
    std0 = rewards[:3].std()
    assert torch.allclose(scaled[:3], adv[:3] / (std0 + 1e-6))


def test_equal_rewards_give_zero_advantage():
    adv = group_advantages(torch.full((4,), 0.7), 4, scale_by_std=True)
    assert torch.equal(adv, torch.zeros(4))


def test_token_logprobs_match_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    lp = token_logprobs(logits, ids, temperature=2.0)
    expected = torch.log_softmax(logits[0, 2] / 2.0, -1)[ids[0, 3]]
    assert lp.shape == (2, 4)
    assert torch.allclose(lp[0, 2], expected)


def test_surrogate_on_policy_is_minus_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    adv = torch.tensor([2.0])
    mask = torch.tensor([[True, True, False]])
    loss, stats = clipped_surrogate(logp, logp.clone(), adv, mask, 0.2, "token_mean")
    assert loss.item() == pytest.approx(-4.0) and stats["tokens"] == 2  # -A per token, summed
    assert stats["clip_frac"] == 0


def test_surrogate_clips_large_ratio_for_positive_advantage():
    old = torch.log(torch.tensor([[0.1]]))
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()  # ratio 5
    loss, stats = clipped_surrogate(logp, old, torch.tensor([1.0]), torch.tensor([[True]]), 0.2, "token_mean")
    assert loss.item() == pytest.approx(-1.2)  # clip(5) = 1.2
    loss.backward()
    assert logp.grad.abs().sum() == 0  # clipped: no gradient pushes the ratio further
    assert stats["clip_frac"] == 1


def test_seq_mean_weighs_sequences_equally():
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, _ = clipped_surrogate(logp, logp, adv, mask, 0.2, "seq_mean")
    assert loss.item() / 2 == pytest.approx(-1.0)  # over the 2 sequences: each weighs 1/2
    loss_t, stats = clipped_surrogate(logp, logp, torch.tensor([1.0, 0.0]), mask, 0.2, "token_mean")
    assert loss_t.item() / stats["tokens"] == pytest.approx(-1 / 5)  # over the 5 tokens: the 1-token one weighs 1/5


def test_kl_k3_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, same = clipped_surrogate(logp, logp, torch.zeros(1), mask, 0.2, "token_mean", ref_logp=logp, kl_coef=0.1)
    _, diff = clipped_surrogate(logp, logp, torch.zeros(1), mask, 0.2, "token_mean",
                                   ref_logp=torch.log(torch.tensor([[0.9, 0.1]])), kl_coef=0.1)
    assert same["kl"] == 0 and diff["kl"] > 0


def test_micro_batch_aligns_engine_logprobs_with_predicting_positions():
    batch = Batch(input_ids=[[5, 6, 7, 8, 9], [5, 6, 7]], prompt_lens=[3, 2],
                  old_logprobs=[[-0.1, -0.2], [-0.3]], rewards=torch.zeros(2), advantages=torch.tensor([1.0, -1.0]),
                  correct=torch.zeros(2), completion_lens=torch.tensor([2.0, 1.0]))
    t = micro_batch_tensors(batch, [0, 1], "cpu")
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # sample 0: tokens 8 and 9 (index 3, 4) are predicted at positions 2 and 3
    assert t["mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert t["old_logp"][0, 2].item() == pytest.approx(-0.1) and t["old_logp"][1, 1].item() == pytest.approx(-0.3)


def test_warmup_ramps_to_one():
    f = warmup_lambda(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert math.isclose(warmup_lambda(0)(0), 1.0)


def test_logprobs_and_advantages_are_float32_from_bf16_inputs():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    lp = token_logprobs(logits.bfloat16(), ids)
    assert lp.dtype == torch.float32
    assert torch.equal(lp, token_logprobs(logits.bfloat16().float(), ids))  # cast first, then log_softmax
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.bfloat16), 2, scale_by_std=True)
    assert adv.dtype == torch.float32


def test_local_count_is_this_ranks_tokens_or_sequences():
    batch = Batch(input_ids=[[1, 2, 3], [1, 2, 3, 4, 5], [1, 2]], prompt_lens=[1, 1, 1],
                  old_logprobs=[[-1.0, -1.0], [-1.0] * 4, [-1.0]], rewards=torch.zeros(3), advantages=torch.zeros(3),
                  correct=torch.zeros(3), completion_lens=torch.tensor([2.0, 4.0, 1.0]))
    assert local_count(batch, [0, 1], "token_mean") == 6
    assert local_count(batch, [0, 1], "seq_mean") == 2
