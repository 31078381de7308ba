"""What the parity probe sees when the update was trained on tokens other than its own (real vLLM on
CPU, world 1, the tiny model). The fault tests elsewhere train on the probe's own tokens, which
makes the probe look sharper than it is; these figures are the ones docs/SYNC.md quotes.

For each dtype and learning rate: a clean sync, then one AdamW step on arithmetic text that is not
the probe's (other prompts, another completion), then the probe's mean and worst gap for
- a missed update: the engine keeps the weights from before the step;
- one stale tensor: every tensor synced except layer 1's MLP down_proj, which keeps its old value
  (a stale value in the stream: the digest cannot see it, it digests what was streamed);
- the same stale tensor after a step trained on the probe's own tokens (what the fault tests do).

    .venv/bin/python -m pytest tests/e2e/test_probe_reach.py -v -s     # prints the table
"""

from __future__ import annotations

import pytest

from recipe.settings import Settings

from tests.helpers import engine_spec, policy_of, run_world

pytestmark = pytest.mark.slow
FAULT_NAME = "model.layers.1.mlp.down_proj.weight"
OFF_PROBE = ["47+28=", "90-45=", "7*8=", "13+59=", "66-7=", "4*12=", "38+38=", "81-19="]
OFF_COMPLETION = " so we get 75 in total."
LRS = (1e-3, 1e-4)


def _step(policy, optimizer, batch):
    import torch

    width = min(len(ids) for ids in batch)
    ids = torch.tensor([b[:width] for b in batch])
    logits = policy(input_ids=ids).logits.float()
    loss = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _gap(sync):
    from recipe.model import sequence_logprobs
    from recipe.sync import mean_gap, worst_token

    engine = sync.engine.prompt_logprobs(sync.probe)
    trainer = sequence_logprobs(sync.model, sync.probe, sync.ctx.device)
    return mean_gap(trainer, engine), worst_token(trainer, engine)[0]


def _stale_stream(old):
    from recipe.weights import stream_weights

    def stream(model, spec, device):
        for name, t in stream_weights(model, spec, device):
            yield name, (old[name].clone() if name == FAULT_NAME else t)

    return stream


def _reach(rank, world, model_dir):
    import torch
    from transformers import AutoTokenizer

    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy
    from recipe.engine import build_engine
    from recipe.weights import stream_weights
    from tests.doubles import HookedSync
    from tests.helpers import compose

    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    off = [tok(p + OFF_COMPLETION, add_special_tokens=False).input_ids for p in OFF_PROBE]
    rows = []
    for dtype in ("float32", "bfloat16"):
        cfg = compose(
            [
                f"model.path={model_dir}",
                "fsdp=fsdp2",
                "+offload=none",
                "+lora=none",
                "trainer.device=cpu",
                f"model.dtype={dtype}",
                "rollout.max_model_len=128",
                "sync.probe_every=0",
                "sync.digest=false",
            ]
        )
        engine = build_engine(engine_spec(cfg), ctx, model_dir, load=cfg.sync.load, digest=cfg.sync.digest)
        try:
            policy = build_policy(policy_of(cfg), ctx)
            sync = HookedSync(Settings.from_cfg(cfg), ctx, policy, engine, tok)
            for lr in LRS:
                for trained_on in ("other tokens", "probe tokens"):
                    optimizer = build_optimizer(policy, policy_of(cfg))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    sync.stream_fn = None
                    sync.sync(0)
                    clean = _gap(sync)
                    old = {n: t.clone() for n, t in stream_weights(policy, sync.spec, ctx.device)}
                    _step(policy, optimizer, off if trained_on == "other tokens" else sync.probe)
                    missed = _gap(sync)
                    sync.stream_fn = _stale_stream(old)
                    sync.sync(1)
                    stale = _gap(sync)
                    rows.append(
                        {
                            "dtype": dtype,
                            "lr": lr,
                            "trained_on": trained_on,
                            "clean": clean,
                            "missed_update": missed,
                            "stale_tensor": stale,
                            "tolerance": sync.tolerance,
                        }
                    )
        finally:
            engine.close()
    return rows


@pytest.fixture(scope="module")
def reach(tiny_model_dir):
    rows = run_world(_reach, 1, str(tiny_model_dir), timeout_s=1500)[0]
    print(
        "\n| dtype | lr | trained on | clean mean / worst | missed update mean / worst | one stale tensor mean / worst |"
    )
    for r in rows:
        cell = lambda v: f"{v[0]:.3g} / {v[1]:.3g}"  # noqa: E731
        print(
            f"| {r['dtype']} | {r['lr']:g} | {r['trained_on']} | {cell(r['clean'])} | {cell(r['missed_update'])} | "
            f"{cell(r['stale_tensor'])} |"
        )
    return rows


def test_float32_probe_catches_a_missed_update_and_a_stale_tensor_trained_off_probe(reach):
    for r in reach:
        if r["dtype"] == "float32" and r["lr"] == 1e-3:
            assert r["clean"][0] <= r["tolerance"]
            assert r["missed_update"][0] > r["tolerance"] and r["stale_tensor"][0] > r["tolerance"], r


def test_bfloat16_probe_misses_a_stale_tensor_on_the_tiny_model(reach):
    """The blind spot docs/SYNC.md states: in bf16 (tolerance 0.5) one stale tensor of the tiny model
    moves the probe's mean gap far less than the tolerance, whatever tokens the step trained on."""
    for r in reach:
        if r["dtype"] == "bfloat16":
            assert r["stale_tensor"][0] < r["tolerance"], r
