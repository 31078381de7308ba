"""The rollout engine: vLLM in the trainer's process (or HF generate), one engine per rank.

    engine = build_engine(cfg, ctx, model_dir)
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
  gather -> load -> verify path runs on machines without vLLM. `HfEngine(policy, ...)`
  generates with a given module directly (FSDP2 at world > 1 with `synced_gpus=True`, FSDP1
  inside `summon_full_params`): tests use it as the reference "HF generate on the trained model".
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig

from recipe import digest as digest_mod
from recipe.config import resolve_device
from recipe.names import PEFT_PREFIX, checkpoint_shapes, checkpoint_tensors, hf_name, is_lora_param, peft_name

log = logging.getLogger(__name__)

WeightIter = Iterable[Tuple[str, torch.Tensor]]
# An engine tensor: the streamed names it is made of (dim-0 concatenation order) and the Digest of
# what the engine holds (None: the engine has no readable copy of it since the last load).
Held = Tuple[Tuple[str, ...], Optional[digest_mod.Digest]]


@dataclass
class Sample:
    """One completion: the prompt's ids, the sampled ids and their logprobs under the sampler."""

    prompt_token_ids: List[int]
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str = ""


class Finished:
    """The handle `Engine.submit` returns when the samples already exist."""

    def __init__(self, samples: List[Sample]):
        self.samples = samples

    def result(self) -> List[Sample]:
        return self.samples


class Engine:
    """Common interface; see the module docstring. `weight_version` counts loads."""

    backend = "none"
    shares_policy = False  # True only when the engine generates with the trainer's own module
    lora_version: Optional[int] = None
    load_digest_seconds = 0.0  # digest time spent inside the last load_weights (vLLM CPU), else 0

    def generate(self, prompt_token_ids: List[List[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> List[Sample]:
        raise NotImplementedError

    def submit(self, prompt_token_ids: List[List[int]], n: int, max_new_tokens: int, temperature: float,
               top_p: float, seed: int):
        """`generate` as a handle whose `.result()` returns the samples. Here they are generated at once. An
        engine that generates elsewhere returns at once and keeps order: a load called after a submit applies
        after that submit's generation, so the batch has the weights the engine held when it was submitted.
        The trainer wakes the engine before a submit and puts it to sleep after (a colocated engine frees the
        device for the update); an engine on devices of its own may take both as no-ops."""
        return Finished(self.generate(prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed))

    def prompt_logprobs(self, token_id_lists: List[List[int]]) -> List[List[float]]:
        raise NotImplementedError

    def load_weights(self, weights: WeightIter) -> None:
        raise NotImplementedError

    def load_adapter(self, tensors: WeightIter, adapter_config: dict, version: int) -> None:
        raise NotImplementedError

    def weight_digests(self) -> Dict[str, Held]:
        """{engine tensor name: (streamed names it is made of, Digest of what it holds now)}."""
        raise NotImplementedError(f"{type(self).__name__} cannot digest its weights; set sync.digest=false")

    def adapter_digests(self) -> Dict[str, Held]:
        """The same for the live adapter, keyed by peft's saved names."""
        raise NotImplementedError(f"{type(self).__name__} cannot digest its adapter; set sync.digest=false")

    def adapter_held_form(self, adapter_config: dict) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """Maps a streamed adapter tensor to the form this engine holds it in (None: as streamed)."""
        return None

    def weight_held_form(self) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """Maps a streamed weight to the form this engine holds it in (None: as streamed)."""
        return None

    def sleep(self) -> None:
        pass

    def memory_stats(self) -> Dict[str, float]:
        """GPU memory readings of the engine (free before start, asleep, awake), for the step metrics."""
        return {}

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- vLLM


def _add_lora_in_worker(worker, lora_id: int, tensors: Dict[str, torch.Tensor], config: dict,
                        drop_id: Optional[int]) -> int:
    """Runs inside the vLLM worker (collective_rpc): build the adapter from tensors, register it.

    The same checks as vLLM's own path-based loader (`PEFTHelper.validate_legal`) run first.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(dict(config, vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)
    lora = LoRAModel.from_lora_tensors(lora_model_id=lora_id, tensors=tensors, peft_helper=helper, device="cpu",
                                       dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size)
    adapters = manager._adapter_manager
    if drop_id is not None:
        adapters.remove_adapter(drop_id)  # the previous version: never generate with it again
    adapters.remove_adapter(lora_id)
    adapters.add_adapter(lora)
    return len(lora.loras)


def _free_gb(device: torch.device) -> float:
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0] / 2**30


def _reload_in_worker(worker, weights: WeightIter) -> None:
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


def base_layer_name(name: str, wrapped: set, packed: Dict[str, List[str]]) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.base_layer.weight` when the
    engine's layer that holds it (`qkv_proj`, through the model's packed-modules map) is LoRA-wrapped."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    fused = next((f for f, parts in packed.items() if leaf in parts), leaf)
    holder = f"{parent}.{fused}" if parent else fused
    return f"{module}.base_layer.{param}" if holder in wrapped else name


def streamed_shapes(model_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the checkpoint's tensors that a full sync streams (a tied head is not streamed)."""
    import json
    from pathlib import Path

    shapes = checkpoint_shapes(model_dir)
    if json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


NO_PARAMETER = "no parameter of that name"


def weight_destinations(model: nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Where each checkpoint tensor lives in the engine's model: a view of the parameter that holds it.

    Built once from the engine's model and the checkpoint's names and shapes, for a tensor-parallel
    group of one: a tensor of a fused layer (`q_proj` in `qkv_proj`, `gate_proj` in `gate_up_proj`,
    through the model's `packed_modules_mapping`) is rows [offset, offset + rows) of the fused
    parameter, the parts stacked in the map's order (what vLLM's own weight loaders write at TP 1);
    a LoRA-wrapped layer holds its weight under `base_layer`; a vocabulary embedding may hold padding
    rows after the real ones. Returns (destinations, reasons): a name whose place cannot be derived
    exactly is left out, with the reason, and the engine then loads through vLLM's reload instead.
    This is an assumption about vLLM's loaders: `compare_layout` checks it against what they wrote.
    """
    dest, reasons = destinations(dict(model.named_parameters()), getattr(model, "packed_modules_mapping", {}) or {},
                                 shapes)
    return dest, [f"{name}: {why}" for name, why in reasons.items()]


def destinations(params: Dict[str, torch.Tensor], packed: Dict[str, List[str]],
                 shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """`weight_destinations` over a {name: tensor} table of the engine's parameters; reasons by name."""
    dest: Dict[str, torch.Tensor] = {}
    reasons: Dict[str, str] = {}

    def held(module: str, attr: str) -> Optional[torch.Tensor]:
        return params.get(f"{module}.{attr}", params.get(f"{module}.base_layer.{attr}"))

    for name, shape in shapes.items():
        module, _, attr = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        fused = next((f for f, parts in packed.items() if leaf in parts), None)
        if fused is None:
            target = held(module, attr)
            if target is None:
                reasons[name] = NO_PARAMETER
            elif tuple(target.shape) == tuple(shape):
                dest[name] = target.data
            elif target.shape[1:] == shape[1:] and target.shape[0] > shape[0] and ("embed" in name or "lm_head" in name):
                dest[name] = target.data.narrow(0, 0, shape[0])  # padded vocabulary rows stay as loaded
            else:
                reasons[name] = f"shape {tuple(shape)} vs the engine's {tuple(target.shape)}"
            continue
        target = held(f"{parent}.{fused}" if parent else fused, attr)
        siblings = [f"{parent}.{part}.{attr}" if parent else f"{part}.{attr}" for part in packed[fused]]
        if target is None or any(s not in shapes for s in siblings):
            reasons[name] = f"no fused parameter {fused} with all of {packed[fused]}"
            continue
        rows = [shapes[s][0] for s in siblings]
        if sum(rows) != target.shape[0] or tuple(target.shape[1:]) != tuple(shape[1:]):
            reasons[name] = f"parts {rows} do not stack into the engine's {tuple(target.shape)}"
            continue
        offset = sum(rows[:packed[fused].index(leaf)])
        dest[name] = target.data.narrow(0, offset, shape[0])
    return dest, reasons


@dataclass
class LayoutReport:
    """vLLM's own load of the checkpoint against the layout the direct map and the digest assume
    (each checkpoint tensor = rows of the engine tensor of its name, or of its fused tensor).

    same: names where the engine holds exactly the checkpoint tensor where the map says;
    transposed: names whose engine tensor is the checkpoint tensor transposed (GPT-2's Conv1D);
    rearranged: names held some other way, with what differs; ignored: checkpoint names with no
    engine tensor at all (a saved head beside a tied embedding, buffers such as rotary_emb.inv_freq);
    unplaced: names the map cannot place (fused parts missing), with the reason.
    """

    same: List[str]
    transposed: List[str]
    rearranged: Dict[str, str]
    ignored: List[str]
    unplaced: Dict[str, str]

    @property
    def direct_ok(self) -> bool:
        return not (self.transposed or self.rearranged or self.unplaced)

    def why_not_direct(self) -> str:
        """One line: what the direct map gets wrong (empty when it agrees with vLLM's loader)."""
        wrong = {**{n: "vLLM holds it transposed" for n in self.transposed}, **self.rearranged, **self.unplaced}
        if not wrong:
            return ""
        first = next(iter(wrong))
        return f"{len(wrong)} checkpoint tensors are not where the direct map puts them (e.g. {first}: {wrong[first]})"


def compare_layout(held: Dict[str, torch.Tensor], packed: Dict[str, List[str]], shapes: Dict[str, Tuple[int, ...]],
                   tensors: WeightIter) -> LayoutReport:
    """Each checkpoint tensor against what vLLM's own loader wrote for it (`held`: the engine's
    parameters right after that load, tied aliases left out), byte for byte, in the engine's dtype."""
    dest, reasons = destinations(held, packed, shapes)
    report = LayoutReport([], [], {}, [], {})
    for name, tensor in tensors:
        target = dest.get(name)
        own = held.get(name)
        if target is not None and torch.equal(target, tensor.to(target.device, target.dtype)):
            report.same.append(name)
        elif reasons.get(name) == NO_PARAMETER:
            report.ignored.append(name)
        elif own is not None and tensor.dim() == 2 and own.shape == tensor.t().shape and \
                torch.equal(own, tensor.t().to(own.device, own.dtype)):
            report.transposed.append(name)
        elif target is not None:
            report.rearranged[name] = "the engine holds other values where the map puts it"
        elif name in reasons and own is not None:
            report.rearranged[name] = reasons[name]
        else:
            report.unplaced[name] = reasons.get(name, "no place")
    return report


def _refresh_embedding_kernels(model: nn.Module) -> int:
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
_HOOKED = "_recipe_digest_hooked"      # attribute on the vLLM model: names of hooked modules
_CAPTURE_S = "_recipe_digest_capture_s"  # attribute on the vLLM model: [seconds spent capturing]
_COPIES = "_recipe_loader_copies"  # attribute on the vLLM model: [{param name: copy} during a layout check, else None]


def _engine_name(name: str) -> str:
    """vLLM parameter name without LoRA wrapper segments (what reload_weights itself strips)."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def _vllm_model(worker) -> nn.Module:
    return worker.model_runner.get_model()


def _capturing(original: Callable, names: Dict[int, str], captures: dict, seconds: List[float],
               copies: List[Optional[dict]]) -> Callable:
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


def _install_digest_hooks_in_worker(worker) -> int:
    """Wrap every layer's `quant_method.process_weights_after_loading` to digest its parameters first."""
    model = _vllm_model(worker)
    if getattr(model, _CAPTURES, None) is not None:
        return 0
    captures: dict = {}
    seconds = [0.0]
    copies: List[Optional[dict]] = [None]
    names = {id(m): _engine_name(n) for n, m in model.named_modules()
             if hasattr(getattr(m, "quant_method", None), "process_weights_after_loading")}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if id(module) in names and not getattr(method, "_recipe_digest_hook", False):
            method.process_weights_after_loading = _capturing(method.process_weights_after_loading, names, captures,
                                                              seconds, copies)
            method._recipe_digest_hook = True
    setattr(model, _CAPTURES, captures)
    setattr(model, _HOOKED, set(names.values()))
    setattr(model, _CAPTURE_S, seconds)
    setattr(model, _COPIES, copies)
    return len(names)


def _clear_captures_in_worker(worker) -> None:
    model = _vllm_model(worker)
    getattr(model, _CAPTURES).clear()
    getattr(model, _CAPTURE_S)[0] = 0.0


def _capture_seconds_in_worker(worker) -> float:
    return getattr(_vllm_model(worker), _CAPTURE_S, [0.0])[0]


def _held_digests_in_worker(worker, use_captures: bool) -> Dict[str, Optional[digest_mod.Digest]]:
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


def _aliases_in_worker(worker) -> List[List[str]]:
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


def alias_owners(groups: List[List[str]], checkpoint: set) -> Dict[str, str]:
    """{alias: owner} for groups of names that are one tensor: the owner is the group's first name
    the checkpoint holds (else its first), the name the tensor is streamed under."""
    owners: Dict[str, str] = {}
    for group in groups:
        owner = next((n for n in group if n in checkpoint), group[0])
        owners.update({alias: owner for alias in group if alias != owner})
    return owners


def _copy_next_load_in_worker(worker) -> None:
    """Keep a copy of each hooked layer's parameters as the next load leaves them (before packing)."""
    getattr(_vllm_model(worker), _COPIES)[0] = {}


def _layout_in_worker(worker, model_dir: str, aliases: List[str]) -> LayoutReport:
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


def _packed_modules_in_worker(worker) -> Dict[str, List[str]]:
    """The model class's fused modules, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}."""
    model = _vllm_model(worker)
    return {k: list(v) for k, v in dict(getattr(model, "packed_modules_mapping", {}) or {}).items()}


def _adapter_digests_in_worker(worker, lora_id: int) -> Dict[str, List[Optional[tuple]]]:
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


def _vllm_kwargs(cfg: DictConfig, ctx, model_dir: str) -> dict:
    kwargs = dict(model=model_dir, dtype=cfg.model.dtype, max_model_len=cfg.rollout.max_model_len,
                  seed=cfg.trainer.seed + ctx.rank, enable_prefix_caching=True,
                  # logprobs of the distribution actually sampled from (after temperature), which is
                  # what the trainer's importance ratio divides by (recipe/model.py token_logprobs)
                  logprobs_mode="processed_logprobs",
                  use_tqdm_on_load=cfg.logger.verbose)
    if _in_trainer_world():
        # One engine per rank beside torch.distributed, as TRL's colocate mode and verl start it: vLLM
        # joins the trainer's world (RANK / LOCAL_RANK / MASTER_* from the launcher) instead of making
        # its own, puts its worker on LOCAL_RANK's device and forms a tensor-parallel group of one per
        # rank. Without it every rank's worker took cuda:0 ("No available memory for the cache blocks").
        kwargs["distributed_executor_backend"] = "external_launcher"
    if resolve_device(cfg) == "cpu":
        # vLLM reads the CPU KV-cache size from the environment when the engine starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.kv_cache_gb)
        kwargs["enforce_eager"] = True
        # A prefill split across engine steps rewinds the request's seeded generator by an offset,
        # which CPU generators do not have ("CPU Generator does not use offset"): a batch of more
        # prompt tokens than one step takes (4096, e.g. 128 samples of 40-token prompts) crashed.
        # Whole prefills only: a request that does not fit waits for the next step.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = cfg.rollout.gpu_memory_utilization
        kwargs["enforce_eager"] = cfg.rollout.enforce_eager
        kwargs["enable_sleep_mode"] = cfg.rollout.sleep
    if cfg.lora.name == "adapter":
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_slot(cfg.lora.rank), max_loras=1)
    return kwargs


def _in_trainer_world() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def check_gpu_memory_split(cfg: DictConfig, device: torch.device) -> Dict[str, float]:
    """The engine takes `rollout.gpu_memory_utilization` of the GPU's total memory (weights + KV cache);
    the trainer keeps the rest. Checked before the engine starts, on every rank, with one verdict:
    a rank short of memory names the field and what it would fit, instead of vLLM's own error later."""
    from recipe.config import ConfigError
    from recipe.dist import agree

    free, total = torch.cuda.mem_get_info(device)
    want = cfg.rollout.gpu_memory_utilization * total
    agree(None if free >= want else (
        f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} asks the engine for "
        f"{want / 2**30:.1f} GiB of {device}'s {total / 2**30:.1f} GiB, but {free / 2**30:.1f} GiB is free after "
        f"the trainer's model and optimizer. Lower it to at most {max(0.0, free / total - 0.02):.2f}, or move the "
        f"trainer's weights off the GPU between phases (+offload=cpu or +offload=manual)."), ConfigError)
    return {"free_gb": free / 2**30, "total_gb": total / 2**30, "engine_gb": want / 2**30}


def lora_scaling(adapter_config: dict) -> float:
    """vLLM's LoRA scaling factor: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFTHelper)."""
    rank, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts only some max_lora_rank values; take the smallest one >= rank."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if slot >= rank:
            return slot
    raise ValueError(f"lora.rank={rank} is larger than vLLM's largest max_lora_rank (512)")


# vLLM messages that every weight reload repeats and that say nothing wrong here: the rotary
# embedding has no weights, the tied LM head is the embedding (re-processed in load_weights),
# and the CPU worker cannot re-set its thread count. The parity probe checks what they concern.
_HARMLESS = ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights",
             "doesn't allow to use `torch.set_num_threads`")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(h in msg for h in _HARMLESS)


def _quiet_vllm_logs() -> None:
    """Keep the console readable: vLLM at WARNING (unless VLLM_LOGGING_LEVEL is set, as `logger.verbose`
    does through recipe.progress.configure_console) minus the repeats."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm  # noqa: F401  (configures the "vllm" logger and its handler)

    # A logger's filters see only records logged to it, so attach to every vLLM logger that exists.
    names = [n for n in logging.Logger.manager.loggerDict if n == "vllm" or n.startswith("vllm.")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(self, cfg: DictConfig, ctx, model_dir: str):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: reload via iterator
        _quiet_vllm_logs()
        from vllm import LLM

        self.cfg, self.ctx = cfg, ctx
        self.on_cpu = resolve_device(cfg) == "cpu"
        self.memory: Dict[str, float] = {}  # GPU memory free at start, after sleep and after wake (GiB)
        if not self.on_cpu:
            self.memory["rollout/mem_free_before_engine_gb"] = check_gpu_memory_split(cfg, ctx.device)["free_gb"]
        self.llm = LLM(**_vllm_kwargs(cfg, ctx, model_dir))
        _quiet_vllm_logs()  # again: building the engine imported more vLLM modules
        self._lora = None  # (LoRARequest, tensors, config) of the live adapter version
        self._asleep = False
        self._packed = self.llm.collective_rpc(_packed_modules_in_worker)[0]
        self._aliases = alias_owners(self.llm.collective_rpc(_aliases_in_worker)[0], set(checkpoint_shapes(model_dir)))
        self._hooked = self.on_cpu and cfg.sync.digest
        if self._hooked:  # CPU packs linear weights after a load: digest them just before (see above)
            self.llm.collective_rpc(_install_digest_hooks_in_worker)
        self.layout = self._check_layout(model_dir)
        self._transposed = set(self.layout.transposed) if self.layout is not None else set()
        self._dest = self._direct_destinations(model_dir)  # name -> view of the engine's parameter, or None
        self.load_path = "direct" if self._dest is not None else "reload"

    def _check_layout(self, model_dir: str) -> Optional[LayoutReport]:
        """Prove the direct map and the digest's picture of the engine against vLLM's own loader: each
        checkpoint tensor against what that loader wrote for it (on CUDA the parameters as the engine
        started; on CPU a reload of the checkpoint, copied before the packing). Needed for the direct
        load (CUDA) and for the digest; a layout the digest cannot follow is refused here, at start."""
        from recipe.config import ConfigError

        direct_wanted = not self.on_cpu and self.cfg.sync.load != "reload"
        if not (direct_wanted or self.cfg.sync.digest):
            return None
        if self.on_cpu:
            self.llm.collective_rpc(_copy_next_load_in_worker)
            self.reload_weights(checkpoint_tensors(model_dir))
        report = self.llm.collective_rpc(_layout_in_worker, args=(model_dir, sorted(self._aliases)))[0]
        if report.rearranged and self.cfg.sync.digest:
            first = next(iter(report.rearranged))
            raise ConfigError(
                f"sync.digest=true: vLLM's loader rearranges {len(report.rearranged)} tensors of {model_dir} in a way "
                f"the digest cannot follow (e.g. {first}: {report.rearranged[first]}), so every sync would fail; set "
                f"sync.digest=false (the logprob probe, sync.probe_every, still checks the engine)")
        if report.transposed:
            log.info("sync.digest: vLLM holds %d tensors transposed (e.g. %s); the trainer digests them transposed",
                     len(report.transposed), report.transposed[0])
        return report

    def weight_held_form(self) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """Streamed tensors the engine holds transposed (found at start) are digested transposed."""
        if not self._transposed:
            return None
        transposed = self._transposed
        return lambda name, tensor: tensor.t() if name in transposed else tensor

    def _direct_destinations(self, model_dir: str) -> Optional[Dict[str, torch.Tensor]]:
        """`sync.load`: "direct" writes each streamed tensor straight into its place in the engine's
        parameters (a map built once here); "reload" runs vLLM's own reload (its per-tensor weight
        loaders); "auto" takes direct where it applies (CUDA, every name placed) and reload otherwise."""
        from recipe.config import ConfigError

        mode = self.cfg.sync.load
        if mode == "reload" or (mode == "auto" and self.on_cpu):
            return None
        if self.on_cpu:
            raise ConfigError("sync.load=direct needs CUDA: vLLM's CPU backend repacks its linear weights after "
                              "every load, so they cannot be written in place; use sync.load=auto or reload")
        model = self.llm.apply_model(lambda m: m)[0]  # in-process: the engine's own module
        dest, _ = weight_destinations(model, checkpoint_shapes(model_dir))
        why = self.layout.why_not_direct()  # the map against vLLM's own loader, tensor by tensor
        if why:
            if mode == "direct":
                raise ConfigError(f"sync.load=direct: {why}; use sync.load=auto or reload")
            log.info("sync.load=auto: vLLM's reload, not the direct map: %s", why)
            return None
        return {name: view for name, view in dest.items() if name not in self.layout.ignored}

    def _request(self):
        return self._lora[0] if self._lora is not None else None

    def generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams

        # One seed per prompt: with a single shared seed every prompt draws the same random
        # stream, so sample j of each prompt comes out (nearly) the same and a batch holds
        # only n distinct completions. vLLM seeds sample j of a request with seed + j, hence
        # the stride n between prompts.
        # detokenize=False: the caller decodes the token ids it needs (GRPOTrainer.decode); vLLM's
        # incremental detokenizer cost 13 ms of a 85 ms rollout (256 x 4 tokens, tiny model, CPU).
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=(seed * 100_003 + i * n) % 2**31, logprobs=0, detokenize=False)
                  for i in range(len(prompt_token_ids))]
        outs = self.llm.generate(_token_prompts(prompt_token_ids), params, lora_request=self._request(),
                                 use_tqdm=False)
        samples = []
        for out in outs:
            for c in out.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                samples.append(Sample(list(out.prompt_token_ids), list(c.token_ids), lps, str(c.finish_reason)))
        return samples

    def prompt_logprobs(self, token_id_lists):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if self._lora is None:
            outs = self.llm.generate(_token_prompts(token_id_lists), params, use_tqdm=False)
        else:
            # One request per call: vLLM's LoRA logits path indexes adapters per *sampled* row, so
            # a batch of prompts fails (CPU punica: "einsum(): subscript b has size 4 ... size 11")
            # on models whose LM head takes LoRA (Llama/SmolLM2). With one request the adapter
            # index broadcasts over that request's prompt tokens, which all share the adapter.
            outs = [self.llm.generate(_token_prompts([ids]), params, lora_request=self._request(),
                                      use_tqdm=False)[0] for ids in token_id_lists]
        result = []
        for ids, out in zip(token_id_lists, outs):
            # entry i is the logprob of token i given tokens < i; entry 0 is None
            result.append([d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])])
        return result

    def load_weights(self, weights):
        if self._dest is not None:
            self._write_direct(weights)
            self.llm.reset_prefix_cache()
            return
        self.reload_weights(weights)

    def reload_weights(self, weights: WeightIter) -> None:
        """vLLM's own reload (its per-tensor weight loaders and post-processing), whatever `sync.load` says."""
        if self._hooked:
            self.llm.collective_rpc(_clear_captures_in_worker)
        self.llm.collective_rpc(_reload_in_worker, args=(iter(weights),))
        if self.on_cpu:
            self.llm.apply_model(_refresh_embedding_kernels)
        self.llm.reset_prefix_cache()
        if self._lora is not None:  # reload_weights drops adapters (they were built on the old base)
            req, tensors, config = self._lora
            self.llm.collective_rpc(_add_lora_in_worker, args=(req.lora_int_id, tensors, config, None))

    @torch.no_grad()
    def _write_direct(self, weights: WeightIter) -> None:
        """One device copy per streamed tensor into its view of the engine's parameters; no weight loader,
        no post-processing (unquantized CUDA layers use their parameters as loaded). Nothing else in the
        engine changes, so a live LoRA adapter stays registered."""
        for name, tensor in weights:
            dst = self._dest.get(name)
            if dst is None:
                raise KeyError(f"sync.load=direct: the engine has no place for {name!r} (the checkpoint's tensors "
                               f"are {len(self._dest)} names such as {next(iter(self._dest))!r})")
            dst.copy_(tensor, non_blocking=True)

    def load_adapter(self, tensors, adapter_config, version):
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise RuntimeError("load_adapter needs an engine built with lora=adapter (enable_lora=True)")
        # Copies: vLLM folds the scaling into lora_b IN PLACE (LoRALayerWeights.optimize), and a stream
        # may yield the trainer's own tensors (world 1, shards on the device). Adapters are small.
        tensors = {name: t.detach().clone() for name, t in tensors}
        lora_id = version + 1  # lora_int_id must be > 0 and new for every version
        drop = self._lora[0].lora_int_id if self._lora is not None else None
        self.llm.collective_rpc(_add_lora_in_worker, args=(lora_id, tensors, adapter_config, drop))
        # The path is never read: the id is already registered, so vLLM only activates it.
        self._lora = (LoRARequest(f"policy-v{version}", lora_id, f"in-memory://policy-v{version}"), tensors,
                      adapter_config)
        self.lora_version = version
        self.llm.reset_prefix_cache()

    def weight_digests(self):
        if self.on_cpu and not self._hooked:
            raise RuntimeError("weight_digests on CPU needs the engine built with sync.digest=true (the load hooks)")
        if self._hooked:
            self.load_digest_seconds = self.llm.collective_rpc(_capture_seconds_in_worker)[0]
        held = self.llm.collective_rpc(_held_digests_in_worker, args=(self._hooked,))[0]
        return {name: (self._parts(name), d) for name, d in held.items()}

    def _parts(self, name: str) -> Tuple[str, ...]:
        """Streamed names an engine tensor is made of: fused modules by the model's
        packed_modules_mapping (in concatenation order), a tied alias by the tensor it is."""
        if name in self._aliases:
            return (self._aliases[name],)
        prefix, _, attr = name.rpartition(".")
        stem, _, leaf = prefix.rpartition(".")
        if leaf in self._packed:
            return tuple(f"{stem}.{part}.{attr}" if stem else f"{part}.{attr}" for part in self._packed[leaf])
        return (name,)

    def adapter_digests(self):
        if self._lora is None:
            raise RuntimeError("adapter_digests: no adapter is loaded")
        held = self.llm.collective_rpc(_adapter_digests_in_worker, args=(self._lora[0].lora_int_id,))[0]
        out = {}
        for module_name, subs in held.items():
            stem, _, leaf = module_name.rpartition(".")
            parts = [f"{stem}.{p}" for p in self._packed[leaf]] if leaf in self._packed else [module_name]
            if len(parts) != len(subs):
                raise RuntimeError(f"adapter module {module_name!r}: {len(subs)} packed LoRAs for parts {parts}")
            for part, sub in zip(parts, subs):
                if sub is not None:
                    for kind, both in zip(("lora_A", "lora_B"), sub):
                        name = f"{PEFT_PREFIX}{part}.{kind}.weight"
                        out[name] = ((name,), both)  # both orientations; the caller picks the streamed one
        return out

    def adapter_held_form(self, adapter_config):
        """vLLM folds the scaling into lora_b in place (LoRALayerWeights.optimize) in the LoRA dtype."""
        scale = lora_scaling(adapter_config)
        dtype = self.llm.llm_engine.vllm_config.lora_config.lora_dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, self.cfg.model.dtype)

        def held(name: str, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(dtype)
            return tensor * scale if ".lora_B." in name and scale != 1 else tensor

        return held

    def sleep(self):
        if not self.cfg.rollout.sleep or self._asleep:
            return
        if self.on_cpu:
            log.info("rollout.sleep: vLLM has no sleep mode on CPU; the engine stays resident")
            self._asleep = True  # log once per sleep/wake pair, not every call
            return
        self.llm.sleep(level=1)
        self._asleep = True
        self.memory["rollout/mem_free_asleep_gb"] = _free_gb(self.ctx.device)

    def wake(self):
        if not self._asleep:
            return
        if not self.on_cpu:
            self.llm.wake_up()
            self.memory["rollout/mem_free_awake_gb"] = _free_gb(self.ctx.device)
        self._asleep = False

    def memory_stats(self) -> Dict[str, float]:
        return dict(self.memory)

    def close(self):
        """Shut the engine down and leave the trainer's process group alive.

        Call it before `destroy_process_group`. vLLM's in-process shutdown ends with
        `destroy_distributed_environment()`, which destroys torch's *default* group too, i.e. the
        trainer's world: we keep that call away from the default group (vLLM's own groups are
        still destroyed). Left to garbage collection after the world is gone, the same cleanup
        fails with "Invalid process group specified"; hence an explicit, ordered close.
        """
        import gc

        if getattr(self, "llm", None) is None:
            return
        with _keep_default_process_group():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()


@contextlib.contextmanager
def _keep_default_process_group():
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group=None):
        if group is None or group is dist.GroupMember.WORLD:
            return  # the trainer's world outlives the engine
        original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


def _token_prompts(token_id_lists):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_id_lists]


# ----------------------------------------------------------------------------- HF generate


class HfEngine(Engine):
    """HF generate on `module` (the policy itself, or any unsharded HF / peft model)."""

    backend = "hf"
    shares_policy = True  # the engine IS the policy: a sync moves nothing

    def __init__(self, module: nn.Module, device: torch.device, eos_token_id: Optional[int], pad_token_id: int):
        self.module, self.device = module, device
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def _full_params(self):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(self.module, FSDP):
            return FSDP.summon_full_params(self.module, writeback=False), self.module.module, False
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.module, FSDPModule):
            # generate() may bypass the root's forward (peft calls the inner model's generate), so
            # gather the root's own params (embeddings, norm) up front; the layers gather in their
            # forward hooks, one collective per step: hence synced_gpus.
            return _root_unsharded(self.module), self.module, torch.distributed.is_initialized()
        return contextlib.nullcontext(), self.module, False

    @torch.no_grad()
    def generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        """All prompts x n in ONE left-padded `generate` call, so every rank makes the same
        number of (collective) forwards whatever its prompts are."""
        rows = [list(ids) for ids in prompt_token_ids for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        torch.manual_seed(seed)
        out = self._generate(ids.to(self.device), mask.to(self.device), max_new_tokens, temperature, top_p)
        # logprobs of the distribution sampled from (after temperature / top-p), as the vLLM
        # engine reports them (logprobs_mode="processed_logprobs"); greedy: the raw logits
        steps = out.logits if out.scores is None else out.scores
        logprobs = torch.stack([torch.log_softmax(lg.float(), -1) for lg in steps], 1)  # [rows, steps, vocab]
        new = out.sequences[:, width:]
        picked = logprobs.gather(-1, new[..., None])[..., 0].cpu()
        return [self._sample(r, new[i].tolist(), picked[i].tolist()) for i, r in enumerate(rows)]

    def _generate(self, ids, mask, max_new_tokens, temperature, top_p):
        ctx, module, synced = self._full_params()
        greedy = temperature == 0
        with ctx, only_given_sampling(module):
            return module.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
                output_logits=True, output_scores=not greedy, return_dict_in_generate=True, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, synced_gpus=synced)

    def _sample(self, prompt: List[int], new: List[int], lps: List[float]) -> Sample:
        if self.eos_token_id in new:  # HF pads finished rows after EOS; cut there like vLLM
            cut = new.index(self.eos_token_id) + 1
            return Sample(prompt, new[:cut], lps[:cut], "stop")
        return Sample(prompt, new, lps, "length")

    def prompt_logprobs(self, token_id_lists):
        from recipe.model import sequence_logprobs

        ctx, module, _ = self._full_params()
        with ctx:
            return sequence_logprobs(module, token_id_lists, self.device)

    def load_weights(self, weights):
        """The engine is the policy: nothing to copy. The iterator is still drained (the gather is collective)."""
        for _ in weights:
            pass

    def load_adapter(self, tensors, adapter_config, version):
        for _ in tensors:
            pass
        self.lora_version = version


@contextlib.contextmanager
def only_given_sampling(module: nn.Module):
    """HF `generate` with exactly the arguments given: the checkpoint's `generation_config.json` set aside.

    transformers fills every generation setting a call leaves unset from the model's
    `generation_config` (loaded from the checkpoint): a `repetition_penalty` there reshaped the
    distribution sampled from, so the engine's logprobs differed from the trainer's. For the call,
    every module that carries one (the HF model, and a peft wrapper around it) gets an empty
    `GenerationConfig`; transformers' neutral defaults then fill what the call does not say.
    """
    from transformers import GenerationConfig

    saved = [(m, vars(m)["generation_config"]) for m in module.modules()
             if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    try:
        for m, _ in saved:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in saved:
            m.generation_config = config


@contextlib.contextmanager
def _root_unsharded(module):
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


class HfCopyEngine(HfEngine):
    """HF generate on the engine's OWN unsharded copy of the model, which the sync loads into.

    This is `rollout=hf`: the same gather -> load -> verify path as vLLM, for machines without
    vLLM (the GPU test machines) and as a second engine in tests. Loads are by HF name (full
    weights) or peft's saved-adapter name (lora=adapter); an unknown name raises, as vLLM does.
    """

    shares_policy = False

    def __init__(self, cfg: DictConfig, ctx, model_dir: str):
        from transformers import AutoConfig

        from recipe.model import apply_lora, load_hf_model

        hf_cfg = AutoConfig.from_pretrained(model_dir)
        module = load_hf_model(cfg, ctx.device)
        if cfg.lora.name == "adapter":
            module = apply_lora(module, cfg)
        module.eval().requires_grad_(False)
        super().__init__(module, ctx.device, hf_cfg.eos_token_id,
                         hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0)
        params = dict(module.named_parameters())
        self._by_hf_name = {hf_name(n): p for n, p in params.items() if not is_lora_param(n)}
        self._by_adapter_name = {peft_name(n): p for n, p in params.items() if is_lora_param(n)}

    @staticmethod
    @torch.no_grad()
    def _copy_into(table: Dict[str, torch.Tensor], weights: WeightIter, what: str) -> None:
        for name, tensor in weights:
            if name not in table:
                raise KeyError(f"rollout=hf: no {what} named {name!r} in the engine's model")
            table[name].copy_(tensor)

    def load_weights(self, weights):
        self._copy_into(self._by_hf_name, weights, "weight")

    def load_adapter(self, tensors, adapter_config, version):
        self._copy_into(self._by_adapter_name, tensors, "adapter tensor")
        self.lora_version = version

    def weight_digests(self):
        """Every parameter under each of its names; a tied alias (found by identity) must be the tensor
        it is streamed as (peft keeps the tie)."""
        owners = alias_owners(self._alias_groups(), set(self._by_hf_name))
        held = dict(self._by_hf_name)
        for raw, param in self.module.named_parameters(remove_duplicate=False):
            if not is_lora_param(raw) and hf_name(raw) in owners:
                held[hf_name(raw)] = param
        names = list(held)
        done = digest_mod.digests([held[n] for n in names])
        return {n: ((owners.get(n, n),), d) for n, d in zip(names, done)}

    def _alias_groups(self) -> List[List[str]]:
        groups: Dict[int, List[str]] = {}
        for raw, param in self.module.named_parameters(remove_duplicate=False):
            if not is_lora_param(raw):
                groups.setdefault(id(param), []).append(hf_name(raw))
        return [g for g in groups.values() if len(g) > 1]

    def adapter_digests(self):
        names = list(self._by_adapter_name)
        return {n: ((n,), d) for n, d in zip(names, digest_mod.digests([self._by_adapter_name[n] for n in names]))}


def build_engine(cfg: DictConfig, ctx, model_dir: str) -> Engine:
    """The engine named by `rollout.backend`: "vllm", or "hf" (an own HF copy the sync loads into).
    (`HfEngine(policy, ...)` generates with the policy itself.)"""
    if cfg.rollout.backend == "vllm":
        return VllmEngine(cfg, ctx, str(model_dir))
    if cfg.rollout.backend == "hf":
        return HfCopyEngine(cfg, ctx, str(model_dir))
    raise ValueError(f"rollout.backend={cfg.rollout.backend!r} is not valid; choose one of: vllm, hf")
