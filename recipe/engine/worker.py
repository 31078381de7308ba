"""Functions that run inside vLLM's worker (`llm.collective_rpc(fn, args=...)`, in-process): adapter
registration, the engine's own reload, the tied head's kernel refresh, and the engine-side digests.
Each takes the worker first; `recipe.engine.vllm` calls them."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from recipe import digest as digest_mod
from recipe.engine.base import WeightIter
from recipe.engine.layout import LayoutReport, base_layer_name, compare_layout
from recipe.names import checkpoint_shapes, checkpoint_tensors


def add_lora_in_worker(
    worker, lora_id: int, tensors: Dict[str, torch.Tensor], config: dict, drop_id: Optional[int]
) -> int:
    """Runs inside the vLLM worker (collective_rpc): build the adapter from tensors, register it.

    The same checks as vLLM's own path-based loader (`PEFTHelper.validate_legal`) run first.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(dict(config, vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
    )
    adapters = manager._adapter_manager
    if drop_id is not None:
        adapters.remove_adapter(drop_id)  # the previous version: never generate with it again
    adapters.remove_adapter(lora_id)
    adapters.add_adapter(lora)
    return len(lora.loras)


def reload_in_worker(worker, weights: WeightIter) -> None:
    """Runs inside the vLLM worker (collective_rpc): the engine's own reload, under the names its model holds.

    With `enable_lora` the engine's linear layers are wrapped, and the wrapper keeps the weight under
    `base_layer`. vLLM 0.32's wrapper forwards checkpoint names to it (`BaseLayerWithLoRA.load_weights`);
    vLLM 0.26's has no such forwarding, and its model's `load_weights` looks the names up among the
    model's parameters and fails ("There is no module or parameter named
    'layers.0.self_attn.qkv_proj.weight'"). There, the names are given the `base_layer` segment here.
    """
    from vllm.lora.layers import BaseLayerWithLoRA

    model = worker.model_runner.get_model()
    forwards = "load_weights" in vars(BaseLayerWithLoRA)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, BaseLayerWithLoRA)}
    if wrapped and not forwards:
        weights = ((base_layer_name(n, wrapped, getattr(model, "packed_modules_mapping", {})), t) for n, t in weights)
    worker.reload_weights(weights_iterator=weights)


def refresh_embedding_kernels(model: nn.Module) -> int:
    """Re-run weight post-processing of vocab embeddings / LM heads after a reload (vLLM CPU).

    vLLM's CPU backend packs each layer's weight into a `cpu_linear` kernel when it loads. A
    tied LM head shares the embedding's parameter but is never "loaded" itself (tied names are
    skipped), so a reload refreshes the embedding and leaves the head's packed copy stale:
    logits then come from the old weights (measured: logprob gaps of ~1 after one update).
    Processing again from the (shared, already updated) parameter fixes that.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    count = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
            count += 1
    return count


# ----------------------------------------------------------------------------- engine-side digests
# These run inside the vLLM worker (collective_rpc) and read what the engine holds after a load.
# On CUDA the unquantized linear weights stay plain parameters in vLLM's fused layout (qkv_proj,
# gate_up_proj), so they are digested directly. On CPU, processing after a load packs every linear
# weight into an opaque cpu_linear kernel and leaves `weight` empty: there the digest is taken
# inside the load, from the layer's parameters the moment before `process_weights_after_loading`
# packs them (a hook on each layer's quant method), and the packed kernels themselves are checked
# end to end by the logprob probe. Captures are cleared before every load, so a layer that was not
# processed after this load (a tied head never refreshed) has no digest and is reported.

_CAPTURES = "_recipe_digest_captures"  # attribute on the vLLM model: {param name: (shape info, sums)}
_HOOKED = "_recipe_digest_hooked"  # attribute on the vLLM model: names of hooked modules
_CAPTURE_S = "_recipe_digest_capture_s"  # attribute on the vLLM model: [seconds spent capturing]
_COPIES = "_recipe_loader_copies"  # attribute on the vLLM model: [{param name: copy} during a layout check, else None]


def _engine_name(name: str) -> str:
    """vLLM parameter name without LoRA wrapper segments (what reload_weights itself strips)."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def _vllm_model(worker) -> nn.Module:
    return worker.model_runner.get_model()


def _capturing(
    original: Callable, names: Dict[int, str], captures: dict, seconds: List[float], copies: List[Optional[dict]]
) -> Callable:
    def process_weights_after_loading(layer, *args, **kwargs):
        prefix = names.get(id(layer))
        if prefix is not None:
            t0 = time.perf_counter()
            for attr, param in layer._parameters.items():
                if param is not None and param.numel() > 0:
                    captures[f"{prefix}.{attr}"] = (digest_mod.shape_info(param), digest_mod.digest_sums(param))
                    if copies[0] is not None:  # a layout check: what vLLM's loader wrote, before packing
                        copies[0][f"{prefix}.{attr}"] = param.detach().clone()
            seconds[0] += time.perf_counter() - t0
        return original(layer, *args, **kwargs)

    return process_weights_after_loading


def install_digest_hooks_in_worker(worker) -> int:
    """Wrap every layer's `quant_method.process_weights_after_loading` to digest its parameters first."""
    model = _vllm_model(worker)
    if getattr(model, _CAPTURES, None) is not None:
        return 0
    captures: dict = {}
    seconds = [0.0]
    copies: List[Optional[dict]] = [None]
    names = {
        id(m): _engine_name(n)
        for n, m in model.named_modules()
        if hasattr(getattr(m, "quant_method", None), "process_weights_after_loading")
    }
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if id(module) in names and not getattr(method, "_recipe_digest_hook", False):
            method.process_weights_after_loading = _capturing(
                method.process_weights_after_loading, names, captures, seconds, copies
            )
            method._recipe_digest_hook = True
    setattr(model, _CAPTURES, captures)
    setattr(model, _HOOKED, set(names.values()))
    setattr(model, _CAPTURE_S, seconds)
    setattr(model, _COPIES, copies)
    return len(names)


def clear_captures_in_worker(worker) -> None:
    model = _vllm_model(worker)
    getattr(model, _CAPTURES).clear()
    getattr(model, _CAPTURE_S)[0] = 0.0


def capture_seconds_in_worker(worker) -> float:
    return getattr(_vllm_model(worker), _CAPTURE_S, [0.0])[0]


def held_digests_in_worker(worker, use_captures: bool) -> Dict[str, Optional[digest_mod.Digest]]:
    """{vLLM parameter name: Digest} of every parameter (shared ones under each owner's name)."""
    model = _vllm_model(worker)
    captures, hooked = getattr(model, _CAPTURES, {}), getattr(model, _HOOKED, set())
    captured: Dict[str, Tuple] = {}
    direct: Dict[str, torch.Tensor] = {}
    unreadable: List[str] = []
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is None:
                continue
            name = _engine_name(f"{module_name}.{attr}")
            if use_captures and _engine_name(module_name) in hooked:
                if name in captures:
                    captured[name] = captures[name]
                else:
                    unreadable.append(name)
            elif param.numel() > 0:
                direct[name] = param
            else:
                unreadable.append(name)
    done = dict(zip(captured, digest_mod.finish([c[0] for c in captured.values()], [c[1] for c in captured.values()])))
    done.update(zip(direct, digest_mod.digests(list(direct.values()))))  # small ones batched, one host copy
    return {**done, **{n: None for n in unreadable}}


def aliases_in_worker(worker) -> List[List[str]]:
    """Names that are one tensor in the engine's model (a tied head and its embedding), found by
    identity, each group in the model's order; groups of one are left out."""
    model = _vllm_model(worker)
    groups: Dict[int, List[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                names = groups.setdefault(id(param), [])
                name = _engine_name(f"{module_name}.{attr}")
                if name not in names:
                    names.append(name)
    return [names for names in groups.values() if len(names) > 1]


def copy_next_load_in_worker(worker) -> None:
    """Keep a copy of each hooked layer's parameters as the next load leaves them (before packing)."""
    getattr(_vllm_model(worker), _COPIES)[0] = {}


def layout_in_worker(worker, model_dir: str, aliases: List[str]) -> LayoutReport:
    """`compare_layout` of the checkpoint against the engine's parameters as vLLM's loader wrote them:
    the copies taken in the last load (CPU: packed layers read as empty) or the parameters themselves."""
    model = _vllm_model(worker)
    copies = getattr(model, _COPIES, [None])
    taken, copies[0] = copies[0] or {}, None
    held: Dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            name = _engine_name(f"{module_name}.{attr}")
            if param is not None and name not in aliases:
                held[name] = taken.get(name, param.data)
    packed = {k: list(v) for k, v in dict(getattr(model, "packed_modules_mapping", {}) or {}).items()}
    return compare_layout(held, packed, checkpoint_shapes(model_dir), checkpoint_tensors(model_dir))


def packed_modules_in_worker(worker) -> Dict[str, List[str]]:
    """The model class's fused modules, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}."""
    model = _vllm_model(worker)
    return {k: list(v) for k, v in dict(getattr(model, "packed_modules_mapping", {}) or {}).items()}


def adapter_digests_in_worker(worker, lora_id: int) -> Dict[str, List[Optional[tuple]]]:
    """{vLLM module name: [(A digests, B digests) per packed sub-module, or None]} of the registered
    adapter after vLLM's own processing (B scaled in place, packed modules as lists). Each digest
    comes in both orientations (as held, transposed), so the caller can match the streamed layout."""
    adapters = worker.model_runner.lora_manager._adapter_manager
    lora = adapters.get_adapter(lora_id) if hasattr(adapters, "get_adapter") else adapters._registered_adapters[lora_id]
    if lora is None:
        raise RuntimeError(f"the engine has no adapter registered under id {lora_id}")
    slots: Dict[str, List[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module_name, weights in lora.loras.items():
        pairs = zip(*(w if isinstance(w, list) else [w] for w in (weights.lora_a, weights.lora_b)))
        slots[module_name] = [None if a is None else (a, b) for a, b in pairs]
    tensors = [t for subs in slots.values() for sub in subs if sub is not None for t in sub]
    both = [(t, t.t()) if t.dim() == 2 else (t,) for t in tensors]
    flat = iter(digest_mod.digests([x for ways in both for x in ways]))  # one host sync for all
    done = iter([tuple(next(flat) for _ in ways) for ways in both])
    return {name: [None if sub is None else (next(done), next(done)) for sub in subs] for name, subs in slots.items()}
