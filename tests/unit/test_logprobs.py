"""The block-by-block logprobs and entropies (recipe/logprobs.py, recipe.model.policy_logprobs) against
the straightforward formula written out over the whole batch: values and gradients, at a vocabulary
of several thousand, from logits and fused with the output layer; and the memory they need."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recipe.logprobs import chunk_rows, chunked_logprobs, shifted_targets, token_entropy, token_logprobs
from tests.helpers import peak_rss_above_start

VOCAB = 5003  # several thousand, and no multiple of a block


def plain(logits, ids, temperature=1.0):
    """The straightforward formula (the old token_logprobs and token_entropy): [B, T-1] each."""
    lsm = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    logp = torch.gather(lsm, 2, ids[:, 1:, None]).squeeze(-1)
    lsm2 = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp, -(lsm2.exp() * lsm2).sum(-1)


def blocked(x, ids, temperature, weight=None, rows=7):
    """chunked_logprobs over [B, T, *] rows in blocks of `rows`, shaped like `plain`'s results."""
    b, t = ids.shape
    logp, ent = chunked_logprobs(
        x.reshape(b * t, x.shape[-1]), shifted_targets(ids), temperature, weight=weight, rows=rows
    )
    return logp.view(b, t)[:, :-1], ent.view(b, t)[:, :-1]


def _grads(fn, leaves, seed=1):
    """Values of fn() and the gradients of leaves for a fixed random weighting of both outputs."""
    for leaf in leaves:
        leaf.grad = None
    logp, ent = fn()
    g = torch.Generator().manual_seed(seed)
    (logp * torch.randn(logp.shape, generator=g)).sum().add(
        (ent * torch.randn(ent.shape, generator=g)).sum()
    ).backward()
    return logp.detach(), ent.detach(), [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_from_logits_bit_for_bit(dtype, temperature):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 41))
    logits = (torch.randn(3, 41, VOCAB) * 3).to(dtype).requires_grad_()
    ref = _grads(lambda: plain(logits, ids, temperature), [logits])
    got = _grads(lambda: blocked(logits, ids, temperature, rows=7), [logits])
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert torch.equal(ref[2][0], got[2][0])
    # the wrappers the loss and the probe call (default blocks) give the same values
    assert torch.equal(token_logprobs(logits, ids, temperature), ref[0])
    assert torch.equal(token_entropy(logits, temperature), ref[1])


def _rel(ref, got):
    return ((ref.float() - got.float()).abs().max() / ref.float().abs().max()).item()


def test_fused_matches_the_formula_float32():
    """The linear inside the blocks: where the BLAS computes a block's rows as it computes them in
    the whole product, every value and the hidden states' gradient are the formula's bit for bit
    (here blocks of 41 rows); a ragged block can take another kernel (blocks of 16 here: values
    within 1 ulp of the largest, gradients within 6). The weight's gradient is a sum over blocks
    instead of one product. Bound: 1e-6 of the largest entry (8 float32 ulps)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 41))
    hidden = torch.randn(3, 41, 64, requires_grad=True)
    weight = (torch.randn(VOCAB, 64) * 0.3).requires_grad_()
    ref = _grads(lambda: plain(F.linear(hidden, weight), ids, 0.7), [hidden, weight])
    for rows in (41, 16):
        got = _grads(lambda rows=rows: blocked(hidden, ids, 0.7, weight=weight, rows=rows), [hidden, weight])
        gaps = [_rel(ref[0], got[0]), _rel(ref[1], got[1]), _rel(ref[2][0], got[2][0]), _rel(ref[2][1], got[2][1])]
        print(f"blocks of {rows}: relative gaps logp, entropy, d hidden, d weight: {gaps}")
        assert max(gaps) <= 1e-6, (rows, gaps)
        if rows == 41:
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and torch.equal(ref[2][0], got[2][0])


def test_fused_bfloat16_within_rounding():
    """bf16 compute: values and gradients within bf16 rounding of the formula's (2^-7 of the largest)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 33))
    hidden = torch.randn(2, 33, 64).bfloat16().requires_grad_()
    weight = (torch.randn(VOCAB, 64) * 0.3).bfloat16().requires_grad_()
    ref = _grads(lambda: plain(F.linear(hidden, weight), ids), [hidden, weight])
    got = _grads(lambda: blocked(hidden, ids, 1.0, weight=weight, rows=16), [hidden, weight])
    gaps = [_rel(ref[0], got[0]), _rel(ref[1], got[1]), _rel(ref[2][0], got[2][0]), _rel(ref[2][1], got[2][1])]
    print(f"bf16, blocks of 16: relative gaps logp, entropy, d hidden, d weight: {gaps}")
    assert max(gaps) <= 2**-7, gaps


def test_entropy_without_gradient_is_not_recomputed():
    """entropy_grad=False: the entropy is measured, carries no gradient, and the gradient is logp's alone."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = torch.randn(2 * 9, VOCAB, requires_grad=True)
    logp, ent = chunked_logprobs(logits, shifted_targets(ids), entropy=True, entropy_grad=False, rows=5)
    assert not ent.requires_grad and torch.equal(ent.view(2, 9)[:, :-1], plain(logits.view(2, 9, -1), ids)[1])
    torch.stack([logp, ent], -1)[:, 0].sum().backward()  # a stack sends zeros to the entropy's column
    only = logits.grad.clone()
    logits.grad = None
    chunked_logprobs(logits, shifted_targets(ids), entropy=False, rows=5)[0].sum().backward()
    assert torch.equal(only, logits.grad)


def test_block_size_follows_the_vocabulary():
    assert chunk_rows(151_936) == 256 and chunk_rows(49_152) == 256 and chunk_rows(64) == 131_072


def _tiny(vocab=VOCAB, model_type="qwen2"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(**kwargs))
    return Qwen2ForCausalLM(Qwen2Config(**kwargs))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_policy_logprobs_fused_into_the_model(model_type):
    """Through a whole model: the values of model(...).logits + the formula, bit for bit, at the
    completion positions (0 elsewhere); parameter gradients within 1e-6 of the largest (measured:
    the tied embedding's gradient differs in the last float32 bits, the layers' not at all)."""
    from recipe.model import fused_head_supported, policy_logprobs

    model = _tiny(model_type=model_type)
    assert fused_head_supported(model)
    ids = torch.randint(0, VOCAB, (3, 21))
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0
    positions = torch.zeros(3, 20, dtype=torch.bool)
    positions[:, 6:] = True
    positions[2, 14:] = False

    def ours():
        return policy_logprobs(model, ids, attn, 0.9, positions=positions, entropy=True, entropy_grad=True)

    def formula():
        logp, ent = plain(model(input_ids=ids, attention_mask=attn).logits, ids, 0.9)
        return logp * positions, ent * positions

    params = [p for p in model.parameters()]
    ref, got = _grads(formula, params), _grads(ours, params)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    for (name, _), r, g in zip(model.named_parameters(), ref[2], got[2]):
        assert (r - g).abs().max() <= 1e-6 * r.abs().max(), name
    assert model.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward  # the swap is undone


def test_policy_logprobs_through_peft_and_the_logits_fallback():
    from peft import LoraConfig, get_peft_model

    from recipe.model import policy_logprobs

    model = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, VOCAB, (2, 11))
    logp, ent = policy_logprobs(model, ids, torch.ones_like(ids), entropy=True)
    ref = plain(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids)
    assert torch.equal(logp, ref[0]) and torch.equal(ent, ref[1])
    model.config.model_type = "gemma2"  # a model whose logits may be more than lm_head(hidden): via its logits
    assert torch.equal(policy_logprobs(model, ids, torch.ones_like(ids))[0], ref[0])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_backward_at_a_real_vocabulary_stays_within_one_logits_tensor():
    """At SmolLM2's 49,152 vocabulary and 2,048 tokens, forward + backward of the fused logprobs and
    entropy peak below one float32 [tokens x vocabulary] (384 MiB): measured 240-280 MiB here (blocks of
    256 rows), against 1.9 GiB for the straightforward formula's forward alone. tests/e2e/test_real_vocab.py
    runs the whole loop at this vocabulary."""
    torch.manual_seed(0)
    n, vocab, width = 2048, 49_152, 64
    hidden = torch.randn(1, n, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.1).requires_grad_()
    ids = torch.randint(0, vocab, (1, n))
    logits_bytes = n * vocab * 4

    def run():
        logp, ent = blocked(hidden, ids, 1.0, weight=weight, rows=chunk_rows(vocab))
        (logp.sum() + ent.sum()).backward()

    run()  # warm: allocator, the weight's gradient
    extra = peak_rss_above_start(run)[1]
    print(
        f"fused, blocks of {chunk_rows(vocab)}: peak {extra / 2**20:.0f} MiB above the start, "
        f"one float32 logits tensor {logits_bytes / 2**20:.0f} MiB"
    )
    assert extra < logits_bytes
