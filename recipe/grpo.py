"""GRPO: rollout -> reward -> advantage -> update -> sync -> log, one function per phase.

Every rank runs this loop on its own prompts (data parallel): its own engine samples
`rollout.n` completions for each of `trainer.prompts_per_step` prompts (per rank), the policy is
sharded across ranks with FSDP, and after each update the weights stream from the shards
into every rank's engine (recipe/sync.py).

The objective (advantages, the clipped surrogate, the off-policy importance weight, KL, entropy bonus,
aggregation) and its derivation are in recipe/loss.py; the batch, its micro-batches and the counts all
ranks agree on in recipe/batch.py; the update's passes over the policy (the backward of a mini-batch, the
recompute of the old logprobs) in recipe/update.py. Here, the order of the phases and what they log:
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
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from recipe.batch import Batch
from recipe.dist import DistContext, agree
from recipe.loss import group_advantages
from recipe.metrics import peak_flops, throughput, train_flops_per_token
from recipe.profiling import DeviceBusy
from recipe.settings import Algo, Rollout, Settings, Trainer
from recipe.model import micro_batch_tokens
from recipe.update import backward_mini_batch, behaviour_logprobs, truncated_sampling


class NonFiniteError(RuntimeError):
    """Loss or reward is NaN/inf: the run stops rather than train on garbage."""


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


@dataclass
class Pending:
    """A batch handed to the engine: its step, prompts, the engine's handle (`.result()` -> samples), the
    weight version the engine held at the submit, and when it was submitted (perf_counter)."""

    step: int
    prompts: List
    handle: object
    version: int
    since: float


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
        settings = dataclasses.replace(
            settings, trainer=dataclasses.replace(settings.trainer, micro_batch_tokens=micro_batch_tokens(settings))
        )
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
        self.residency = Residency(
            cfg.offload, self.policy, self.optimizer, ctx.device
        )  # offload=manual: host between phases
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
        handle = self.engine.submit(
            prompt_ids,
            n=cfg.rollout.n,
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=seed,
        )
        self.engine.sleep()
        return Pending(step, prompts, handle, self.sync.weight_version, since)

    def collect(self, pending: Pending):
        """(prompts, samples, stats) of a submitted batch: `time/rollout_wait_s`, the seconds from the step's
        start (or the submit, if later) until the samples were in hand, and `rollout/staleness`, how many
        weight versions the engine's were behind the trainer's when they were sampled (0 or 1)."""
        samples = pending.handle.result()
        stats = {
            "time/rollout_wait_s": time.perf_counter() - max(pending.since, self.step_began),
            "rollout/staleness": self.sync.weight_version - pending.version,
        }
        return pending.prompts, samples, stats

    def generate(self, prompts, n: int, temperature: float, top_p: float, seed: int):
        """`n` samples per prompt from the engine (woken first, left awake), up to rollout.max_new_tokens. An
        engine that keeps order generates them after whatever was submitted and loaded before."""
        prompt_ids = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
        self.engine.wake()
        return self.engine.generate(
            prompt_ids,
            n=n,
            max_new_tokens=self.settings.rollout.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

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
        sums = torch.tensor(
            [
                sum(float(self.task.correct(p, t)) for p, t in pairs),
                sum(self.task.reward(p, t) for p, t in pairs),
                float(len(pairs)),
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(sums)
        exact, reward, count = sums.tolist()
        return {
            "eval/exact": exact / count,
            "eval/reward": reward / count,
            "eval/prompts": count,
            "eval/time_s": time.perf_counter() - t0,
            "eval/example": texts[0],
        }

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
            rewards=rewards,
            advantages=adv,
            correct=correct,
            completion_lens=torch.tensor([float(len(s.token_ids)) for s in samples]),
        )

    # -- phase 4: update
    def update(self, batch: Batch) -> Dict[str, float]:
        cfg = self.settings
        self.residency.to_device()  # offload=manual: parameters and optimizer state to the device for the update
        self.policy.train()
        order = list(range(len(batch.input_ids)))
        random.Random(cfg.trainer.seed + self.step).shuffle(order)
        minis = [order[i :: cfg.trainer.updates_per_batch] for i in range(cfg.trainer.updates_per_batch)]
        busy = DeviceBusy(self.ctx.device)  # CUDA: events around each optimizer step's device work
        t0 = time.perf_counter()
        gap = None  # the trainer-engine gap: of the first mini-batch, or of the recomputation
        if truncated_sampling(cfg.rollout) or cfg.algo.off_policy_steps > 0:
            proximal, gap = behaviour_logprobs(
                self.policy, batch, minis, cfg.trainer, cfg.rollout.temperature, self.ctx.device
            )
            if cfg.algo.off_policy_steps > 0:  # the engine's logprobs weight each token (recipe/loss.py)
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
        stats = backward_mini_batch(
            self.policy,
            batch,
            mini,
            self.settings.algo,
            self.settings.trainer,
            self.settings.rollout.temperature,
            self.ctx.device,
            self.ctx.world_size,
            self.reference,
        )
        self._check_finite(stats["loss"], "loss")
        stats["grad_norm"] = self._clip_grad()
        self._check_finite(stats["grad_norm"], "gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats

    def _update_metrics(
        self, per_mini: List[Dict[str, float]], gap: Optional[Dict[str, float]] = None
    ) -> Dict[str, float]:
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
        agree(
            None if math.isfinite(value) else f"non-finite {what} at step {self.step} ({value}); stopping the run",
            NonFiniteError,
        )

    # -- checkpoints
    def save_checkpoint(self) -> None:
        from recipe.checkpoint import save

        cfg = self.settings
        counters = {"weight_version": self.sync.weight_version, "num_syncs": self.sync.num_syncs}
        save(
            Path(cfg.run_dir) / "checkpoints",
            self.policy,
            self.optimizer,
            self.scheduler,
            self.step,
            self.ctx,
            state=counters,
            keep=cfg.trainer.keep_checkpoints,
            residency=self.residency,
            base=self.lora_base,
        )

    def export(self) -> None:
        """The policy of this step as a Hugging Face (and, for LoRA, PEFT) directory (recipe/export.py)."""
        from recipe.export import export, export_dir

        out = export_dir(self.settings.run_dir, self.step)
        t0 = time.perf_counter()
        export(self.policy, self.settings, self.ctx, out, self.step, self.settings.run_dir)
        self.exported = self.step
        if self.ctx.is_main:
            size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
            print(
                f"exported step {self.step} to {out} ({size / 1e6:,.1f} MB in {time.perf_counter() - t0:.2f} s)",
                flush=True,
            )

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
        loaded = load(
            path, self.policy, self.optimizer, self.scheduler, self.ctx, residency=self.residency, base=self.lora_base
        )
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
        profiler = StepProfiler(
            cfg.trainer, cfg.run_dir, self.ctx, self.step
        )  # trainer.profile_steps > 0: steps 2.. under torch.profiler
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
        local = torch.tensor(
            [
                batch.rewards.mean().item(),
                batch.rewards.std().item(),
                batch.correct.mean().item(),
                batch.completion_lens.mean().item(),
                batch.completion_lens.sum().item() / t_rollout,
            ]
        )
        tokens = torch.tensor(
            [batch.completion_lens.sum().item(), float(sum(len(ids) for ids in batch.input_ids))], dtype=torch.float64
        )  # generated, trained (prompt + completion) tokens
        dist.all_reduce(local)
        dist.all_reduce(tokens)
        local /= self.ctx.world_size
        reward, reward_std, acc, length, tok_s = local.tolist()
        generated, trained = tokens.tolist()
        perf = throughput(
            generated,
            trained,
            t_rollout,
            train_stats["time/update_s"],
            self.flops_per_token,
            self.ctx.world_size,
            self.peak_flops,
        )
        return {
            "reward/mean": reward,
            "reward/std": reward_std,
            "reward/accuracy": acc,
            "rollout/response_length": length,
            "rollout/tokens_per_s": tok_s * self.ctx.world_size,
            "rollout/time_s": t_rollout,
            "rollout/example": texts[0],
            "time/step_s": t_step,
            **train_stats,
            **perf,
            **sync_stats,
            **self.engine.memory_stats(),
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
    return (
        f"batch per step: {prompts} prompts per rank x {world_size} ranks x {n} samples (rollout.n) = "
        f"{prompts * world_size * n} completions ({prompts * world_size} prompts)"
    )


def behaviour_note(rollout: Rollout) -> str:
    """The line the run prints at start when the trainer recomputes the old logprobs."""
    return (
        f"{truncated_sampling(rollout)}: the engine's logprobs are of a truncated distribution the trainer does not "
        "reproduce; the old (behaviour) logprobs of the ratio are recomputed by the trainer before each update "
        "(one forward pass without gradients per batch)"
    )


def off_policy_note(algo: Algo) -> str:
    """The line the run prints at start with algo.off_policy_steps=1."""
    return (
        f"algo.off_policy_steps={algo.off_policy_steps}: the batch of step k is sampled with the weights of "
        f"step k-1; the trainer recomputes its own logprobs before each update (one forward pass without "
        f"gradients) and weights each token by min(pi_prox / pi_engine, algo.is_cap={algo.is_cap})"
    )


def held_out_share(task, trainer: Trainer, ctx: DistContext) -> List:
    """This rank's share of the held-out prompts (every world_size-th, from its rank on); [] when eval is off."""
    if trainer.eval_every == 0:
        return []
    return task.heldout(trainer.eval_prompts)[ctx.rank :: ctx.world_size]


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
    out = {
        "reward/first10": first,
        "reward/last10": last,
        "steps": len(history),
        "sync/total_s_median": sorted(h["sync/total_s"] for h in history)[len(history) // 2],
    }
    if evals:
        out.update(
            {
                "eval/exact_first": evals[0]["eval/exact"],
                "eval/exact_last": evals[-1]["eval/exact"],
                "eval/reward_first": evals[0]["eval/reward"],
                "eval/reward_last": evals[-1]["eval/reward"],
                "eval/first_step": evals[0]["step"],
                "eval/last_step": evals[-1]["step"],
            }
        )
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
