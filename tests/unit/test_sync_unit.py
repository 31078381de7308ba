"""WeightSync's contract with a fake engine and a plain (unsharded) model: no vLLM, no processes.

.venv/bin/python -m pytest tests/unit/test_sync_unit.py -q
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from recipe.digest import Digest, digest, digests
from recipe.metrics import MetricsLogger
from recipe.engine import HfCopyEngine
from recipe.sync import WeightStream
from recipe.model import sequence_logprobs
from tests.doubles import HookedSync
from recipe.settings import DEFAULT_TOLERANCE, Settings, default_tolerance
from recipe.sync import WeightSyncError, compare_digests, mean_gap, name_problems, worst_token

SYNC_KEYS = {
    "sync/total_s",
    "sync/gather_s",
    "sync/load_s",
    "sync/digest_s",
    "sync/probe_s",
    "sync/bytes",
    "sync/gbps",
    "sync/peak_mem_bytes",
    "sync/strategy",
    "sync/weight_version",
    "sync/verified_tensors",
    "sync/verified_bytes",
    "sync/digest",
    "sync/parity_max_abs_diff",
    "sync/parity_mean_abs_diff",
    "sync/fingerprint",
}


class FakeEngine(HfCopyEngine):
    """rollout=hf's own-copy engine that records the calls WeightSync makes, in order."""

    backend = "fake"

    def __init__(self, cfg, ctx, model_dir):
        super().__init__(cfg, ctx, model_dir)
        self.calls = []

    def wake(self):
        self.calls.append("wake")

    def load_weights(self, weights):
        self.calls.append("load")
        super().load_weights(weights)

    def weight_digests(self):
        self.calls.append("digests")
        return super().weight_digests()

    def prompt_logprobs(self, ids):
        self.calls.append("prompt_logprobs")
        return sequence_logprobs(self.module, ids, torch.device("cpu"))


def _stream(model, cfg, device):
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            yield name, tensor.detach().clone()


@pytest.fixture(params=["float32", "bfloat16"])
def setup(tiny_model_dir, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.model import torch_dtype
    from tests.helpers import compose

    cfg = compose(
        [f"model.path={tiny_model_dir}", "trainer.device=cpu", "sync.probe_every=2", f"model.dtype={request.param}"]
    )
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype(request.param))
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    engine = FakeEngine(cfg, ctx, str(tiny_model_dir))
    sync = HookedSync(
        Settings.from_cfg(cfg), ctx, trainer, engine, AutoTokenizer.from_pretrained(tiny_model_dir), stream_fn=_stream
    )
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
    assert engine.calls == ["wake", "load", "digests", "prompt_logprobs"]  # wake -> load -> digests -> probe
    assert stats["sync/weight_version"] == 1 and stats["sync/parity_max_abs_diff"] == 0.0
    streamed = list(_stream(trainer, None, None))
    assert stats["sync/bytes"] == sum(t.numel() * t.element_size() for _, t in streamed)
    assert stats["sync/verified_tensors"] == len(streamed) + 1  # + the tied head, checked against the embedding
    assert stats["sync/verified_bytes"] == stats["sync/bytes"] and len(stats["sync/digest"]) == 16
    assert stats["sync/peak_mem_bytes"] > 0 and stats["sync/gather_s"] >= 0 and stats["sync/load_s"] >= 0
    assert stats["sync/digest_s"] > 0 and stats["sync/probe_s"] > 0
    assert stats["sync/strategy"] == "fsdp2/none/none"


def test_probe_every_n_and_digest_changes(setup):
    sync, trainer, _ = setup
    diffs, prints, probes = [], [], []
    for step in range(4):
        _perturb(trainer)
        stats = sync.sync(step)
        diffs.append(stats["sync/parity_max_abs_diff"])
        prints.append(stats["sync/digest"])
        probes.append(stats["sync/probe_s"])
    assert [math.isnan(d) for d in diffs] == [False, True, False, True]  # sync.probe_every=2: 1st, 3rd, ...
    assert [p > 0 for p in probes] == [True, False, True, False]
    assert len(set(prints)) == 4


def test_stale_engine_fails_digest_naming_tensors(setup):
    sync, trainer, engine = setup
    engine.load_weights = lambda weights: [None for _ in weights]  # drains the stream, loads nothing
    _perturb(trainer)
    with pytest.raises(WeightSyncError, match=r"digest check.*model\.embed_tokens\.weight: engine .* != streamed"):
        sync.sync(1)


def test_stale_engine_fails_probe_without_digest(setup):
    sync, trainer, engine = setup
    sync.digest = False
    engine.load_weights = lambda weights: [None for _ in weights]
    _perturb(trainer)
    with pytest.raises(WeightSyncError, match=r"parity probe.*probe \d+ token \d+ \(id \d+\)"):
        sync.sync(1)


def test_digest_off_checks_nothing(setup):
    sync, trainer, engine = setup
    sync.digest = False
    stats = sync.sync(1)
    assert "digests" not in engine.calls
    assert (stats["sync/verified_tensors"], stats["sync/verified_bytes"], stats["sync/digest"]) == (0, 0, "")
    assert stats["sync/digest_s"] == 0.0


def test_skipped_tensor_fails_name_check(setup):
    sync, trainer, _ = setup
    gone = "model.layers.1.mlp.down_proj.weight"
    sync.stream_fn = lambda m, c, d: ((n, t) for n, t in _stream(m, c, d) if n != gone)
    with pytest.raises(WeightSyncError, match=rf"not streamed: \['{gone}'\]"):
        sync.sync(1)


def test_empty_stream_raises(setup):
    sync, _, _ = setup
    sync.stream_fn = lambda model, cfg, device: iter(())
    with pytest.raises(WeightSyncError, match="no tensors"):
        sync.sync(1)


def test_probe_schedule(setup):
    sync, _, _ = setup
    for every, expected in [
        (1, [True] * 4),
        (-1, [True, False, False, False]),
        (0, [False] * 4),
        (3, [True, False, False, True]),
    ]:
        sync.settings = replace(sync.settings, sync=replace(sync.settings.sync, probe_every=every))  # frozen
        got = []
        for n in range(1, 5):
            sync.num_syncs = n
            got.append(sync._should_probe())
        assert got == expected, every


def test_worst_token_and_tolerances():
    assert worst_token([[0.0, -1.0]], [[0.0, -1.5]]) == (0.5, 0, 2)
    assert worst_token([[0.0]], [[float("nan")]])[0] == math.inf
    assert worst_token([[0.0, 1.0]], [[0.0]])[0] == math.inf  # a length mismatch is never a pass
    assert DEFAULT_TOLERANCE["float32"] < DEFAULT_TOLERANCE["float16"] < DEFAULT_TOLERANCE["bfloat16"]


def test_probe_verdict_is_the_mean_gap():
    """One token far off (bf16 rounding at a very unlikely token) among many exact ones passes a bound
    its gap exceeds; the same gap on every token does not; NaN or a length mismatch never passes."""
    trainer = [[-1.0] * 24, [-10.0] + [-2.0] * 23]
    engine = [[-1.0] * 24, [-9.3] + [-2.0] * 23]
    assert worst_token(trainer, engine)[0] > 0.5 > mean_gap(trainer, engine) == pytest.approx(0.7 / 48)
    shifted = [[x + 0.7 for x in row] for row in trainer]
    assert mean_gap(trainer, shifted) == pytest.approx(0.7)
    assert mean_gap([[0.0]], [[float("nan")]]) == math.inf
    assert mean_gap([[0.0, 1.0]], [[0.0]]) == math.inf
    assert mean_gap([[0.0]], []) == math.inf


def test_weight_stream_counts_releases_and_digests():
    stream = WeightStream(
        ((name, torch.arange(n, dtype=torch.float32)) for name, n in [("a", 4), ("b", 8)]), digest=True
    )
    names = []
    for name, tensor in stream:
        names.append(name)
        del tensor  # dropped before the next one is produced
    assert names == ["a", "b"] and stream.num_bytes == 48 and stream.peak_live_bytes == 32
    assert stream.num_tensors == 2 and stream.max_tensor_bytes == 32
    assert stream.digests() == {"a": digest(torch.arange(4.0)), "b": digest(torch.arange(8.0))}
    held = WeightStream((name, torch.zeros(n)) for name, n in [("a", 4), ("b", 8)])
    kept = list(held)  # a consumer that buffers everything: peak = all bytes
    assert held.peak_live_bytes == 48 and len(kept) == 2 and held.digests() == {}
    scaled = WeightStream([("x.lora_B.weight", torch.ones(2, 2))], digest=True, held_form=lambda n, t: t * 2)
    list(scaled)
    assert scaled.digests()["x.lora_B.weight"] == digest(torch.full((2, 2), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_digest_composes_over_concatenation(dtype):
    """vLLM's qkv_proj is cat([q, k, v]) along dim 0: its digest composes from the parts', for
    matrices (8-byte words per row) and for 1-D biases (an element per row), and for odd widths."""
    g = torch.Generator().manual_seed(0)
    for shapes in ([(8, 16), (4, 16), (4, 16)], [(8,), (4,), (4,)], [(3, 5), (2, 5)], [(6, 12), (6, 12)]):
        parts = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
        assert Digest.concat(digests(parts)) == digest(torch.cat(parts)), shapes
    big = torch.randn(64, 32, generator=g).to(dtype)  # a tensor split across ranks by rows
    assert Digest.concat(digests(list(big.chunk(3)))) == digest(big)


def test_stream_digests_of_large_and_small_tensors_keep_their_names():
    """Large tensors are digested as they stream and fetched in one host copy (`digest.to_host`),
    small ones batched at the end: each name still gets its own tensor's digest."""
    g = torch.Generator().manual_seed(5)
    named = [
        (f"t{i}", torch.randn(*shape, generator=g))
        for i, shape in enumerate([(300, 256), (4,), (512, 200), (7, 3), (300, 256), (5,)])
    ]  # 300 KB, 400 KB: large
    stream = WeightStream(iter(named), digest=True)
    list(stream)
    assert stream.digests() == {name: digest(t) for name, t in named}
    assert len({d for d in stream.digests().values()}) == len(named)


def test_batched_digests_equal_one_by_one():
    """`digests` stacks small tensors of one shape; the numbers are those of `digest` on each."""
    g = torch.Generator().manual_seed(3)
    tensors = (
        [torch.randn(8, 64, generator=g).bfloat16() for _ in range(5)]
        + [torch.randn(7, generator=g)] * 3
        + [torch.randn(1024, 1024, generator=g), torch.randn(3, 5, generator=g).t()]
    )
    assert digests(tensors) == [digest(t) for t in tensors]
    assert len(set(digests(tensors[:5]))) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_digest_catches_small_and_positional_changes(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 16, generator=g).to(dtype)
    base = digest(w)
    assert digest(w.clone()) == base
    ulp = w.clone()
    ulp.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[3, 5] += 1  # one unit in the last place
    scaled = (w.float() * (1 + 2**-7)).to(dtype)
    shuffled = w.flatten()[torch.randperm(w.numel(), generator=g)].view(16, 16)
    rows_swapped = w[[1, 0, *range(2, 16)]]
    for other in (ulp, scaled, w.t().contiguous(), w.t(), shuffled, rows_swapped):
        assert digest(other) != base
    assert digest(w.t()) == digest(w.t().contiguous())  # strides do not matter, only values and shape
    assert digest(torch.zeros(4)) != digest(torch.zeros(4, dtype=torch.bfloat16))  # dtype counts


def test_compare_digests_maps_fused_and_tied_names():
    g = torch.Generator().manual_seed(2)
    q, k, v, emb = (torch.randn(*s, generator=g) for s in [(8, 4), (4, 4), (4, 4), (10, 4)])
    streamed = dict(
        zip(["l.q_proj.weight", "l.k_proj.weight", "l.v_proj.weight", "embed_tokens.weight"], digests([q, k, v, emb]))
    )
    padded = torch.cat([emb, torch.zeros(6, 4)])  # vocab padded with zero rows
    held = {
        "l.qkv_proj.weight": (("l.q_proj.weight", "l.k_proj.weight", "l.v_proj.weight"), digest(torch.cat([q, k, v]))),
        "embed_tokens.weight": (("embed_tokens.weight",), digest(padded)),
        "lm_head.weight": (("embed_tokens.weight",), digest(emb)),
    }
    assert compare_digests(held, streamed) == ([], 3)
    swapped = dict(held, **{"l.qkv_proj.weight": (held["l.qkv_proj.weight"][0], digest(torch.cat([k, q, v])))})
    problems, _ = compare_digests(swapped, streamed)
    assert len(problems) == 1 and problems[0].startswith("l.qkv_proj.weight: engine")
    stale_head = dict(held, **{"lm_head.weight": (("embed_tokens.weight",), None)})
    assert "lm_head.weight: not loaded or not re-processed" in compare_digests(stale_head, streamed)[0][0]
    partial = {n: d for n, d in streamed.items() if n != "l.k_proj.weight"}
    assert "['l.k_proj.weight'] not streamed" in compare_digests(held, partial)[0][0]
    extra = dict(streamed, **{"l.x.weight": digest(q)})
    assert compare_digests(held, extra)[0] == ["streamed but held by no engine tensor: ['l.x.weight']"]


def test_name_problems():
    assert name_problems(["a", "b"], ["a", "b"]) == []
    assert name_problems(["a", "b"], ["a", "c", "c"]) == [
        "not streamed: ['b']",
        "streamed under unexpected names: ['c']",
        "streamed more than once: ['c']",
    ]


def test_metrics_logger_rank0_writes_jsonl_rank1_noop(tmp_path, tiny_model_dir):
    from tests.helpers import compose

    cfg = compose([f"model.path={tiny_model_dir}", "logger=none"])
    rank1 = MetricsLogger(cfg.logger, str(tmp_path / "r1"), rank=1)
    rank1.log({"sync/total_s": 1.0}, step=1)
    rank1.close()
    assert not (tmp_path / "r1").exists()
    logger = MetricsLogger(cfg.logger, str(tmp_path), rank=0)
    logger.log({"sync/total_s": 0.5, "sync/parity_max_abs_diff": float("nan")}, step=3)
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line == {"step": 3, "sync/total_s": 0.5, "sync/parity_max_abs_diff": None}


def test_base_layer_name_follows_the_engines_fused_lora_layers():
    """vLLM 0.26 needs checkpoint names rewritten onto LoRA-wrapped layers (`qkv_proj.base_layer`)."""
    from recipe.engine.layout import base_layer_name

    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    wrapped = {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"}
    assert (
        base_layer_name("model.layers.0.self_attn.k_proj.bias", wrapped, packed)
        == "model.layers.0.self_attn.k_proj.base_layer.bias"
    )
    assert (
        base_layer_name("model.layers.0.mlp.down_proj.weight", wrapped, packed)
        == "model.layers.0.mlp.down_proj.base_layer.weight"
    )
    # not wrapped: unchanged (layer 1, the MLP's gate_up, norms, the embedding)
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
    ):
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
    shapes = {
        "model.embed_tokens.weight": (vocab, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.self_attn.k_proj.weight": (2, 4),
        "model.layers.0.self_attn.v_proj.weight": (2, 4),
        "model.layers.0.self_attn.q_proj.bias": (4,),
        "model.layers.0.self_attn.k_proj.bias": (2,),
        "model.layers.0.self_attn.v_proj.bias": (2,),
        "model.layers.0.mlp.gate_proj.weight": (6, 4),
        "model.layers.0.mlp.up_proj.weight": (6, 4),
        "model.layers.0.mlp.down_proj.weight": (4, 6),
    }
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def test_direct_destinations_place_every_tensor_where_the_fused_layout_has_it():
    from recipe.engine import weight_destinations

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
    assert torch.equal(
        mlp.gate_up_proj.base_layer.weight, torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    )
    assert torch.equal(mlp.down_proj.weight, hf[p + "mlp.down_proj.weight"])
    # Padded vocabulary: the real rows are written, the padding rows are left alone.
    emb = engine.model.embed_tokens.weight
    assert torch.equal(emb[:8], hf["model.embed_tokens.weight"]) and not emb[8:].any()


def test_direct_destinations_refuse_what_they_cannot_place_exactly():
    from recipe.engine import weight_destinations

    hf = _hf_like()
    shapes = {n: tuple(t.shape) for n, t in hf.items()}
    shapes["model.layers.0.self_attn.k_proj.weight"] = (3, 4)  # parts no longer stack into qkv_proj
    shapes["model.norm.weight"] = (4,)  # a name the engine does not hold
    dest, reasons = weight_destinations(_engine_like(), shapes)
    assert any("k_proj" in r for r in reasons) and any("model.norm.weight" in r for r in reasons)
    assert "model.layers.0.mlp.down_proj.weight" in dest


def test_float32_probe_tolerance_is_wider_on_cuda_only():
    """The H200's float32 engine differed by 0.0043 on a correct sync: CPU's 1e-3 would refuse it."""
    assert default_tolerance("float32", "cpu") == DEFAULT_TOLERANCE["float32"] < 0.0043
    assert 0.0043 < default_tolerance("float32", "cuda") < DEFAULT_TOLERANCE["float16"]
    assert default_tolerance("bfloat16", "cuda") == DEFAULT_TOLERANCE["bfloat16"]


def test_sync_without_checkpoint_or_tokenizer_checks_the_given_names(tiny_model_dir, tmp_path):
    """A caller with weights made in memory (tools/sync_bench.py) gives the expected names and no
    tokenizer: nothing is read from model.path, the digest check still covers every name."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import compose

    common = ["trainer.device=cpu", "sync.probe_every=0", "model.dtype=float32"]
    cfg = compose([f"model.path={tmp_path / 'absent'}", *common])
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    engine = FakeEngine(compose([f"model.path={tiny_model_dir}", *common]), ctx, str(tiny_model_dir))
    names = [n for n, _ in _stream(trainer, None, None)]
    sync = HookedSync(Settings.from_cfg(cfg), ctx, trainer, engine, None, expected=names, stream_fn=_stream)
    stats = sync.sync(1)
    assert engine.calls == ["wake", "load", "digests"]  # no probe
    assert stats["sync/verified_tensors"] == len(names) + 1
    sync = HookedSync(
        Settings.from_cfg(cfg), ctx, trainer, engine, None, expected=names + ["extra.weight"], stream_fn=_stream
    )
    with pytest.raises(WeightSyncError, match=r"not streamed: \['extra.weight'\]"):
        sync.sync(1)
    probing = Settings.from_cfg(
        compose([f"model.path={tmp_path / 'absent'}", "trainer.device=cpu", "sync.probe_every=2"])
    )
    with pytest.raises(ValueError, match="sync.probe_every=2 needs a tokenizer"):
        HookedSync(probing, ctx, trainer, engine, None, expected=names, stream_fn=_stream)
