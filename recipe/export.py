"""Export: the trained policy as a Hugging Face directory that transformers and vLLM load, and for
LoRA also the adapter in PEFT format that peft and vLLM's `LoRARequest` load.

    from recipe.export import export
    export(model, settings, ctx, out=run_dir / "export" / f"step_{step}", step=step, run_dir=run_dir)

Layout of `out` (`trainer.export`: `final` (default), `every_checkpoint`, `none`; or
`python -m tools.export <checkpoint>`):
- `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`: the policy in `model.dtype`
  under HF names; for `lora=merged` and `lora=adapter` the merged policy (W + alpha/r * B @ A in
  float32, cast once: the weights the engine's merged sync gets);
- `config.json` (the base's, `dtype` = `model.dtype`), `generation_config.json`, the tokenizer files;
- `adapter/` (LoRA only): `adapter_config.json` and `adapter_model.safetensors` with peft's names;
- `export.json`: the run directory, step, combination, dtype, base, and the sha256 of every file.

The weights come through the dispatch table's strategies (recipe/weights/), the sync's own
gathers: every rank takes part, no rank holds more of the model on its device than a sync does,
and rank 0 writes. Host memory on rank 0: one safetensors shard (`shard_bytes`, 1 GiB) at most.

Atomic: rank 0 writes into a fresh hidden directory beside `out` and renames it into place once
every file is written (an existing export of this run moves aside first and is removed last). A
failed write (a full disk: "no space left on device: <path>") removes the temporary directory,
leaves any earlier export as it was, and raises `ExportError` on every rank; the ranks keep
consuming the stream after a write fails, so none waits in a collective. An existing `out` that
is not an export of this run (no `export.json` naming this run directory) is refused, unless empty.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from recipe.dist import agree
from recipe.files import sha256, write_error
from recipe.model import adapter_config
from recipe.settings import Settings
from recipe.weights import StreamSpec, stream_transform

MANIFEST = "export.json"
SHARD_BYTES = 2**30
INDEX = "model.safetensors.index.json"
ADAPTER_DIR = "adapter"


class ExportError(RuntimeError):
    """An export cannot be written; the message names the path."""


@dataclass(frozen=True)
class ExportSpec:
    """What the writers read: the stream's spec (gather, dtype, LoRA mode), the base model's directory
    (`model.path`: config, tokenizer, the manifest's base) and the LoRA slice (adapter_config.json)."""

    stream: StreamSpec
    base: str
    lora: Any

    @classmethod
    def of(cls, settings: Settings) -> "ExportSpec":
        return cls(StreamSpec.of(settings), str(settings.model.path), settings.lora)

    @property
    def has_lora(self) -> bool:
        return self.stream.lora != "none"


# ----------------------------------------------------------------------------- target directory


def is_export_of(out: Path, run_dir: Path) -> bool:
    """`out` holds an export whose manifest names `run_dir`."""
    try:
        return json.loads((out / MANIFEST).read_text())["run_dir"] == str(Path(run_dir).resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_target(out: Path, run_dir: Path) -> None:
    """Refuse to write over anything but an empty directory or an export of this run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"export target {out} exists and is not a directory; choose another directory")
    if any(out.iterdir()) and not is_export_of(out, run_dir):
        raise ExportError(
            f"export target {out} exists and is not an export of this run ({MANIFEST} naming "
            f"{Path(run_dir).resolve()} is missing); choose another directory, nothing was written"
        )


def publish(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`; an existing `out` (checked: empty or ours) goes aside first."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)  # a publish killed between its renames; `out` was checked to be ours
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- safetensors shards


class ShardWriter:
    """Safetensors shards of at most `shard_bytes` (a larger tensor gets a shard of its own), the
    tensors of one shard held on the host until it is written; `close` names them
    `model-0000i-of-0000N.safetensors` and writes the index."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = out, shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffered = self.total = 0
        self.shards: List[Tuple[Path, List[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.shard_bytes:
            self.flush()
        # A copy of its own: gathered tensors may be views of one buffer, which safetensors refuses.
        self.buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.out / f"shard-{len(self.shards):05d}.safetensors"
        self.shards.append((path, sorted(self.buffer)))
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.buffer, self.buffered = {}, 0

    def close(self) -> List[str]:
        """Write the last shard, name them all, write the index; returns the file names."""
        self.flush()
        count, weight_map, names = len(self.shards), {}, []
        for i, (path, tensors) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update({t: name for t in tensors})
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX]


# ----------------------------------------------------------------------------- the export


def consume(stream: Iterable, write, path: Path) -> Optional[str]:
    """Take every tensor of the stream (every rank must, to keep the collectives in step); hand them
    to `write` (rank 0; None elsewhere) until it fails. Returns the failure's message."""
    error = None
    for name, tensor in stream:
        if write is not None and error is None:
            try:
                write(name, tensor)
            except Exception as exc:  # noqa: BLE001  (a full disk, a permission; reported after the stream)
                error = write_error(exc, path)
        del tensor
    return error


def export(
    model: nn.Module,
    settings: Settings,
    ctx,
    out: Path,
    step: int,
    run_dir: Path,
    shard_bytes: int = SHARD_BYTES,
    adapter_only: bool = False,
) -> Path:
    """Write the export of the sharded `model` to `out` (see the module docstring). Every rank calls it.
    `adapter_only` (LoRA): `out` is the PEFT directory alone (adapter files and the manifest)."""
    spec = ExportSpec.of(settings)
    out, run_dir = Path(out).resolve(), Path(run_dir).resolve()
    tmp, error = None, None
    if ctx.is_main:
        try:
            check_target(out, run_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        except ExportError as exc:
            error = str(exc)
        except OSError as exc:
            error = write_error(exc, out)
    agree(error, ExportError)  # rank 0 writes; the others wait for its verdict
    try:
        if adapter_only:
            error = write_adapter_stream(model, spec, ctx, tmp)
        else:
            error = write_weights(model, spec, ctx, tmp, shard_bytes)
        if ctx.is_main and error is None:
            error = write_files(spec, tmp, out, step, run_dir, hf=not adapter_only)
        agree(error, ExportError)
        if ctx.is_main:
            try:
                publish(tmp, out)
            except OSError as exc:
                error = write_error(exc, out)
        agree(error, ExportError)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing partial
    return out


def write_weights(model: nn.Module, spec: ExportSpec, ctx, tmp: Optional[Path], shard_bytes: int) -> Optional[str]:
    """The policy's shards (merged for LoRA) and, for LoRA, the adapter tensors; rank 0 writes.
    Returns rank 0's first failure, if any."""
    lora = spec.has_lora
    writer = ShardWriter(tmp, shard_bytes) if ctx.is_main else None
    error = consume(
        stream_transform(model, spec.stream, ctx.device, "merged" if lora else "none"),
        writer.add if writer else None,
        tmp,
    )
    if writer is not None and error is None:
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001
            error = write_error(exc, tmp)
    if not lora:
        return error
    return write_adapter_stream(model, spec, ctx, tmp / ADAPTER_DIR if tmp is not None else None) or error


def write_adapter_stream(model: nn.Module, spec: ExportSpec, ctx, out: Optional[Path]) -> Optional[str]:
    """The LoRA tensors under peft's names, with adapter_config.json, into `out` (rank 0)."""
    adapter: Dict[str, torch.Tensor] = {}
    collect = (
        (lambda name, t: adapter.__setitem__(name, t.detach().to("cpu", copy=True).contiguous()))
        if ctx.is_main
        else None
    )
    error = consume(stream_transform(model, spec.stream, ctx.device, "adapter"), collect, out)
    if ctx.is_main and error is None:
        error = write_adapter(spec, out, adapter)
    return error


def write_adapter(spec: ExportSpec, out: Path, tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    from safetensors.torch import save_file

    try:
        out.mkdir(exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(
            json.dumps(adapter_config(spec.lora, spec.base), indent=2, sort_keys=True) + "\n"
        )
    except Exception as exc:  # noqa: BLE001
        return write_error(exc, out)
    return None


def write_files(spec: ExportSpec, tmp: Path, out: Path, step: int, run_dir: Path, hf: bool = True) -> Optional[str]:
    """With `hf`: config.json, generation_config.json and the tokenizer of the base (in `model.dtype`);
    then the manifest with every file's sha256. Rank 0 only."""
    base = Path(spec.base).expanduser().resolve()
    try:
        if hf:
            write_hf_files(base, spec.stream.dtype, tmp)
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "run_dir": str(run_dir),
            "step": step,
            "combination": "/".join(spec.stream.combo),
            "dtype": spec.stream.dtype,
            "base": str(base),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except Exception as exc:  # noqa: BLE001
        return write_error(exc, out)
    return None


def write_hf_files(base: Path, dtype: str, out: Path) -> None:
    """The base's config (its `dtype` set to the export's), generation config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:  # the base has none
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def export_dir(run_dir: Path, step: int) -> Path:
    """Where a run's export of `step` goes."""
    return Path(run_dir) / "export" / f"step_{step}"
