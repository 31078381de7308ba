"""`rollout=hf` samples with exactly `rollout.*`: the checkpoint's generation_config.json (here a
`repetition_penalty` and a `no_repeat_ngram_size`, as real checkpoints ship) is not applied, so the
logprobs the engine reports are the trainer's tempered distribution (recipe/engine/hf.py
`only_given_sampling`).

    .venv/bin/python -m pytest tests/unit/test_hf_sampling.py -q
"""

from __future__ import annotations

import json
import shutil

import torch

# max |engine logprob - trainer logprob| per sampled token (float32, same weights, HF generate's
# cached decode vs one full forward); measured 2.6e-6. With the checkpoint's penalties applied: 1.39.
GAP_TOL = 1e-4


def _checkpoint_with_penalties(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "penalised"
    shutil.copytree(tiny_model_dir, model_dir)
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=3)
    path.write_text(json.dumps(config))
    return model_dir


def test_hf_engine_ignores_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    from recipe.dist import DistContext
    from recipe.model import load_hf_model, token_logprobs
    from recipe.engine import HfCopyEngine
    from tests.helpers import compose, engine_spec

    model_dir = _checkpoint_with_penalties(tiny_model_dir, tmp_path)
    cfg = compose(
        [f"model.path={model_dir}", "model.builder=none", "rollout=hf", "trainer.device=cpu", "rollout.temperature=0.7"]
    )
    engine = HfCopyEngine(engine_spec(cfg), DistContext(0, 1, 0, torch.device("cpu")), str(model_dir))
    assert engine.module.generation_config.repetition_penalty == 3.0  # the checkpoint's setting is loaded ...
    prompts = [[5, 6, 7, 5, 6, 7], [9, 9, 9, 9]]
    samples = engine.generate(prompts, n=4, max_new_tokens=8, temperature=0.7, top_p=1.0, seed=0)
    assert engine.module.generation_config.repetition_penalty == 3.0  # ... and given back after the call
    trainer = load_hf_model(cfg.model)
    worst = 0.0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_token_ids + s.token_ids])
            lp = token_logprobs(trainer(input_ids=ids).logits, ids, 0.7)[0, len(s.prompt_token_ids) - 1 :]
            worst = max(worst, (lp - torch.tensor(s.logprobs)).abs().max().item())
    print(f"max |engine - trainer| logprob: {worst:.2e}")
    assert worst <= GAP_TOL, f"the engine sampled from another distribution than rollout.* (gap {worst:.3f})"
