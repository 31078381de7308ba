"""recipe.dist.agree, "all ranks agree, then raise", at world 2 on CPU (gloo) and without a process
group: no rank raises unless one failed; then every rank raises the error type given, with the same
text naming each failing rank, and none is left waiting in a collective.

    .venv/bin/python -m pytest tests/dist/test_agree.py -q
"""

from __future__ import annotations

import pytest

from tests.helpers import run_world


class Refused(RuntimeError):
    pass


def _outcomes(rank, world, failures):
    """What agree() did on this rank for each case: None (returned) or (type, text, cause's text)."""
    import torch.distributed as dist

    from recipe.dist import agree

    out = []
    for case in failures:
        mine = case[rank]
        cause = ValueError(f"cause on rank {rank}") if mine else None
        try:
            agree(mine, Refused, cause=cause)
            out.append(None)
        except Refused as exc:
            out.append((type(exc).__name__, str(exc), str(exc.__cause__) if exc.__cause__ else None))
        dist.barrier()  # both ranks are still in step after each case
    return out


def test_ranks_agree_then_raise_together():
    cases = [(None, None), (None, "disk full"), ("nan loss", "inf loss")]
    rank0, rank1 = run_world(_outcomes, 2, cases, timeout_s=60)
    assert rank0[0] is None and rank1[0] is None
    # only rank 1 failed: rank 0 raises too, with rank 1's text; the cause stays with the rank that had it
    assert rank0[1] == ("Refused", "rank 1: disk full", None)
    assert rank1[1] == ("Refused", "rank 1: disk full", "cause on rank 1")
    both = "rank 0: nan loss | rank 1: inf loss"
    assert rank0[2] == ("Refused", both, "cause on rank 0") and rank1[2] == ("Refused", both, "cause on rank 1")


def test_without_a_process_group_the_failure_is_raised_as_it_is():
    from recipe.dist import agree

    agree(None, Refused)
    with pytest.raises(Refused, match=r"^disk full$") as err:
        agree("disk full", Refused, cause=OSError("ENOSPC"))
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(ValueError, match="^wrapped: x$"):
        agree("x", lambda text: ValueError(f"wrapped: {text}"))
