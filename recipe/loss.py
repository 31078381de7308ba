"""The GRPO objective as pure functions of tensors: group advantages, the clipped surrogate (with the
off-policy truncated importance weight), the k3 KL to a reference and the entropy bonus's mask.

It imports torch only, so the update (recipe/update.py), the tools (tools/grpo_sim.py) and the unit tests
compute the one objective; the update decides which terms are on and hands in the tensors (recipe/batch.py
builds them).

The algorithm, as in the GRPO paper (Shao et al., 2024) and as TRL and verl implement it:
- Advantage: for the group of n samples of one prompt with rewards r_1..r_n,
  A_i = (r_i - mean(r)) / (std(r) + eps) with `algo.scale_by_std`, else r_i - mean(r)
  (Dr. GRPO drops the std to avoid favouring easy/hard prompts). Every token of sample i
  gets A_i. A group whose rewards are all equal has A = 0 and contributes no gradient.
- Policy loss per token t: the clipped surrogate of PPO with importance ratio
  rho_t = pi_theta(y_t | y_<t) / pi_old(y_t | y_<t). Both sides use the tempered distribution
  softmax(logits / T). With plain temperature sampling (`rollout.top_p` = 1) pi_old's logprobs are
  the ones the engine reported while sampling (so engine/trainer drift is corrected, not ignored).
  With top_p < 1 the engine's logprobs are those of the truncated, renormalised distribution,
  which the trainer's full-vocabulary one never equals (at top_p 0.5 the ratio was clipped on every
  token before any step); there, as verl and TRL do, pi_old is the trainer's own distribution
  before the update, recomputed by a forward pass without gradients (recipe/update.py `behaviour_logprobs`):
  L_t = -min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A).
- Off-policy (`algo.off_policy_steps=1`, default 0): the batch of step k is sampled with the weights of
  step k-1 (step 0 and the first step after a resume: with the step's own), so an engine that generates
  elsewhere (`Engine.submit` returns at once) samples batch k+1 while the trainer updates on batch k; see
  recipe/grpo.py `GRPOTrainer.run` for the order. The loss is decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025),
  which splits pi_old's two roles. The proximal policy pi_prox, the trust region's centre, is the
  trainer's policy before the update, recomputed without gradients (`behaviour_logprobs`, as for
  top_p < 1; the first mini-batch's ratio is exactly 1); the behaviour policy pi_behav, which only drew
  the samples, is the engine's logprob of each sampled token (one weight version behind). The objective
  is the on-policy one at pi_prox, E_{y ~ pi_prox}[min(rho A, clip(rho) A)] with rho = pi_theta / pi_prox,
  but y ~ pi_behav; per token, E_{pi_prox}[f] = E_{pi_behav}[(pi_prox / pi_behav) f], so each token's
  term is weighted by w_t = pi_prox / pi_behav (per token as PPO's ratio is; a sequence's product of
  weights has a variance exponential in its length). w is a constant of the update (both policies are
  fixed), so it is detached. It is unbounded where pi_behav gave little mass to a token pi_prox now
  favours, and an importance-sampled mean's variance grows with E[w^2]: one such token could carry the
  batch. So it is truncated (truncated IS, Ionides 2008; verl's TIS; V-trace's and Retrace's cap):
  w_t = min(pi_prox / pi_behav, C), C = `algo.is_cap` >= 1: no token weighs more than C, so no term's
  second moment exceeds C^2 times its unweighted one's. The truncation's bias:
  E_behav[min(w, C) f] = E_prox[f] - E_behav[(w - C)^+ f]: tokens the policy moved up by more than C
  since pi_behav are under-weighted by C / w; nothing else is, and with no token above the cap there is
  no bias (`train/is_capped_frac` is the share at the cap, `train/is_weight_mean` the mean weight). Tokens
  with w < 1 are down-weighted, never truncated. The KL and entropy terms are not weighted (as in AReaL
  and verl). L_t = -w_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A). On-policy (0), pi_behav is pi_prox
  (the engine's logprobs are pi_old, as above) and w = 1: the code takes no weight at all, so the loss is
  the one above bit for bit. With top_p < 1 the engine's logprobs are of the truncated distribution, so
  pi_behav is unknown: off_policy_steps=1 with top_p < 1 is refused at start (recipe/config.py).
- KL (off by default, `algo.kl_coef`): k3 estimator to a frozen reference,
  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (unbiased, always >= 0), clamped as verl
  clamps it: ref_t - logp_t to [-20, 20] before exp (no overflow, so no inf x 0 = NaN in the
  backward) and KL_t to [-10, 10].
- Entropy bonus (off by default, `algo.entropy_coef`): the loss subtracts entropy_coef x H_t,
  the entropy of the tempered policy at token t, over each completion's first
  `algo.entropy_tokens` tokens (0: all), so the policy keeps sampling different answers. With
  the coefficient 0 the entropy (a full-vocabulary pass) is not computed, nor logged.
- Aggregation (`algo.loss_agg`), over the *global* mini-batch (the mini-batches of all ranks
  together): `token_mean` averages L_t over all its completion tokens (long answers weigh
  more); `seq_mean` averages within each sequence first, then over all its sequences (every
  sample weighs the same). The token (or sequence) count is all-reduced, so world 1 and
  world N train the same way on the same global batch (recipe/update.py `backward_mini_batch`).
Departures: no value model (GRPO has none); an optional entropy bonus (GRPO has none); rewards come from a
programmatic task (recipe/tasks.py), not a reward model.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages; `rewards` is prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def bonus_mask(mask: torch.Tensor, first: int) -> torch.Tensor:
    """`mask` (float, [B, T]) limited to each row's first `first` completion tokens; 0 keeps all."""
    if first <= 0:
        return mask
    return mask * (mask.cumsum(1) <= first).float()


def clipped_surrogate(
    logp,
    old_logp,
    adv,
    mask,
    clip_eps: float,
    loss_agg: str,
    ref_logp=None,
    kl_coef=0.0,
    entropy=None,
    entropy_coef=0.0,
    entropy_tokens=0,
    behav_logp=None,
    is_cap=math.inf,
):
    """The GRPO loss of one micro-batch and its stats; see the module docstring.

    Off-policy (`behav_logp`, the sampler's logprobs; `old_logp` is then pi_prox): each token's clipped
    term is weighted by the detached min(exp(old_logp - behav_logp), is_cap). Without it no weight is
    computed: the loss is the on-policy one bit for bit.

    The entropy bonus covers each completion's first `entropy_tokens` tokens (0: all of them);
    `stats["entropy"]` sums the entropy over every completion token either way.

    Returns (loss_sum, stats): the sum over tokens (`token_mean`) or of per-sequence token means
    (`seq_mean`); the caller divides by the global mini-batch's token or sequence count. The stats
    are 0-d tensors on the loss's device.
    """
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    weight = capped = None
    if behav_logp is not None:  # truncated importance weight pi_prox / pi_behav (inputs: no gradient)
        raw = torch.exp(old_logp - behav_logp).detach()
        weight, capped = raw.clamp(max=is_cap), (raw >= is_cap).float()
        per_token = per_token * weight
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
    mask = mask.float()
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy * bonus_mask(mask, entropy_tokens)
    if loss_agg == "token_mean":
        loss_sum = (per_token * mask).sum()
    else:  # seq_mean: each sequence's token mean, summed; normalised by the sequence count
        loss_sum = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {  # 0-d tensors: the caller adds them up and reads them once (no host sync per micro-batch)
        "clip_frac": (clipped * mask).sum(),
        "kl": (kl.detach() * mask).sum(),
        "entropy": (entropy.detach() * mask).sum() if entropy is not None else mask.new_zeros(()),
        "tokens": mask.sum(),
        "is_weight": (weight * mask).sum() if weight is not None else mask.new_zeros(()),
        "is_capped": (capped * mask).sum() if capped is not None else mask.new_zeros(()),
    }
    return loss_sum, stats


KL_LOG_RATIO_MAX = 20.0  # |ref - logp| before exp (verl: 20)
KL_MAX = 10.0  # |k3| per token (verl: 10)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_theta || pi_ref) per token, clamped as verl clamps it: the log
    ratio to [-20, 20] (exp stays finite, so its gradient is never inf x 0 = NaN) and k3 to [-10, 10]
    (one token far from the reference cannot dominate the loss)."""
    log_r = (ref_logp - logp).clamp(-KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX)
    return (torch.exp(log_r) - log_r - 1).clamp(-KL_MAX, KL_MAX)
