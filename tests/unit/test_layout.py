"""`compare_layout`: each checkpoint tensor against what vLLM's own loader wrote for it, byte for byte
(recipe/engine/layout.py). An engine-like table stands in for the engine's parameters after that load."""

from __future__ import annotations

import torch

from recipe.engine import compare_layout

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def _checkpoint():
    g = torch.Generator().manual_seed(0)
    shapes = {
        "l.q_proj.weight": (4, 4),
        "l.k_proj.weight": (2, 4),
        "l.v_proj.weight": (2, 4),
        "l.o_proj.weight": (4, 4),
        "l.norm.weight": (4,),
        "l.rotary_emb.inv_freq": (2,),
    }
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _loaded(ckpt, **override):
    """The engine's parameters as a loader that follows the map would leave them (fused qkv, no buffers)."""
    held = {
        "l.qkv_proj.weight": torch.cat([ckpt[f"l.{x}_proj.weight"] for x in "qkv"]),
        "l.o_proj.weight": ckpt["l.o_proj.weight"].clone(),
        "l.norm.weight": ckpt["l.norm.weight"].clone(),
    }
    held.update(override)
    return held


def _compare(held, ckpt):
    return compare_layout(held, PACKED, {n: tuple(t.shape) for n, t in ckpt.items()}, iter(ckpt.items()))


def test_a_loader_that_follows_the_map_proves_it():
    ckpt = _checkpoint()
    report = _compare(_loaded(ckpt), ckpt)
    assert report.direct_ok and report.why_not_direct() == ""
    assert sorted(report.same) == sorted(n for n in ckpt if "inv_freq" not in n)
    assert report.ignored == ["l.rotary_emb.inv_freq"]  # a buffer vLLM does not hold is not an obstacle


def test_a_square_tensor_held_transposed_is_found_though_its_shape_matches():
    ckpt = _checkpoint()
    report = _compare(_loaded(ckpt, **{"l.o_proj.weight": ckpt["l.o_proj.weight"].t().contiguous()}), ckpt)
    assert report.transposed == ["l.o_proj.weight"] and not report.direct_ok
    assert "transposed" in report.why_not_direct()


def test_fused_rows_in_another_order_are_rearranged_not_proven():
    ckpt = _checkpoint()
    qkv = torch.cat([ckpt["l.k_proj.weight"], ckpt["l.q_proj.weight"], ckpt["l.v_proj.weight"]])  # k before q
    report = _compare(_loaded(ckpt, **{"l.qkv_proj.weight": qkv}), ckpt)
    assert {"l.q_proj.weight", "l.k_proj.weight"} <= set(report.rearranged) and not report.direct_ok
    assert "l.v_proj.weight" in report.same


def test_one_ulp_off_in_the_engine_is_not_proven():
    ckpt = _checkpoint()
    norm = ckpt["l.norm.weight"].clone()
    norm.view(torch.int32)[1] += 1
    report = _compare(_loaded(ckpt, **{"l.norm.weight": norm}), ckpt)
    assert list(report.rearranged) == ["l.norm.weight"]


def test_a_tied_alias_stands_for_the_name_the_checkpoint_holds():
    from recipe.engine import alias_owners

    groups = [["transformer.wte.weight", "lm_head.weight"], ["lm_head.weight2", "model.embed.weight2"]]
    owners = alias_owners(groups, {"transformer.wte.weight", "model.embed.weight2"})
    assert owners == {"lm_head.weight": "transformer.wte.weight", "lm_head.weight2": "model.embed.weight2"}
    # both saved (a head copy beside a tied embedding): the model's first name is the owner
    assert alias_owners(groups[:1], {"transformer.wte.weight", "lm_head.weight"}) == {
        "lm_head.weight": "transformer.wte.weight"
    }
