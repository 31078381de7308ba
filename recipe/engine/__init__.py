"""The rollout engine: vLLM in the trainer's process (or HF generate), one engine per rank.

    engine = build_engine(EngineSpec.of(settings), ctx, model_dir, load=..., digest=...)
    samples = engine.generate(prompt_ids, n=8, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=0)
    engine.load_weights(iter([(hf_name, tensor), ...]))          # full weights, no disk
    engine.load_adapter(iter(adapter_tensors), adapter_cfg, version)   # lora=adapter
    engine.prompt_logprobs([[ids...]])                            # parity probe
    engine.close()                                                # before destroy_process_group

Why one engine per rank: rollout is data parallel (each rank samples its own prompts), every
engine is a full tensor-parallel-1 copy of the model, and the sync streams full tensors on
every rank anyway (the FSDP all-gather), so no extra broadcast is needed and no rank waits
for another's generation. The price is one model copy + KV cache per rank, which is what a
colocated 1-GPU-per-rank setup has room for at the model sizes this recipe targets.

Backends:
- ``vllm``: `vllm.LLM` in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Weights go in through
  the worker's `reload_weights(weights_iterator=...)`. LoRA adapters are built in memory
  (`LoRAModel.from_lora_tensors`) inside the worker and registered under a fresh
  `lora_int_id` per version; requests then name that id, so vLLM never reads a path.
- ``hf`` (`HfCopyEngine`): HF `generate` on the engine's own unsharded copy of the model on
  the rank's device; the sync loads into it by name exactly as into vLLM, so the whole
  gather -> load -> verify path runs on machines without vLLM. Its base, `HfEngine(module, ...)`,
  generates with a given unsharded module.
"""

from __future__ import annotations

from recipe.engine.base import Engine, EngineSpec, Held, Sample, WeightIter
from recipe.engine.hf import HfCopyEngine, HfEngine
from recipe.engine.layout import LayoutReport, alias_owners, compare_layout, streamed_shapes, weight_destinations
from recipe.engine.vllm import VllmEngine, check_gpu_memory_split, lora_scaling

__all__ = [
    "Engine",
    "EngineSpec",
    "Held",
    "Sample",
    "WeightIter",
    "HfEngine",
    "HfCopyEngine",
    "VllmEngine",
    "LayoutReport",
    "alias_owners",
    "compare_layout",
    "streamed_shapes",
    "weight_destinations",
    "check_gpu_memory_split",
    "lora_scaling",
    "build_engine",
]


def build_engine(spec: EngineSpec, ctx, model_dir: str, *, load: str, digest: bool) -> Engine:
    """The engine named by `rollout.backend`: "vllm", or "hf" (an own HF copy the sync loads into).
    `load` and `digest`: the sync's settings (`sync.load`, `sync.digest`), passed by the loop; the
    engine reads no sync settings itself."""
    if spec.rollout.backend == "vllm":
        return VllmEngine(spec, ctx, str(model_dir), load=load, digest=digest)
    if spec.rollout.backend == "hf":
        return HfCopyEngine(spec, ctx, str(model_dir))
    raise ValueError(f"rollout.backend={spec.rollout.backend!r} is not valid; choose one of: vllm, hf")
