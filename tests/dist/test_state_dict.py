"""Every CPU-runnable (fsdp, offload, lora) strategy at world 2 (gloo) against an unsharded reference.

    .venv/bin/python -m pytest tests/dist/test_state_dict.py -q

One spawned world runs all 15 combinations (fsdp1 + offload=cpu needs an accelerator; see
tests/gpu/test_state_dict_gpu.py), in two precisions: float32 throughout, and bf16 compute over
float32 masters (FSDP mixed precision, the engine in bf16). Per combination each rank: builds the
policy, checks the base weights against the checkpoint, takes one AdamW step on a fixed batch
(the same on both ranks), streams, and compares with an unsharded copy given the same step: bit
for bit, same dtype, same names as the HF checkpoint (full / merged) or as peft's saved adapter
(adapter). For mixed precision the copy keeps float32 masters, runs forward/backward on a bf16
copy of them (as FSDP does), steps the masters with the float32 grads, and the engine should
get the masters cast to bf16 (merged: the float32 merge formula on the masters, cast once). A
LoRA base is frozen and held in bf16 (only the adapters are float32 masters).
The rank function is shared with the GPU test (NCCL, all 18 combinations).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import weakref
from typing import Dict, List

import pytest
import torch

from recipe.weights import all_keys
from tests.helpers import policy_of

CPU_COMBOS = [k for k in all_keys() if k[:2] != ("fsdp1", "cpu")]
# fp32: float32 throughout; bf16: bf16 compute and engine over float32 masters (the default
# for bf16 models).
PRECISIONS = {"fp32": [], "bf16": ["model.dtype=bfloat16", "model.master_dtype=float32"]}


def combo_cfg(model_dir, key, device: str = "cpu", precision: str = "fp32"):
    from tests.helpers import compose

    fsdp, offload, lora = key
    return compose([f"model.path={model_dir}", "model.builder=none", f"fsdp={fsdp}", f"+offload={offload}",
                    f"+lora={lora}", f"trainer.device={device}", "trainer.lr=0.01", *PRECISIONS[precision]])


def _batch(device) -> torch.Tensor:
    return torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)


def _train_step(model, optimizer, device, host_update: bool = False, compute_dtype=None) -> None:
    """One AdamW step on the fixed batch. `host_update` (unsharded reference only) runs the
    step on the host like FSDP's CPU offload does, so the arithmetic matches bit for bit.
    `compute_dtype` (unsharded reference only): forward/backward on a copy with the parameters
    in that dtype, grads cast back to the masters' dtype, as FSDP mixed precision does."""
    ids = _batch(device)
    if compute_dtype is None:
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        _mixed_backward(model, ids, compute_dtype)
    if host_update:
        model.to("cpu")  # moves the grads too
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if host_update:
        model.to(device)


def _mixed_backward(model, ids, dtype) -> None:
    """Backward on a copy whose parameters (not buffers: FSDP casts only parameters) are in
    `dtype`; the masters get the copy's grads cast to their dtype (FSDP's float32 reduce)."""
    compute = copy.deepcopy(model)
    for p in compute.parameters():
        p.data = p.data.to(dtype)
    compute(input_ids=ids, labels=ids).loss.backward()
    for master, p in zip(model.parameters(), compute.parameters()):
        if p.grad is not None:
            master.grad = p.grad.to(master.dtype)


def reference(cfg, device) -> Dict[str, torch.Tensor]:
    """What the engine should receive: an unsharded copy given the same step, in the engine dtype."""
    from peft import get_peft_model_state_dict

    from recipe.model import build_optimizer, mixed_precision, torch_dtype, unsharded_policy

    model = unsharded_policy(policy_of(cfg)).to(device)  # same LoRA init as build_policy: on the host RNG
    dtype = torch_dtype(cfg.model.dtype)
    _train_step(model, build_optimizer(model, policy_of(cfg)), device, host_update=cfg.offload.name == "cpu",
                compute_dtype=dtype if mixed_precision(cfg.model) else None)
    with torch.no_grad():
        if cfg.lora.name == "adapter":
            return {n: t.detach().to(dtype).clone() for n, t in get_peft_model_state_dict(model).items()}
        if cfg.lora.name == "merged" and (cfg.model.dtype != "float32" or mixed_precision(cfg.model)):
            return _merged_fp32(model, cfg)
        if cfg.lora.name == "merged":
            model = model.merge_and_unload()  # in float32 our merge is peft's, bit for bit
        return {n: p.detach().to(dtype).clone() for n, p in model.named_parameters()}


def _merged_fp32(model, cfg) -> Dict[str, torch.Tensor]:
    """bf16/fp16 engine: peft merges in the low dtype; we merge the unsharded (master) tensors in
    float32 and cast once (recipe/state_dict.py), so the reference applies that formula to the copy."""
    from recipe.model import torch_dtype
    from recipe.names import hf_name, is_lora_param

    params, scale = dict(model.named_parameters()), cfg.lora.alpha / cfg.lora.rank
    out = {}
    for name, p in params.items():
        if is_lora_param(name):
            continue
        if name.endswith(".base_layer.weight"):  # the documented formula, written out here
            stem = name[: -len("base_layer.weight")]
            a, b = params[stem + "lora_A.default.weight"], params[stem + "lora_B.default.weight"]
            p = (p.float() + (b.float() @ a.float()) * scale)
        out[hf_name(name)] = p.detach().to(torch_dtype(cfg.model.dtype)).clone()
    return out


def unit_bytes_bound(cfg) -> int:
    """Largest FSDP unit (a decoder layer, or the root's leftovers) plus the largest tensor."""
    from recipe.model import largest_unit_bytes, unsharded_policy

    model = unsharded_policy(policy_of(cfg))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return largest_unit_bytes(model) + largest


def lora_a_bytes(cfg) -> int:
    """Bytes of every LoRA A in the master dtype (the tiny model's rank divides evenly: no padding)."""
    from recipe.model import unsharded_policy

    model = unsharded_policy(policy_of(cfg))
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_A." in n)


def local_state(model) -> Dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def param_dtypes(model, trainable: bool) -> set:
    return {str(p.dtype) for p in model.parameters() if p.requires_grad == trainable}


def check_stream(stream, expected: Dict[str, torch.Tensor], device, baseline=None) -> dict:
    """Consume `stream` like an engine would; compare each tensor and track live yielded bytes.
    `changed` counts tensors that differ from `baseline` (the weights before the update)."""
    names, bad, alive, peak, changed, nbytes = [], [], [], 0, 0, 0
    for name, tensor in stream:
        names.append(name)
        nbytes += tensor.numel() * tensor.element_size()
        ref = expected.get(name)
        if ref is None or tensor.dtype != ref.dtype or tensor.device != device or not torch.equal(tensor.cpu(), ref.cpu()):
            bad.append(name)
        if baseline is not None and name in baseline and not torch.equal(tensor.cpu(), baseline[name].cpu()):
            changed += 1
        alive = [(r, n) for r, n in alive if r() is not None] + [(weakref.ref(tensor), tensor.numel() * tensor.element_size())]
        peak = max(peak, sum(n for _, n in alive))
        del tensor, ref
    return dict(names=names, bad=bad, peak=peak, bytes=nbytes, changed=changed)


def checkpoint_state(path, dtype: str = "float32") -> Dict[str, torch.Tensor]:
    """The HF checkpoint's tensors in the engine dtype."""
    from safetensors.torch import load_file

    return {n: t.to(getattr(torch, dtype)) for n, t in load_file(str(path) + "/model.safetensors").items()}


def run_combos(rank: int, world: int, cfg_yamls: List[str], device_type: str) -> List[dict]:
    from omegaconf import OmegaConf

    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy, load_to_device, offload_to_cpu
    from recipe.weights import StreamSpec, stream_base_weights, stream_weights

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=device)
    results = []
    for cfg in map(OmegaConf.create, cfg_yamls):
        model = build_policy(policy_of(cfg), ctx)
        base = check_stream(stream_base_weights(model, StreamSpec.of(cfg), device), checkpoint_state(cfg.model.path, cfg.model.dtype),
                            device)
        optimizer = build_optimizer(model, policy_of(cfg))
        _train_step(model, optimizer, device)
        if cfg.offload.name == "manual":
            offload_to_cpu(model, optimizer)
        before = local_state(model)
        expected = reference(cfg, device)
        with record_all_gathers() as wire:
            got = check_stream(stream_weights(model, StreamSpec.of(cfg), device), expected, device, initial_state(cfg))
        after = local_state(model)
        unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        if cfg.offload.name == "manual":
            load_to_device(model, optimizer, device)
            _train_step(model, optimizer, device)  # the moved-back state still trains
        results.append(dict(key=StreamSpec.of(cfg).combo, base=base, got=got, unchanged=unchanged,
                            bound=unit_bytes_bound(cfg), masters=param_dtypes(model, trainable=True),
                            frozen=param_dtypes(model, trainable=False),
                            wire=wire))
        del model, optimizer
    return results


@contextlib.contextmanager
def record_all_gathers():
    """Bytes per dtype that `dist.all_gather_into_tensor` receives inside the block (what crosses the wire)."""
    import torch.distributed as dist

    seen: Dict[str, int] = collections.Counter()
    original = dist.all_gather_into_tensor

    def recording(output, input, *args, **kwargs):
        seen[str(output.dtype)] += output.numel() * output.element_size()
        return original(output, input, *args, **kwargs)

    dist.all_gather_into_tensor = recording
    try:
        yield seen
    finally:
        dist.all_gather_into_tensor = original


def initial_state(cfg) -> Dict[str, torch.Tensor]:
    """Weights before the update: the checkpoint, or peft's freshly initialised adapter."""
    from peft import get_peft_model_state_dict

    from recipe.model import unsharded_policy

    if cfg.lora.name != "adapter":
        return checkpoint_state(cfg.model.path, cfg.model.dtype)
    state = get_peft_model_state_dict(unsharded_policy(policy_of(cfg)))
    return {n: t.to(getattr(torch, cfg.model.dtype)) for n, t in state.items()}


def expected_names(cfg) -> set:
    return set(initial_state(cfg))


def assert_combo(result: dict, cfg, model_dir, world: int = 2) -> None:
    key, got, base = result["key"], result["got"], result["base"]
    assert not base["bad"], f"{key}: base weights differ from the checkpoint: {base['bad']}"
    assert set(base["names"]) == set(checkpoint_state(model_dir)), f"{key}: base names {sorted(base['names'])}"
    assert not got["bad"], f"{key}: streamed tensors differ from the reference: {got['bad']}"
    assert len(got["names"]) == len(set(got["names"])), f"{key}: a name was yielded twice"
    assert set(got["names"]) == expected_names(cfg), f"{key}: names {sorted(got['names'])}"
    # The update moved the weights, so a stale stream could not pass: LoRA B, every trained
    # weight, or every merged target (norms and biases are not LoRA targets).
    assert got["changed"] >= len(got["names"]) // 2, f"{key}: only {got['changed']} tensors changed"
    assert result["unchanged"], f"{key}: the gather changed the trained (sharded) parameters"
    assert result["masters"] == {f"torch.{cfg.model.master_dtype}"}, f"{key}: trained parameters in {result['masters']}"
    # A frozen LoRA base stays in the compute dtype: no float32 masters of weights that never change.
    assert result["frozen"] == (set() if cfg.lora.name == "none" else {f"torch.{cfg.model.dtype}"}), \
        f"{key}: frozen parameters in {result['frozen']}"
    if cfg.fsdp.name == "fsdp2" and world > 1:  # the shards are cast before the all-gather (merged: LoRA layers excepted)
        engine, master = f"torch.{cfg.model.dtype}", f"torch.{cfg.model.master_dtype}"
        allowed = {engine, master} if cfg.lora.name == "merged" else {engine}
        wire = result["wire"]
        assert engine in wire and set(wire) <= allowed, f"{key}: all-gathered {dict(wire)}"
        if cfg.lora.name == "merged" and engine != master:  # merged on the shards: only the A's are not cast
            assert wire[master] == lora_a_bytes(cfg), f"{key}: all-gathered {dict(wire)}"
    assert got["peak"] <= result["bound"], f"{key}: stream held {got['peak']} B at once > bound {result['bound']} B"


@pytest.fixture(scope="module")
def cpu_results(tiny_model_dir):
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    cases = [(key, precision) for precision in PRECISIONS for key in CPU_COMBOS]
    yamls = [OmegaConf.to_yaml(combo_cfg(tiny_model_dir, key, precision=precision)) for key, precision in cases]
    ranks = run_world(run_combos, 2, yamls, "cpu", timeout_s=600)
    return {case: (r0, r1) for case, r0, r1 in zip(cases, ranks[0], ranks[1])}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("key", CPU_COMBOS, ids=lambda k: "-".join(k))
def test_stream_equals_reference(cpu_results, tiny_model_dir, key, precision):
    for result in cpu_results[(key, precision)]:  # both ranks receive every tensor
        assert_combo(result, combo_cfg(tiny_model_dir, key, precision=precision), tiny_model_dir)


def reference_strategies(rank: int, world: int, cfg_yaml: str) -> dict:
    from omegaconf import OmegaConf

    from recipe.dist import DistContext
    from recipe.model import build_optimizer, build_policy
    from recipe.weights import StreamSpec, stream_weights

    cfg, device = OmegaConf.create(cfg_yaml), torch.device("cpu")
    model = build_policy(policy_of(cfg), DistContext(rank, world, rank, device))
    _train_step(model, build_optimizer(model, policy_of(cfg)), device)
    expected = reference(cfg, device)
    out = {}
    for name in ("dtensor_stream", "dcp_full_cpu", "naive"):
        cfg.sync.strategy = name
        out[name] = check_stream(stream_weights(model, StreamSpec.of(cfg), device), expected, device)
    return out


@pytest.mark.timeout(300)
def test_reference_strategies_agree(tiny_model_dir):
    """The benchmark's reference strategies stream the same tensors (and dcp holds them all at once)."""
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    cfg = combo_cfg(tiny_model_dir, ("fsdp2", "none", "none"))
    names = set(checkpoint_state(tiny_model_dir))
    ranks = run_world(reference_strategies, 2, OmegaConf.to_yaml(cfg))
    for per_rank in ranks:
        for name, got in per_rank.items():
            assert not got["bad"] and set(got["names"]) == names, f"{name}: {got['bad']}"
    # The memory probe can fail: rank 0's full DCP state dict holds the whole model at once.
    assert ranks[0]["dcp_full_cpu"]["peak"] > unit_bytes_bound(cfg)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_one_rank_merged_equals_reference(tiny_model_dir, precision):
    """World 1 takes the gather's one-rank path (the local shards are the full tensors): merged
    on the shards there too, bit for bit."""
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    key = ("fsdp2", "none", "merged")
    cfg = combo_cfg(tiny_model_dir, key, precision=precision)
    (results,) = run_world(run_combos, 1, [OmegaConf.to_yaml(cfg)], "cpu", timeout_s=240)
    assert_combo(results[0], cfg, tiny_model_dir, world=1)
    assert not results[0]["wire"], "one rank all-gathered"


def uneven_gathers(rank: int, world: int) -> List[str]:
    """The FSDP2 gather on layers whose rows do not split evenly (3 rows: 2 + 1; 1 row: 1 + none)
    with one piece per tensor, so rank 1 packs pieces of one row and of no rows (and merges a
    single row: the BLAS's one-row kernel rounds otherwise at LoRA rank 8). Returns what differs from the full tensors (merged: `merge_lora` on them)."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from recipe.names import is_lora_param
    from recipe.weights import GATHERS, StreamSpec, merge_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 3), nn.Linear(3, 1), nn.Linear(1, 5, bias=False))
    net._no_split_modules = ["Linear"]  # the gather's memory budget looks for the "decoder layers"
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=7.0, target_modules=["0", "1", "2"],
                                           init_lora_weights=False))
    for layer in net:
        fully_shard(layer)
    fully_shard(model)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    spec = StreamSpec(fsdp="fsdp2", offload="none", lora="merged", strategy="auto", dtype="bfloat16",
                      lora_scale=7.0 / 8, bucket_bytes=1e-6 * 2**20)
    gather, scale, bad = GATHERS[("fsdp2", "none")], 7.0 / 8, []
    cases = {"full": (lambda n: True, False, torch.bfloat16), "adapter": (is_lora_param, False, torch.bfloat16),
             "merged": (lambda n: True, True, torch.bfloat16), "merged-fp32": (lambda n: True, True, torch.float32)}
    for case, (select, merge, dtype) in cases.items():
        wire = (lambda n, p: p.dtype if is_lora_param(n) else dtype) if merge else (lambda n, p: dtype)
        with torch.no_grad():  # as WeightStream runs the gathers
            got = {n: t for group in gather(model, spec, torch.device("cpu"), wire, select, merge) for n, t in group.items()}
        want = {n: t.to(dtype) for n, t in full.items() if select(n) and not (merge and is_lora_param(n))}
        if merge:
            for stem in ("base_model.model.0.", "base_model.model.1.", "base_model.model.2."):
                w = want.pop(stem + "base_layer.weight")
                want[stem + "weight"] = merge_lora(full[stem + "base_layer.weight"], full[stem + "lora_A.default.weight"],
                                                   full[stem + "lora_B.default.weight"], scale, dtype)
                assert not torch.equal(want[stem + "weight"], w)  # the merge changes the weight
        if got.keys() != want.keys():
            bad.append(f"{case}: names {sorted(got)} != {sorted(want)}")
        bad += [f"{case}: {n}" for n in want if n in got and not torch.equal(got[n], want[n])]
    return bad


@pytest.mark.timeout(120)
def test_fsdp2_gather_uneven_shards():
    from tests.helpers import run_world

    for bad in run_world(uneven_gathers, 2, timeout_s=90):
        assert not bad, bad
