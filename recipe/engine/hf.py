"""HF generate engines: `HfEngine` on a given unsharded module, `HfCopyEngine` (rollout=hf) on its own copy
(see `recipe.engine`)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from recipe import digest as digest_mod
from recipe.engine.base import Engine, EngineSpec, Sample, WeightIter
from recipe.engine.layout import alias_owners
from recipe.names import hf_name, is_lora_param, peft_name


class HfEngine(Engine):
    """HF generate on `module`, an unsharded HF / peft model; `HfCopyEngine` loads the sync into its own."""

    backend = "hf"

    def __init__(self, module: nn.Module, device: torch.device, eos_token_id: Optional[int], pad_token_id: int):
        self.module, self.device = module, device
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def full_module(self) -> Tuple[ContextManager, nn.Module, bool]:
        """(context in which the module's full parameters are present, the module to call, synced_gpus)."""
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
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
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
        ctx, module, synced = self.full_module()
        greedy = temperature == 0
        with ctx, only_given_sampling(module):
            return module.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=None,
                output_logits=True,
                output_scores=not greedy,
                return_dict_in_generate=True,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                synced_gpus=synced,
            )

    def _sample(self, prompt: List[int], new: List[int], lps: List[float]) -> Sample:
        if self.eos_token_id in new:  # HF pads finished rows after EOS; cut there like vLLM
            cut = new.index(self.eos_token_id) + 1
            return Sample(prompt, new[:cut], lps[:cut], "stop")
        return Sample(prompt, new, lps, "length")

    def prompt_logprobs(self, token_id_lists):
        from recipe.model import sequence_logprobs

        ctx, module, _ = self.full_module()
        with ctx:
            return sequence_logprobs(module, token_id_lists, self.device)


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

    saved = [
        (m, vars(m)["generation_config"])
        for m in module.modules()
        if isinstance(vars(m).get("generation_config"), GenerationConfig)
    ]
    try:
        for m, _ in saved:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in saved:
            m.generation_config = config


class HfCopyEngine(HfEngine):
    """HF generate on the engine's OWN unsharded copy of the model, which the sync loads into.

    This is `rollout=hf`: the same gather -> load -> verify path as vLLM, for machines without
    vLLM (the GPU test machines) and as a second engine in tests. Loads are by HF name (full
    weights) or peft's saved-adapter name (lora=adapter); an unknown name raises, as vLLM does.
    """

    def __init__(self, spec: EngineSpec, ctx, model_dir: str):
        from transformers import AutoConfig

        from recipe.model import apply_lora, load_hf_model

        hf_cfg = AutoConfig.from_pretrained(model_dir)
        module = load_hf_model(spec.model, ctx.device)
        if spec.lora.name == "adapter":
            module = apply_lora(module, spec.lora, spec.model.master_dtype)
        module.eval().requires_grad_(False)
        super().__init__(
            module, ctx.device, hf_cfg.eos_token_id, hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0
        )
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
