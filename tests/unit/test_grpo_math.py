"""The GRPO math (recipe/loss.py), the batch it reads (recipe/batch.py) and the update's passes
(recipe/update.py), checked against hand-computed values."""

import math
import random

import pytest
import torch

from recipe.batch import Batch, local_count, micro_batch_tensors, micro_batches, placeholder_tensors
from recipe.grpo import warmup_lambda
from recipe.logprobs import token_entropy, token_logprobs
from recipe.loss import bonus_mask, clipped_surrogate, group_advantages


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
    _, diff = clipped_surrogate(
        logp, logp, torch.zeros(1), mask, 0.2, "token_mean", ref_logp=torch.log(torch.tensor([[0.9, 0.1]])), kl_coef=0.1
    )
    assert same["kl"] == 0 and diff["kl"] > 0


def test_micro_batch_aligns_engine_logprobs_with_predicting_positions():
    batch = Batch(
        input_ids=[[5, 6, 7, 8, 9], [5, 6, 7]],
        prompt_lens=[3, 2],
        old_logprobs=[[-0.1, -0.2], [-0.3]],
        rewards=torch.zeros(2),
        advantages=torch.tensor([1.0, -1.0]),
        correct=torch.zeros(2),
        completion_lens=torch.tensor([2.0, 1.0]),
    )
    t = micro_batch_tensors(batch, [0, 1], "cpu")
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # sample 0: tokens 8 and 9 (index 3, 4) are predicted at positions 2 and 3
    assert t["mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert t["old_logp"][0, 2].item() == pytest.approx(-0.1) and t["old_logp"][1, 1].item() == pytest.approx(-0.3)


def test_micro_batch_tensors_match_a_row_by_row_build():
    """The vectorised assembly puts every engine logprob where a per-row loop would, bit for bit."""
    rng = random.Random(0)
    ids, plens, lps = [], [], []
    for _ in range(9):
        plen, clen = rng.randint(1, 6), rng.randint(1, 5)
        ids.append([rng.randint(1, 50) for _ in range(plen + clen)])
        plens.append(plen)
        lps.append([-rng.random() for _ in range(clen)])
    batch = Batch(
        input_ids=ids,
        prompt_lens=plens,
        old_logprobs=lps,
        rewards=torch.zeros(9),
        advantages=torch.randn(9),
        correct=torch.zeros(9),
        completion_lens=torch.zeros(9),
    )
    idx = [4, 0, 7, 2]
    t = micro_batch_tensors(batch, idx, "cpu")
    width = max(len(ids[i]) for i in idx)
    for row, i in enumerate(idx):
        assert t["input_ids"][row].tolist() == ids[i] + [0] * (width - len(ids[i]))
        assert t["attention_mask"][row].tolist() == [1] * len(ids[i]) + [0] * (width - len(ids[i]))
        expect = torch.zeros(width - 1)
        expect[plens[i] - 1 : plens[i] - 1 + len(lps[i])] = torch.tensor(lps[i])
        assert torch.equal(t["old_logp"][row], expect)
        assert t["mask"][row].nonzero().flatten().tolist() == list(range(plens[i] - 1, plens[i] - 1 + len(lps[i])))
    assert torch.equal(t["adv"], batch.advantages[idx])


def test_micro_batches_cap_sequences_and_padded_tokens():
    lens = [4, 4, 10, 3, 3, 3, 30]
    batch = Batch(
        input_ids=[[1] * n for n in lens],
        prompt_lens=[1] * 7,
        old_logprobs=[[0.0]] * 7,
        rewards=torch.zeros(7),
        advantages=torch.zeros(7),
        correct=torch.zeros(7),
        completion_lens=torch.zeros(7),
    )
    order = list(range(7))
    assert micro_batches(batch, order, 3, 0) == [[0, 1, 2], [3, 4, 5], [6]]  # sequences only
    # 20 padded tokens: [4, 4] (8), then 10 would make 3 x 10 = 30; [10] + 3 -> 2 x 10 = 20; ...
    assert micro_batches(batch, order, 100, 20) == [[0, 1], [2, 3], [4, 5], [6]]
    for size, tokens in ((2, 12), (100, 1), (1, 0), (100, 1000)):
        parts = micro_batches(batch, order, size, tokens)
        assert [i for p in parts for i in p] == order  # every sample once, in order
        for p in parts:
            assert len(p) <= size and (len(p) == 1 or not tokens or len(p) * max(lens[i] for i in p) <= tokens)


def test_entropy_bonus_lowers_the_loss_by_coef_times_masked_entropy():
    logits = torch.zeros(1, 3, 8)  # uniform over 8 tokens: entropy ln 8 at every position
    logits[0, 1, 0] = 50.0  # near one-hot at position 1: entropy ~0
    ent = token_entropy(logits)
    assert ent.shape == (1, 2)
    assert ent[0, 0].item() == pytest.approx(math.log(8)) and ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    logp, mask = torch.full((1, 2), -1.0), torch.tensor([[True, True]])
    adv = torch.tensor([0.5])
    base, _ = clipped_surrogate(logp, logp, adv, mask, 0.2, "token_mean")
    bonus, stats = clipped_surrogate(logp, logp, adv, mask, 0.2, "token_mean", entropy=ent, entropy_coef=0.1)
    assert bonus.item() == pytest.approx(base.item() - 0.1 * math.log(8))
    assert stats["entropy"] == pytest.approx(math.log(8))


def test_entropy_bonus_covers_only_the_first_entropy_tokens():
    ent = torch.tensor([[9.0, 1.0, 2.0, 4.0, 8.0]])  # position 0 is the prompt's: outside the mask
    mask = torch.tensor([[False, True, True, True, True]])
    logp, adv = torch.zeros(1, 5), torch.zeros(1)
    base, _ = clipped_surrogate(logp, logp, adv, mask, 0.2, "token_mean")
    for first, covered in ((0, 15.0), (1, 1.0), (2, 3.0), (4, 15.0), (9, 15.0)):
        loss, stats = clipped_surrogate(
            logp, logp, adv, mask, 0.2, "token_mean", entropy=ent, entropy_coef=0.5, entropy_tokens=first
        )
        assert loss.item() == pytest.approx(base.item() - 0.5 * covered)
        assert stats["entropy"] == pytest.approx(15.0)  # logged over every completion token either way
    assert torch.equal(bonus_mask(mask.float(), 2), torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]]))


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
    batch = Batch(
        input_ids=[[1, 2, 3], [1, 2, 3, 4, 5], [1, 2]],
        prompt_lens=[1, 1, 1],
        old_logprobs=[[-1.0, -1.0], [-1.0] * 4, [-1.0]],
        rewards=torch.zeros(3),
        advantages=torch.zeros(3),
        correct=torch.zeros(3),
        completion_lens=torch.tensor([2.0, 4.0, 1.0]),
    )
    assert local_count(batch, [0, 1], "token_mean") == 6
    assert local_count(batch, [0, 1], "seq_mean") == 2


def test_kl_is_clamped_as_verl_clamps_it_and_its_gradient_stays_finite():
    """k3 to [-10, 10] and the log ratio to [-20, 20] before exp: a token 100 nats from the reference
    adds 10, not exp(100) (inf in float32, whose gradient through a clamp would be inf x 0 = NaN)."""
    from recipe.loss import k3_kl

    ref = torch.tensor([[0.0, -1.0, -0.5, -100.0]])
    logp = torch.tensor([[-100.0, -1.0, -0.4, 0.0]], requires_grad=True)
    kl = k3_kl(logp, ref)
    log_r = ref[0, 2] - logp[0, 2].detach()
    assert kl[0, 0].item() == 10.0 and kl[0, 3].item() == 10.0  # exp(100) - 101 and 100 - 1: both clamped
    assert kl[0, 1].item() == 0.0
    assert kl[0, 2].item() == pytest.approx((torch.exp(log_r) - log_r - 1).item())  # inside: k3 unchanged
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = clipped_surrogate(
        logp, logp.detach(), torch.zeros(1), mask, 0.2, "token_mean", ref_logp=ref, kl_coef=0.5
    )
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert stats["kl"] == pytest.approx(20.0 + kl[0, 2].item())


class _TinyLM(torch.nn.Module):
    """A causal-LM-shaped module: embedding -> linear, `.logits` like HF's output."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def _loop_cfg(**algo):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "algo": {
                "clip_eps": 0.2,
                "loss_agg": "token_mean",
                "kl_coef": 0.0,
                "entropy_coef": 0.0,
                "entropy_tokens": 0,
                **algo,
            },
            "rollout": {"temperature": 1.0, "top_p": 1.0},
            "trainer": {"micro_batch_size": 2, "micro_batch_tokens": 0},
        }
    )


def _update_args(cfg):
    """backward_mini_batch's settings: the algo and trainer slices and the sampling temperature."""
    return cfg.algo, cfg.trainer, cfg.rollout.temperature


def _loop_batch():
    g = torch.Generator().manual_seed(3)
    lens = [2, 3, 1, 4, 2]
    return Batch(
        input_ids=[torch.randint(0, 11, (3 + n,), generator=g).tolist() for n in lens],
        prompt_lens=[3] * 5,
        old_logprobs=[[-2.0] * n for n in lens],
        rewards=torch.zeros(5),
        advantages=torch.randn(5, generator=g),
        correct=torch.zeros(5),
        completion_lens=torch.tensor(lens, dtype=torch.float),
    )


def test_entropy_is_not_computed_when_its_coefficient_is_zero(monkeypatch):
    import recipe.update as update

    import recipe.model as model

    calls = []  # one per micro-batch whose blocks computed the entropy
    real = model.chunked_logprobs
    monkeypatch.setattr(
        model, "chunked_logprobs", lambda *a, **k: (calls.append(1) if k.get("entropy") else None) or real(*a, **k)
    )
    monkeypatch.setattr(update, "global_count", lambda local: max(local, 1.0))  # one process, no group
    batch, policy = _loop_batch(), _TinyLM()
    stats = update.backward_mini_batch(policy, batch, range(5), *_update_args(_loop_cfg()), "cpu", 1)
    assert calls == [] and stats["entropy"] == 0.0
    stats = update.backward_mini_batch(policy, batch, range(5), *_update_args(_loop_cfg(entropy_coef=0.1)), "cpu", 1)
    assert len(calls) == 3 and stats["entropy"] > 0  # micro-batches of 2, 2, 1


def test_a_placeholder_micro_batch_adds_exactly_nothing(monkeypatch):
    """The zero-weight micro-batches a rank with fewer micro-batches runs: gradients and sums bit for bit
    those without them (with the KL and entropy terms on)."""
    import recipe.update as update

    monkeypatch.setattr(update, "global_count", lambda local: max(local, 1.0))
    cfg = _loop_cfg(entropy_coef=0.1)
    results = []
    for extra in (0, 2):
        own = update.agreed_micro_batches
        monkeypatch.setattr(
            update, "agreed_micro_batches", lambda b, m, c, own=own, extra=extra: own(b, m, c) + [[]] * extra
        )
        policy = _TinyLM()
        stats = update.backward_mini_batch(
            policy, _loop_batch(), range(5), *_update_args(cfg), "cpu", 1, reference=_TinyLM()
        )
        results.append((stats, {n: p.grad.clone() for n, p in policy.named_parameters()}))
        monkeypatch.setattr(update, "agreed_micro_batches", own)
    (plain, g_plain), (padded, g_padded) = results
    assert plain == padded
    assert all(torch.equal(g_plain[n], g_padded[n]) for n in g_plain)
    t = placeholder_tensors(_loop_batch(), "cpu")
    assert t["mask"].sum() == 0 and t["adv"].abs().sum() == 0 and t["input_ids"].shape[0] == 1


def test_agreed_micro_batches_in_one_process_are_the_own_ones():
    from recipe.batch import agreed_micro_batches

    batch = _loop_batch()
    assert agreed_micro_batches(batch, range(5), _loop_cfg().trainer) == micro_batches(batch, range(5), 2, 0)


def test_old_logprobs_are_recomputed_only_when_sampling_truncates():
    from omegaconf import OmegaConf

    from recipe.grpo import behaviour_note
    from recipe.update import truncated_sampling

    cfg = _loop_cfg()
    assert truncated_sampling(cfg.rollout) is None
    cfg = OmegaConf.merge(cfg, {"rollout": {"top_p": 0.5}})
    assert truncated_sampling(cfg.rollout) == "rollout.top_p=0.5"
    assert behaviour_note(cfg.rollout).startswith(
        "rollout.top_p=0.5: "
    ) and "recomputed by the trainer" in behaviour_note(cfg.rollout)


def test_start_line_states_the_global_batch():
    """trainer.prompts_per_step is per rank: the start line multiplies it by the ranks and rollout.n."""
    from omegaconf import OmegaConf

    from recipe.grpo import batch_note

    cfg = OmegaConf.merge(_loop_cfg(), {"trainer": {"prompts_per_step": 3}, "rollout": {"n": 4}})
    assert batch_note(cfg.trainer, cfg.rollout, 2) == (
        "batch per step: 3 prompts per rank x 2 ranks x 4 samples (rollout.n) = 24 completions (6 prompts)"
    )


def test_recomputed_old_logprobs_make_the_first_ratio_exactly_one(monkeypatch):
    """`behaviour_logprobs` returns the policy's own logprobs with the update's micro-batch shapes: the
    first mini-batch then sees ratio 1 bit for bit (gap 0, nothing clipped), whatever the engine said."""
    import recipe.update as update

    monkeypatch.setattr(update, "global_count", lambda local: max(local, 1.0))
    cfg, batch, policy = _loop_cfg(), _loop_batch(), _TinyLM()
    minis = [[0, 2, 4], [1, 3]]
    old, gap = update.behaviour_logprobs(policy, batch, minis, cfg.trainer, cfg.rollout.temperature, "cpu")
    assert [len(r) for r in old] == [len(r) for r in batch.old_logprobs]
    assert gap["tokens"] == 12 and gap["gap_sum"] > 0  # against the engine's -2.0 everywhere
    batch.old_logprobs = old
    stats = update.backward_mini_batch(policy, batch, minis[0], *_update_args(cfg), "cpu", 1)
    assert stats["gap_sum"] == 0.0 and stats["gap_max"] == 0.0 and stats["clip_frac"] == 0.0


# --- off-policy (algo.off_policy_steps=1): decoupled PPO with a truncated importance weight


def _off_policy_batch():
    """Four tokens of two sequences: pi_theta, pi_prox (recomputed), pi_behav (the engine's, stale)."""
    logp = [[math.log(0.7), math.log(0.3)], [math.log(0.5), math.log(0.15)]]
    prox = [[math.log(0.5), math.log(0.3)], [math.log(0.4), math.log(0.25)]]
    behav = [[math.log(0.4), math.log(0.1)], [math.log(0.5), math.log(0.25)]]
    return logp, prox, behav, [1.5, -2.0]


def test_off_policy_loss_and_gradient_by_hand():
    logp, prox, behav, adv = _off_policy_batch()
    eps, cap = 0.2, 2.0
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = clipped_surrogate(
        lp,
        torch.tensor(prox, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        mask,
        eps,
        "token_mean",
        behav_logp=torch.tensor(behav, dtype=torch.float64),
        is_cap=cap,
    )
    loss.backward()
    want_loss, want_grad, weights, capped = 0.0, [[0.0, 0.0], [0.0, 0.0]], [], 0
    for i in range(2):
        for t in range(2):
            rho = math.exp(logp[i][t] - prox[i][t])
            raw = math.exp(prox[i][t] - behav[i][t])
            w = min(raw, cap)
            weights.append(w)
            capped += raw >= cap
            a = adv[i]
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            want_loss += -w * min(unclipped, clipped)
            # d/dlogp: the unclipped branch is rho * A (d rho / d logp = rho); the clipped one is constant
            want_grad[i][t] = -w * a * rho if unclipped < clipped or 1 - eps < rho < 1 + eps else 0.0
    # rho 1.4 (A > 0: clipped, no gradient), 1, 1.25 (A < 0: unclipped), 0.6 (A < 0: clipped, no gradient);
    # weights 1.25, 3 (capped at 2), 0.8, 1
    assert weights == pytest.approx([1.25, 2.0, 0.8, 1.0]) and capped == 1
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert want_grad == [[0.0, -3.0], [pytest.approx(2.0), 0.0]]
    for got, want in zip(lp.grad.tolist(), want_grad):
        assert got == pytest.approx(want, rel=1e-12)
    assert stats["is_weight"].item() == pytest.approx(sum(weights)) and stats["is_capped"].item() == 1


def test_off_policy_weight_is_detached_and_capped():
    """A token whose pi_prox / pi_behav is 10 contributes as if it were the cap (2), not 10: its loss and its
    gradient are the cap times the unweighted ones; one at 1.5 contributes 1.5 times its own; no gradient
    flows into the weight (pi_behav is the sampler's, a constant)."""
    logp = torch.zeros(1, 2, requires_grad=True)
    prox = torch.zeros(1, 2)
    behav = torch.tensor([[-math.log(10.0), -math.log(1.5)]], requires_grad=True)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)
    loss, stats = clipped_surrogate(logp, prox, adv, mask, 0.2, "token_mean", behav_logp=behav, is_cap=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-3.5)  # -(2 + 1.5)
    assert logp.grad.tolist()[0] == pytest.approx([-2.0, -1.5])
    assert behav.grad is None
    assert stats["is_capped"].item() == 1 and stats["is_weight"].item() == pytest.approx(3.5)
    unweighted, _ = clipped_surrogate(logp.detach(), prox, adv, mask, 0.2, "token_mean")
    assert unweighted.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_on_policy_loss_is_the_off_policy_loss_at_pi_behav_equal_pi_prox(loss_agg):
    """With pi_behav = pi_prox every weight is exp(0) = 1 and the loss and its gradient equal, bit for
    bit, the loss without a weight (what off_policy_steps=0 computes), with a KL and an entropy term."""
    torch.manual_seed(0)
    logp0, old, ref, ent = (torch.randn(3, 5) * 0.3 - 1 for _ in range(4))
    adv, mask = torch.randn(3), torch.rand(3, 5) > 0.3
    grads, losses = [], []
    for behav in (None, old.clone()):
        logp = logp0.clone().requires_grad_()
        entropy = ent.abs().clone().requires_grad_()
        loss, stats = clipped_surrogate(
            logp, old, adv, mask, 0.2, loss_agg, ref, 0.1, entropy, 0.05, 2, behav_logp=behav, is_cap=2.0
        )
        loss.backward()
        losses.append(loss.detach())
        grads.append((logp.grad, entropy.grad))
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_on_policy_loss_is_the_clipped_surrogate_formula():
    """off_policy_steps=0 computes no weight: the loss is -sum min(rho A, clip(rho) A) over the mask exactly
    (the same float32 operations, in the same order), and the stats have no weight in them."""
    torch.manual_seed(1)
    logp, old = torch.randn(2, 4) * 0.2 - 1, torch.randn(2, 4) * 0.2 - 1
    adv, mask = torch.randn(2), torch.rand(2, 4) > 0.2
    loss, stats = clipped_surrogate(logp, old, adv, mask, 0.2, "token_mean")
    ratio = torch.exp(logp - old)
    want = (-torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * mask.float()).sum()
    assert torch.equal(loss, want)
    assert stats["is_weight"] == 0 and stats["is_capped"] == 0


def test_off_policy_start_line_names_the_setting_and_the_cap():
    from omegaconf import OmegaConf

    from recipe.grpo import off_policy_note

    algo = OmegaConf.create({"off_policy_steps": 1, "is_cap": 3.0})
    assert off_policy_note(algo).startswith("algo.off_policy_steps=1: ") and "algo.is_cap=3.0" in off_policy_note(algo)
