"""A LoRA run's export served by vLLM on CPU: the merged Hugging Face directory loads and generates,
and the PEFT adapter, served on the base through `LoRARequest`, gives the merged policy's logprobs.

    .venv/bin/python -m pytest tests/e2e/test_export_serve.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import compose

PROMPTS = [[1, 7, 12, 30, 4, 9, 22, 5], [3, 8, 40, 2, 17, 11]]
# float32: vLLM's prompt logprobs (LoRA applied as x A^T B^T, its own kernels) against transformers'
# forward of the merged weights. Measured on the tiny model after one step: 1e-6 or less.
TOLERANCE = 1e-4


def _prompt_logprobs(llm, lora_request=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, lora_request=lora_request, use_tqdm=False
    )
    return [
        [
            next(iter(d.values())).logprob if len(d) == 1 else d[tok].logprob
            for d, tok in zip(o.prompt_logprobs[1:], p[1:])
        ]
        for o, p in zip(outs, PROMPTS)
    ]


def _llm(model, **kwargs):
    from vllm import LLM

    return LLM(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        seed=0,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def no_process_group_left():
    """vllm.LLM in the test's own process sets up torch.distributed's default group (world 1) and leaves
    it: the tests after this one in the same pytest process start their own and would fail with
    "trying to initialize the default process group twice"."""
    yield
    import torch.distributed as dist
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_serves_the_export_and_the_adapter(tiny_model_dir, tmp_path):
    from omegaconf import open_dict
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from recipe.model import sequence_logprobs
    from recipe.train import train

    cfg = compose(
        [
            f"model.path={tiny_model_dir}",
            "+lora=adapter",
            "rollout=hf",
            "trainer.world_size=1",
            "trainer.steps=1",
            "trainer.prompts_per_step=2",
            "rollout.n=4",
            "rollout.max_new_tokens=4",
            "logger=none",
            "trainer.lr=0.05",
        ]
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    train(cfg)  # trainer.export=final (the default): export/step_1
    out = tmp_path / "export" / "step_1"
    assert json.loads((out / "export.json").read_text())["step"] == 1
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = sequence_logprobs(merged, PROMPTS, torch.device("cpu"))
    base = sequence_logprobs(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), PROMPTS, torch.device("cpu")
    )

    def gap(a, b):
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    assert gap(want, base) > 10 * TOLERANCE, "one step at lr 0.05 left the policy at the base: the test proves nothing"
    llm = _llm(out)
    text = llm.generate([{"prompt_token_ids": PROMPTS[0]}], use_tqdm=False)[0].outputs[0].token_ids
    assert len(text) > 0
    assert gap(_prompt_logprobs(llm), want) <= TOLERANCE
    del llm
    served = _llm(tiny_model_dir, enable_lora=True, max_lora_rank=8, max_loras=1)
    adapter = LoRARequest("trained", 1, str(out / "adapter"))
    measured = gap(_prompt_logprobs(served, adapter), want)
    assert measured <= TOLERANCE, f"vLLM + LoRARequest vs the merged policy: {measured}"
