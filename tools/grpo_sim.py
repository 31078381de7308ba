"""A single-process GRPO loop on the tiny model for quick hyperparameter probes (no vLLM, no FSDP):
sampling by plain forward passes, then the recipe's own update math (`group_advantages`,
`micro_batch_tensors`, `token_logprobs`, `token_entropy`, `clipped_surrogate`) with AdamW, the
2-step warm-up and gradient clip 1.0 as the recipe uses them. Not a benchmark and not the recipe:
it exists to try many settings in a minute each (docs/LEARNING.md).

    python -m tools.grpo_sim --steps 200 --ent 0.3 --out /tmp/ent03.jsonl
    python -m tools.grpo_sim --steps 200 --reward exact --task '{"close_window": 1}'
"""
import argparse
import json
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from recipe.grpo import Batch, group_advantages, clipped_surrogate, token_logprobs, token_entropy, micro_batch_tensors
from recipe.tasks import Arithmetic
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200); p.add_argument("--prompts", type=int, default=32); p.add_argument("--n", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--updates", type=int, default=2); p.add_argument("--scale", type=int, default=1)
p.add_argument("--ent", type=float, default=0.0); p.add_argument("--temp", type=float, default=1.0); p.add_argument("--tokens", type=int, default=8)
p.add_argument("--task", default="{}"); p.add_argument("--seed", type=int, default=0); p.add_argument("--out", default="")
p.add_argument("--reward", default="shaped", choices=["shaped", "exact", "exact1"],
               help="shaped: the task's reward; exact: 0.5 + 0.5 x stop credit for the exact answer only; exact1: 0/1")
p.add_argument("--model", default=os.path.join(os.environ.get("GRPO_CACHE", ".cache"), "models", "tiny"))
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
path = a.model
tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
task = Arithmetic(seed=0, num_prompts=512, **json.loads(a.task))
if a.reward == "exact":
    from recipe.tasks import parse_leading_int
    def rew(prompt, c):
        lead = parse_leading_int(c)
        if lead is None or lead[0] != int(prompt.answer): return 0.0
        return 0.5 + 0.5 * max(0.0, 1 - (len(c) - lead[1]) / 12)
    task.reward = rew
if a.reward == "exact1":
    task.reward = lambda prompt, c: float(task.correct(prompt, c))
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
gen = torch.Generator().manual_seed(a.seed)
@torch.no_grad()
def sample(prompt_ids):
    B = len(prompt_ids); L = len(prompt_ids[0])  # all prompts of a step padded? lengths vary: left-pad not supported; do per length bucket
    seqs = [list(p) for p in prompt_ids]; lps = [[] for _ in range(B)]; done = [False]*B
    for t in range(a.tokens):
        alive = [i for i in range(B) if not done[i]]
        if not alive: break
        width = max(len(seqs[i]) for i in alive)
        ids = torch.tensor([seqs[i] + [0]*(width-len(seqs[i])) for i in alive]); att = (ids != 0) | (torch.arange(width)[None] < torch.tensor([len(seqs[i]) for i in alive])[:, None])
        logits = model(input_ids=ids, attention_mask=att.long()).logits.float()
        last = logits[torch.arange(len(alive)), torch.tensor([len(seqs[i]) - 1 for i in alive])] / a.temp
        lp = torch.log_softmax(last, -1); nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
        for j, i in enumerate(alive):
            seqs[i].append(nxt[j].item()); lps[i].append(lp[j, nxt[j]].item())
            if nxt[j].item() == 1: done[i] = True
    return seqs, lps
hist = []
t_start = time.time()
for step in range(a.steps):
    prompts = task.batch(step, a.prompts)
    pids = [tok(pr.text, add_special_tokens=False).input_ids for pr in prompts for _ in range(a.n)]
    seqs, lps = sample(pids)
    texts = [tok.decode(s[len(p):], skip_special_tokens=True) for s, p in zip(seqs, pids)]
    rewards = torch.tensor([task.reward(prompts[i // a.n], t) for i, t in enumerate(texts)])
    correct = torch.tensor([float(task.correct(prompts[i // a.n], t)) for i, t in enumerate(texts)])
    adv = group_advantages(rewards, a.n, bool(a.scale))
    batch = Batch(input_ids=seqs, prompt_lens=[len(p) for p in pids], old_logprobs=lps, rewards=rewards, advantages=adv, correct=correct, completion_lens=torch.zeros(len(seqs)))
    order = list(range(len(seqs))); random.Random(step).shuffle(order)
    ents = []
    for u in range(a.updates):
        mini = order[u::a.updates]
        t = micro_batch_tensors(batch, mini, "cpu")
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logp = token_logprobs(logits, t["input_ids"], a.temp); ent = token_entropy(logits, a.temp)
        loss_sum, norm, s = clipped_surrogate(logp, t["old_logp"], t["adv"], t["mask"], 0.2, "token_mean",
                                              entropy=ent, entropy_coef=a.ent)
        (loss_sum / norm).backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(); sched.step()
        ents.append(s["entropy"] / s["tokens"])
    hist.append({"step": step + 1, "reward/mean": rewards.mean().item(), "reward/accuracy": correct.mean().item(), "train/entropy": sum(ents)/len(ents)})
    if (step + 1) % 25 == 0:
        r = hist[-25:]
        print(f"step {step+1} acc {sum(x['reward/accuracy'] for x in r)/25:.3f} rew {sum(x['reward/mean'] for x in r)/25:.3f} ent {sum(x['train/entropy'] for x in r)/25:.3f} ex {texts[0]!r} t={time.time()-t_start:.0f}s", flush=True)
if a.out:
    open(a.out, "w").write("".join(json.dumps(h) + "\n" for h in hist))
