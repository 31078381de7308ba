"""GRPO: rollout -> reward -> advantage -> update -> sync -> log, one function per phase.

Every rank runs this loop on its own prompts (data parallel): its own engine samples
`rollout.n` completions for each of `trainer.prompts_per_step` prompts, the policy is
sharded across ranks with FSDP, and after each update the weights stream from the shards
into every rank's engine (recipe/sync.py).

The algorithm, as in the GRPO paper (Shao et al., 2024) and as TRL and verl implement it:
- Advantage: for the group of n samples of one prompt with rewards r_1..r_n,
  A_i = (r_i - mean(r)) / (std(r) + eps) with `algo.scale_by_std`, else r_i - mean(r)
  (Dr. GRPO drops the std to avoid favouring easy/hard prompts). Every token of sample i
  gets A_i. A group whose rewards are all equal has A = 0 and contributes no gradient.
- Policy loss per token t: the clipped surrogate of PPO with importance ratio
  rho_t = pi_theta(y_t | y_<t) / pi_rollout(y_t | y_<t), where pi_rollout's logprobs are the
  ones the engine reported while sampling (so engine/trainer drift is corrected, not ignored).
  Both sides use the tempered distribution softmax(logits / T); with top_p < 1 the engine's
  distribution is also truncated while the trainer's is not (as in verl and TRL):
  L_t = -min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A).
- KL (off by default, `algo.kl_coef`): k3 estimator to a frozen reference,
  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (unbiased, always >= 0).
- Entropy bonus (off by default, `algo.entropy_coef`): the loss subtracts entropy_coef x H_t,
  the entropy of the tempered policy at token t, over each completion's first
  `algo.entropy_tokens` tokens (0: all), so the policy keeps sampling different answers.
- Aggregation (`algo.loss_agg`), over the *global* mini-batch (the mini-batches of all ranks
  together): `token_mean` averages L_t over all its completion tokens (long answers weigh
  more); `seq_mean` averages within each sequence first, then over all its sequences (every
  sample weighs the same). The token (or sequence) count is all-reduced, so world 1 and
  world N train the same way on the same global batch (see `backward_mini_batch`).
- Precision: the trainer's logprobs, the loss and the advantages are float32 (the logits come
  in the compute dtype `model.dtype`, as the engine's do, and are cast before log_softmax);
  parameters and AdamW state are in `model.master_dtype` (recipe/model.py).
- `trainer.updates_per_batch` optimizer steps per rollout batch: the batch is split into
  that many mini-batches; the first is on-policy (rho = 1 up to engine drift), later
  ones are slightly off-policy, which the clip bounds.
- Held-out evaluation (`trainer.eval_every` > 0): before training, every eval_every steps and after
  the last step, each rank's engine answers its share of `trainer.eval_prompts` prompts that are
  not in the task's training pool (`Task.heldout`) greedily; `eval/exact` and `eval/reward` are over
  all ranks' prompts. It reads the weights the last sync loaded, and changes no RNG the training uses.
Departures: no value model (GRPO has none); an optional entropy bonus (GRPO has none); rewards come from a
programmatic task (recipe/tasks.py), not a reward model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig

from recipe.dist import DistContext
from recipe.model import token_logprobs


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


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) at the positions that predict tokens 1..T-1: [B, T-1], fp32."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bonus_mask(mask: torch.Tensor, first: int) -> torch.Tensor:
    """`mask` (float, [B, T]) limited to each row's first `first` completion tokens; 0 keeps all."""
    if first <= 0:
        return mask
    return mask * (mask.cumsum(1) <= first).float()


def clipped_surrogate(logp, old_logp, adv, mask, clip_eps: float, loss_agg: str, ref_logp=None, kl_coef=0.0,
                      entropy=None, entropy_coef=0.0, entropy_tokens=0):
    """The GRPO loss of one micro-batch and its stats; see the module docstring.

    The entropy bonus covers each completion's first `entropy_tokens` tokens (0: all of them);
    `stats["entropy"]` sums the entropy over every completion token either way.

    Returns (loss_sum, stats): the sum over tokens (`token_mean`) or of per-sequence token means
    (`seq_mean`); the caller divides by the global mini-batch's token or sequence count.
    """
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + kl_coef * kl
    mask = mask.float()
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy * bonus_mask(mask, entropy_tokens)
    if loss_agg == "token_mean":
        loss_sum = (per_token * mask).sum()
    else:  # seq_mean: each sequence's token mean, summed; normalised by the sequence count
        loss_sum = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {
        "clip_frac": (clipped * mask).sum().item(),
        "kl": (kl * mask).sum().item(),
        "entropy": (entropy.detach() * mask).sum().item() if entropy is not None else 0.0,
        "tokens": mask.sum().item(),
    }
    return loss_sum, stats


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
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attn, old_logp=old,
                                              mask=mask, adv=adv).items()}


def backward_mini_batch(policy, batch: Batch, mini: Sequence[int], cfg: DictConfig, device, world_size: int,
                        reference=None) -> Dict[str, float]:
    """Backpropagate this rank's share of the global mini-batch objective; grads accumulate.

    The objective is J = (sum of L over the global mini-batch) / N, N = the global token count
    (`token_mean`) or sequence count (`seq_mean`), L per token or per sequence as in the module
    docstring. FSDP averages gradients over ranks (its reduce-scatter divides by the world size
    W), so each rank backpropagates W * loss_sum_r / N: the average over ranks of that is
    sum_r loss_sum_r / N = J, and the gradient the optimizer sees is dJ/dtheta.

    Returns this rank's sums: `loss` (its part of J; J is the sum over ranks), `clip_frac` and
    `kl` (sums over tokens), `tokens`, and the on-policy gap of trainer and engine logprobs
    (`gap_sum` over tokens, `gap_max`).
    """
    norm = global_count(local_count(batch, mini, cfg.algo.loss_agg)) / world_size
    stats = dict(loss=0.0, clip_frac=0.0, kl=0.0, entropy=0.0, tokens=0.0, gap_sum=0.0, gap_max=0.0)
    for idx in micro_batches(batch, mini, cfg.trainer.micro_batch_size, cfg.trainer.micro_batch_tokens):
        t = micro_batch_tensors(batch, idx, device)
        logits = policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logp = token_logprobs(logits, t["input_ids"], cfg.rollout.temperature)
        ref_logp = reference_logprobs(reference, t, cfg.rollout.temperature) if reference is not None else None
        with torch.set_grad_enabled(cfg.algo.entropy_coef > 0):  # else only measured
            entropy = token_entropy(logits, cfg.rollout.temperature)
        loss_sum, s = clipped_surrogate(logp, t["old_logp"], t["adv"], t["mask"], cfg.algo.clip_eps,
                                        cfg.algo.loss_agg, ref_logp, cfg.algo.kl_coef, entropy,
                                        cfg.algo.entropy_coef, cfg.algo.entropy_tokens)
        (loss_sum / norm).backward()
        stats["loss"] += loss_sum.item() / (norm * world_size)
        for key in ("clip_frac", "kl", "entropy", "tokens"):
            stats[key] += s[key]
        gap = (logp.detach() - t["old_logp"]).abs() * t["mask"]
        stats["gap_sum"] += gap.sum().item()
        stats["gap_max"] = max(stats["gap_max"], gap.max().item())
    return stats


@torch.no_grad()
def reference_logprobs(reference, t: Dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    logits = reference(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    return token_logprobs(logits, t["input_ids"], temperature)


# ----------------------------------------------------------------------------- phases


class GRPOTrainer:
    """Holds the objects of one rank; `run()` is the loop. Config is read-only here."""

    def __init__(self, cfg: DictConfig, ctx: DistContext):
        from transformers import AutoTokenizer

        from recipe.metrics import MetricsLogger
        from recipe.model import Residency, build_optimizer, build_policy
        from recipe.rollout import build_engine
        from recipe.sync import WeightSync
        from recipe.tasks import build_task

        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.trainer.seed)
        self.model_dir = str(Path(cfg.model.path).expanduser().resolve())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.task = build_task(cfg, self.tokenizer)
        self.eval_prompts = held_out_share(self.task, cfg, ctx)  # [] when trainer.eval_every=0
        self.policy = build_policy(cfg, ctx)
        self.reference = self._build_reference() if cfg.algo.kl_coef > 0 else None
        self.optimizer = build_optimizer(self.policy, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(cfg.trainer.warmup_steps))
        self.residency = Residency(cfg, self.policy, self.optimizer, ctx.device)  # offload=manual: host between phases
        self.engine = build_engine(cfg, ctx, self.model_dir)
        self.sync = WeightSync(cfg, ctx, self.policy, self.engine, self.tokenizer, residency=self.residency)
        self.logger = MetricsLogger(cfg, cfg.run_dir, ctx.rank)
        self.step = 0
        self.resumed = False

    def _build_reference(self):
        from recipe.model import build_policy

        ref = build_policy(self.cfg, self.ctx)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- phase 1: rollout
    def rollout(self, step: int):
        cfg = self.cfg
        prompts = self.task.batch(step * self.ctx.world_size + self.ctx.rank, cfg.trainer.prompts_per_step)
        seed = cfg.trainer.seed * 1_000_003 + step * 1009 + self.ctx.rank
        samples = self.generate(prompts, cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p, seed)
        self.engine.sleep()
        return prompts, samples

    def generate(self, prompts, n: int, temperature: float, top_p: float, seed: int):
        """`n` samples per prompt from the engine (woken first, left awake), up to rollout.max_new_tokens."""
        prompt_ids = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
        self.engine.wake()
        return self.engine.generate(prompt_ids, n=n, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed)

    def decode(self, samples) -> List[str]:
        return [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]

    # -- held-out evaluation
    def eval_due(self) -> bool:
        """Every `trainer.eval_every` steps (step 0 = before training) and after the last step."""
        every = self.cfg.trainer.eval_every
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.trainer.steps)

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
        n = self.cfg.rollout.n
        texts = self.decode(samples)
        rewards = torch.tensor([self.task.reward(prompts[i // n], t) for i, t in enumerate(texts)])
        correct = torch.tensor([float(self.task.correct(prompts[i // n], t)) for i, t in enumerate(texts)])
        return rewards, correct, texts

    # -- phase 3: advantage
    def make_batch(self, samples, rewards, correct) -> Batch:
        adv = group_advantages(rewards, self.cfg.rollout.n, self.cfg.algo.scale_by_std)
        return Batch(
            input_ids=[list(s.prompt_token_ids) + list(s.token_ids) for s in samples],
            prompt_lens=[len(s.prompt_token_ids) for s in samples],
            old_logprobs=[list(s.logprobs) for s in samples],
            rewards=rewards, advantages=adv, correct=correct,
            completion_lens=torch.tensor([float(len(s.token_ids)) for s in samples]),
        )

    # -- phase 4: update
    def update(self, batch: Batch) -> Dict[str, float]:
        cfg = self.cfg
        self.residency.to_device()  # offload=manual: parameters and optimizer state to the device for the update
        self.policy.train()
        order = list(range(len(batch.input_ids)))
        random.Random(cfg.trainer.seed + self.step).shuffle(order)
        minis = [order[i::cfg.trainer.updates_per_batch] for i in range(cfg.trainer.updates_per_batch)]
        t0 = time.perf_counter()
        per_mini = [self._optimizer_step(batch, mini) for mini in minis]
        t_update = time.perf_counter() - t0  # forward, backward and optimizer steps
        self.residency.to_host()
        return {**self._update_metrics(per_mini), "time/update_s": t_update}

    def _optimizer_step(self, batch: Batch, mini: List[int]) -> Dict[str, float]:
        stats = backward_mini_batch(self.policy, batch, mini, self.cfg, self.ctx.device, self.ctx.world_size,
                                    self.reference)
        self._check_finite(stats["loss"], "loss")
        stats["grad_norm"] = self._clip_grad()
        self._check_finite(stats["grad_norm"], "gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats

    def _update_metrics(self, per_mini: List[Dict[str, float]]) -> Dict[str, float]:
        """Global (all-ranks) update metrics; the logprob gap is of the first, on-policy mini-batch."""
        keys = ("loss", "clip_frac", "kl", "entropy", "tokens")
        sums = torch.tensor([[s[k] for k in keys] for s in per_mini], dtype=torch.float64)
        first = torch.tensor([per_mini[0]["gap_sum"], per_mini[0]["tokens"]], dtype=torch.float64)
        gap_max = torch.tensor([per_mini[0]["gap_max"]], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(first)
        dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
        loss, clip, kl, entropy, tokens = sums.sum(0).tolist()
        tokens = max(tokens, 1.0)
        return {
            "train/loss": loss / len(per_mini),  # the objective J, mean over the mini-batches
            "train/grad_norm": sum(s["grad_norm"] for s in per_mini) / len(per_mini),
            "train/clip_frac": clip / tokens,
            "train/kl": kl / tokens,
            "train/entropy": entropy / tokens,  # of the trainer's tempered distribution, per completion token
            "train/lr": self.scheduler.get_last_lr()[0],
            # |log pi_trainer - log pi_engine| on the first (on-policy) mini-batch: the drift
            "train/logprob_gap": first[0].item() / max(first[1].item(), 1.0),
            "train/logprob_gap_max": gap_max.item(),
        }

    def _clip_grad(self) -> float:
        from recipe.model import clip_grad_norm

        return clip_grad_norm(self.policy, self.cfg.trainer.grad_clip)

    def _check_finite(self, value: float, what: str) -> None:
        """All ranks agree before anyone raises, so a NaN on one rank cannot hang the others."""
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            raise NonFiniteError(f"non-finite {what} at step {self.step} (this rank: {value}); stopping the run")

    # -- checkpoints
    def save_checkpoint(self) -> None:
        from recipe.checkpoint import save

        cfg = self.cfg
        counters = {"weight_version": self.sync.weight_version, "num_syncs": self.sync.num_syncs}
        save(Path(cfg.run_dir) / "checkpoints", self.policy, self.optimizer, self.scheduler, self.step, self.ctx,
             state=counters, keep=cfg.trainer.keep_checkpoints, residency=self.residency)

    def maybe_resume(self) -> None:
        """With trainer.resume: model, optimizer, scheduler, RNG, step and weight version from the
        newest complete checkpoint; metrics.jsonl loses the records after that step."""
        from recipe.checkpoint import load, latest

        if not self.cfg.trainer.resume or self.resumed:
            return
        path = latest(Path(self.cfg.run_dir) / "checkpoints")
        if path is None:  # stopped before its first checkpoint: it starts again from step 0, in place
            self.logger.rewind(-1)
            self.resumed = True
            return
        loaded = load(path, self.policy, self.optimizer, self.scheduler, self.ctx, residency=self.residency)
        self.step, counters = loaded["step"], loaded["state"]
        if counters:  # (checkpoints written before the counters were saved have none)
            # The first sync after resume loads the checkpoint's weights again: it remakes the saved version.
            self.sync.weight_version = counters["weight_version"] - 1
            self.sync.num_syncs = counters["num_syncs"] - 1
        self.logger.rewind(self.step)
        self.resumed = True

    # -- the loop
    def run(self) -> Dict[str, float]:
        from recipe.profiling import StepProfiler, phase
        from recipe.progress import Progress

        cfg = self.cfg
        self.maybe_resume()
        self.sync.sync(self.step)  # engine starts from the trainer's weights (and loads the adapter base)
        progress = Progress(cfg.trainer.steps, initial=self.step, enabled=self.ctx.is_main)
        if self.step == 0 and self.eval_due():
            before = self.evaluate()  # 0. held-out accuracy before training
            self.logger.log(before, step=0)
            progress.update(before)
        profiler = StepProfiler(cfg, self.ctx, self.step)  # trainer.profile_steps > 0: steps 2.. under torch.profiler
        while self.step < cfg.trainer.steps:
            profiler.step_begins(self.step)
            t0 = time.perf_counter()
            with phase("rollout"):
                prompts, samples = self.rollout(self.step)  # 1. rollout
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
        progress.close()
        return summarize(self.logger.records())  # the whole run, across resumes (rank 0; {} elsewhere)

    def metrics(self, batch, train_stats, sync_stats, t_rollout, t_step, texts):
        """Per-step metrics, averaged over ranks (reward, accuracy, lengths) so rank 0 logs the global view."""
        local = torch.tensor([batch.rewards.mean().item(), batch.rewards.std().item(), batch.correct.mean().item(),
                              batch.completion_lens.mean().item(), batch.completion_lens.sum().item() / t_rollout])
        dist.all_reduce(local)
        local /= self.ctx.world_size
        reward, reward_std, acc, length, tok_s = local.tolist()
        return {
            "reward/mean": reward, "reward/std": reward_std, "reward/accuracy": acc,
            "rollout/response_length": length, "rollout/tokens_per_s": tok_s * self.ctx.world_size,
            "rollout/time_s": t_rollout, "rollout/example": texts[0],
            "time/step_s": t_step, **train_stats, **sync_stats, **self.engine.memory_stats(),
        }

    def close(self) -> None:
        self.logger.close()
        self.engine.close()


def held_out_share(task, cfg: DictConfig, ctx: DistContext) -> List:
    """This rank's share of the held-out prompts (every world_size-th, from its rank on); [] when eval is off."""
    if cfg.trainer.eval_every == 0:
        return []
    return task.heldout(cfg.trainer.eval_prompts)[ctx.rank::ctx.world_size]


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


def run(cfg: DictConfig, ctx: DistContext) -> Dict[str, float]:
    """Entry of every rank (recipe/train.py launches it)."""
    from recipe.progress import configure_console

    configure_console(cfg.logger.verbose)
    trainer = GRPOTrainer(cfg, ctx)
    try:
        summary = trainer.run()
        if cfg.trainer.checkpoint_every == 0 or trainer.step % cfg.trainer.checkpoint_every:
            trainer.save_checkpoint()  # always leave the final state
    finally:
        trainer.close()
    if ctx.is_main:
        from recipe.files import write_atomic

        write_atomic(Path(cfg.run_dir) / "summary.json", json.dumps(summary, indent=1))
        print(f"\nrun directory: {cfg.run_dir}\nsummary: {json.dumps(summary)}", flush=True)
    return summary
