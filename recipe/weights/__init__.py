"""The dispatch table of weight-sync strategies: (fsdp, offload, lora) -> gather strategy.

    from recipe.weights import StreamSpec, stream_weights, stream_base_weights
    spec = StreamSpec.of(settings)   # the few settings a stream reads: key, dtype, LoRA scale, bucket
    for name, tensor in stream_weights(model, spec, device):   # HF names, engine dtype, on `device`
        engine_weights[name].copy_(tensor)

The key is built from the Hydra option names (`conf/fsdp`, `conf/offload`, `conf/lora`), the
same tuples `recipe.config` validates against, so config and code cannot drift: each of the
2 x 3 x 3 = 18 combinations is composed when it is looked up (`get_strategy`), and a key outside
them lists the valid ones. `sync.strategy` other than "auto" picks a reference strategy
(`REFERENCES`: `naive`, `dcp_full_cpu`, `dtensor_stream`) for comparison; they are never a fallback.
The streams are plain iterators; the sync wraps each in `recipe.sync.WeightStream` (counts, times, digests).

Each strategy is two steps, composed in the table (`GATHERS` per (fsdp, offload) x `TRANSFORMS` per lora):
1. a *gather* yields full tensors as fresh tensors on the engine device (or, on one rank whose
   shards are already there, the local shards themselves), keyed by raw module names:
   - FSDP2, every offload mode and LoRA mode: `fsdp2_pipelined_groups` -- each local shard
     (device, pinned host or pageable host) is packed into pieces of about `sync.bucket_mb`,
     all-gathered, and cut into full tensors, on three CUDA streams so that copy-in, all-gather
     and the caller's use of the previous piece overlap (adapter syncs gather the LoRA shards only);
   - FSDP1: `summon_full_params(unit, recurse=False, writeback=False)` per unit; for manual
     offload the unit's flat shard is brought to the device for the summon and sent back after.
   Nothing calls `module.state_dict()` or `model.to(device)`, and no rank builds a full copy.
   A group holds whole "atoms": a LoRA layer's base weight comes with its A and B -- except
   FSDP2 merged LoRA, which merges each rank's rows before the gather (`fsdp2.py`) and
   hands over the merged weight alone.
2. a *transform* maps names and values: full weights (`hf_name`), merged LoRA
   (W + alpha/r * B @ A under the base name) or adapter tensors only (peft's saved names).

Every rank gets every tensor (each rank owns an engine). Peak extra memory: FSDP1, one unit's
tensors (twice for a moment: the summon buffer and the clone); FSDP2, what is launched and not yet
consumed, bounded by the largest FSDP unit + one bucket. Never the whole model: tensors are popped
as they are yielded.

dtypes: the trained parameters are in `model.master_dtype` (float32 by default), the engine
takes `model.dtype`. Each tensor is cast to the engine dtype on the rank that holds it, before
it moves: FSDP2 casts each local shard as it packs the send buffer, so the all-gather and the
engine get bf16 bytes; FSDP1 summons the unit's full parameters in the master dtype (its
all-gather is float32, which FSDP1 does not let us change) and casts each one on the spot,
before the copy. The stream therefore equals `master.to(model.dtype)`, bit for bit.

LoRA merge dtype: the merge is computed in float32 (W.float() + (B.float() @ A.float()) * scale)
from the master tensors into a new tensor and then cast to `model.dtype`, once (`merge_lora`).
FSDP2 computes it on each rank's rows before the all-gather (only the A's travel in the master
dtype; the merged rows travel in the engine dtype, like full weights), bit for bit the rows of the
full merge (`merge_lora_rows`); FSDP1 merges the summoned full tensors. For float32 models that
is bit-identical to peft's `merge_and_unload`; for bf16 masters it rounds once instead of after
each op. The trained weights are never modified (merge -> unmerge in bf16 drifts).

Base weights for the engine's first load (LoRA adapter mode) come from `stream_base_weights`:
the lora=none entry of the same (fsdp, offload), which streams the base layers of a peft model
under HF names and skips the LoRA tensors.
"""

from recipe.weights.lora import MergeRounding, measure_merge_rounding, merge_lora, merge_lora_rows
from recipe.weights.table import (
    GATHERS,
    REFERENCES,
    StrategyNotFound,
    all_keys,
    compose,
    get_reference,
    get_strategy,
    stream_base_weights,
    stream_transform,
    stream_weights,
)
from recipe.weights.transforms import TRANSFORMS, Transform
from recipe.weights.units import StreamSpec

__all__ = [
    "MergeRounding",
    "measure_merge_rounding",
    "merge_lora",
    "merge_lora_rows",
    "GATHERS",
    "REFERENCES",
    "StrategyNotFound",
    "all_keys",
    "compose",
    "get_reference",
    "get_strategy",
    "StreamSpec",
    "stream_base_weights",
    "stream_transform",
    "stream_weights",
    "TRANSFORMS",
    "Transform",
]
