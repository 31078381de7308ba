"""Tiny checkpoints of other architectures, built locally with transformers (head dim 64 for vLLM's CPU
attention), with the built-in tiny model's character tokenizer: for the per-model sync tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch


def _save(model, out: Path, edit: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None) -> str:
    """save_pretrained + the tokenizer; `edit` may change the saved tensors (add or drop keys)."""
    from safetensors.torch import load_file, save_file

    from recipe.builtin_models import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    if edit is not None:
        file = out / "model.safetensors"
        tensors = load_file(str(file))
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    return str(out)


def gpt2(out: Path, seed: int = 0) -> str:
    """GPT-2: its Conv1D weights are saved [in, out]; vLLM's loader transposes them on load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from recipe.builtin_models import VOCAB_SIZE

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=128,
        n_head=2,
        n_layer=2,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.1,
    )
    return _save(GPT2LMHeadModel(config), Path(out))


def llama(
    out: Path, tied: bool = False, seed: int = 0, edit: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None
) -> str:
    """A Llama (untied head unless `tied`); `edit` changes the saved tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipe.builtin_models import VOCAB_SIZE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.1,
    )
    return _save(LlamaForCausalLM(config), Path(out), edit)


def with_ignored_keys(tensors: Dict[str, torch.Tensor]) -> None:
    """What some tied checkpoints carry beside the tensors a model loads: the head saved as a copy of
    the embedding, and each layer's rotary `inv_freq` buffer."""
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)


def llama_bin(out: Path, seed: int = 0) -> str:
    """An untied Llama saved as PyTorch `.bin` only (no safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipe.builtin_models import VOCAB_SIZE, build_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    build_tokenizer().save_pretrained(out)
    return str(out)


def mixtral(out: Path, seed: int = 0) -> str:
    """A mixture of experts that transformers 5 converts at load (experts fused into one tensor)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from recipe.builtin_models import VOCAB_SIZE

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
    )
    return _save(MixtralForCausalLM(config), Path(out))
