"""The export (recipe/export.py) of every CPU combination at world 2, and `python -m tools.export` from
the checkpoints that world wrote.

    .venv/bin/python -m pytest tests/dist/test_export.py -q

One spawned world: per combination each rank builds the policy, takes one AdamW step, computes the
trainer's logprobs of a fixed batch, streams what the export should hold, and exports. Then here:
the files equal the streamed tensors bit for bit and the manifest's sha256; transformers loads the
directory and gives the trainer's logprobs (full fine-tuning: bit for bit; LoRA: the merged weights,
within a measured float32 tolerance); peft loads the adapter on the base and gives the trainer's
logprobs. Two combinations also save a checkpoint, which the export tool turns into the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch

from tests.dist.test_state_dict import CPU_COMBOS, combo_cfg
from tests.helpers import policy_of

BATCH = [[1, 7, 12, 30, 4, 9, 22, 5], [3, 8, 40, 2, 17]]
# float32 logprobs of the merged weights (W + s * B @ A) against the trainer's unmerged forward
# (x W^T + s * (x A^T) B^T): the sums run in another order. Measured on the tiny model: 1.4e-6.
MERGED_TOLERANCE = 1e-5
CASES = [(key, "fp32") for key in CPU_COMBOS] + [(key, "bf16") for key in
                                                 [("fsdp1", "manual", "adapter"), ("fsdp2", "cpu", "merged")]]
CHECKPOINTED = [("fsdp2", "none", "none"), ("fsdp1", "manual", "merged")]


def export_combos(rank: int, world: int, cfg_yamls: List[str], root: str) -> List[dict]:
    from omegaconf import OmegaConf

    from recipe.checkpoint import save
    from recipe.dist import DistContext
    from recipe.export import export
    from recipe.model import build_optimizer, build_policy, sequence_logprobs
    from recipe.preflight import save_run_config
    from recipe.weights import StreamSpec, stream_transform
    from tests.dist.test_state_dict import _train_step

    device = torch.device("cpu")
    ctx = DistContext(rank, world, rank, device)
    results = []
    for i, cfg_yaml in enumerate(cfg_yamls):
        cfg = OmegaConf.create(cfg_yaml)
        model = build_policy(policy_of(cfg), ctx)
        optimizer = build_optimizer(model, policy_of(cfg))
        _train_step(model, optimizer, device)
        if cfg.offload.name == "manual":
            from recipe.model import offload_to_cpu

            offload_to_cpu(model, optimizer)
        lora = cfg.lora.name != "none"
        streamed = {n: t.clone() for n, t in stream_transform(model, StreamSpec.of(cfg), device, "merged" if lora else "none")}
        adapter = {n: t.clone() for n, t in stream_transform(model, StreamSpec.of(cfg), device, "adapter")} if lora else {}
        run_dir = Path(root) / f"run{i}"
        out = export(model, cfg, ctx, run_dir / "export" / "step_1", 1, run_dir, shard_bytes=2**18)
        key = (cfg.fsdp.name, cfg.offload.name, cfg.lora.name)
        if key in CHECKPOINTED and cfg.model.dtype == "float32":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            save(run_dir / "checkpoints", model, optimizer, scheduler, 1, ctx,
                 base=cfg.model.path if lora else None)
            if rank == 0:
                save_run_config(cfg, run_dir / "config.yaml")  # as a run writes it
        results.append(dict(out=str(out), logprobs=sequence_logprobs(model, BATCH, device),
                            streamed=streamed if rank == 0 else {}, adapter=adapter if rank == 0 else {}))
        del model, optimizer
    return results


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    from omegaconf import OmegaConf

    from tests.helpers import run_world

    root = tmp_path_factory.mktemp("export")
    yamls = [OmegaConf.to_yaml(combo_cfg(tiny_model_dir, key, precision=p)) for key, p in CASES]
    ranks = run_world(export_combos, 2, yamls, str(root), timeout_s=600)
    return root, dict(zip(CASES, zip(*ranks)))


def _hf_logprobs(model, batch=BATCH) -> List[List[float]]:
    from recipe.model import sequence_logprobs

    return sequence_logprobs(model, batch, torch.device("cpu"))


def _max_gap(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _files(out: Path) -> dict:
    from safetensors.torch import load_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / name)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c[0]) + "-" + c[1])
def test_export_loads_and_equals_the_trainer(exported, tiny_model_dir, case):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from recipe.files import sha256

    _, results = exported
    (key, precision), (r0, r1) = case, exported[1][case]
    out = Path(r0["out"])
    assert r1["out"] == r0["out"] and r0["logprobs"] == r1["logprobs"]
    manifest = json.loads((out / "export.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "export.json")
    assert sorted(manifest["files"]) == files and all(sha256(out / f) == manifest["files"][f] for f in files)
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    assert len([f for f in files if f.startswith("model-")]) > 1, "the small shard size gave one shard"
    written = _files(out)
    dtype = getattr(torch, "bfloat16" if precision == "bf16" else "float32")
    assert written.keys() == r0["streamed"].keys(), key
    assert all(t.dtype == dtype and torch.equal(t, r0["streamed"][n]) for n, t in written.items()), key
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    gap = _max_gap(_hf_logprobs(model), r0["logprobs"])
    if key[2] == "none" and precision == "fp32":
        assert gap == 0.0, f"{key}: exported model's logprobs differ from the trainer's by {gap}"
    elif precision == "fp32":
        assert gap <= MERGED_TOLERANCE, f"{key}: merged export's logprobs differ from the trainer's by {gap}"
    if key[2] != "none":
        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert adapter.keys() == r0["adapter"].keys() and all(torch.equal(t, r0["adapter"][n]) for n, t in adapter.items())
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        peft_model = PeftModel.from_pretrained(base, out / "adapter")
        assert all(torch.equal(peft_model.state_dict()[k.replace(".weight", ".default.weight")], t)
                   for k, t in adapter.items())
        if precision == "fp32":  # peft's forward is the trainer's, unmerged
            assert _max_gap(_hf_logprobs(peft_model), r0["logprobs"]) == 0.0, key


@pytest.mark.timeout(600)
@pytest.mark.parametrize("key", CHECKPOINTED, ids=lambda k: "-".join(k))
def test_export_tool_from_a_world_two_checkpoint_writes_the_same_bytes(exported, key, tmp_path):
    """`python -m tools.export` on CPU, world 1, from the checkpoint two ranks wrote: the same files
    as the export the trainer wrote at that step (LoRA: from the adapters and the referenced base)."""
    from tools.export import main

    root, results = exported
    run_dir = Path(results[(key, "fp32")][0]["out"]).parents[1]
    out = tmp_path / "tool"
    main([str(run_dir / "checkpoints" / "step_1"), "--out", str(out), "--shard-mb", "0.25"])
    ours = json.loads((run_dir / "export" / "step_1" / "export.json").read_text())["files"]
    tool = json.loads((out / "export.json").read_text())["files"]
    assert tool == ours, f"{key}: {[f for f in set(ours) | set(tool) if ours.get(f) != tool.get(f)]} differ"


@pytest.mark.timeout(600)
def test_export_tool_adapter_only_writes_the_adapter_the_run_wrote(exported, tmp_path):
    """`--adapter-only` on a LoRA checkpoint: the PEFT files alone, byte for byte the run's `adapter/`;
    on a full fine-tune it is refused, naming the reason."""
    from tools.export import NotACheckpoint, main

    root, results = exported
    run_dir = Path(results[(("fsdp1", "manual", "merged"), "fp32")][0]["out"]).parents[1]
    out = tmp_path / "adapter"
    main([str(run_dir / "checkpoints" / "step_1"), "--out", str(out), "--adapter-only"])
    ours = json.loads((run_dir / "export" / "step_1" / "export.json").read_text())["files"]
    tool = json.loads((out / "export.json").read_text())["files"]
    assert tool and set(tool) == {f.split("/", 1)[1] for f in ours if f.startswith("adapter/")}
    assert all(tool[f] == ours["adapter/" + f] for f in tool)
    assert not list(out.glob("*.safetensors.index.json"))  # no base weights
    full = Path(results[(("fsdp2", "none", "none"), "fp32")][0]["out"]).parents[1]
    with pytest.raises(NotACheckpoint, match="without LoRA"):
        main([str(full / "checkpoints" / "step_1"), "--out", str(tmp_path / "none"), "--adapter-only"])
