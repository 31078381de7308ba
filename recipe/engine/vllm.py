"""The vLLM engine: `vllm.LLM` in the trainer's process, one per rank (see `recipe.engine`)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from recipe.engine.base import Engine, EngineSpec, Sample, WeightIter
from recipe.engine.layout import LayoutReport, alias_owners, weight_destinations
from recipe.engine.worker import (
    adapter_digests_in_worker,
    add_lora_in_worker,
    aliases_in_worker,
    capture_seconds_in_worker,
    clear_captures_in_worker,
    copy_next_load_in_worker,
    held_digests_in_worker,
    install_digest_hooks_in_worker,
    layout_in_worker,
    packed_modules_in_worker,
    refresh_embedding_kernels,
    reload_in_worker,
)
from recipe.names import PEFT_PREFIX, checkpoint_shapes, checkpoint_tensors

log = logging.getLogger(__name__)


def _free_gb(device: torch.device) -> float:
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0] / 2**30


def vllm_kwargs(spec: EngineSpec, ctx, model_dir: str) -> dict:
    rollout = spec.rollout
    kwargs = dict(
        model=model_dir,
        dtype=spec.model.dtype,
        max_model_len=rollout.max_model_len,
        seed=spec.seed + ctx.rank,
        enable_prefix_caching=True,
        # logprobs of the distribution actually sampled from (after temperature), which is
        # what the trainer's importance ratio divides by (recipe/model.py token_logprobs)
        logprobs_mode="processed_logprobs",
        use_tqdm_on_load=spec.verbose,
    )
    if in_trainer_world():
        # One engine per rank beside torch.distributed, as TRL's colocate mode and verl start it: vLLM
        # joins the trainer's world (RANK / LOCAL_RANK / MASTER_* from the launcher) instead of making
        # its own, puts its worker on LOCAL_RANK's device and forms a tensor-parallel group of one per
        # rank. Without it every rank's worker took cuda:0 ("No available memory for the cache blocks").
        kwargs["distributed_executor_backend"] = "external_launcher"
    if spec.device == "cpu":
        # vLLM reads the CPU KV-cache size from the environment when the engine starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(rollout.kv_cache_gb)
        kwargs["enforce_eager"] = True
        # A prefill split across engine steps rewinds the request's seeded generator by an offset,
        # which CPU generators do not have ("CPU Generator does not use offset"): a batch of more
        # prompt tokens than one step takes (4096, e.g. 128 samples of 40-token prompts) crashed.
        # Whole prefills only: a request that does not fit waits for the next step.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
        kwargs["enforce_eager"] = rollout.enforce_eager
        kwargs["enable_sleep_mode"] = rollout.sleep
    if spec.lora.name == "adapter":
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(spec.lora.rank), max_loras=1)
    return kwargs


def in_trainer_world() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def check_gpu_memory_split(rollout, device: torch.device) -> Dict[str, float]:
    """The engine takes `rollout.gpu_memory_utilization` (of the rollout slice `rollout`) of the GPU's total memory (weights + KV cache);
    the trainer keeps the rest. Checked before the engine starts, on every rank, with one verdict:
    a rank short of memory names the field and what it would fit, instead of vLLM's own error later."""
    from recipe.config import ConfigError
    from recipe.dist import agree

    free, total = torch.cuda.mem_get_info(device)
    want = rollout.gpu_memory_utilization * total
    agree(
        None
        if free >= want
        else (
            f"rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} asks the engine for "
            f"{want / 2**30:.1f} GiB of {device}'s {total / 2**30:.1f} GiB, but {free / 2**30:.1f} GiB is free after "
            f"the trainer's model and optimizer. Lower it to at most {max(0.0, free / total - 0.02):.2f}, or move the "
            f"trainer's weights off the GPU between phases (+offload=cpu or +offload=manual)."
        ),
        ConfigError,
    )
    return {"free_gb": free / 2**30, "total_gb": total / 2**30, "engine_gb": want / 2**30}


def lora_scaling(adapter_config: dict) -> float:
    """vLLM's LoRA scaling factor: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFTHelper)."""
    rank, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def lora_rank_slot(rank: int) -> int:
    """vLLM accepts only some max_lora_rank values; take the smallest one >= rank."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if slot >= rank:
            return slot
    raise ValueError(f"lora.rank={rank} is larger than vLLM's largest max_lora_rank (512)")


# vLLM messages that every weight reload repeats and that say nothing wrong here: the rotary
# embedding has no weights, the tied LM head is the embedding (re-processed in load_weights),
# and the CPU worker cannot re-set its thread count. The parity probe checks what they concern.
_HARMLESS = (
    "RotaryEmbedding: Failed to load weights",
    "ParallelLMHead: Failed to load weights",
    "doesn't allow to use `torch.set_num_threads`",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(h in msg for h in _HARMLESS)


def _quiet_vllm_logs() -> None:
    """Keep the console readable: vLLM at WARNING (unless VLLM_LOGGING_LEVEL is set, as `logger.verbose`
    does through recipe.progress.configure_console) minus the repeats."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm  # noqa: F401  (configures the "vllm" logger and its handler)

    # A logger's filters see only records logged to it, so attach to every vLLM logger that exists.
    names = [n for n in logging.Logger.manager.loggerDict if n == "vllm" or n.startswith("vllm.")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(self, spec: EngineSpec, ctx, model_dir: str, *, load: str, digest: bool):
        """`load` ("auto", "direct", "reload": how streamed weights are written) and `digest` (whether
        the engine digests what it holds) are the sync's settings, given by whoever builds the engine."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: reload via iterator
        _quiet_vllm_logs()
        from vllm import LLM

        self.spec, self.ctx = spec, ctx
        self.load_mode, self.digest = load, digest
        self.on_cpu = spec.device == "cpu"
        self.memory: Dict[str, float] = {}  # GPU memory free at start, after sleep and after wake (GiB)
        if not self.on_cpu:
            self.memory["rollout/mem_free_before_engine_gb"] = check_gpu_memory_split(spec.rollout, ctx.device)[
                "free_gb"
            ]
        self.llm = LLM(**vllm_kwargs(spec, ctx, model_dir))
        _quiet_vllm_logs()  # again: building the engine imported more vLLM modules
        self._lora = None  # (LoRARequest, tensors, config) of the live adapter version
        self._asleep = False
        self._packed = self.llm.collective_rpc(packed_modules_in_worker)[0]
        self._aliases = alias_owners(self.llm.collective_rpc(aliases_in_worker)[0], set(checkpoint_shapes(model_dir)))
        self._hooked = self.on_cpu and digest
        if self._hooked:  # CPU packs linear weights after a load: digest them just before (see above)
            self.llm.collective_rpc(install_digest_hooks_in_worker)
        self.layout = self._check_layout(model_dir)
        self._transposed = set(self.layout.transposed) if self.layout is not None else set()
        self._dest = self._direct_destinations(model_dir)  # name -> view of the engine's parameter, or None
        self.load_path = "direct" if self._dest is not None else "reload"

    def _check_layout(self, model_dir: str) -> Optional[LayoutReport]:
        """Prove the direct map and the digest's picture of the engine against vLLM's own loader: each
        checkpoint tensor against what that loader wrote for it (on CUDA the parameters as the engine
        started; on CPU a reload of the checkpoint, copied before the packing). Needed for the direct
        load (CUDA) and for the digest; a layout the digest cannot follow is refused here, at start."""
        from recipe.config import ConfigError

        direct_wanted = not self.on_cpu and self.load_mode != "reload"
        if not (direct_wanted or self.digest):
            return None
        if self.on_cpu:
            self.llm.collective_rpc(copy_next_load_in_worker)
            self.reload_weights(checkpoint_tensors(model_dir))
        report = self.llm.collective_rpc(layout_in_worker, args=(model_dir, sorted(self._aliases)))[0]
        if report.rearranged and self.digest:
            first = next(iter(report.rearranged))
            raise ConfigError(
                f"sync.digest=true: vLLM's loader rearranges {len(report.rearranged)} tensors of {model_dir} in a way "
                f"the digest cannot follow (e.g. {first}: {report.rearranged[first]}), so every sync would fail; set "
                f"sync.digest=false (the logprob probe, sync.probe_every, still checks the engine)"
            )
        if report.transposed:
            log.info(
                "sync.digest: vLLM holds %d tensors transposed (e.g. %s); the trainer digests them transposed",
                len(report.transposed),
                report.transposed[0],
            )
        return report

    def weight_held_form(self) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """Streamed tensors the engine holds transposed (found at start) are digested transposed."""
        if not self._transposed:
            return None
        transposed = self._transposed
        return lambda name, tensor: tensor.t() if name in transposed else tensor

    def _direct_destinations(self, model_dir: str) -> Optional[Dict[str, torch.Tensor]]:
        """`sync.load`: "direct" writes each streamed tensor straight into its place in the engine's
        parameters (a map built once here); "reload" runs vLLM's own reload (its per-tensor weight
        loaders); "auto" takes direct where it applies (CUDA, every name placed) and reload otherwise."""
        from recipe.config import ConfigError

        mode = self.load_mode
        if mode == "reload" or (mode == "auto" and self.on_cpu):
            return None
        if self.on_cpu:
            raise ConfigError(
                "sync.load=direct needs CUDA: vLLM's CPU backend repacks its linear weights after "
                "every load, so they cannot be written in place; use sync.load=auto or reload"
            )
        model = self.llm.apply_model(lambda m: m)[0]  # in-process: the engine's own module
        dest, _ = weight_destinations(model, checkpoint_shapes(model_dir))
        why = self.layout.why_not_direct()  # the map against vLLM's own loader, tensor by tensor
        if why:
            if mode == "direct":
                raise ConfigError(f"sync.load=direct: {why}; use sync.load=auto or reload")
            log.info("sync.load=auto: vLLM's reload, not the direct map: %s", why)
            return None
        return {name: view for name, view in dest.items() if name not in self.layout.ignored}

    def _request(self):
        return self._lora[0] if self._lora is not None else None

    def generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams

        # One seed per prompt: with a single shared seed every prompt draws the same random
        # stream, so sample j of each prompt comes out (nearly) the same and a batch holds
        # only n distinct completions. vLLM seeds sample j of a request with seed + j, hence
        # the stride n between prompts.
        # detokenize=False: the caller decodes the token ids it needs (GRPOTrainer.decode); vLLM's
        # incremental detokenizer cost 13 ms of a 85 ms rollout (256 x 4 tokens, tiny model, CPU).
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=(seed * 100_003 + i * n) % 2**31,
                logprobs=0,
                detokenize=False,
            )
            for i in range(len(prompt_token_ids))
        ]
        outs = self.llm.generate(_token_prompts(prompt_token_ids), params, lora_request=self._request(), use_tqdm=False)
        samples = []
        for out in outs:
            for c in out.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                samples.append(Sample(list(out.prompt_token_ids), list(c.token_ids), lps, str(c.finish_reason)))
        return samples

    def prompt_logprobs(self, token_id_lists):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if self._lora is None:
            outs = self.llm.generate(_token_prompts(token_id_lists), params, use_tqdm=False)
        else:
            # One request per call: vLLM's LoRA logits path indexes adapters per *sampled* row, so
            # a batch of prompts fails (CPU punica: "einsum(): subscript b has size 4 ... size 11")
            # on models whose LM head takes LoRA (Llama/SmolLM2). With one request the adapter
            # index broadcasts over that request's prompt tokens, which all share the adapter.
            outs = [
                self.llm.generate(_token_prompts([ids]), params, lora_request=self._request(), use_tqdm=False)[0]
                for ids in token_id_lists
            ]
        result = []
        for ids, out in zip(token_id_lists, outs):
            # entry i is the logprob of token i given tokens < i; entry 0 is None
            result.append([d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])])
        return result

    def load_weights(self, weights):
        if self._dest is not None:
            self._write_direct(weights)
            self.llm.reset_prefix_cache()
            return
        self.reload_weights(weights)

    def reload_weights(self, weights: WeightIter) -> None:
        """vLLM's own reload (its per-tensor weight loaders and post-processing), whatever `sync.load` says."""
        if self._hooked:
            self.llm.collective_rpc(clear_captures_in_worker)
        self.llm.collective_rpc(reload_in_worker, args=(iter(weights),))
        if self.on_cpu:
            self.llm.apply_model(refresh_embedding_kernels)
        self.llm.reset_prefix_cache()
        if self._lora is not None:  # reload_weights drops adapters (they were built on the old base)
            req, tensors, config = self._lora
            self.llm.collective_rpc(add_lora_in_worker, args=(req.lora_int_id, tensors, config, None))

    @torch.no_grad()
    def _write_direct(self, weights: WeightIter) -> None:
        """One device copy per streamed tensor into its view of the engine's parameters; no weight loader,
        no post-processing (unquantized CUDA layers use their parameters as loaded). Nothing else in the
        engine changes, so a live LoRA adapter stays registered."""
        for name, tensor in weights:
            dst = self._dest.get(name)
            if dst is None:
                raise KeyError(
                    f"sync.load=direct: the engine has no place for {name!r} (the checkpoint's tensors "
                    f"are {len(self._dest)} names such as {next(iter(self._dest))!r})"
                )
            dst.copy_(tensor, non_blocking=True)

    def load_adapter(self, tensors, adapter_config, version):
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise RuntimeError("load_adapter needs an engine built with lora=adapter (enable_lora=True)")
        # Copies: vLLM folds the scaling into lora_b IN PLACE (LoRALayerWeights.optimize), and a stream
        # may yield the trainer's own tensors (world 1, shards on the device). Adapters are small.
        tensors = {name: t.detach().clone() for name, t in tensors}
        lora_id = version + 1  # lora_int_id must be > 0 and new for every version
        drop = self._lora[0].lora_int_id if self._lora is not None else None
        self.llm.collective_rpc(add_lora_in_worker, args=(lora_id, tensors, adapter_config, drop))
        # The path is never read: the id is already registered, so vLLM only activates it.
        self._lora = (
            LoRARequest(f"policy-v{version}", lora_id, f"in-memory://policy-v{version}"),
            tensors,
            adapter_config,
        )
        self.lora_version = version
        self.llm.reset_prefix_cache()

    def weight_digests(self):
        if self.on_cpu and not self._hooked:
            raise RuntimeError("weight_digests on CPU needs the engine built with sync.digest=true (the load hooks)")
        if self._hooked:
            self.load_digest_seconds = self.llm.collective_rpc(capture_seconds_in_worker)[0]
        held = self.llm.collective_rpc(held_digests_in_worker, args=(self._hooked,))[0]
        return {name: (self._parts(name), d) for name, d in held.items()}

    def _parts(self, name: str) -> Tuple[str, ...]:
        """Streamed names an engine tensor is made of: fused modules by the model's
        packed_modules_mapping (in concatenation order), a tied alias by the tensor it is."""
        if name in self._aliases:
            return (self._aliases[name],)
        prefix, _, attr = name.rpartition(".")
        stem, _, leaf = prefix.rpartition(".")
        if leaf in self._packed:
            return tuple(f"{stem}.{part}.{attr}" if stem else f"{part}.{attr}" for part in self._packed[leaf])
        return (name,)

    def adapter_digests(self):
        if self._lora is None:
            raise RuntimeError("adapter_digests: no adapter is loaded")
        held = self.llm.collective_rpc(adapter_digests_in_worker, args=(self._lora[0].lora_int_id,))[0]
        out = {}
        for module_name, subs in held.items():
            stem, _, leaf = module_name.rpartition(".")
            parts = [f"{stem}.{p}" for p in self._packed[leaf]] if leaf in self._packed else [module_name]
            if len(parts) != len(subs):
                raise RuntimeError(f"adapter module {module_name!r}: {len(subs)} packed LoRAs for parts {parts}")
            for part, sub in zip(parts, subs):
                if sub is not None:
                    for kind, both in zip(("lora_A", "lora_B"), sub):
                        name = f"{PEFT_PREFIX}{part}.{kind}.weight"
                        out[name] = ((name,), both)  # both orientations; the caller picks the streamed one
        return out

    def adapter_held_form(self, adapter_config):
        """vLLM folds the scaling into lora_b in place (LoRALayerWeights.optimize) in the LoRA dtype."""
        scale = lora_scaling(adapter_config)
        dtype = self.llm.llm_engine.vllm_config.lora_config.lora_dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, self.spec.model.dtype)

        def held(name: str, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(dtype)
            return tensor * scale if ".lora_B." in name and scale != 1 else tensor

        return held

    def sleep(self):
        if not self.spec.rollout.sleep or self._asleep:
            return
        if self.on_cpu:
            log.info("rollout.sleep: vLLM has no sleep mode on CPU; the engine stays resident")
            self._asleep = True  # log once per sleep/wake pair, not every call
            return
        self.llm.sleep(level=1)
        self._asleep = True
        self.memory["rollout/mem_free_asleep_gb"] = _free_gb(self.ctx.device)

    def wake(self):
        if not self._asleep:
            return
        if not self.on_cpu:
            self.llm.wake_up()
            self.memory["rollout/mem_free_awake_gb"] = _free_gb(self.ctx.device)
        self._asleep = False

    def memory_stats(self) -> Dict[str, float]:
        return dict(self.memory)

    def close(self):
        """Shut the engine down and leave the trainer's process group alive.

        Call it before `destroy_process_group`. vLLM's in-process shutdown ends with
        `destroy_distributed_environment()`, which destroys torch's *default* group too, i.e. the
        trainer's world: we keep that call away from the default group (vLLM's own groups are
        still destroyed). Left to garbage collection after the world is gone, the same cleanup
        fails with "Invalid process group specified"; hence an explicit, ordered close.
        """
        import gc

        if getattr(self, "llm", None) is None:
            return
        with _keep_default_process_group():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()


@contextlib.contextmanager
def _keep_default_process_group():
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group=None):
        if group is None or group is dist.GroupMember.WORLD:
            return  # the trainer's world outlives the engine
        original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


def _token_prompts(token_id_lists):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_id_lists]
