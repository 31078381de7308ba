"""What one rank's batch is and how the update cuts it: the rollout batch (`Batch`), its mini-batches cut
into micro-batches, the padded tensors of a micro-batch, the micro-batch count every rank agrees on, and
the token (or sequence) count that normalises the loss over all ranks.

Apart from the loop (recipe/grpo.py) because it is data and its layout, not the order of the phases: the
update, the recompute of the old logprobs, the tools (tools/grpo_sim.py, tools/update_bench.py) and the
tests build the same tensors from it. Every count that drives a collective is agreed here
(`agreed_micro_batches`, `global_count`), so a rank whose completions are longer cannot hang the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from recipe.settings import Trainer


@dataclass
class Batch:
    """One rank's rollout batch, prompt-major (n samples per prompt, consecutive)."""

    input_ids: List[List[int]]  # prompt + completion
    prompt_lens: List[int]
    old_logprobs: List[List[float]]  # per completion token, from the engine
    rewards: torch.Tensor
    advantages: torch.Tensor
    correct: torch.Tensor
    completion_lens: torch.Tensor
    # algo.off_policy_steps=1: the engine's logprobs (pi_behav) once `old_logprobs` holds the recomputed pi_prox
    behav_logprobs: Optional[List[List[float]]] = None


def micro_batches(batch: Batch, mini: Sequence[int], max_seqs: int, max_tokens: int) -> List[List[int]]:
    """`mini` cut in order into micro-batches of at most `max_seqs` sequences and, with
    `max_tokens` > 0, at most `max_tokens` padded tokens (sequences x the longest one); a
    sequence longer than `max_tokens` goes alone."""
    out, current, width = [], [], 0
    for i in mini:
        wider = max(width, len(batch.input_ids[i]))
        if current and (len(current) >= max_seqs or (max_tokens and (len(current) + 1) * wider > max_tokens)):
            out.append(current)
            current, wider = [], len(batch.input_ids[i])
        current.append(i)
        width = wider
    return out + [current] if current else out


def micro_batch_tensors(batch: Batch, idx: Sequence[int], device) -> Dict[str, torch.Tensor]:
    """Right-padded tensors for samples `idx`; logprob tensors are aligned to input_ids[:, 1:]."""
    idx = list(idx)
    lens = torch.tensor([len(batch.input_ids[i]) for i in idx])
    input_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(batch.input_ids[i]) for i in idx], batch_first=True)
    width = input_ids.shape[1]
    attn = (torch.arange(width)[None] < lens[:, None]).long()
    start = torch.tensor([batch.prompt_lens[i] - 1 for i in idx])[:, None]  # position t-1 predicts token t
    end = start + torch.tensor([len(batch.old_logprobs[i]) for i in idx])[:, None]
    positions = torch.arange(width - 1)[None]
    mask = (positions >= start) & (positions < end)
    old = torch.zeros(mask.shape)
    old[mask] = torch.tensor([lp for i in idx for lp in batch.old_logprobs[i]])  # row-major, as mask orders them
    adv = batch.advantages[idx]
    out = dict(input_ids=input_ids, attention_mask=attn, old_logp=old, mask=mask, adv=adv)
    if batch.behav_logprobs is not None:
        out["behav_logp"] = torch.zeros(mask.shape)
        out["behav_logp"][mask] = torch.tensor([lp for i in idx for lp in batch.behav_logprobs[i]])
    # non_blocking: from pageable memory the copy is staged at once, without waiting for the device's queue
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def agreed_micro_batches(batch: Batch, mini: Sequence[int], trainer: Trainer) -> List[List[int]]:
    """This rank's `micro_batches` of `mini`, then empty ones ([]) up to the largest count over ranks.

    Each micro-batch is one forward (and backward) of the sharded policy, i.e. FSDP collectives, and
    each rank cuts its own samples by their own padded widths: with longer completions on one rank
    it cut more micro-batches, and the ranks' collectives never matched (both ranks waited for the
    process-group timeout). An empty entry stands for a zero-weight micro-batch (`placeholder_tensors`).
    """
    own = micro_batches(batch, mini, trainer.micro_batch_size, trainer.micro_batch_tokens)
    count = torch.tensor([len(own)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return own + [[] for _ in range(int(count.item()) - len(own))]


def placeholder_tensors(batch: Batch, device) -> Dict[str, torch.Tensor]:
    """A zero-weight micro-batch: sample 0's tensors with no token in the mask and advantage 0. Its
    forward and backward run (they are collectives) and add exactly 0 to every gradient and sum."""
    t = micro_batch_tensors(batch, [0], device)
    t["mask"] = torch.zeros_like(t["mask"])
    t["adv"] = torch.zeros_like(t["adv"])
    return t


def micro_batch_inputs(batch: Batch, idx: Sequence[int], device) -> Dict[str, torch.Tensor]:
    """`micro_batch_tensors` of `idx`, or a placeholder for an empty entry of `agreed_micro_batches`."""
    return micro_batch_tensors(batch, idx, device) if idx else placeholder_tensors(batch, device)


def global_count(local: float) -> float:
    """Sum of `local` over all ranks (at least 1): the global mini-batch's token or sequence count."""
    count = torch.tensor([float(local)], dtype=torch.float64)
    dist.all_reduce(count)
    return max(count.item(), 1.0)


def local_count(batch: Batch, mini: Sequence[int], loss_agg: str) -> float:
    """What this rank's part of the mini-batch adds to the normaliser: tokens or sequences."""
    if loss_agg == "seq_mean":
        return float(len(mini))
    return float(sum(len(batch.old_logprobs[i]) for i in mini))
