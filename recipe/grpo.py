"""GRPO: rollout -> reward -> advantage -> update -> sync -> log, one function per phase.

Every rank runs this loop on its own prompts (data parallel): its own engine samples
`rollout.n` completions for each of `trainer.prompts_per_step` prompts (per rank), the policy is
sharded across ranks with FSDP, and after each update the weights stream from the shards
into every rank's engine (recipe/sync.py).

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
  before the update, recomputed by a forward pass without gradients (`behaviour_logprobs`):
  L_t = -min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A).
- Off-policy (`algo.off_policy_steps=1`, default 0): the batch of step k is sampled with the weights of
  step k-1 (step 0 and the first step after a resume: with the step's own), so an engine that generates
  elsewhere (`Engine.submit` returns at once) samples batch k+1 while the trainer updates on batch k; see
  `GRPOTrainer.run` for the order. The loss is decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025),
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
  world N train the same way on the same global batch (see `backward_mini_batch`).
- Precision: the trainer's logprobs, the loss and the advantages are float32 (the logits come
  in the compute dtype `model.dtype`, as the engine's do, and are cast before log_softmax; both
  are computed block by block inside the model's output layer, recipe/logprobs.py, so neither a
  float32 nor a compute-dtype [tokens x vocabulary] exists for a whole micro-batch);
  parameters and AdamW state are in `model.master_dtype` (recipe/model.py).
- `trainer.updates_per_batch` optimizer steps per rollout batch: the batch is split into
  that many mini-batches; the first is on-policy (rho = 1 up to engine drift), later
  ones are slightly off-policy, which the clip bounds.
- Micro-batches: every forward of the sharded policy is a collective, so every rank runs the
  same number per mini-batch: the largest count over ranks (`agreed_micro_batches`); a rank with
  fewer runs zero-weight ones (`placeholder_tensors`) that add exactly nothing to the gradient.
- Held-out evaluation (`trainer.eval_every` > 0): before training, every eval_every steps and after
  the last step, each rank's engine answers its share of `trainer.eval_prompts` prompts that are
  not in the task's training pool (`Task.heldout`) greedily; `eval/exact` and `eval/reward` are over
  all ranks' prompts. It reads the weights the last sync loaded, and changes no RNG the training uses.
- Throughput (per step, all ranks): `perf/generated_tokens_per_s` (completion tokens / rollout
  time), `perf/trained_tokens_per_s` (prompt + completion tokens / update time), on CUDA
  `perf/mfu` (those tokens x 6 x parameters, a LoRA's frozen base 4, / update time / the GPUs'
  dense bf16 peak, recipe/metrics.py) and `perf/update_gpu_busy` (the share of the update's wall
  time the device spent inside optimizer steps, from CUDA events: recipe/profiling.py DeviceBusy).
  The update reads its stats from the device once per optimizer step, not per micro-batch.
Departures: no value model (GRPO has none); an optional entropy bonus (GRPO has none); rewards come from a
programmatic task (recipe/tasks.py), not a reward model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from recipe.dist import DistContext, agree
from recipe.metrics import peak_flops, throughput, train_flops_per_token
from recipe.profiling import DeviceBusy
from recipe.settings import Algo, Rollout, Settings, Trainer
from recipe.model import micro_batch_tokens, policy_logprobs


class NonFiniteError(RuntimeError):
    """Loss or reward is NaN/inf: the run stops rather than train on garbage."""


# ----------------------------------------------------------------------------- math


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


def clipped_surrogate(logp, old_logp, adv, mask, clip_eps: float, loss_agg: str, ref_logp=None, kl_coef=0.0,
                      entropy=None, entropy_coef=0.0, entropy_tokens=0, behav_logp=None, is_cap=math.inf):
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


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


# ----------------------------------------------------------------------------- batch


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


@dataclass
class Pending:
    """A batch handed to the engine: its step, prompts, the engine's handle (`.result()` -> samples), the
    weight version the engine held at the submit, and when it was submitted (perf_counter)."""

    step: int
    prompts: List
    handle: object
    version: int
    since: float


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


def backward_mini_batch(policy, batch: Batch, mini: Sequence[int], algo: Algo, trainer: Trainer,
                        temperature: float, device, world_size: int, reference=None) -> Dict[str, float]:
    """Backpropagate this rank's share of the global mini-batch objective; grads accumulate.

    The objective is J = (sum of L over the global mini-batch) / N, N = the global token count
    (`token_mean`) or sequence count (`seq_mean`), L per token or per sequence as in the module
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
        logp, entropy = policy_logprobs(policy, t["input_ids"], t["attention_mask"], temperature,
                                        positions=t["mask"], entropy=algo.entropy_coef > 0, entropy_grad=True)
        ref_logp = reference_logprobs(reference, t, temperature) if reference is not None else None
        loss_sum, s = clipped_surrogate(logp, t["old_logp"], t["adv"], t["mask"], algo.clip_eps,
                                        algo.loss_agg, ref_logp, algo.kl_coef, entropy,
                                        algo.entropy_coef, algo.entropy_tokens, *off_policy_inputs(t, algo))
        (loss_sum / norm).backward()
        gap = (logp.detach() - t["old_logp"]).abs() * t["mask"]
        sums += torch.stack([loss_sum.detach(), s["clip_frac"], s["kl"], s["entropy"], s["tokens"], s["is_weight"],
                             s["is_capped"], gap.sum()]).double()
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
def behaviour_logprobs(policy, batch: Batch, minis: Sequence[Sequence[int]], trainer: Trainer,
                       temperature: float, device) -> Tuple[List[List[float]], Dict[str, float]]:
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
            logp = policy_logprobs(policy, t["input_ids"], t["attention_mask"], temperature,
                                   positions=t["mask"])[0]  # computed as the update computes it
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


# ----------------------------------------------------------------------------- phases


class GRPOTrainer:
    """Holds the objects of one rank; `run()` is the loop. It holds the run's settings and hands each
    component its slice."""

    def __init__(self, settings: Settings, ctx: DistContext):
        from transformers import AutoTokenizer

        from recipe.metrics import MetricsLogger
        from recipe.model import Residency, build_optimizer, build_policy, build_reference, parameter_counts
        from recipe.remote import place_engine
        from recipe.sync import WeightSync
        from recipe.tasks import build_task

        # trainer.micro_batch_tokens=null is resolved here, once (it reads the model's shape and the device)
        settings = dataclasses.replace(settings, trainer=dataclasses.replace(
            settings.trainer, micro_batch_tokens=micro_batch_tokens(settings)))
        self.settings, self.ctx = cfg, ctx = settings, ctx
        torch.manual_seed(cfg.trainer.seed)
        self.model_dir = str(Path(cfg.model.path).expanduser().resolve())
        self.lora_base = self.model_dir if cfg.lora.name != "none" else None  # LoRA checkpoints: adapters + a reference
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.task = build_task(cfg.task, self.tokenizer)
        self.eval_prompts = held_out_share(self.task, cfg.trainer, ctx)  # [] when trainer.eval_every=0
        self.policy = build_policy(cfg.policy, ctx)
        self.flops_per_token = train_flops_per_token(*parameter_counts(cfg.policy))
        self.peak_flops = peak_flops(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
        self.reference = build_reference(cfg.policy, ctx) if cfg.algo.kl_coef > 0 else None  # in model.dtype
        self.optimizer = build_optimizer(self.policy, cfg.policy)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(cfg.trainer.warmup_steps))
        self.residency = Residency(cfg.offload, self.policy, self.optimizer, ctx.device)  # offload=manual: host between phases
        # rollout.placement: here or in its own process; the engine takes the sync's load mode and digest
        # setting from here: it reads no sync settings itself
        self.engine = place_engine(cfg, ctx, self.model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
        self.sync = WeightSync(cfg, ctx, self.policy, self.engine, self.tokenizer, residency=self.residency)
        self.logger = MetricsLogger(cfg.logger, cfg.run_dir, ctx.rank, resume=cfg.trainer.resume, config=cfg.source)
        self.step = 0
        self.resumed = False
        self.exported = -1  # the step last exported
        self.step_began = 0.0  # perf_counter at the current step's start

    # -- phase 1: rollout
    def rollout(self, step: int):
        """The prompts of `step` and their samples, generated now."""
        prompts, samples, _ = self.collect(self.submit(step))
        return prompts, samples

    def submit(self, step: int) -> Pending:
        """Hands the prompts of `step` to the engine (woken first, put to sleep after: the colocated engine
        generates inside `submit`); the batch is sampled with the weights the engine holds now."""
        cfg = self.settings
        prompts = self.task.batch(step * self.ctx.world_size + self.ctx.rank, cfg.trainer.prompts_per_step)
        seed = cfg.trainer.seed * 1_000_003 + step * 1009 + self.ctx.rank
        prompt_ids = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
        since = time.perf_counter()
        self.engine.wake()
        handle = self.engine.submit(prompt_ids, n=cfg.rollout.n, max_new_tokens=cfg.rollout.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed)
        self.engine.sleep()
        return Pending(step, prompts, handle, self.sync.weight_version, since)

    def collect(self, pending: Pending):
        """(prompts, samples, stats) of a submitted batch: `time/rollout_wait_s`, the seconds from the step's
        start (or the submit, if later) until the samples were in hand, and `rollout/staleness`, how many
        weight versions the engine's were behind the trainer's when they were sampled (0 or 1)."""
        samples = pending.handle.result()
        stats = {"time/rollout_wait_s": time.perf_counter() - max(pending.since, self.step_began),
                 "rollout/staleness": self.sync.weight_version - pending.version}
        return pending.prompts, samples, stats

    def generate(self, prompts, n: int, temperature: float, top_p: float, seed: int):
        """`n` samples per prompt from the engine (woken first, left awake), up to rollout.max_new_tokens. An
        engine that keeps order generates them after whatever was submitted and loaded before."""
        prompt_ids = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
        self.engine.wake()
        return self.engine.generate(prompt_ids, n=n, max_new_tokens=self.settings.rollout.max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed)

    def decode(self, samples) -> List[str]:
        return [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]

    # -- held-out evaluation
    def eval_due(self) -> bool:
        """Every `trainer.eval_every` steps (step 0 = before training) and after the last step."""
        every = self.settings.trainer.eval_every
        return every > 0 and (self.step % every == 0 or self.step == self.settings.trainer.steps)

    def evaluate(self) -> Dict[str, float]:
        """Greedy answers of the engine (which holds the weights of `self.step`) to this rank's share of
        the held-out prompts; exact rate and mean reward over all ranks' prompts. Runs right after a
        sync and leaves the engine awake as the sync does (the next rollout would wake it anyway)."""
        t0 = time.perf_counter()
        texts = self.decode(self.generate(self.eval_prompts, 1, temperature=0.0, top_p=1.0, seed=0))
        pairs = list(zip(self.eval_prompts, texts))
        sums = torch.tensor([sum(float(self.task.correct(p, t)) for p, t in pairs),
                             sum(self.task.reward(p, t) for p, t in pairs), float(len(pairs))], dtype=torch.float64)
        dist.all_reduce(sums)
        exact, reward, count = sums.tolist()
        return {"eval/exact": exact / count, "eval/reward": reward / count, "eval/prompts": count,
                "eval/time_s": time.perf_counter() - t0, "eval/example": texts[0]}

    # -- phase 2: reward
    def score(self, prompts, samples):
        n = self.settings.rollout.n
        texts = self.decode(samples)
        rewards = torch.tensor([self.task.reward(prompts[i // n], t) for i, t in enumerate(texts)])
        correct = torch.tensor([float(self.task.correct(prompts[i // n], t)) for i, t in enumerate(texts)])
        return rewards, correct, texts

    # -- phase 3: advantage
    def make_batch(self, samples, rewards, correct) -> Batch:
        adv = group_advantages(rewards, self.settings.rollout.n, self.settings.algo.scale_by_std)
        return Batch(
            input_ids=[list(s.prompt_token_ids) + list(s.token_ids) for s in samples],
            prompt_lens=[len(s.prompt_token_ids) for s in samples],
            old_logprobs=[list(s.logprobs) for s in samples],
            rewards=rewards, advantages=adv, correct=correct,
            completion_lens=torch.tensor([float(len(s.token_ids)) for s in samples]),
        )

    # -- phase 4: update
    def update(self, batch: Batch) -> Dict[str, float]:
        cfg = self.settings
        self.residency.to_device()  # offload=manual: parameters and optimizer state to the device for the update
        self.policy.train()
        order = list(range(len(batch.input_ids)))
        random.Random(cfg.trainer.seed + self.step).shuffle(order)
        minis = [order[i::cfg.trainer.updates_per_batch] for i in range(cfg.trainer.updates_per_batch)]
        busy = DeviceBusy(self.ctx.device)  # CUDA: events around each optimizer step's device work
        t0 = time.perf_counter()
        gap = None  # the trainer-engine gap: of the first mini-batch, or of the recomputation
        if truncated_sampling(cfg.rollout) or cfg.algo.off_policy_steps > 0:
            proximal, gap = behaviour_logprobs(self.policy, batch, minis, cfg.trainer, cfg.rollout.temperature,
                                               self.ctx.device)
            if cfg.algo.off_policy_steps > 0:  # the engine's logprobs weight each token (the module docstring)
                batch.behav_logprobs = batch.old_logprobs
            batch.old_logprobs = proximal
        t_old = time.perf_counter() - t0
        per_mini = []
        for mini in minis:
            with busy.span():
                per_mini.append(self._optimizer_step(batch, mini))
        busy.synchronize()  # the wall time covers the last optimizer step's kernels
        t_update = time.perf_counter() - t0  # (recomputed old logprobs,) forward, backward and optimizer steps
        self.residency.to_host()
        out = {**self._update_metrics(per_mini, gap), "time/update_s": t_update}
        if gap is not None:
            out["time/old_logprobs_s"] = t_old
        if busy.enabled:  # the share of the update's wall time the device spent inside optimizer steps
            out["perf/update_gpu_busy"] = busy.seconds() / t_update
        return out

    def _optimizer_step(self, batch: Batch, mini: List[int]) -> Dict[str, float]:
        stats = backward_mini_batch(self.policy, batch, mini, self.settings.algo, self.settings.trainer,
                                    self.settings.rollout.temperature, self.ctx.device, self.ctx.world_size, self.reference)
        self._check_finite(stats["loss"], "loss")
        stats["grad_norm"] = self._clip_grad()
        self._check_finite(stats["grad_norm"], "gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats

    def _update_metrics(self, per_mini: List[Dict[str, float]], gap: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Global (all-ranks) update metrics. The logprob gap of trainer and engine is of the first, on-policy
        mini-batch, or, when the old logprobs were recomputed (`gap`), of the whole batch before the update
        (then it includes what the engine's truncation removed or, off-policy, the weights' one-step lag)."""
        keys = ("loss", "clip_frac", "kl", "entropy", "tokens", "is_weight", "is_capped")
        sums = torch.tensor([[s[k] for k in keys] for s in per_mini], dtype=torch.float64)
        gap = gap or per_mini[0]
        first = torch.tensor([gap["gap_sum"], gap["tokens"]], dtype=torch.float64)
        gap_max = torch.tensor([gap["gap_max"]], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(first)
        dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
        loss, clip, kl, entropy, tokens, is_weight, is_capped = sums.sum(0).tolist()
        tokens = max(tokens, 1.0)
        out = {
            "train/loss": loss / len(per_mini),  # the objective J, mean over the mini-batches
            "train/grad_norm": sum(s["grad_norm"] for s in per_mini) / len(per_mini),
            "train/clip_frac": clip / tokens,
            "train/kl": kl / tokens,
            "train/lr": self.scheduler.get_last_lr()[0],
            # |log pi_trainer - log pi_engine| before the first optimizer step: the drift
            "train/logprob_gap": first[0].item() / max(first[1].item(), 1.0),
            "train/logprob_gap_max": gap_max.item(),
        }
        if self.settings.algo.entropy_coef > 0:  # (not computed otherwise)
            out["train/entropy"] = entropy / tokens  # of the trainer's tempered distribution, per completion token
        if self.settings.algo.off_policy_steps > 0:  # the truncated importance weights, per completion token
            out["train/is_weight_mean"] = is_weight / tokens
            out["train/is_capped_frac"] = is_capped / tokens
        return out

    def _clip_grad(self) -> float:
        from recipe.model import clip_grad_norm

        return clip_grad_norm(self.policy, self.settings.trainer.grad_clip)

    def _check_finite(self, value: float, what: str) -> None:
        """All ranks agree before anyone raises, so a NaN on one rank cannot hang the others."""
        agree(None if math.isfinite(value) else f"non-finite {what} at step {self.step} ({value}); stopping the run",
              NonFiniteError)

    # -- checkpoints
    def save_checkpoint(self) -> None:
        from recipe.checkpoint import save

        cfg = self.settings
        counters = {"weight_version": self.sync.weight_version, "num_syncs": self.sync.num_syncs}
        save(Path(cfg.run_dir) / "checkpoints", self.policy, self.optimizer, self.scheduler, self.step, self.ctx,
             state=counters, keep=cfg.trainer.keep_checkpoints, residency=self.residency, base=self.lora_base)

    def export(self) -> None:
        """The policy of this step as a Hugging Face (and, for LoRA, PEFT) directory (recipe/export.py)."""
        from recipe.export import export, export_dir

        out = export_dir(self.settings.run_dir, self.step)
        t0 = time.perf_counter()
        export(self.policy, self.settings, self.ctx, out, self.step, self.settings.run_dir)
        self.exported = self.step
        if self.ctx.is_main:
            size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
            print(f"exported step {self.step} to {out} ({size / 1e6:,.1f} MB in {time.perf_counter() - t0:.2f} s)",
                  flush=True)

    def maybe_resume(self) -> None:
        """With trainer.resume: model, optimizer, scheduler, RNG, step and weight version from the
        newest complete checkpoint; metrics.jsonl loses the records after that step."""
        from recipe.checkpoint import load, latest

        if not self.settings.trainer.resume or self.resumed:
            return
        path = latest(Path(self.settings.run_dir) / "checkpoints")
        if path is None:  # stopped before its first checkpoint: it starts again from step 0, in place
            self.logger.rewind(-1)
            self.resumed = True
            return
        loaded = load(path, self.policy, self.optimizer, self.scheduler, self.ctx, residency=self.residency,
                      base=self.lora_base)
        self.step, counters = loaded["step"], loaded["state"]
        if counters:  # (checkpoints written before the counters were saved have none)
            # The first sync after resume loads the checkpoint's weights again: it remakes the saved version.
            self.sync.weight_version = counters["weight_version"] - 1
            self.sync.num_syncs = counters["num_syncs"] - 1
        self.logger.rewind(self.step)
        self.resumed = True

    # -- the loop
    def run(self) -> Dict[str, float]:
        """The loop. Step k: take batch k, score, advantage, update, sync the weights of step k + 1, log.

        Off-policy (`algo.off_policy_steps=1`): batch k is taken from the submit of the previous step (at the
        first step, and the first after a resume, it is submitted and awaited then), and batch k + 1 is
        submitted right after it (unless k is the last step), before the update. So an engine that generates
        elsewhere samples batch k + 1 with the weights of step k during update k, and the sync after update
        k reaches it after that generation (engines keep order, `Engine.submit`); the colocated engine
        generates inside the submit, with the same weights: the same batches, no overlap. The evaluation
        after a sync generates after the sync in both cases (it follows it in the engine's order), so it
        sees the synced weights. A checkpoint holds no submitted batch: after a resume, the first batch is
        sampled with the resumed weights (staleness 0), where the uninterrupted run's had staleness 1, so
        the two runs part there.
        """
        from recipe.profiling import StepProfiler, phase
        from recipe.progress import Progress

        cfg = self.settings
        self.maybe_resume()
        self.sync.sync(self.step)  # engine starts from the trainer's weights (and loads the adapter base)
        progress = Progress(cfg.trainer.steps, initial=self.step, enabled=self.ctx.is_main)
        progress.note(batch_note(cfg.trainer, cfg.rollout, self.ctx.world_size))
        if truncated_sampling(cfg.rollout):
            progress.note(behaviour_note(cfg.rollout))
        if cfg.algo.off_policy_steps > 0:
            progress.note(off_policy_note(cfg.algo))
        if self.step == 0 and self.eval_due():
            before = self.evaluate()  # 0. held-out accuracy before training
            self.logger.log(before, step=0)
            progress.update(before)
        profiler = StepProfiler(cfg.trainer, cfg.run_dir, self.ctx, self.step)  # trainer.profile_steps > 0: steps 2.. under torch.profiler
        pending = None  # off_policy_steps=1: the next step's batch, submitted (not checkpointed)
        while self.step < cfg.trainer.steps:
            profiler.step_begins(self.step)
            if self.ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.ctx.device)  # memory/trainer_peak_gib is per step
            t0 = self.step_began = time.perf_counter()
            with phase("rollout"):  # 1. rollout: this step's batch, then (off-policy) the next step's submit
                prompts, samples, rollout_stats = self.collect(pending or self.submit(self.step))
                ahead = cfg.algo.off_policy_steps > 0 and self.step + 1 < cfg.trainer.steps
                pending = self.submit(self.step + 1) if ahead else None
            t_rollout = time.perf_counter() - t0
            with phase("score"):
                rewards, correct, texts = self.score(prompts, samples)  # 2. reward
                self._check_finite(float(rewards.sum()), "reward")
            with phase("advantage"):
                batch = self.make_batch(samples, rewards, correct)  # 3. advantage
            with phase("update"):
                train_stats = self.update(batch)  # 4. update
            self.step += 1
            with phase("sync"):
                sync_stats = self.sync.sync(self.step)  # 5. sync (gather -> load -> verify)
            metrics = self.metrics(batch, train_stats, sync_stats, t_rollout, time.perf_counter() - t0, texts)
            metrics.update(rollout_stats)
            if self.eval_due():
                metrics.update(self.evaluate())  # held-out accuracy of the weights just synced
            with phase("log"):
                self.logger.log(metrics, step=self.step)  # 6. log
            progress.update(metrics)
            written = profiler.step_ends(self.step - 1, last=self.step == cfg.trainer.steps)
            if written is not None:
                progress.note(f"profile of the steps: {written}")
            if cfg.trainer.checkpoint_every and self.step % cfg.trainer.checkpoint_every == 0:
                self.save_checkpoint()
                if cfg.trainer.export == "every_checkpoint":
                    self.export()
        progress.close()
        return summarize(self.logger.records())  # the whole run, across resumes (rank 0; {} elsewhere)

    def metrics(self, batch, train_stats, sync_stats, t_rollout, t_step, texts):
        """Per-step metrics, averaged over ranks (reward, accuracy, lengths) so rank 0 logs the global view."""
        local = torch.tensor([batch.rewards.mean().item(), batch.rewards.std().item(), batch.correct.mean().item(),
                              batch.completion_lens.mean().item(), batch.completion_lens.sum().item() / t_rollout])
        tokens = torch.tensor([batch.completion_lens.sum().item(), float(sum(len(ids) for ids in batch.input_ids))],
                              dtype=torch.float64)  # generated, trained (prompt + completion) tokens
        dist.all_reduce(local)
        dist.all_reduce(tokens)
        local /= self.ctx.world_size
        reward, reward_std, acc, length, tok_s = local.tolist()
        generated, trained = tokens.tolist()
        perf = throughput(generated, trained, t_rollout, train_stats["time/update_s"], self.flops_per_token,
                          self.ctx.world_size, self.peak_flops)
        return {
            "reward/mean": reward, "reward/std": reward_std, "reward/accuracy": acc,
            "rollout/response_length": length, "rollout/tokens_per_s": tok_s * self.ctx.world_size,
            "rollout/time_s": t_rollout, "rollout/example": texts[0],
            "time/step_s": t_step, **train_stats, **perf, **sync_stats, **self.engine.memory_stats(),
            **self.trainer_memory(),
        }

    def trainer_memory(self) -> Dict[str, float]:
        """CUDA: the step's peak of torch's allocator on this rank (the trainer's tensors; the engine's
        weights and KV cache live in vLLM's own pool; `rollout/mem_free_*` reads the device), the largest over ranks."""
        if self.ctx.device.type != "cuda":
            return {}
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(self.ctx.device))], device=self.ctx.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"memory/trainer_peak_gib": peak.item() / 2**30}

    def close(self) -> None:
        self.logger.close()
        self.engine.close()


def batch_note(trainer: Trainer, rollout: Rollout, world_size: int) -> str:
    """The line the run prints at start: the global batch, since trainer.prompts_per_step is per rank
    (each rank draws its own prompts)."""
    prompts, n = trainer.prompts_per_step, rollout.n
    return (f"batch per step: {prompts} prompts per rank x {world_size} ranks x {n} samples (rollout.n) = "
            f"{prompts * world_size * n} completions ({prompts * world_size} prompts)")


def behaviour_note(rollout: Rollout) -> str:
    """The line the run prints at start when the trainer recomputes the old logprobs."""
    return (f"{truncated_sampling(rollout)}: the engine's logprobs are of a truncated distribution the trainer does not "
            "reproduce; the old (behaviour) logprobs of the ratio are recomputed by the trainer before each update "
            "(one forward pass without gradients per batch)")


def off_policy_note(algo: Algo) -> str:
    """The line the run prints at start with algo.off_policy_steps=1."""
    return (f"algo.off_policy_steps={algo.off_policy_steps}: the batch of step k is sampled with the weights of "
            f"step k-1; the trainer recomputes its own logprobs before each update (one forward pass without "
            f"gradients) and weights each token by min(pi_prox / pi_engine, algo.is_cap={algo.is_cap})")


def held_out_share(task, trainer: Trainer, ctx: DistContext) -> List:
    """This rank's share of the held-out prompts (every world_size-th, from its rank on); [] when eval is off."""
    if trainer.eval_every == 0:
        return []
    return task.heldout(trainer.eval_prompts)[ctx.rank::ctx.world_size]


def summarize(history: List[Dict]) -> Dict[str, float]:
    """First and last 10 steps' reward, step count and median sync time of metrics.jsonl's records;
    with the held-out evaluation on, its first (before training) and last exact rate and reward."""
    evals = [h for h in history if "eval/exact" in h]
    history = [h for h in history if "reward/mean" in h]  # the step-0 record holds only the evaluation
    if not history:
        return {}
    k = min(10, len(history))
    first = sum(h["reward/mean"] for h in history[:k]) / k
    last = sum(h["reward/mean"] for h in history[-k:]) / k
    out = {"reward/first10": first, "reward/last10": last, "steps": len(history),
           "sync/total_s_median": sorted(h["sync/total_s"] for h in history)[len(history) // 2]}
    if evals:
        out.update({"eval/exact_first": evals[0]["eval/exact"], "eval/exact_last": evals[-1]["eval/exact"],
                    "eval/reward_first": evals[0]["eval/reward"], "eval/reward_last": evals[-1]["eval/reward"],
                    "eval/first_step": evals[0]["step"], "eval/last_step": evals[-1]["step"]})
    return out


def run(settings: Settings, ctx: DistContext) -> Dict[str, float]:
    """Entry of every rank (recipe/train.py launches it), with the run's settings."""
    from recipe.progress import configure_console

    configure_console(settings.logger.verbose)
    trainer = GRPOTrainer(settings, ctx)
    try:
        summary = trainer.run()
        if settings.trainer.checkpoint_every == 0 or trainer.step % settings.trainer.checkpoint_every:
            trainer.save_checkpoint()  # always leave the final state
        if settings.trainer.export != "none" and trainer.exported != trainer.step:
            trainer.export()  # and the model, ready to load
    finally:
        trainer.close()
    if ctx.is_main:
        from recipe.files import write_atomic

        write_atomic(Path(settings.run_dir) / "summary.json", json.dumps(summary, indent=1))
        print(f"\nrun directory: {settings.run_dir}\nsummary: {json.dumps(summary)}", flush=True)
    return summary
