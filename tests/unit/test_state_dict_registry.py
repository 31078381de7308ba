"""The dispatch table and the name mapping, without processes.

.venv/bin/python -m pytest tests/unit/test_state_dict_registry.py -q
"""

from __future__ import annotations

import itertools

import pytest
import torch

from recipe import names
from recipe import weights as sd
from recipe.config import FSDP_CHOICES, LORA_CHOICES, OFFLOAD_CHOICES, SYNC_STRATEGY_CHOICES


def test_every_combination_has_a_strategy():
    expected = set(itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES))
    assert len(expected) == 18
    assert set(sd.all_keys()) == expected
    for key in expected:
        assert sd.get_strategy(key).__name__ == (
            f"{sd.GATHERS[key[:2]].__name__.lstrip('_')}+{sd.TRANSFORMS[key[2]].apply.__name__}"
        )
    # That no two entries behave alike is test_table_is_one_gather_per_fsdp_offload_and_one_transform_per_lora's.


def test_lookup_miss_lists_valid_keys():
    with pytest.raises(KeyError) as info:
        sd.get_strategy(("fsdp3", "none", "none"))
    message = str(info.value)
    assert "('fsdp3', 'none', 'none')" in message
    for key in sd.all_keys():
        assert "/".join(key) in message


def test_reference_lookup_miss_lists_choices():
    with pytest.raises(KeyError, match="dcp_full_cpu, dtensor_stream, naive"):
        sd.get_reference("fastest")


def test_sync_strategy_choices_are_auto_and_the_reference_strategies():
    """`sync.strategy` accepts exactly "auto" and the names of the reference strategies in the code: a
    reference added to the code but not to the config (or the reverse) fails here."""
    assert SYNC_STRATEGY_CHOICES[0] == "auto"
    assert sorted(SYNC_STRATEGY_CHOICES[1:]) == sorted(sd.REFERENCES)
    for name in SYNC_STRATEGY_CHOICES[1:]:
        assert callable(sd.get_reference(name))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("base_model.model.model.layers.1.mlp.down_proj.base_layer.weight", "model.layers.1.mlp.down_proj.weight"),
        ("base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias", "model.layers.1.self_attn.q_proj.bias"),
        ("base_model.model.model.norm.weight", "model.norm.weight"),
        (
            "_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        ),
        (
            "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.v_proj.base_layer.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
        ("model.layers.3._checkpoint_wrapped_module.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
    ],
)
def test_hf_name(raw, expected):
    assert names.hf_name(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        ),
        (
            "_fsdp_wrapped_module.base_model.model.model.layers.1._fsdp_wrapped_module.mlp.gate_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight",
        ),
    ],
)
def test_peft_name(raw, expected):
    assert names.peft_name(raw) == expected


def test_names_refuse_the_wrong_kind():
    with pytest.raises(ValueError, match="LoRA tensor"):
        names.hf_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        names.peft_name("model.layers.0.self_attn.q_proj.weight")


def test_peft_names_match_peft(tiny_model_dir):
    """Our adapter names are the keys peft saves, for a real peft model."""
    from peft import get_peft_model_state_dict

    from recipe.model import apply_lora, load_hf_model
    from tests.helpers import compose

    cfg = compose([f"model.path={tiny_model_dir}", "+lora=adapter"])
    model = apply_lora(load_hf_model(cfg.model), cfg.lora, cfg.model.master_dtype)
    ours = {names.peft_name(n) for n, _ in model.named_parameters() if names.is_lora_param(n)}
    assert ours == set(get_peft_model_state_dict(model))
    base = {names.hf_name(n) for n, _ in model.named_parameters() if not names.is_lora_param(n)}
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert base == set(f.keys())  # tied lm_head is neither a parameter nor a checkpoint key


def test_adapter_config_equals_peft_save(tiny_model_dir, tmp_path):
    import json

    from recipe.model import adapter_config, apply_lora, load_hf_model
    from tests.helpers import compose

    cfg = compose([f"model.path={tiny_model_dir}", "+lora=adapter"])
    apply_lora(load_hf_model(cfg.model), cfg.lora, cfg.model.master_dtype).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["target_modules"] = sorted(saved["target_modules"])  # peft saves a set in hash order
    assert adapter_config(cfg.lora, cfg.model.path) == saved


def test_merge_lora_is_fp32_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g).bfloat16()
    a, b = torch.randn(2, 4, generator=g).bfloat16(), torch.randn(6, 2, generator=g).bfloat16()
    w0 = w.clone()
    merged = sd.merge_lora(w, a, b, 2.0, torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(w, w0)
    expected = (w.float() + (b.float() @ a.float()) * 2.0).bfloat16()
    assert torch.equal(merged, expected)


def test_merged_rows_equal_rows_of_the_full_merge():
    """What FSDP2 merged LoRA relies on: each rank's rows of W + (B @ A) * scale (its rows of W
    and B, all of A) are bit for bit those rows of the merge on the full tensors, for every way
    `Shard(0)` cuts the rows (uneven, one row, none), one input feature, LoRA ranks 1-64, float32
    and bf16 masters. (A product of the rows alone fails it: the BLAS sums a one-row block, or a
    one-column product, in another order.)"""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for out, inn, r, dtype in itertools.product(
        [2, 3, 7, 33, 96, 257], [1, 16, 33, 896], [1, 8, 16, 64], [torch.float32, torch.bfloat16]
    ):
        w = torch.randn(out, inn, generator=g).to(dtype)
        a, b = torch.randn(r, inn, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype)
        full = sd.merge_lora(w, a, b, 2.5, torch.bfloat16)
        for world in (2, 3, 4, 8):
            offset = 0
            for rows_w, rows_b in zip(torch.chunk(w, world), torch.chunk(b, world)):
                part = sd.merge_lora_rows(rows_w.clone(), a, rows_b.clone(), 2.5, torch.bfloat16, offset, out)
                assert torch.equal(part, full[offset : offset + rows_w.shape[0]]), (out, inn, r, dtype, world, offset)
                offset += rows_w.shape[0]
                checked += 1
    assert checked > 500


def test_table_is_one_gather_per_fsdp_offload_and_one_transform_per_lora():
    assert set(sd.GATHERS) == set(itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES))
    assert set(sd.TRANSFORMS) == set(LORA_CHOICES)
    # Three gather behaviours: FSDP2 under any offload, FSDP1's summon (none and cpu), FSDP1 manual.
    assert len({id(g) for g in sd.GATHERS.values()}) == 3
    assert sd.GATHERS[("fsdp2", "none")] is sd.GATHERS[("fsdp2", "cpu")] is sd.GATHERS[("fsdp2", "manual")]
    assert sd.GATHERS[("fsdp1", "none")] is sd.GATHERS[("fsdp1", "cpu")] is not sd.GATHERS[("fsdp1", "manual")]


def test_composed_entry_passes_the_transforms_dtype_and_selection_to_its_gather(tiny_model_dir):
    from tests.helpers import compose as compose_cfg

    cfg = compose_cfg([f"model.path={tiny_model_dir}", "+lora=adapter", "model.dtype=bfloat16"])
    seen = {}

    def gather(model, spec, device, wire, select, merge):
        seen.update(
            wire=wire("x.lora_A.default.weight", torch.zeros(1)),
            lora=select("x.lora_A.default.weight"),
            base=select("x.base_layer.weight"),
            merge=merge,
        )
        yield {"m.q_proj.lora_A.default.weight": torch.ones(2, 2), "m.q_proj.base_layer.weight": torch.ones(2, 2)}

    out = list(sd.compose(gather, sd.TRANSFORMS["adapter"])(None, sd.StreamSpec.of(cfg), torch.device("cpu")))
    assert seen == {
        "wire": torch.bfloat16,
        "lora": True,
        "base": False,  # adapter syncs gather LoRA shards only
        "merge": False,
    }
    assert [(n, t.dtype) for n, t in out] == [("m.q_proj.lora_A.weight", torch.bfloat16)]
