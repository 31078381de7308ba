"""Token logprobs and entropies of a causal LM without a float32 [tokens x vocabulary] tensor.

    logp, entropy = chunked_logprobs(hidden, targets, T, weight=lm_head.weight)   # fused: [N, H] -> [N]
    logp, entropy = chunked_logprobs(logits, targets, T)                          # from logits: [N, V] -> [N]

The formula is the straightforward one, computed per token (row) in float32:

    logits = hidden @ weight.T                       (the compute dtype, as the model's lm_head does)
    logp   = log_softmax(logits.float() / T)[target]
    H      = -(exp(lsm) * lsm).sum(-1),  lsm = log_softmax(logits.float() / T)

Written out over a whole micro-batch it needs [tokens x vocabulary] float32 several times over: at
a 151,936 vocabulary and 16k tokens one such tensor is 10 GB, and autograd keeps log_softmax's
output (and, for the entropy, its exp) until backward. `ChunkedLogprobs` is one autograd function
that runs the formula over blocks of `rows` tokens: forward keeps only its inputs (the hidden
states and the weight, or the logits) and the per-token results; backward recomputes each block and
backpropagates it at once. The largest transient is then a few
[rows x vocabulary] float32 blocks, whatever the micro-batch.

Why fused (hidden states and the lm_head weight in, the linear inside the chunks): the logits in
the compute dtype are [tokens x vocabulary] too (5 GB at the size above in bf16, plus their
gradient in backward); taking the hidden states means they never exist for the whole micro-batch.
`recipe.model.policy_logprobs` runs a model's own forward with its output embedding doing this
(so FSDP gathers and frees the weight as usual). The cost: one more [rows x H] x [H x V] product
per block in backward (the recomputation), about a third more lm_head FLOPs, and the weight's
gradient summed block by block in float32. Why not a fused kernel such as Liger's fused linear
cross entropy: it needs Triton (no CPU stack here runs it, so the CPU tests could not check the
code the GPU runs) and it returns a loss, not per-token logprobs and entropies; no hand-written
kernel either. Plain torch ops run on both pinned stacks.

Backward does not run the block under autograd again (that held about eight float32 blocks at
once); `_block_backward` takes the same ops autograd would, in their in-place forms.

Exactness (CPU, float32, measured by tests/unit/test_logprobs.py): from logits, values and
gradients equal the straightforward formula bit for bit (each row goes through the same ops).
Fused, the values and the hidden states' gradient are bit for bit as long as the BLAS computes
a block's rows as it computes them in the whole product, which the test checks at its shapes; the
weight's gradient is a sum over blocks instead of one product, so it differs in the last bits
(measured there: at most a few float32 ulps; in bf16 each block's part is rounded to bf16 before
the float32 sum, where the whole product rounds once).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Rows per block: CHUNK_BYTES of float32 logits, but at least MIN_ROWS so a block's product with
# the weight stays compute-bound on a GPU (a block re-reads the whole [V x H] weight: below about
# 200 rows an H200 waits for memory). At a 151,936 vocabulary: 256 rows (155 MB a block); at
# 49,152 also 256 (48 MiB); at 64 (the tiny model) 131,072, i.e. one block.
CHUNK_BYTES = 32 << 20
MIN_ROWS = 256
# On CUDA, blocks of 512 MiB of float32 logits (883 rows at 151,936; four such blocks at most at
# once, 2 GiB): each block re-reads the [V x H] weight three times and adds a [V x H] float32
# weight gradient, fixed costs that 256-row blocks paid about 500 times per 128k-token update.
CUDA_CHUNK_BYTES = 512 << 20


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per block for a vocabulary of `vocab` entries."""
    return max(MIN_ROWS, chunk_bytes // (4 * max(vocab, 1)))


def _scaled(logits: torch.Tensor, temperature: float, owned: bool = False) -> torch.Tensor:
    """logits.float() / T, as the straightforward formula writes it; with `owned` (a block this
    module computed and no one else holds) divided in place where the cast made no copy (the same
    values, one [rows x V] float32 block fewer)."""
    scaled = logits.float()
    return scaled.div_(temperature) if owned or scaled is not logits else scaled / temperature


def block_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The straightforward log pi(target) of one block of rows: [rows, V] -> [rows], float32."""
    lsm = F.log_softmax(_scaled(logits, temperature), dim=-1)
    return torch.gather(lsm, 1, targets[:, None]).squeeze(1)


def block_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The straightforward entropy of softmax(logits / T) of one block: [rows, V] -> [rows], float32."""
    lsm = F.log_softmax(_scaled(logits, temperature), dim=-1)
    return -(lsm.exp() * lsm).sum(-1)


def _block_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor, temperature: float, entropy: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Both results of one block without autograd, freeing each temporary as soon as it is used."""
    logits = x if weight is None else F.linear(x, weight)
    lsm = F.log_softmax(_scaled(logits, temperature, owned=weight is not None), dim=-1)
    del logits
    logp = torch.gather(lsm, 1, targets[:, None]).squeeze(1)
    ent = None
    if entropy:  # -(exp(lsm) * lsm).sum(-1), the product taken in place (same values)
        ent = -lsm.exp().mul_(lsm).sum(-1)
    return logp, ent


class ChunkedLogprobs(torch.autograd.Function):
    """(logp [N], entropy [N]) of `x` ([N, H] hidden states with `weight` [V, H], or [N, V] logits
    with weight None) for `targets` [N], block by block; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, targets, temperature: float, rows: int, entropy: bool, entropy_grad: bool):
        n = x.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=x.device)
        ent = torch.zeros(n, dtype=torch.float32, device=x.device)
        for s in range(0, n, rows):
            lp, h = _block_forward(x[s : s + rows], weight, targets[s : s + rows], temperature, entropy)
            logp[s : s + rows] = lp
            if h is not None:
                ent[s : s + rows] = h
        ctx.save_for_backward(x, weight, targets)
        ctx.temperature, ctx.rows, ctx.entropy = temperature, rows, entropy and entropy_grad
        ctx.set_materialize_grads(False)
        if not ctx.entropy:  # no gradient flows back through it: backward never recomputes it
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        x, weight, targets = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        if not ctx.entropy:
            grad_ent = None
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if (grad_logp is not None or grad_ent is not None) and (need_x or need_w):
            rows = ctx.rows
            for s in range(0, x.shape[0], rows):
                block = slice(s, s + rows)
                grad = _block_backward(
                    x[block],
                    weight,
                    targets[block],
                    ctx.temperature,
                    None if grad_logp is None else grad_logp[block],
                    None if grad_ent is None else grad_ent[block],
                )
                if weight is None:
                    grad_x[block] = grad
                    continue
                if need_x:  # the linear's backward, as autograd takes it for F.linear's mm
                    grad_x[block] = grad.mm(weight)
                if need_w:  # summed over blocks in float32
                    grad_w += grad.t().mm(x[block])
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def _block_backward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    grad_logp: Optional[torch.Tensor],
    grad_ent: Optional[torch.Tensor],
) -> torch.Tensor:
    """The gradient of sum(grad_logp * logp + grad_ent * H) with respect to one block's logits.

    Op for op what autograd computes for `block_logprobs` and `block_entropy` (each from its own
    log_softmax, the two summed at the logits), so the values are the same; written out to take
    the in-place forms and free each temporary as soon as it is used: at most four float32
    [rows x V] blocks at once (three without the entropy's gradient), where autograd's
    recomputation held about eight."""
    logits = x if weight is None else F.linear(x, weight)
    dtype = logits.dtype
    lsm = F.log_softmax(_scaled(logits, temperature, owned=weight is not None), dim=-1)
    del logits
    grad = None
    if grad_logp is not None:
        d = torch.zeros_like(lsm).scatter_add_(1, targets[:, None], grad_logp[:, None])  # gather's backward
        d = torch._log_softmax_backward_data(d, lsm, 1, torch.float32)
        grad = d.div_(temperature).to(dtype)  # the division's backward, then .float()'s (a cast back)
        del d
    if grad_ent is not None:  # H = -(exp(lsm) * lsm).sum(-1)
        neg = (-grad_ent)[:, None]  # neg's backward, broadcast by sum's
        e = lsm.exp()
        through_exp = (neg * lsm).mul_(e)  # mul's backward to exp(lsm), then exp's (grad * result)
        d = e.mul_(neg).add_(through_exp)  # mul's backward to lsm, plus the path through exp
        del through_exp
        d = torch._log_softmax_backward_data(d, lsm, 1, torch.float32).div_(temperature).to(dtype)
        grad = d if grad is None else grad.add_(d)
    return grad


def chunked_logprobs(
    x: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    weight: Optional[torch.Tensor] = None,
    entropy: bool = True,
    entropy_grad: bool = True,
    rows: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), each [N] float32, of the rows of `x` ([N, H] with `weight` [V, H], or [N, V]
    logits); entropy is zeros with `entropy=False`, and not differentiable unless `entropy_grad`
    (then backward skips its recomputation, even when a caller's stack of the two would send zeros)."""
    vocab = weight.shape[0] if weight is not None else x.shape[-1]
    rows = rows or chunk_rows(vocab, CUDA_CHUNK_BYTES if x.is_cuda else CHUNK_BYTES)
    return ChunkedLogprobs.apply(x, weight, targets, float(temperature), int(rows), bool(entropy), bool(entropy_grad))


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """[B*T] targets of each position: token t+1 predicted at t; the last position of each row gets
    0 (its result is dropped), so logits or hidden states [B, T, *] need no copy to be cut."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return targets.reshape(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) for t >= 1 from the logits [B, T, V] of `input_ids`: [B, T-1], float32,
    block by block (never a float32 [B, T, V])."""
    b, t, v = logits.shape
    logp, _ = chunked_logprobs(logits.reshape(b * t, v), shifted_targets(input_ids), temperature, entropy=False)
    return logp.view(b, t)[:, :-1]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) at the positions that predict tokens 1..T-1: [B, T-1], float32,
    block by block."""
    b, t, v = logits.shape
    targets = torch.zeros(b * t, dtype=torch.long, device=logits.device)
    _, ent = chunked_logprobs(logits.reshape(b * t, v), targets, temperature, entropy=True)
    return ent.view(b, t)[:, :-1]
