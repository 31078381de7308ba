"""The update phase's passes over the sharded policy: `backward_mini_batch` backpropagates this rank's
share of one global mini-batch's objective (recipe/loss.py), `behaviour_logprobs` recomputes the old
logprobs without gradients when the engine's cannot serve (`truncated_sampling`, or off-policy: pi_prox),
`reference_logprobs` gives the KL's reference.

Apart from the loop (recipe/grpo.py) because they hold no state of the run: functions of the policy, the
batch (recipe/batch.py) and the settings' slices, so the loop, tools/update_bench.py and the tests run the
one update the loop runs. Every rank runs as many forwards as every other (`agreed_micro_batches`), and the
loss is normalised by the count over all ranks (`global_count`), so world 1 and world N train alike.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from recipe.batch import Batch, agreed_micro_batches, global_count, local_count, micro_batch_inputs
from recipe.loss import clipped_surrogate
from recipe.model import policy_logprobs
from recipe.settings import Algo, Rollout, Trainer


def backward_mini_batch(
    policy,
    batch: Batch,
    mini: Sequence[int],
    algo: Algo,
    trainer: Trainer,
    temperature: float,
    device,
    world_size: int,
    reference=None,
) -> Dict[str, float]:
    """Backpropagate this rank's share of the global mini-batch objective; grads accumulate.

    The objective is J = (sum of L over the global mini-batch) / N, N = the global token count
    (`token_mean`) or sequence count (`seq_mean`), L per token or per sequence as in recipe/loss.py's
    docstring. FSDP averages gradients over ranks (its reduce-scatter divides by the world size
    W), so each rank backpropagates W * loss_sum_r / N: the average over ranks of that is
    sum_r loss_sum_r / N = J, and the gradient the optimizer sees is dJ/dtheta.

    Returns this rank's sums: `loss` (its part of J; J is the sum over ranks), `clip_frac`, `kl`,
    `is_weight` and `is_capped` (sums over tokens; the last two 0 on-policy), `tokens`, and the gap of
    the trainer's logprobs to `old_logprobs` (`gap_sum` over tokens, `gap_max`).
    """
    norm = global_count(local_count(batch, mini, algo.loss_agg)) / world_size
    keys = ("loss", "clip_frac", "kl", "entropy", "tokens", "is_weight", "is_capped", "gap_sum")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # summed on the device ...
    gap_max = torch.zeros((), dtype=torch.float64, device=device)
    for idx in agreed_micro_batches(batch, mini, trainer):
        t = micro_batch_inputs(batch, idx, device)
        # logprobs (and the entropy, a full-vocabulary pass, only when the loss uses it) at the
        # completion positions, fused into the model's output layer
        logp, entropy = policy_logprobs(
            policy,
            t["input_ids"],
            t["attention_mask"],
            temperature,
            positions=t["mask"],
            entropy=algo.entropy_coef > 0,
            entropy_grad=True,
        )
        ref_logp = reference_logprobs(reference, t, temperature) if reference is not None else None
        loss_sum, s = clipped_surrogate(
            logp,
            t["old_logp"],
            t["adv"],
            t["mask"],
            algo.clip_eps,
            algo.loss_agg,
            ref_logp,
            algo.kl_coef,
            entropy,
            algo.entropy_coef,
            algo.entropy_tokens,
            *off_policy_inputs(t, algo),
        )
        (loss_sum / norm).backward()
        gap = (logp.detach() - t["old_logp"]).abs() * t["mask"]
        sums += torch.stack(
            [
                loss_sum.detach(),
                s["clip_frac"],
                s["kl"],
                s["entropy"],
                s["tokens"],
                s["is_weight"],
                s["is_capped"],
                gap.sum(),
            ]
        ).double()
        gap_max = torch.maximum(gap_max, gap.max().double())
    *totals, top = torch.cat([sums, gap_max[None]]).tolist()  # ... and read once per mini-batch
    stats = dict(zip(keys, totals), gap_max=top)
    stats["loss"] /= norm * world_size
    return stats


def off_policy_inputs(t: Dict[str, torch.Tensor], algo: Algo) -> Tuple:
    """`clipped_surrogate`'s behaviour logprobs and cap: those of the batch when it holds the engine's
    (off_policy_steps=1), else none (no weight)."""
    return (t["behav_logp"], algo.is_cap) if "behav_logp" in t else ()


def truncated_sampling(rollout: Rollout) -> Optional[str]:
    """Why the engine's logprobs are not the trainer's distribution (None when they are): sampling that
    is not plain temperature sampling reports logprobs of a truncated, renormalised distribution.
    Every `rollout.*` setting that filters the distribution belongs here."""
    if rollout.top_p < 1:
        return f"rollout.top_p={rollout.top_p}"
    return None


@torch.no_grad()
def behaviour_logprobs(
    policy, batch: Batch, minis: Sequence[Sequence[int]], trainer: Trainer, temperature: float, device
) -> Tuple[List[List[float]], Dict[str, float]]:
    """The trainer's own logprobs of every completion token under the weights before the update (the
    old policy of the ratio, when the engine's are of a truncated distribution: `truncated_sampling`).

    The forwards run per mini-batch with the micro-batches the update uses (the same shapes, so the
    first mini-batch's ratio is exactly 1) and as many as every other rank (`agreed_micro_batches`).
    Returns (logprobs per sample, gap): `gap_sum`, `gap_max` and `tokens` of |trainer - engine| over
    this rank's tokens, the engine's being `batch.old_logprobs` as sampled.
    """
    out: List[List[float]] = [list(lps) for lps in batch.old_logprobs]
    gap = dict(gap_sum=0.0, gap_max=0.0, tokens=0.0)
    for mini in minis:
        for idx in agreed_micro_batches(batch, mini, trainer):
            t = micro_batch_inputs(batch, idx, device)
            logp = policy_logprobs(policy, t["input_ids"], t["attention_mask"], temperature, positions=t["mask"])[
                0
            ]  # computed as the update computes it
            diff = (logp - t["old_logp"]).abs() * t["mask"]
            gap["gap_sum"] += diff.sum().item()
            gap["gap_max"] = max(gap["gap_max"], diff.max().item())
            gap["tokens"] += t["mask"].sum().item()
            if idx:
                rows = logp[t["mask"]].cpu().split([len(batch.old_logprobs[i]) for i in idx])  # row-major, as built
                for i, row in zip(idx, rows):
                    out[i] = row.tolist()
    return out, gap


@torch.no_grad()
def reference_logprobs(reference, t: Dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    return policy_logprobs(reference, t["input_ids"], t["attention_mask"], temperature, positions=t["mask"])[0]
