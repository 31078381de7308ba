"""The engine interface: what the loop and the sync call on a rollout engine (see `recipe.engine`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from recipe import digest as digest_mod
from recipe.settings import Settings

WeightIter = Iterable[Tuple[str, torch.Tensor]]
# An engine tensor: the streamed names it is made of (dim-0 concatenation order) and the Digest of
# what the engine holds (None: the engine has no readable copy of it since the last load).
Held = Tuple[Tuple[str, ...], Optional[digest_mod.Digest]]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from: the rollout, model and LoRA slices, the resolved device ("cpu" or
    "cuda"), the sampling seed (`trainer.seed`; each rank adds its rank) and `logger.verbose`. The sync's
    settings are not here: the engine's load mode and digest come from its builder."""

    rollout: Any  # recipe.settings.Rollout
    model: Any  # recipe.settings.Model
    lora: Any  # recipe.settings.Lora
    device: str
    seed: int
    verbose: bool

    @classmethod
    def of(cls, settings: Settings) -> "EngineSpec":
        return cls(
            settings.rollout,
            settings.model,
            settings.lora,
            settings.device,
            settings.trainer.seed,
            settings.logger.verbose,
        )


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
    lora_version: Optional[int] = None
    load_digest_seconds = 0.0  # digest time spent inside the last load_weights (vLLM CPU), else 0

    def generate(
        self,
        prompt_token_ids: List[List[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> List[Sample]:
        raise NotImplementedError

    def submit(
        self,
        prompt_token_ids: List[List[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ):
        """`generate` as a handle whose `.result()` returns the samples. Here they are generated at once. An
        engine that generates elsewhere returns at once and keeps order: a load called after a submit applies
        after that submit's generation, so the batch has the weights the engine held when it was submitted.
        The trainer wakes the engine before a submit and puts it to sleep after (a colocated engine frees the
        device for the update); an engine on devices of its own may take both as no-ops."""
        return Finished(
            self.generate(
                prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
            )
        )

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
