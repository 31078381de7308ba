"""Time the GRPO update alone (no engine, no rollout) on a synthetic batch of a real shape.

    python -m tools.update_bench /tmp/m/q15 --seqs 256 --prompt-len 28 --new-tokens 512 --steps 3 --profile \
        trainer.micro_batch_tokens=16384

The update is `GRPOTrainer.update` itself, on the policy, optimizer and residency the trainer builds
(`recipe.model`), over a batch of random token ids with `--new-tokens` completion tokens each: the
same forwards, backwards and optimizer steps as a run whose answers are that long, without the
minutes an engine takes to start. Prints, per step, the update's wall time, trained tokens/s, its MFU
(6 x trainable parameters x tokens / time / `--peak-tflops`; LoRA: + 4 x the frozen base) and the
trainer's peak memory; with `--profile` the last step runs under torch.profiler: the share of its
wall time the device is busy (the union of kernel and copy intervals), the kernel count, and the top
kernels and host operators. Trailing arguments are config overrides, as for `python -m recipe.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time


def build(overrides, model: str, device: str = "cuda"):
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import recipe.config  # noqa: F401  registers the schema
    from recipe.dist import free_port, init_process_group
    from recipe.grpo import GRPOTrainer
    from recipe.model import Residency, build_optimizer, build_policy, micro_batch_tokens, parameter_counts
    from recipe.settings import Settings

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        where = ["model=tiny"] if model == "tiny" else ["model=local", f"model.path={model}"]
        cfg = compose(
            config_name="train",
            overrides=[*where, f"trainer.device={device}", "trainer.world_size=1", "logger=none", *overrides],
        )
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ctx = init_process_group(device, int(cfg.trainer.timeout_s))
    with open_dict(cfg):
        cfg.run_dir = "/tmp/update_bench"
    settings = Settings.from_cfg(cfg)
    settings = dataclasses.replace(
        settings, trainer=dataclasses.replace(settings.trainer, micro_batch_tokens=micro_batch_tokens(settings))
    )  # as GRPOTrainer resolves it
    # the update's own state, as GRPOTrainer.__init__ builds it, without the engine
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.settings, trainer.ctx, trainer.step, trainer.reference = settings, ctx, 0, None
    trainer.policy = build_policy(settings.policy, ctx)
    trainer.optimizer = build_optimizer(trainer.policy, settings.policy)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    trainer.residency = Residency(settings.offload, trainer.policy, trainer.optimizer, ctx.device)
    return trainer, parameter_counts(settings.policy)  # (all, trainable)


def synthetic_batch(seqs: int, prompt_len: int, new_tokens: int, vocab: int, seed: int):
    import torch

    from recipe.batch import Batch

    rng = random.Random(seed)
    ids = [[rng.randrange(vocab) for _ in range(prompt_len + new_tokens)] for _ in range(seqs)]
    old = [[0.0] * new_tokens for _ in range(seqs)]  # replaced by the policy's own (main)
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        input_ids=ids,
        prompt_lens=[prompt_len] * seqs,
        old_logprobs=old,
        rewards=torch.zeros(seqs),
        advantages=torch.randn(seqs, generator=gen),
        correct=torch.zeros(seqs),
        completion_lens=torch.full((seqs,), float(new_tokens)),
    )


def device_busy(events, wall_us: float):
    """(busy share of `wall_us`, kernel count, {kernel: total us}) from torch.profiler's events."""
    from torch.autograd import DeviceType

    spans, per = [], {}
    for e in events:
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False):
            spans.append((e.time_range.start, e.time_range.end))
            per[e.name] = per.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    busy, end = 0.0, float("-inf")
    for s, e in sorted(spans):  # the union of the intervals
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / wall_us, len(spans), per


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (tools.make_random_model), or `tiny`")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--seqs", type=int, default=256, help="sequences per batch (prompts x completions)")
    p.add_argument("--prompt-len", type=int, default=28)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="updates timed (the first pays for warm-up)")
    p.add_argument("--profile", action="store_true", help="the last step under torch.profiler")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200/H100 SXM: 989)")
    p.add_argument("--label", default="")
    args, overrides = p.parse_known_args(argv)
    import torch

    cuda = args.device == "cuda"
    trainer, (total, trainable) = build(overrides, args.model, args.device)
    # ids of the tiny tokenizer (every checkpoint here has them); the logits span the whole vocabulary
    batch = synthetic_batch(args.seqs, args.prompt_len, args.new_tokens, 64, trainer.settings.trainer.seed)
    # the engine's logprobs stand-in: the policy's own (an on-policy first mini-batch, ratio 1, as in a run)
    from recipe.update import behaviour_logprobs

    batch.old_logprobs = behaviour_logprobs(
        trainer.policy,
        batch,
        [list(range(args.seqs))],
        trainer.settings.trainer,
        trainer.settings.rollout.temperature,
        trainer.ctx.device,
    )[0]
    bad = sum(not math.isfinite(lp) for row in batch.old_logprobs for lp in row)
    if bad:
        print(f"{bad} non-finite logprobs of the policy on the synthetic batch (the forward overflows)")
    tokens = sum(len(x) for x in batch.input_ids)
    flops = (6 * trainable + 4 * (total - trainable)) * tokens
    label = args.label or " ".join(overrides) or "defaults"
    limit = trainer.settings.trainer.micro_batch_tokens  # the limit the update cuts with (null: resolved per device)
    print(f"[{label}] micro_batch_tokens {limit}, {tokens} tokens per update")
    for step in range(args.steps):
        prof = None
        if args.profile and step == args.steps - 1:
            prof = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    *([torch.profiler.ProfilerActivity.CUDA] if cuda else []),
                ]
            )
            prof.__enter__()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = trainer.update(batch)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        trainer.step += 1
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        print(
            f"[{label}] step {step + 1}: update {wall:.3f} s, {tokens / wall:,.0f} trained tok/s, "
            f"MFU {flops / wall / args.peak_tflops / 1e12:.1%}, peak {peak:.1f} GiB, loss {stats['train/loss']:.4f}",
            flush=True,
        )
        if prof is not None:
            prof.__exit__(None, None, None)
            share, count, per = device_busy(prof.events(), wall * 1e6)
            print(
                f"[{label}] profiled step: device busy {share:.0%} of the wall (profiler overhead included), "
                f"{count} kernels and copies"
            )
            for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:12]:
                print(f"    {us / 1e6:8.3f} s  {name[:110]}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
