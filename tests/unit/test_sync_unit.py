"""WeightSync's contract with a fake engine and a plain (unsharded) model: no vLLM, no processes.

    .venv/bin/python -m pytest tests/unit/test_sync_unit.py -q
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from recipe.metrics import MetricsLogger
from recipe.rollout import Engine
from recipe.sync import DEFAULT_TOLERANCE, TimedStream, WeightSync, WeightSyncError, trainer_logprobs, worst_token

SYNC_KEYS = {"sync/total_s", "sync/gather_s", "sync/load_s", "sync/verify_s", "sync/bytes", "sync/gbps",
             "sync/peak_mem_bytes", "sync/strategy", "sync/weight_version", "sync/parity_max_abs_diff",
             "sync/fingerprint"}


class FakeEngine(Engine):
    """An engine whose weights are a plain HF model; records the calls WeightSync makes, in order."""

    backend = "fake"

    def __init__(self, model):
        self.model, self.calls = model, []

    def wake(self):
        self.calls.append("wake")

    def load_weights(self, weights):
        self.calls.append("load")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def prompt_logprobs(self, ids):
        self.calls.append("prompt_logprobs")
        return trainer_logprobs(self.model, ids, torch.device("cpu"))


def _stream(model, cfg, device):
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            yield name, tensor.detach().clone()


@pytest.fixture()
def setup(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import compose

    cfg = compose([f"model.path={tiny_model_dir}", "trainer.device=cpu", "sync.verify=2"])
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = FakeEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    sync = WeightSync(cfg, ctx, trainer, engine, AutoTokenizer.from_pretrained(tiny_model_dir), stream_fn=_stream)
    return sync, trainer, engine


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_sync_moves_weights_and_reports_metrics(setup):
    sync, trainer, engine = setup
    _perturb(trainer)
    stats = sync.sync(1)
    assert set(stats) == SYNC_KEYS
    assert engine.calls == ["wake", "load", "prompt_logprobs"]  # wake -> load -> read back (+ verify)
    assert stats["sync/weight_version"] == 1 and stats["sync/parity_max_abs_diff"] == 0.0
    assert stats["sync/bytes"] == sum(t.numel() * 4 for _, t in _stream(trainer, None, None))
    assert stats["sync/peak_mem_bytes"] > 0 and stats["sync/gather_s"] >= 0 and stats["sync/load_s"] >= 0
    assert stats["sync/strategy"] == "fsdp2/none/none"


def test_verify_every_n_and_fingerprint_changes(setup):
    sync, trainer, _ = setup
    diffs, prints = [], []
    for step in range(4):
        _perturb(trainer)
        stats = sync.sync(step)
        diffs.append(stats["sync/parity_max_abs_diff"])
        prints.append(stats["sync/fingerprint"])
    assert [math.isnan(d) for d in diffs] == [False, True, False, True]  # sync.verify=2: 1st, 3rd, ...
    assert len(set(prints)) == 4


def test_stale_engine_raises_naming_token(setup):
    sync, trainer, engine = setup
    engine.load_weights = lambda weights: [None for _ in weights]  # drains the stream, loads nothing
    _perturb(trainer)
    with pytest.raises(WeightSyncError, match=r"parity probe.*probe \d+ token \d+ \(id \d+\)"):
        sync.sync(1)


def test_empty_stream_raises(setup):
    sync, _, _ = setup
    sync.stream_fn = lambda model, cfg, device: iter(())
    with pytest.raises(WeightSyncError, match="no tensors"):
        sync.sync(1)


def test_verify_modes(setup):
    sync, _, _ = setup
    for mode, expected in [("every", [True] * 4), ("first", [True, False, False, False]), ("off", [False] * 4),
                           ("3", [True, False, False, True])]:
        sync.cfg.sync.verify = mode
        got = []
        for n in range(1, 5):
            sync.num_syncs = n
            got.append(sync._should_verify())
        assert got == expected, mode


def test_worst_token_and_tolerances():
    assert worst_token([[0.0, -1.0]], [[0.0, -1.5]]) == (0.5, 0, 2)
    assert worst_token([[0.0]], [[float("nan")]])[0] == math.inf
    assert worst_token([[0.0, 1.0]], [[0.0]])[0] == math.inf  # a length mismatch is never a pass
    assert DEFAULT_TOLERANCE["float32"] < DEFAULT_TOLERANCE["float16"] < DEFAULT_TOLERANCE["bfloat16"]


def test_timed_stream_counts_and_releases():
    stream = TimedStream((name, torch.zeros(n)) for name, n in [("a", 4), ("b", 8)])
    names = []
    for name, tensor in stream:
        names.append(name)
        del tensor  # dropped before the next one is produced
    assert names == ["a", "b"] and stream.bytes == 48 and stream.peak_live_bytes == 32
    held = TimedStream((name, torch.zeros(n)) for name, n in [("a", 4), ("b", 8)])
    kept = list(held)  # a consumer that buffers everything: peak = all bytes
    assert held.peak_live_bytes == 48 and len(kept) == 2


def test_metrics_logger_rank0_writes_jsonl_rank1_noop(tmp_path, tiny_model_dir):
    from tests.helpers import compose

    cfg = compose([f"model.path={tiny_model_dir}", "logger=none"])
    rank1 = MetricsLogger(cfg, str(tmp_path / "r1"), rank=1)
    rank1.log({"sync/total_s": 1.0}, step=1)
    rank1.close()
    assert not (tmp_path / "r1").exists()
    logger = MetricsLogger(cfg, str(tmp_path), rank=0)
    logger.log({"sync/total_s": 0.5, "sync/parity_max_abs_diff": float("nan")}, step=3)
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line == {"step": 3, "sync/total_s": 0.5, "sync/parity_max_abs_diff": None}


def test_base_layer_name_follows_the_engines_fused_lora_layers():
    """vLLM 0.26 needs checkpoint names rewritten onto LoRA-wrapped layers (`qkv_proj.base_layer`)."""
    from recipe.rollout import base_layer_name

    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    wrapped = {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"}
    assert base_layer_name("model.layers.0.self_attn.k_proj.bias", wrapped, packed) == \
        "model.layers.0.self_attn.k_proj.base_layer.bias"
    assert base_layer_name("model.layers.0.mlp.down_proj.weight", wrapped, packed) == \
        "model.layers.0.mlp.down_proj.base_layer.weight"
    # not wrapped: unchanged (layer 1, the MLP's gate_up, norms, the embedding)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert base_layer_name(name, wrapped, packed) == name


class _Linear(torch.nn.Module):
    def __init__(self, rows: int, cols: int, bias: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols))
        self.bias = torch.nn.Parameter(torch.zeros(rows)) if bias else None


class _Wrapped(torch.nn.Module):  # a LoRA-wrapped engine layer keeps its weight under base_layer
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.base_layer = _Linear(rows, cols)


def _engine_like(vocab_rows: int = 10):
    """vLLM's layout of a one-layer Qwen2 at tensor-parallel 1: fused qkv (with bias) and gate_up."""
    root = torch.nn.Module()
    root.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    root.model = torch.nn.Module()
    root.model.embed_tokens = _Linear(vocab_rows, 4)
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    layer.self_attn.qkv_proj = _Linear(4 + 2 + 2, 4, bias=True)
    layer.mlp = torch.nn.Module()
    layer.mlp.gate_up_proj = _Wrapped(6 + 6, 4)
    layer.mlp.down_proj = _Linear(4, 6)
    root.model.layers = torch.nn.ModuleList([layer])
    return root


def _hf_like(vocab: int = 8):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.0.self_attn.k_proj.weight": (2, 4), "model.layers.0.self_attn.v_proj.weight": (2, 4),
              "model.layers.0.self_attn.q_proj.bias": (4,), "model.layers.0.self_attn.k_proj.bias": (2,),
              "model.layers.0.self_attn.v_proj.bias": (2,), "model.layers.0.mlp.gate_proj.weight": (6, 4),
              "model.layers.0.mlp.up_proj.weight": (6, 4), "model.layers.0.mlp.down_proj.weight": (4, 6)}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def test_direct_destinations_place_every_tensor_where_the_fused_layout_has_it():
    from recipe.rollout import weight_destinations

    engine, hf = _engine_like(), _hf_like()
    dest, reasons = weight_destinations(engine, {n: tuple(t.shape) for n, t in hf.items()})
    assert reasons == [] and set(dest) == set(hf)
    for name, tensor in hf.items():
        dest[name].copy_(tensor)
    attn, mlp = engine.model.layers[0].self_attn, engine.model.layers[0].mlp
    p = "model.layers.0."
    # The fused parameters hold the parts stacked in packed order, bit for bit.
    assert torch.equal(attn.qkv_proj.weight, torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(attn.qkv_proj.bias, torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(mlp.gate_up_proj.base_layer.weight,
                       torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
    assert torch.equal(mlp.down_proj.weight, hf[p + "mlp.down_proj.weight"])
    # Padded vocabulary: the real rows are written, the padding rows are left alone.
    emb = engine.model.embed_tokens.weight
    assert torch.equal(emb[:8], hf["model.embed_tokens.weight"]) and not emb[8:].any()


def test_direct_destinations_refuse_what_they_cannot_place_exactly():
    from recipe.rollout import weight_destinations

    hf = _hf_like()
    shapes = {n: tuple(t.shape) for n, t in hf.items()}
    shapes["model.layers.0.self_attn.k_proj.weight"] = (3, 4)  # parts no longer stack into qkv_proj
    shapes["model.norm.weight"] = (4,)  # a name the engine does not hold
    dest, reasons = weight_destinations(_engine_like(), shapes)
    assert any("k_proj" in r for r in reasons) and any("model.norm.weight" in r for r in reasons)
    assert "model.layers.0.mlp.down_proj.weight" in dest
