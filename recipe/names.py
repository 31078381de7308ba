"""Weight names: the trainer's parameter names -> the names that leave the trainer, and the names
(and tensors) a checkpoint directory holds.

    from recipe.names import hf_name, peft_name, is_lora_param, checkpoint_shapes, checkpoint_tensors

The one place where peft prefixes (`base_model.model.`, `.base_layer`, `.lora_A.default`) and
wrapper segments (FSDP1's `_fsdp_wrapped_module.`, activation checkpointing, torch.compile) are
mapped: the dispatch table (recipe/weights/), the sync's name checks (recipe/sync.py) and the
engine's own copy (recipe/engine/) all use these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Tuple

ADAPTER = "default"  # peft's adapter name; it is dropped from the saved-adapter keys
PEFT_PREFIX = "base_model.model."
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """Drop FSDP1 / activation-checkpoint / torch.compile wrapper segments."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def hf_name(name: str) -> str:
    """Trainer parameter name -> HF checkpoint name (what vLLM's `load_weights` takes).

    `_fsdp_wrapped_module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`
    -> `model.layers.0.self_attn.q_proj.weight`.
    """
    name = strip_wrappers(name)
    if is_lora_param(name):
        raise ValueError(f"{name!r} is a LoRA tensor: it has no HF base name (use peft_name)")
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def peft_name(name: str) -> str:
    """Trainer LoRA parameter name -> key of peft's adapter_model.safetensors.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`
    -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    """
    name = strip_wrappers(name)
    if not is_lora_param(name):
        raise ValueError(f"{name!r} is not a LoRA tensor")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.{ADAPTER}.", f".{part}.")
    return name


def checkpoint_files(model_dir) -> List[Path]:
    """The checkpoint's weight files: safetensors where there are any (as transformers and vLLM
    choose), else PyTorch `.bin` files (read with `torch.load(weights_only=True, mmap=True)`)."""
    safetensors = sorted(Path(model_dir).glob("*.safetensors"))
    return safetensors or sorted(f for f in Path(model_dir).glob("*.bin") if f.name != "training_args.bin")


def _read(file: Path) -> Iterator[Tuple[str, object]]:
    """(name, tensor) of one weight file, one tensor at a time for safetensors."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    import torch

    yield from torch.load(str(file), map_location="cpu", weights_only=True, mmap=True).items()


def checkpoint_shapes(model_dir) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of every tensor in the checkpoint (safetensors headers only; `.bin` mapped)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in checkpoint_files(model_dir):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                shapes.update((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())
        else:
            shapes.update((key, tuple(t.shape)) for key, t in _read(file))
    return shapes


def checkpoint_tensors(model_dir) -> Iterator[Tuple[str, object]]:
    """The checkpoint's tensors by name, one file at a time."""
    for file in checkpoint_files(model_dir):
        yield from _read(file)
