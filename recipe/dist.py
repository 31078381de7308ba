"""Process launch and process groups.

`launch(fn, cfg)` runs `fn(cfg, ctx)` on every rank:
- under torchrun (RANK/WORLD_SIZE set) it joins the existing world;
- otherwise it starts `trainer.world_size` processes itself (spawn), gloo on CPU and one
  process per GPU with NCCL on CUDA.
Process groups have a timeout (`trainer.timeout_s`). If any rank raises, the others are
terminated and the failing rank's traceback is re-raised in the parent as `RankError`:
a crash on one rank never hangs the rest. The rank blamed is the root cause: ranks that
failed only because a peer died (connection reset, collective timeout) are passed over.
The ranks it starts end with it: if the launching process dies, even by SIGKILL, the kernel
kills them (Linux `PR_SET_PDEATHSIG`; elsewhere a thread watches the parent pid).
Stops: within `stop_on_signals()` SIGTERM and SIGINT (Ctrl-C) raise `RunStopped` in the launcher, which
kills its ranks at once (a checkpoint being written is left as a `.tmp` the next save removes) and
re-raises; the ranks themselves ignore SIGINT, so Ctrl-C in a terminal ends the run from one place,
without a traceback per rank.
Hung ranks: every rank touches a heartbeat file each second from a thread of its own; a rank silent for
`hung_after(timeout_s)` seconds (stopped by SIGSTOP, or stuck holding the interpreter) is named as the
hung one and the run ends then, instead of its peers timing out in a collective and being blamed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from recipe.settings import device_of


class RankError(RuntimeError):
    """A rank failed; the message holds that rank's traceback."""


class RunStopped(BaseException):
    """The run was asked to stop (SIGTERM, SIGINT). A BaseException, like KeyboardInterrupt: no
    `except Exception` on the way up turns a stop into a failure."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


HEARTBEAT_S = 1.0


def hung_after(timeout_s: float) -> float:
    """Seconds of silence after which a rank counts as hung: well inside the process-group timeout."""
    return max(5.0, min(60.0, timeout_s / 2))


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise RunStopped in the main thread (a SIGINT that is ignored, as in a job
    started in the background or under nohup, stays ignored)."""

    def stop(signum, frame):
        for sig in previous:  # a second Ctrl-C must not interrupt the clean-up of the first
            signal.signal(sig, signal.SIG_IGN)
        raise RunStopped(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device_type: str, timeout_s: int) -> DistContext:
    """Join the world described by RANK/WORLD_SIZE/MASTER_* in the environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _die_with_parent(parent: int) -> None:
    """End this process when the launcher `parent` dies, however it dies (no orphan ranks).

    torch's spawn already asks for SIGINT on parent death, but a rank started with SIGINT ignored
    (a job a script put in the background, nohup) inherits that and never acts on it: SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:

        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the launcher died before the line above took effect
        os._exit(1)


def _heartbeat(path: Path) -> None:
    """Touch `path` every HEARTBEAT_S from a daemon thread: the launcher's sign that this rank is alive."""

    def beat():
        while True:
            try:
                path.touch()
            except OSError:
                pass
            time.sleep(HEARTBEAT_S)

    path.touch()
    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def _worker(local_rank: int, fn: Callable, cfg_yaml: str, world: int, port: int, error_dir: str, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the launcher acts
    _heartbeat(Path(error_dir, f"alive{local_rank}"))
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cfg = OmegaConf.create(cfg_yaml)
    try:
        _run_rank(fn, cfg)
    except BaseException:
        # Written before this process exits (which is what breaks the peers' collectives), so the
        # parent can tell the first failure from the ranks that failed because of it.
        record = {"rank": local_rank, "time": time.time(), "traceback": traceback.format_exc()}
        Path(error_dir, f"rank{local_rank}.json").write_text(json.dumps(record))
        raise
    # Done: everything the rank writes is closed and its process group destroyed. Leave without the
    # interpreter's teardown, where the communication libraries' threads and destructors (vLLM's
    # groups, gloo) once aborted a finished rank (SIGABRT after its last step, seen in a CPU sweep).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Errors a rank raises because a PEER died (its socket closed, a collective timed out).
_SECONDARY = (
    "Connection reset by peer",
    "Connection closed by peer",
    "DistBackendError",
    "NCCL error",
    "Timed out",
    "timed out",
    "Broken pipe",
    "ProcessGroup",
)


def _root_cause(error_dir: str) -> Optional[dict]:
    """The first rank error that is not a consequence of another rank's death (else the first)."""
    records = [json.loads(p.read_text()) for p in Path(error_dir).glob("rank*.json")]
    if not records:
        return None
    key = lambda r: (any(s in r["traceback"] for s in _SECONDARY), r["time"])  # noqa: E731
    return min(records, key=key)


def _run_rank(fn: Callable, cfg: DictConfig) -> Any:
    ctx = init_process_group(device_of(cfg.trainer.device), cfg.trainer.timeout_s)
    try:
        return fn(cfg, ctx)
    except RunStopped:  # under torchrun: the launcher's one line says it
        raise
    except BaseException:
        # Print here too: the parent shows it, but under torchrun this is the only copy.
        print(f"[rank {ctx.rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def world_size_for(device: str, world_size: int) -> int:
    """`trainer.world_size` (`world_size`), refused when `device` is "cuda" and fewer devices are visible."""
    if device == "cuda":
        available = torch.cuda.device_count()
        if world_size > available:
            raise RankError(f"trainer.world_size={world_size} but only {available} CUDA devices are visible")
    return world_size


def launch(fn: Callable[[DictConfig, DistContext], Any], cfg: DictConfig) -> None:
    """Run `fn(cfg, ctx)` on every rank; see the module docstring."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        _run_rank(fn, cfg)
        return
    world = world_size_for(device_of(cfg.trainer.device), int(cfg.trainer.world_size))
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with tempfile.TemporaryDirectory(prefix="rank-errors-") as error_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, cfg_yaml, world, free_port(), error_dir, os.getpid()),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        try:
            _join(context, error_dir, hung_after(cfg.trainer.timeout_s))
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            root = _root_cause(error_dir)
            if root is not None:
                raise RankError(f"rank {root['rank']} failed:\n{root['traceback']}") from None
            if isinstance(exc, mp.ProcessExitedException):
                raise RankError(
                    f"rank {exc.error_index} exited with code {exc.exit_code} (signal {exc.signal_name})"
                ) from None
            raise RankError(f"rank {exc.error_index} failed:\n{exc}") from None
        finally:
            _end(context)  # a stop, a hung rank, or a failure torch's join already acted on: no rank outlives this


def _join(context, error_dir: str, silent_limit: float) -> None:
    """Wait for every rank; raise RankError naming a rank whose heartbeat stopped for `silent_limit` s."""
    while not context.join(timeout=HEARTBEAT_S):
        now = time.time()
        for rank, process in enumerate(context.processes):
            beat = Path(error_dir, f"alive{rank}")
            if process.is_alive() and beat.exists() and now - beat.stat().st_mtime > silent_limit:
                raise RankError(
                    f"rank {rank} is hung: no sign of life for {now - beat.stat().st_mtime:.0f} s "
                    f"(process {process.pid}, {_process_state(process.pid)}); its peers were waiting for "
                    "it in a collective. The run was ended; resume it with trainer.resume=true"
                )


def _process_state(pid: int) -> str:
    names = {
        "T": "stopped (SIGSTOP?)",
        "t": "stopped by a debugger",
        "D": "in uninterruptible I/O",
        "S": "sleeping",
        "R": "running",
        "Z": "exited",
    }
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "state unknown"
    return f"state {state}: {names.get(state, 'other')}"


def _end(context) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
    for process in context.processes:
        process.join(timeout=30)


def agree(
    failure: Optional[str], error: Callable[[str], BaseException] = RuntimeError, cause: Optional[BaseException] = None
) -> None:
    """All ranks agree, then raise: every rank learns whether any rank failed before any of them
    raises, so no rank is left waiting in a collective that its peers have left.

    `failure` is this rank's problem (None: none). If any rank has one, every rank raises
    `error(text)` with the same text: each failing rank's problem as `rank <r>: <problem>`, joined
    by " | " (in a world of one, or without a process group, the problem alone). `cause` chains this
    rank's own exception. While no rank fails this costs one all-reduce of one number; the
    problems travel (all_gather_object) only when there is one. Every rank must call it."""
    failures = [failure]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0 if failure is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    named = [(rank, text) for rank, text in enumerate(failures) if text is not None]
    if not named:
        return
    text = named[0][1] if len(failures) == 1 else " | ".join(f"rank {rank}: {text}" for rank, text in named)
    raise error(text) from cause
