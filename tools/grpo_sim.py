"""A single-process GRPO loop on the tiny model for quick hyperparameter probes (no vLLM, no FSDP):
sampling by plain forward passes, then the recipe's own update math (`group_advantages`,
`micro_batch_tensors`, `token_logprobs`, `token_entropy`, `clipped_surrogate`) with AdamW, the
2-step warm-up and gradient clip 1.0 as the recipe uses them, on the prompts world 1 would see.
Not a benchmark and not the recipe: it exists to try many settings in a minute each
(docs/LEARNING.md has what it found). Every 50 steps it also prints the greedy exact rate over
every distinct prompt of the pool.

    python -m tools.grpo_sim --steps 200 --ent 0.3 --out /tmp/ent03.jsonl
    python -m tools.grpo_sim --steps 200 --reward exact --task '{"close_window": 1}'
    python -m tools.grpo_sim --steps 600 --ent 0.3 --ent-tokens 3 --tokens 4 --task '{"digit_credit": 0.5}'  # make train
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from recipe.batch import Batch, micro_batch_tensors
from recipe.logprobs import token_entropy, token_logprobs
from recipe.loss import clipped_surrogate, group_advantages
from recipe.tasks import Arithmetic, parse_leading_int


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per batch")
    p.add_argument("--scale", type=int, default=1, help="1: std-scaled advantages; 0: mean-centred (Dr. GRPO)")
    p.add_argument("--ent", type=float, default=0.0, help="entropy bonus (algo.entropy_coef)")
    p.add_argument(
        "--ent-schedule",
        default="const",
        choices=["const", "linear", "cosine", "acc"],
        help="the bonus over the run: constant, decaying to --ent-end by the last step (linear, "
        "cosine), or --ent x (1 - exact rate, moving average) (acc); the recipe has constant only",
    )
    p.add_argument("--ent-end", type=float, default=0.0)
    p.add_argument(
        "--ent-tokens",
        type=int,
        default=0,
        help="the bonus on each completion's first N tokens (algo.entropy_tokens; 0: all)",
    )
    p.add_argument(
        "--lr-schedule",
        default="const",
        choices=["const", "linear", "cosine"],
        help="after the warm-up: constant (the recipe's), or decaying to 0 by the last step",
    )
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--agg", default="token_mean", choices=["token_mean", "seq_mean"])
    p.add_argument("--tokens", type=int, default=8, help="max new tokens")
    p.add_argument("--task", default="{}", help="Arithmetic params as JSON")
    p.add_argument(
        "--reward",
        default="shaped",
        choices=["shaped", "exact", "exact1"],
        help="shaped: the task's reward; exact: 0.5 + 0.5 x stop credit for the exact answer only; "
        "exact1: 1 for the exact answer, else 0",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=os.path.join(os.environ.get("GRPO_CACHE", ".cache"), "models", "tiny"))
    p.add_argument("--save", default="", help="save the final model (and tokenizer) here")
    p.add_argument("--out", default="", help="write one JSON line per step here")
    return p.parse_args(argv)


def make_task(args) -> Arithmetic:
    task = Arithmetic(seed=0, num_prompts=512, **json.loads(args.task))
    if args.reward == "exact":

        def reward(prompt, text):
            lead = parse_leading_int(text)
            if lead is None or lead[0] != int(prompt.answer):
                return 0.0
            return 0.5 + 0.5 * max(0.0, 1 - (len(text) - lead[1]) / task.stop_window)

        task.reward = reward
    elif args.reward == "exact1":
        task.reward = lambda prompt, text: float(task.correct(prompt, text))
    return task


@torch.no_grad()
def sample(model, prompt_ids, max_new_tokens: int, temperature: float, gen):
    """Sequences (prompt + completion, EOS included) and the sampling logprob of every completion token."""
    seqs, logprobs = [list(p) for p in prompt_ids], [[] for _ in prompt_ids]
    alive = list(range(len(seqs)))
    for _ in range(max_new_tokens):
        if not alive:
            break
        lens = torch.tensor([len(seqs[i]) for i in alive])
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(seqs[i]) for i in alive], batch_first=True)
        attn = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        lp = torch.log_softmax(logits[torch.arange(len(alive)), lens - 1] / temperature, -1)
        nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
        for j, i in enumerate(alive):
            seqs[i].append(nxt[j].item())
            logprobs[i].append(lp[j, nxt[j]].item())
        alive = [i for j, i in enumerate(alive) if nxt[j].item() != 1]  # 1 = EOS of the tiny model
    return seqs, logprobs


def decay(kind: str, frac: float) -> float:
    """1 -> 0 as frac goes 0 -> 1 (linear or cosine); 1 throughout for "const"."""
    if kind == "linear":
        return 1.0 - frac
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


def ent_coef(args, step: int, acc: float) -> float:
    if args.ent_schedule == "acc":
        return args.ent * (1 - acc)
    return args.ent_end + (args.ent - args.ent_end) * decay(args.ent_schedule, step / args.steps)


def lr_lambda(args):
    total = args.steps * args.updates
    return lambda s: min(1.0, (s + 1) / 2) * decay(args.lr_schedule, min(1.0, s / total))


@torch.no_grad()
def greedy_accuracy(model, tok, task) -> float:
    """Exact rate of greedy (argmax) answers over every distinct prompt of the pool."""
    prompts = list({p.text: p for p in task.pool}.values())
    ids = [tok(p.text, add_special_tokens=False).input_ids for p in prompts]
    seqs, _ = sample(model, ids, 4, 1e-4, torch.Generator().manual_seed(0))
    texts = [tok.decode(s[len(i) :], skip_special_tokens=True) for s, i in zip(seqs, ids)]
    return sum(task.correct(p, t) for p, t in zip(prompts, texts)) / len(prompts)


def update(model, opt, sched, batch: Batch, args, step: int, coef: float) -> float:
    """`args.updates` optimizer steps over the shuffled batch; returns the mean token entropy."""
    order = list(range(len(batch.input_ids)))
    random.Random(step).shuffle(order)
    entropy = []
    for u in range(args.updates):
        t = micro_batch_tensors(batch, order[u :: args.updates], "cpu")
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logp, ent = token_logprobs(logits, t["input_ids"], args.temp), token_entropy(logits, args.temp)
        loss_sum, stats = clipped_surrogate(
            logp,
            t["old_logp"],
            t["adv"],
            t["mask"],
            0.2,
            args.agg,
            entropy=ent,
            entropy_coef=coef,
            entropy_tokens=args.ent_tokens,
        )
        norm = len(t["adv"]) if args.agg == "seq_mean" else max(float(stats["tokens"]), 1.0)
        (loss_sum / norm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        entropy.append(float(stats["entropy"] / stats["tokens"]))
    return sum(entropy) / len(entropy)


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    task = make_task(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    acc_ema = 0.0
    gen = torch.Generator().manual_seed(args.seed)
    history, t0 = [], time.time()
    for step in range(args.steps):
        prompts = task.batch(step, args.prompts)
        prompt_ids = [tok(p.text, add_special_tokens=False).input_ids for p in prompts for _ in range(args.n)]
        seqs, logprobs = sample(model, prompt_ids, args.tokens, args.temp, gen)
        texts = [tok.decode(s[len(p) :], skip_special_tokens=True) for s, p in zip(seqs, prompt_ids)]
        rewards = torch.tensor([task.reward(prompts[i // args.n], t) for i, t in enumerate(texts)])
        correct = torch.tensor([float(task.correct(prompts[i // args.n], t)) for i, t in enumerate(texts)])
        batch = Batch(
            input_ids=seqs,
            prompt_lens=[len(p) for p in prompt_ids],
            old_logprobs=logprobs,
            rewards=rewards,
            advantages=group_advantages(rewards, args.n, bool(args.scale)),
            correct=correct,
            completion_lens=torch.zeros(len(seqs)),
        )
        acc_ema = 0.9 * acc_ema + 0.1 * correct.mean().item() if step else correct.mean().item()
        coef = ent_coef(args, step, acc_ema)
        entropy = update(model, opt, sched, batch, args, step, coef)
        history.append(
            {
                "step": step + 1,
                "reward/mean": rewards.mean().item(),
                "reward/accuracy": correct.mean().item(),
                "train/entropy": entropy,
            }
        )
        if (step + 1) % 50 == 0:
            history[-1]["greedy"] = greedy_accuracy(model, tok, task)
            print(f"step {step + 1} greedy {history[-1]['greedy']:.3f}", flush=True)
        if (step + 1) % 25 == 0:
            last = history[-25:]
            mean = {k: sum(h[k] for h in last) / len(last) for k in ("reward/accuracy", "reward/mean", "train/entropy")}
            print(
                f"step {step + 1} acc {mean['reward/accuracy']:.3f} rew {mean['reward/mean']:.3f} "
                f"ent {mean['train/entropy']:.3f} coef {coef:.3f} ex {texts[0]!r} t={time.time() - t0:.0f}s",
                flush=True,
            )
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)


if __name__ == "__main__":
    main()
