"""Test doubles of the engine and the sync: what tests substitute, kept out of `recipe/`.

- `PolicyEngine(policy, ...)`: HF generate with the trainer's own (sharded) module, the reference
  "HF generate on the trained model"; FSDP2 at world > 1 with `synced_gpus=True`, FSDP1 inside
  `summon_full_params`. It is the policy, so its loads only drain the stream (the gather is collective).
- `HookedSync(..., stream_fn=f)`: a `WeightSync` whose update stream is `f(model, spec, device)`
  (a fault to inject, a capture); `stream_fn=None` is the table's own stream.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from recipe.engine import HfEngine
from recipe.sync import WeightSync


class PolicyEngine(HfEngine):
    """HF generate on `module` as the trainer holds it (FSDP1, FSDP2 or unsharded)."""

    def full_module(self):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(self.module, FSDP):
            return FSDP.summon_full_params(self.module, writeback=False), self.module.module, False
        if isinstance(self.module, FSDPModule):
            # generate() may bypass the root's forward (peft calls the inner model's generate), so
            # gather the root's own params (embeddings, norm) up front; the layers gather in their
            # forward hooks, one collective per step: hence synced_gpus.
            return root_unsharded(self.module), self.module, torch.distributed.is_initialized()
        return super().full_module()

    def load_weights(self, weights):
        """The engine is the policy: nothing to copy. The iterator is still drained (the gather is collective)."""
        for _ in weights:
            pass

    def load_adapter(self, tensors, adapter_config, version):
        for _ in tensors:
            pass
        self.lora_version = version


@contextlib.contextmanager
def root_unsharded(module):
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


class HookedSync(WeightSync):
    """`WeightSync` with a replaceable update stream: `stream_fn(model, spec, device)` (spec: the sync's `StreamSpec`), or None for the table's."""

    def __init__(self, *args, stream_fn: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_fn = stream_fn

    def update_stream(self):
        if self.stream_fn is None:
            return super().update_stream()
        return self.stream_fn(self.model, self.spec, self.ctx.device)
