"""Where each checkpoint tensor lives in vLLM's model: the direct map, and its check against vLLM's loader.

Pure functions of the engine's parameter table, the model's packed-modules map and the checkpoint's
names and shapes, so they run (and are tested) without vLLM; `recipe.engine.worker` calls them inside
the worker, `recipe.engine.vllm` at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from recipe.engine.base import WeightIter
from recipe.names import checkpoint_shapes


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
    shapes = checkpoint_shapes(model_dir)
    if json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


NO_PARAMETER = "no parameter of that name"


def weight_destinations(
    model: nn.Module, shapes: Dict[str, Tuple[int, ...]]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
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
    dest, reasons = destinations(
        dict(model.named_parameters()), getattr(model, "packed_modules_mapping", {}) or {}, shapes
    )
    return dest, [f"{name}: {why}" for name, why in reasons.items()]


def destinations(
    params: Dict[str, torch.Tensor], packed: Dict[str, List[str]], shapes: Dict[str, Tuple[int, ...]]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
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
            elif (
                target.shape[1:] == shape[1:] and target.shape[0] > shape[0] and ("embed" in name or "lm_head" in name)
            ):
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
        offset = sum(rows[: packed[fused].index(leaf)])
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


def compare_layout(
    held: Dict[str, torch.Tensor], packed: Dict[str, List[str]], shapes: Dict[str, Tuple[int, ...]], tensors: WeightIter
) -> LayoutReport:
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
        elif (
            own is not None
            and tensor.dim() == 2
            and own.shape == tensor.t().shape
            and torch.equal(own, tensor.t().to(own.device, own.dtype))
        ):
            report.transposed.append(name)
        elif target is not None:
            report.rearranged[name] = "the engine holds other values where the map puts it"
        elif name in reasons and own is not None:
            report.rearranged[name] = reasons[name]
        else:
            report.unplaced[name] = reasons.get(name, "no place")
    return report


def alias_owners(groups: List[List[str]], checkpoint: set) -> Dict[str, str]:
    """{alias: owner} for groups of names that are one tensor: the owner is the group's first name
    the checkpoint holds (else its first), the name the tensor is streamed under."""
    owners: Dict[str, str] = {}
    for group in groups:
        owner = next((n for n in group if n in checkpoint), group[0])
        owners.update({alias: owner for alias in group if alias != owner})
    return owners
