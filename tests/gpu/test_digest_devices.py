"""The digest is the same number on CPU and CUDA (the trainer may digest on one, the engine on the other),
for float32, bfloat16 and float16, matrices and 1-D tensors, and over more rows than one mixing block.

    python -m pytest -m gpu tests/gpu/test_digest_devices.py -v     # needs 1 CUDA device (no vLLM)
"""

from __future__ import annotations

import pytest
import torch

from recipe.digest import Digest, digest, digests

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_digest_is_the_same_on_cpu_and_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, generator=g).to(dtype) for s in ((896, 4864), (128, 896), (896,), (3, 5), (151, 64))]
    tensors.append(torch.randn(1 << 22, 8, generator=g).to(dtype))  # more words than one CUDA block
    on_cpu = digests(tensors)
    on_cuda = digests([t.cuda() for t in tensors])
    assert on_cpu == on_cuda
    assert [digest(t.cuda()) for t in tensors] == on_cpu
    assert Digest.concat(digests([t.cuda() for t in tensors[:1] * 2])) == digest(torch.cat(tensors[:1] * 2))
