"""The export of a saved checkpoint, on CPU: a Hugging Face directory (LoRA: merged, plus the PEFT
adapter), as the run writes at its end (recipe/export.py).

    python -m tools.export <run dir or checkpoint dir> [--out DIR] [--adapter-only]

A run directory means its newest complete checkpoint; the run's config.yaml says how the model
was built. The checkpoint may come from any world size (DCP reshards it): it is loaded into one
unsharded FSDP2 unit on the host in a process group of one, and exported through the dispatch
table's FSDP2 entries, so the bytes equal those the run's own export writes. A LoRA checkpoint
holds the adapters: the base comes from `model.path`, checked against the checkpoint's sha256
of its weight files. Default `--out`: `<run dir>/export/step_<N>/`. `--adapter-only` (LoRA):
`--out` becomes the PEFT directory alone. The run's config.yaml must be intact (it ends with
`# end of config.yaml`, as a resume requires); an export into the run directory holds the run's lock
while it writes, and is refused while a run holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import List, Optional, Tuple


class NotACheckpoint(ValueError):
    """The path is neither a run directory with a checkpoint nor a checkpoint; says what is missing."""


def locate(path: Path) -> Tuple[Path, Path]:
    """(checkpoint dir, run dir) of a run directory or a checkpoint directory."""
    from recipe.checkpoint import latest

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise NotACheckpoint(f"{path} is not a directory")
    if (path / "checkpoints").is_dir():
        checkpoint = latest(path / "checkpoints")
        if checkpoint is None:
            raise NotACheckpoint(f"{path}/checkpoints holds no complete checkpoint (no step_<N> directory)")
        run_dir = path
    elif (path / ".metadata").exists() or list(path.glob("rank*.pt")):
        checkpoint, run_dir = path, path.parent.parent
    else:
        raise NotACheckpoint(
            f"{path} is neither a run directory (no checkpoints/ folder) nor a checkpoint (no .metadata, no rank0.pt)"
        )
    if not (run_dir / "config.yaml").is_file():
        raise NotACheckpoint(
            f"{run_dir}/config.yaml is missing: the run's config, which says how to build the "
            f"model the checkpoint {checkpoint} belongs to"
        )
    return checkpoint, run_dir


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, target: Path):
    """An export into the run directory holds the run's lock (recipe/preflight.py `RunDir`) while it
    writes: refused while a run (a resume, a final export) writes there; a run started meanwhile is
    refused. An export elsewhere takes no lock (the run directory may be read-only)."""
    from recipe.preflight import RunDir, RunDirBusy

    if not Path(target).resolve().is_relative_to(run_dir.resolve()):
        yield
        return
    owner = RunDir(run_dir)
    try:
        owner.claim(resume=True)  # takes the lock only: writes nothing else into the directory
    except RunDirBusy as exc:
        raise NotACheckpoint(
            f"{run_dir} is in use by a run ({exc.holder}): wait for it to end, or export elsewhere with --out"
        ) from None
    try:
        yield
    finally:
        owner.release()


def export_checkpoint(
    path: Path, out: Optional[Path] = None, adapter_only: bool = False, shard_bytes: Optional[int] = None
) -> Path:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf, open_dict

    from recipe.checkpoint import load_weights
    from recipe.dist import DistContext
    from recipe.export import SHARD_BYTES, export, export_dir
    from recipe.model import build_policy
    from recipe.preflight import load_run_config
    from recipe.settings import Settings

    checkpoint, run_dir = locate(path)
    cfg = OmegaConf.create(load_run_config(run_dir / "config.yaml"))  # refuses a cut or damaged file
    if adapter_only and cfg.lora.name == "none":
        raise NotACheckpoint(f"--adapter-only: the run {run_dir} trained without LoRA (lora.name=none): no adapter")
    with open_dict(cfg):  # one unsharded unit on the host, whatever the run used
        cfg.fsdp.name, cfg.offload.name, cfg.trainer.device = "fsdp2", "none", "cpu"
        cfg.offload.pin_memory = "false"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ctx = DistContext(0, 1, 0, torch.device("cpu"))
        model = build_policy(Settings.from_cfg(cfg).policy, ctx)
        step = load_weights(checkpoint, model, base=cfg.model.path if cfg.lora.name != "none" else None)
        target = Path(out) if out is not None else export_dir(run_dir, step)
        with run_dir_lock(run_dir, target):
            return export(model, cfg, ctx, target, step, run_dir, shard_bytes or SHARD_BYTES, adapter_only=adapter_only)
    finally:
        if started:
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", default=None, help="target directory (default <run dir>/export/step_<N>)")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: only the PEFT adapter directory")
    parser.add_argument("--shard-mb", type=float, default=None, help="safetensors shard size (default 1024)")
    args = parser.parse_args(argv)
    if args.shard_mb is not None and not args.shard_mb > 0:
        parser.error(f"--shard-mb={args.shard_mb}: give a size in MiB above 0 (default 1024)")
    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    out = export_checkpoint(Path(args.path), Path(args.out) if args.out else None, args.adapter_only, shard)
    print(f"exported: {out}", flush=True)
    return out


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001  (one line, not a traceback, for what the user can fix)
        sys.exit(f"tools.export: {exc}")
