"""The digest has no linear blind spot: changes whose bit-pattern differences cancel in a plain sum
are caught (recipe/digest.py). Each test builds the fault from a random tensor, checks that the
fault really changed the tensor, and that the digest moved.

    .venv/bin/python -m pytest tests/unit/test_digest.py -q
"""

from __future__ import annotations

import pytest
import torch

from recipe.digest import Digest, digest, digests

DTYPES = [torch.float32, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weights(dtype, rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _caught(before: torch.Tensor, after: torch.Tensor) -> bool:
    assert not torch.equal(before.view(BITS[before.dtype]), after.view(BITS[after.dtype])), "the fault changed nothing"
    return digest(after) != digest(before)


def _lanes(dtype) -> int:
    """Elements per 8-byte word: a plain sum sees only (lane, value) pairs of a row."""
    return 8 // torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", DTYPES)
def test_swapped_heads_are_caught(dtype):
    """Two 64-wide heads swapped in every row of an output projection's input (columns permuted
    within rows): the words of each row are the same, only their columns moved."""
    w = _weights(dtype)
    swapped = torch.cat([w[:, 64:128], w[:, :64], w[:, 128:]], dim=1)
    assert _caught(w, swapped)
    rolled = torch.roll(w, shifts=_lanes(dtype), dims=1)  # every word one column on
    assert _caught(w, rolled)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_sign_flips_are_caught(dtype):
    """A positive and a negative element of one row, in the same lane, both negated: their sign bits
    move the plain sum by +2^k and -2^k."""
    w = _weights(dtype)
    lanes = _lanes(dtype)
    for row in (0, 17, 63):
        pos = next(c for c in range(0, w.shape[1], lanes) if w[row, c] > 0)
        neg = next(c for c in range(0, w.shape[1], lanes) if w[row, c] < 0)
        flipped = w.clone()
        flipped[row, pos] = -flipped[row, pos]
        flipped[row, neg] = -flipped[row, neg]
        assert _caught(w, flipped), (row, pos, neg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("along", ["rows", "columns"])
def test_cancelling_ulp_patterns_are_caught(dtype, along):
    """+1, -2, +1 units in the last place: in three consecutive rows of one column (cancels in both
    the sum and the row-weighted sum of a plain digest) or in three words of one row, same lane."""
    w = _weights(dtype)
    lanes = _lanes(dtype)
    for at in (1, 30, 61):
        bumped = w.clone()
        bits = bumped.view(BITS[dtype])
        cells = (
            [(at - 1, 5), (at, 5), (at + 1, 5)] if along == "rows" else [(at, 5), (at, 5 + lanes), (at, 5 + 2 * lanes)]
        )
        for (r, c), d in zip(cells, (1, -2, 1)):
            bits[r, c] += d
        assert _caught(w, bumped), (at, cells)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_far_apart_swapped_are_caught(dtype):
    w = _weights(dtype, rows=4096, cols=64)
    for a, b in ((0, 4095), (1, 2049), (7, 7 + 1024)):
        swapped = w.clone()
        swapped[[a, b]] = w[[b, a]]
        assert _caught(w, swapped), (a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_single_and_multi_element_corruptions_are_all_caught(dtype):
    """1,000 corruptions of 1 to 8 elements (a bit flipped, an ulp step, a random value, a sign
    flip, two elements swapped), on a matrix and on a 1-D tensor: every one changes the digest."""
    g = torch.Generator().manual_seed(123)
    matrix, vector = _weights(dtype, rows=32, cols=128, seed=9), _weights(dtype, rows=1, cols=512, seed=8)[0]
    width = BITS[dtype]
    nbits = torch.tensor([], dtype=width).element_size() * 8
    for trial in range(1000):
        base = matrix if trial % 4 else vector
        flat = base.clone().view(width).flatten()
        k = int(torch.randint(1, 9, (1,), generator=g))
        where = torch.randperm(flat.numel(), generator=g)[:k]
        kind = trial % 5
        if kind == 0:
            bit = torch.randint(0, nbits, (k,), generator=g)
            flat[where] ^= (torch.ones(k, dtype=torch.int64) << bit).to(width)
        elif kind == 1:
            flat[where] += torch.where(torch.rand(k, generator=g) < 0.5, 1, -1).to(width)
        elif kind == 2:
            flat[where] = torch.randint(-(2 ** (nbits - 1)), 2 ** (nbits - 1), (k,), generator=g).to(width)
        elif kind == 3:
            flat[where] ^= torch.tensor(-(2 ** (nbits - 1)), dtype=width)  # the sign bit
        else:
            where = torch.randperm(flat.numel(), generator=g)[:2]
            flat[where] = flat[where.flip(0)]
        after = flat.view(base.shape).view(dtype)
        if torch.equal(after.view(width), base.view(width)):
            continue  # a random value equal to the old one, or two equal elements swapped
        assert digest(after) != digest(base), (trial, kind, where.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_digest_still_composes_and_batches(dtype):
    """The column mixing keeps `Digest.concat` exact over dim-0 concatenation (fused qkv, shards),
    and the batched path gives each tensor's own digest."""
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(r, 96, generator=g).to(dtype) for r in (64, 16, 16)]
    assert Digest.concat(digests(parts)) == digest(torch.cat(parts))
    big = torch.randn(70000, 8, generator=g).to(dtype)  # more rows than one mixing block holds
    assert Digest.concat(digests(list(big.chunk(5)))) == digest(big)
    assert digests(parts[1:]) == [digest(parts[1]), digest(parts[2])]
