"""Checkpoints: sharded model + optimizer (torch.distributed.checkpoint), step, scheduler, RNG
and the trainer's other counters.

Layout: `<run_dir>/checkpoints/step_<N>/` holds the DCP shards and one `rank<R>.pt` per rank
(step, scheduler state, RNG states, the caller's `state`, and a sha256 of every file that rank
wrote). Every file is loaded with `torch.load(weights_only=True)`: tensors, numbers, strings,
lists and dicts only, so a planted file cannot run code.

A save is atomic at every point; the previous checkpoint stays loadable until the new one is
complete:
1. every rank writes into `step_<N>.tmp` (a leftover `.tmp` from a killed save is removed first);
2. every rank flushes its files to the disk (fsync; DCP's writer does for the shards) and all ranks
   agree that every write succeeded; else every rank raises and rank 0 removes `.tmp` (a full disk
   is named as such: `no space left on device: <step_<N>.tmp>`, recipe/files.py);
3. rank 0 flushes `.tmp`'s directory entries, renames an existing `step_<N>` to `step_<N>.old`,
   renames `.tmp` to `step_<N>`, flushes the checkpoints folder (the renames), and only then removes
   `.old`; a kill between the two renames leaves `.old`, which `latest()` treats as `step_<N>`;
4. with `keep` > 0, complete checkpoints older than the newest `keep` are removed: only after the new
   one is on the disk, so a power cut cannot leave fewer complete checkpoints than before.
Loading checks each file against its sha256 first, so a truncated or corrupted checkpoint
gives a `CheckpointError` that names the file.
Resume: `python -m recipe.train trainer.resume=true hydra.run.dir=<run dir>`.

LoRA (`save(base=<model dir>)`): the checkpoint holds only what trains (the adapters, their AdamW
state) besides step, scheduler and RNG, and a reference to the frozen base: its directory and the
sha256 of each of its weight files (rank 0's file). `load(base=)` refuses a base whose weight files
differ, naming the file, since the adapters mean nothing on another base.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from recipe.dist import agree
from recipe.files import DiskFullError, disk_full, fsync_path, sha256
from recipe.model import Residency
from recipe.names import strip_wrappers

# DCP's CheckpointException derives from BaseException, not Exception.
FAILURES = (Exception, CheckpointException)
STEP_DIR = re.compile(r"^step_(\d+)(\.old|\.tmp)?$")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()  # weights_only-safe: lists of ints
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- helpers


def _agree(error: Optional[BaseException], what: str, cleanup=None) -> None:
    """Every rank raises if any rank failed (no rank is left waiting in a collective); `cleanup` runs
    first, once every rank has stopped writing."""
    own = None if error is None else str(error) if isinstance(error, CheckpointError) else f"{what}: {_describe(error)}"
    try:
        agree(own, CheckpointError, cause=error)
    except CheckpointError:
        if cleanup is not None:
            cleanup()
        raise


def _describe(error: BaseException) -> str:
    """One line per failure; DCP wraps each rank's error with its traceback, which the cause keeps."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(exc)}" for r, (exc, _) in error.failures.items())
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _own_files(directory: Path, rank: int) -> Dict[str, str]:
    """sha256 of the DCP files this rank wrote (rank 0 also owns `.metadata`)."""
    names = [p for p in directory.glob(f"__{rank}_*.distcp")]
    if rank == 0 and (directory / ".metadata").exists():
        names.append(directory / ".metadata")
    return {p.name: sha256(p) for p in sorted(names)}


def _step_dirs(root: Path) -> Dict[int, Dict[str, Path]]:
    """{step: {"": complete dir, ".old": moved-aside copy, ".tmp": unfinished}} under `root`."""
    found: Dict[int, Dict[str, Path]] = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(1)), {})[m.group(2) or ""] = p
    return found


def _tidy(root: Path) -> None:
    """Rank 0, before a save: finish a publish a kill interrupted, drop unfinished writes (all ours)."""
    for step, kinds in _step_dirs(root).items():
        if ".old" in kinds:
            if "" in kinds:
                shutil.rmtree(kinds[".old"])
            else:
                kinds[".old"].rename(root / f"step_{step}")
        if ".tmp" in kinds:
            shutil.rmtree(kinds[".tmp"])


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` goes aside first and is removed last,
    once the renames are on the disk."""
    old = final.with_name(final.name + ".old")
    fsync_path(tmp)  # the files' names in `tmp`, before `tmp` becomes the checkpoint
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _remove_unfinished(tmp: Path, ctx) -> None:
    """Rank 0, after a failed write that every rank has given up on: no partial checkpoint is left behind."""
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    complete = sorted((s, k[""]) for s, k in _step_dirs(root).items() if "" in k)
    for _, path in complete[:-keep]:
        if path != newest:
            shutil.rmtree(path)


# ----------------------------------------------------------------------------- the frozen base of a LoRA run

_BASE_DIGESTS: Dict[tuple, str] = {}


def base_reference(model_dir: Path) -> dict:
    """{"path": the base's directory, "files": {weight file name: sha256}}. A file's digest is
    computed once per process for its (path, size, mtime) (a 7B base is 15 GB to read)."""
    model_dir = Path(model_dir).resolve()
    files = sorted({p for pattern in WEIGHT_FILES for p in model_dir.glob(pattern) if p.is_file()})
    digests = {}
    for path in files:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _BASE_DIGESTS:
            _BASE_DIGESTS[key] = sha256(path)
        digests[path.name] = _BASE_DIGESTS[key]
    return {"path": str(model_dir), "files": digests}


def check_base(saved: dict, model_dir: Path) -> None:
    """Refuse to resume LoRA adapters on a base other than the one they were trained on."""
    now = base_reference(model_dir)
    for name in sorted(set(saved["files"]) | set(now["files"])):
        if saved["files"].get(name) != now["files"].get(name):
            state = (
                "is missing"
                if name not in now["files"]
                else "is new"
                if name not in saved["files"]
                else "differs (sha256)"
            )
            raise CheckpointError(
                f"the LoRA checkpoint was trained on the base {saved['path']}; its weight file "
                f"{Path(now['path']) / name} {state} from the one the checkpoint recorded: refusing "
                "to resume the adapters on another base"
            )


def _options(base) -> StateDictOptions:
    """LoRA (a base is given): only the trained parameters (and their optimizer state)."""
    return StateDictOptions(ignore_frozen_params=base is not None, strict=base is None)


def _state_dicts(model, optimizer, base) -> dict:
    """{"model": ..., "optim": ...} as DCP saves and loads them; LoRA: the trained parameters only
    (`ignore_frozen_params` keeps a tied head, which `named_parameters` lists under the embedding)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(base))
    return {"model": _trained_only(model, model_sd) if base is not None else model_sd, "optim": optim_sd}


def _trained_only(model, state: dict) -> dict:
    trained = {strip_wrappers(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


# ----------------------------------------------------------------------------- API


def save(
    root: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    ctx,
    state: Optional[dict] = None,
    keep: int = 0,
    residency: Optional[Residency] = None,
    base: Optional[Path] = None,
) -> Path:
    """Write checkpoint `step` under `root` (see the module docstring); returns its directory.

    `state`: more weights_only-safe values to restore on resume (returned by `load`). `residency`
    (offload=manual): the shards come to the device for DCP, which wants them there, and go back after.
    `base` (LoRA): the frozen base's directory; only the trained parameters are saved, and a reference to it."""
    root = Path(root)
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    error = None
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _tidy(root)
            tmp.mkdir()
        except OSError as exc:
            error = DiskFullError(tmp) if disk_full(exc, root) else exc
    _agree(error, f"cannot prepare checkpoint directory {tmp}")
    try:
        with residency.on_device() if residency is not None else contextlib.nullcontext():
            dcp.save(_state_dicts(model, optimizer, base), checkpoint_id=str(tmp))  # fsyncs each shard file
        extra = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "state": state or {},
            "files": _own_files(tmp, ctx.rank),
        }
        if base is not None and ctx.is_main:
            extra["base"] = base_reference(base)
        torch.save(extra, tmp / f"rank{ctx.rank}.pt")
        fsync_path(tmp / f"rank{ctx.rank}.pt")
    except FAILURES as exc:  # agreed on, then raised on every rank
        # torch's writers hide ENOSPC ("unexpected pos 704 vs 598"): a probe write tells a full disk
        error = DiskFullError(tmp) if disk_full(exc, tmp) else exc
    _agree(
        error,
        f"writing checkpoint {tmp} failed; the previous checkpoints are untouched",
        cleanup=lambda: _remove_unfinished(tmp, ctx),
    )
    if ctx.is_main:
        try:
            _publish(tmp, final)
            _prune(root, keep, final)
        except OSError as exc:
            error = exc
    _agree(error, f"publishing checkpoint {final} failed")
    return final


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint (a `step_<N>.old` counts when `step_<N>` is missing)."""
    complete = {s: k.get("", k.get(".old")) for s, k in _step_dirs(Path(root)).items() if "" in k or ".old" in k}
    return complete[max(complete)] if complete else None


def _check_world(path: Path, world: int) -> None:
    """A checkpoint is loaded by as many ranks as saved it: each rank file holds that rank's RNG and counters,
    and the recipe does not re-shard them (a world of 1 loading a 2-rank checkpoint used to read rank0.pt only)."""
    saved = len(list(path.glob("rank*.pt")))
    if saved and saved != world:
        raise CheckpointError(
            f"checkpoint {path} was saved by {saved} ranks and this run has {world}: resume with "
            f"{saved} ranks (trainer.world_size={saved}, or torchrun --nproc-per-node={saved}); "
            "re-sharding to another world size is not supported"
        )


def _read_rank_file(path: Path, rank: int) -> dict:
    rank_file = path / f"rank{rank}.pt"
    try:
        extra = torch.load(rank_file, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint file {rank_file} is missing (written by rank {rank} of the saving "
            f"world; is the world size the same as when it was saved?)"
        ) from None
    except Exception as exc:  # noqa: BLE001  (truncated, corrupted, or not weights-only)
        raise CheckpointError(
            f"checkpoint file {rank_file} cannot be read (truncated or corrupted?): {_describe(exc)}"
        ) from None
    for name, digest in extra.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupted (sha256 differs from the one "
                "recorded when it was saved)"
            )
    return extra


def load(
    path: Path, model, optimizer, scheduler, ctx, residency: Optional[Residency] = None, base: Optional[Path] = None
) -> dict:
    """Load a checkpoint in place; returns {"step": N, "state": the `state` given to save}.
    `base` (LoRA): the frozen base's directory, checked against the checkpoint's reference."""
    path = Path(path)
    extra, error = None, None
    try:
        _check_world(path, ctx.world_size)
        extra = _read_rank_file(path, ctx.rank)
        if base is not None and "base" in extra:  # rank 0's file holds the reference
            check_base(extra["base"], base)
    except FAILURES as exc:  # CheckpointError names the file; anything else is wrapped by _agree
        error = exc
    _agree(error, f"checkpoint {path} cannot be loaded")
    try:
        with residency.on_device() if residency is not None else contextlib.nullcontext():
            sds = _state_dicts(model, optimizer, base)
            dcp.load(sds, checkpoint_id=str(path))
            set_state_dict(
                model, optimizer, model_state_dict=sds["model"], optim_state_dict=sds["optim"], options=_options(base)
            )
    except FAILURES as exc:
        error = CheckpointError(f"checkpoint {path} cannot be loaded into this model: {_describe(exc)}")
    _agree(error, f"checkpoint {path} cannot be loaded")
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return {"step": int(extra["step"]), "state": extra.get("state", {})}


def load_weights(path: Path, model, base: Optional[Path] = None) -> int:
    """Only the model part of checkpoint `path` (no optimizer, scheduler or RNG), into `model` sharded
    over any world size (DCP reshards what the saving world wrote); every rank file's list of
    sha256 is checked first, and a LoRA checkpoint's base against `base`. Returns the step.
    For exporting a saved checkpoint (tools/export.py)."""
    path = Path(path)
    missing = [name for name in (".metadata", "rank0.pt") if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint: {' and '.join(missing)} missing (a checkpoint "
            "directory holds DCP shards, .metadata and one rank<R>.pt per saving rank)"
        )
    extras = [_read_rank_file(path, rank) for rank in range(len(list(path.glob("rank*.pt"))))]
    if base is not None and "base" in extras[0]:
        check_base(extras[0]["base"], base)
    state = get_model_state_dict(model, options=_options(base))
    state = _trained_only(model, state) if base is not None else state
    try:
        dcp.load({"model": state}, checkpoint_id=str(path))
        set_model_state_dict(model, state, options=_options(base))
    except FAILURES as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {_describe(exc)}") from None
    return int(extras[0]["step"])
