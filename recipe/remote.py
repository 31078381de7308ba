"""The rollout engine in a process of its own (`rollout.placement=separate`), one per trainer rank.

    engine = place_engine(settings, ctx, model_dir, load=..., digest=...)   # colocated: recipe.engine.build_engine; separate: RemoteEngine
    pending = engine.submit(prompt_ids, n=8, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=0)
    ...                                          # the trainer works while the engine generates
    samples = pending.result()                   # waits (trainer.timeout_s) and checks the weight version
    engine.load_weights(stream)                  # what WeightSync calls; the same digest check follows

Why a process of its own: on GPUs, the engine on devices the trainer does not use (`rollout.devices`)
keeps its weights and KV cache there, and it generates while the trainer updates (`submit`). The
child builds the real engine (`recipe.engine.build_engine`: vLLM, or the HF copy for rollout=hf)
and serves requests one at a time, in the order sent: generate, prompt_logprobs, load_weights,
load_adapter, weight_digests, adapter_digests, the held forms, memory_stats, close. Sleep and wake
are no-ops: the engine's memory is not the trainer's.

Transport. Requests and replies are pickled over a pipe (replies with cloudpickle: a held form is a
closure). The stream goes in the order the dispatch table yields it, in buckets of `sync.bucket_mb`:
names, shapes and dtypes over the pipe, the bytes as `rollout.transport` says (recipe/transport.py).
`group`: across a torch process group of two (trainer rank = 0, its engine = 1) made from a TCPStore
of its own, NOT the trainer's default group: gloo on CPU, NCCL on CUDA; torch's own group rather than
vLLM's StatelessProcessGroup/PyNcclCommunicator: the same code for rollout=hf (no vLLM), for gloo on
CPU (what the tests run) and for NCCL, and no vLLM internals. `ipc`: the staging buffer itself over
the pipe (shared memory on CPU, a CUDA IPC handle on CUDA), the only form for trainer and engine on
one GPU (NCCL cannot pair two processes on one device); the child copies the bucket into a fresh
buffer and acknowledges (a reply keyed ("ack", n)), and the trainer refills its staging buffer only
after that acknowledgement, which it awaits like any reply (a dead, hung or failed child is named).
`auto`: ipc where the engine's CUDA device is one of the trainer's, else group. Untested here (no
GPU): the NCCL path and the CUDA IPC path. The child hands the engine's load an iterator that
receives the next bucket only when the load asks for it, so it holds at most one bucket beyond the
engine's weights.

The exact check is WeightSync's, unchanged: the trainer digests what it streams (before it crosses),
the child digests what the engine holds after the load (`Digest` is a plain dataclass and pickles),
so a byte changed in transit is caught like one changed by the engine. Weight versions travel with
every batch of samples: the child counts its loads and returns the count with every reply; the
samples of a generate request must come from exactly the loads sent before it.

Faults stop the run within seconds, naming the engine and the request: a child that dies (its exit
code), one that does not answer within `trainer.timeout_s` (it is killed), one that reports another
weight version, one whose request raised (its traceback). A rank that raises is what recipe.dist's
launcher already handles (the other ranks are ended). `close()` always reaps the child, which also
dies with its trainer rank (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import datetime
import importlib
import itertools
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recipe.dist import DistContext, free_port
from recipe.engine import Engine, EngineSpec, Sample, build_engine
from recipe.settings import Settings
from recipe.transport import (
    ALIGN,
    Receiver,
    aligned,
    as_bytes,
    choose_transport,
    dtype_name,
    engine_index,
    pair_group,
    share,
)

# Building the engine is not a request: vLLM's start (profiling, KV cache, on CUDA graphs) can take
# minutes on a slow machine. A child that dies while starting is still reported at once.
STARTUP_S = 900.0
POLL_S = 0.2
# A dead child's pipe closes at once; this long without that, a child that is not alive counts as dead.
EXIT_GRACE_S = 2.0
# Tests only: "module:function", called in the engine process with its EngineServer before it serves
# (to inject a fault where the engine lives). Unset in every real run.
TEST_HOOK_ENV = "RECIPE_ENGINE_TEST_HOOK"
_TRAINER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


class EngineError(RuntimeError):
    """The engine process died, did not answer in time, failed a request, or answered out of step."""


def place_engine(settings: Settings, ctx: DistContext, model_dir: str, *, load: str, digest: bool) -> Engine:
    """The rank's engine where `rollout.placement` puts it: in this process, or in one of its own. `load`
    and `digest` are the sync's settings (`sync.load`, `sync.digest`), handed on to the engine."""
    if settings.rollout.placement == "separate":
        return RemoteEngine(
            EngineSpec.of(settings),
            ctx,
            model_dir,
            load=load,
            digest=digest,
            timeout_s=settings.trainer.timeout_s,
            bucket_bytes=int(settings.sync.bucket_mb * 2**20),
        )
    return build_engine(EngineSpec.of(settings), ctx, model_dir, load=load, digest=digest)


@dataclass(frozen=True)
class ChildSpec:
    """What the engine process needs to build the engine and join the pair group."""

    engine: EngineSpec  # frozen dataclasses of settings slices: they pickle
    load: str
    digest: bool
    rank: int
    world_size: int
    model_dir: str
    port: int
    transport: str  # "group" or "ipc" (recipe/transport.py)
    timeout_s: float
    cuda_visible: Optional[str]  # CUDA: the one device the engine sees (as cuda:0); None on CPU
    hook: Optional[str]


def engine_device(index: int, device: str) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for the engine on CUDA device `index` (`engine_index`) when `device` is "cuda",
    else None."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


class Pending:
    """A generate request on its way: `result()` waits for its samples (once; later calls return them)."""

    def __init__(self, engine: "RemoteEngine", request: int, version: int):
        self.engine, self.request, self.version = engine, request, version
        self._samples: Optional[List[Sample]] = None

    def result(self) -> List[Sample]:
        if self._samples is None:
            self._samples = self.engine.collect(self)
        return self._samples


class RemoteEngine(Engine):
    """An Engine whose work is done by a child process; see the module docstring."""

    shares_policy = False

    def __init__(
        self,
        spec: EngineSpec,
        ctx: DistContext,
        model_dir: str,
        *,
        load: str,
        digest: bool,
        timeout_s: float,
        bucket_bytes: int,
    ):
        """`timeout_s` bounds every request (`trainer.timeout_s`); weights cross in buckets of `bucket_bytes`."""
        self.backend = spec.rollout.backend
        self.name = f"rank {ctx.rank}'s rollout engine"
        self.device = ctx.device
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = max(ALIGN, bucket_bytes)
        self.loads_sent = 0  # the weight version every later reply must carry
        self._ids = itertools.count()
        self.buckets_sent = 0
        self._replies: Dict[int, Tuple[bool, Any, int]] = {}
        self._cond = threading.Condition()
        self._closed_pipe = False
        self._failure: Optional[EngineError] = None
        timeout = datetime.timedelta(seconds=self.timeout_s)
        port = free_port()
        self._store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timeout, wait_for_workers=False)
        spawn = mp.get_context("spawn")
        self._conn, child_end = spawn.Pipe()
        index = engine_index(spec.rollout.devices, ctx.world_size, ctx.rank)
        device = engine_device(index, spec.device)
        self.transport = choose_transport(spec.rollout.transport, ctx.device, index, ctx.world_size)
        child = ChildSpec(
            spec,
            load,
            digest,
            ctx.rank,
            ctx.world_size,
            str(model_dir),
            port,
            self.transport,
            self.timeout_s,
            device,
            os.environ.get(TEST_HOOK_ENV),
        )
        self.process = spawn.Process(target=serve, args=(child, child_end, os.getpid()), name=f"engine-rank{ctx.rank}")
        self.process.start()
        child_end.close()
        threading.Thread(target=self._read, daemon=True, name=f"engine-replies-{ctx.rank}").start()
        try:
            self._await(next(self._ids), "start (join the weight group)", STARTUP_S)
            self.group = pair_group(self._store, 0, ctx.device, timeout) if self.transport == "group" else None
            self._await(next(self._ids), "start (build the engine)", STARTUP_S)
        except BaseException:
            self.close()
            raise

    # -- requests
    def submit(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed) -> Pending:
        """Send a generate request and return at once; the child generates while the trainer works."""
        request = self._send(
            "generate", [list(p) for p in prompt_token_ids], n, max_new_tokens, temperature, top_p, seed
        )
        return Pending(self, request, self.loads_sent)

    def collect(self, pending: Pending) -> List[Sample]:
        """The samples of `pending`, which must come from exactly the loads sent before it."""
        samples, version = self._await(pending.request, "generate", self.timeout_s, with_version=True)
        if version != pending.version:
            raise self._fail(
                f"{self.name} (process {self.process.pid}) reports weight version {version} for its "
                f"samples of request 'generate', but {pending.version} loads were sent before that "
                f"request: the samples would not come from the weights the trainer synced"
            )
        return samples

    def generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        return self.submit(prompt_token_ids, n, max_new_tokens, temperature, top_p, seed).result()

    def prompt_logprobs(self, token_id_lists):
        return self._call("prompt_logprobs", [list(ids) for ids in token_id_lists])

    def load_weights(self, weights):
        self._load("load_weights", weights)

    def load_adapter(self, tensors, adapter_config, version):
        self._load("load_adapter", tensors, dict(adapter_config), version)
        self.lora_version = version

    def weight_digests(self):
        held, self.load_digest_seconds = self._call("weight_digests")
        return held

    def adapter_digests(self):
        return self._call("adapter_digests")

    def weight_held_form(self):
        return self._call("weight_held_form")

    def adapter_held_form(self, adapter_config):
        return self._call("adapter_held_form", dict(adapter_config))

    def memory_stats(self) -> Dict[str, float]:
        return self._call("memory_stats")

    def close(self) -> None:
        """Ask the child to close its engine, then reap it (killed if it does not exit)."""
        process = getattr(self, "process", None)
        if process is None:
            return
        try:
            if self._failure is None and process.is_alive() and hasattr(self, "group"):
                self._call("close", limit=min(self.timeout_s, 120.0))
        except EngineError:
            pass
        finally:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=30)
            self._conn.close()
            self.process = None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    # -- the weight stream
    def _load(self, what: str, weights, *args) -> None:
        request = self._send(what, *args)
        self.loads_sent += 1
        ended = False
        try:
            self._stream(weights, what, request)
            self._conn.send(("end", None, 0))
            ended = True
        except EngineError:
            raise
        except BaseException:  # the trainer's stream failed: end the child's load too, then re-raise
            if not ended and self._failure is None:
                self._pipe_send(("end", "abort", 0), what)
                self._replies_of(request, what)
            raise
        self._await(request, what, self.timeout_s)

    def _replies_of(self, request: int, what: str) -> None:
        try:
            self._await(request, what, self.timeout_s)
        except EngineError:
            pass

    def _stream(self, weights, what: str, request: int) -> None:
        """Buckets of about `bucket_bytes`: a tensor is copied into the staging buffer as it is yielded (a
        stream may reuse its buffers); a tensor larger than a bucket goes alone, without the copy (with ipc
        on CPU, copied: sharing a storage moves it to shared memory, and the tensor is the trainer's)."""
        staging = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        metas: List[Tuple[str, Tuple[int, ...], str, int]] = []
        used = 0
        for name, tensor in weights:
            t = tensor.detach()
            size = t.numel() * t.element_size()
            if metas and aligned(used) + size > self.bucket_bytes:
                self._send_bucket(metas, staging[:used], what, request)
                metas, used = [], 0
            if size > self.bucket_bytes:
                alone = as_bytes(t.contiguous())
                if self.group is None and alone.device.type == "cpu":
                    alone = alone.clone()
                self._send_bucket([(name, tuple(t.shape), dtype_name(t), 0)], alone, what, request)
                continue
            used = aligned(used)
            staging[used : used + size].copy_(as_bytes(t.contiguous()))
            metas.append((name, tuple(t.shape), dtype_name(t), used))
            used += size
        if metas:
            self._send_bucket(metas, staging[:used], what, request)

    def _send_bucket(self, metas, data: torch.Tensor, what: str, request: int) -> None:
        self.buckets_sent += 1
        if self.group is None:  # ipc: `data` is refilled only once the child has its own copy
            key = ("ack", self.buckets_sent)
            self._pipe_send(("bucket", metas, (key, share(data))), what)
            self._await(key, what, self.timeout_s, unless=request)
            return
        self._pipe_send(("bucket", metas, data.numel()), what)
        try:
            self.group.send([data], 1, 0).wait()
        except RuntimeError as exc:  # DistBackendError: the peer is gone, or the group's timeout passed
            raise self._fault(what, f"could not take the weights ({type(exc).__name__})") from None

    # -- the pipe
    def _send(self, what: str, *args) -> int:
        request = next(self._ids)
        self._pipe_send((request, what, args), what)
        return request

    def _pipe_send(self, message, what: str) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            self._conn.send(message)
        except (OSError, EOFError, ValueError):
            raise self._fault(what, "could not take the request") from None

    def _call(self, what: str, *args, limit: Optional[float] = None):
        return self._await(self._send(what, *args), what, limit if limit is not None else self.timeout_s)

    def _read(self) -> None:
        """The reply thread: drains the pipe as replies come (a large reply never blocks the child)."""
        while True:
            try:
                request, ok, value, version = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                with self._cond:
                    self._closed_pipe = True
                    self._cond.notify_all()
                return
            with self._cond:
                self._replies[request] = (ok, value, version)
                self._cond.notify_all()

    def _await(self, request, what: str, limit: float, with_version: bool = False, unless: Optional[int] = None):
        """The reply to `request`: its value (with the child's weight version), or EngineError; the reply to
        `unless` instead when it comes first (a load that failed before acknowledging a bucket)."""
        if self._failure is not None:
            raise self._failure
        deadline = time.monotonic() + limit
        dead_since = None
        late = False
        with self._cond:
            while request not in self._replies and unless not in self._replies:
                now = time.monotonic()
                if self._closed_pipe or (dead_since is not None and now - dead_since > EXIT_GRACE_S):
                    break
                if now >= deadline:
                    late = True
                    break
                if dead_since is None and not self.process.is_alive():
                    dead_since = now
                self._cond.wait(min(POLL_S, max(0.0, deadline - now)))
            reply = self._replies.pop(request, None)
            if reply is None and unless in self._replies:
                reply = self._replies.pop(unless)
                if reply[0]:
                    reply = (False, "it ended the load without taking the last bucket sent", reply[2])
        if reply is None and late:
            bound = f"trainer.timeout_s={limit:g} s" if limit == self.timeout_s else f"{limit:g} s"
            raise self._fault(what, f"did not answer within {bound} (it was killed)", kill=True)
        if reply is None:
            raise self._fault(what)
        ok, value, version = reply
        if not ok:
            raise self._fail(f"{self.name} (process {self.process.pid}) failed in request {what!r}:\n{value}")
        return (value, version) if with_version else value

    def _fault(self, what: str, happened: Optional[str] = None, kill: bool = False) -> EngineError:
        """An EngineError naming the engine, the request and how the child ended (None: it is gone, say how)."""
        process = self.process
        if kill and process.is_alive():
            process.kill()
            process.join(timeout=10)
        if not kill:
            process.join(timeout=EXIT_GRACE_S)
        code = process.exitcode
        if code is None:
            status = "is still running"
        elif code < 0:
            status = f"exited by signal {signal.Signals(-code).name}"
        else:
            status = f"exited with code {code}"
        head = (
            f"{status} during request {what!r}"
            if happened is None
            else f"{happened} during request {what!r}; it {status}"
        )
        return self._fail(
            f"{self.name} (process {process.pid}) {head}. The run stops; resume it with trainer.resume=true"
        )

    def _fail(self, text: str) -> EngineError:
        self._failure = EngineError(text)
        return self._failure


# ----------------------------------------------------------------------------- the engine process


def die_with_parent(parent: int) -> None:
    """End this process when the trainer rank `parent` dies, however it dies (no orphan engines)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def serve(spec: ChildSpec, conn, parent: int) -> None:
    """Entry of the engine process: join the pair group, build the engine, serve requests until close."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to act on, as for the ranks
    for key in _TRAINER_ENV:  # the engine is no member of the trainer's world (vLLM would join it)
        os.environ.pop(key, None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: loads go in through an iterator
    if spec.cuda_visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible
    server = EngineServer(spec, conn)
    code = 0
    try:
        server.start()
        server.run()
    except BaseException:  # noqa: BLE001  (the trainer reads the exit code; the traceback goes to stderr)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (the communication libraries' threads; see recipe.dist)


class EngineServer:
    """The engine process's side: one request at a time, in order; every reply carries `loads`."""

    def __init__(self, spec: ChildSpec, conn):
        self.spec, self.conn = spec, conn
        self.loads = 0
        self.engine: Optional[Engine] = None
        self.device = torch.device("cuda", 0) if spec.cuda_visible is not None else torch.device("cpu")

    def reply(self, request: int, ok: bool, value: Any = None) -> None:
        import cloudpickle

        self.conn.send_bytes(cloudpickle.dumps((request, ok, value, self.loads)))

    def start(self) -> None:
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        store = dist.TCPStore("127.0.0.1", self.spec.port, 2, False, timeout=timeout)
        self.reply(0, True)
        self.group = pair_group(store, 1, self.device, timeout) if self.spec.transport == "group" else None
        try:
            ctx = DistContext(self.spec.rank, self.spec.world_size, 0, self.device)  # seed = trainer.seed + rank
            self.engine = build_engine(
                self.spec.engine, ctx, self.spec.model_dir, load=self.spec.load, digest=self.spec.digest
            )
            if self.spec.hook:
                module, _, function = self.spec.hook.partition(":")
                getattr(importlib.import_module(module), function)(self)
        except Exception:
            self.reply(1, False, traceback.format_exc())
            raise
        self.reply(1, True)

    def run(self) -> None:
        while True:
            try:
                request, what, args = self.conn.recv()
            except EOFError:  # the trainer rank is gone
                break
            try:
                value = self.handle(what, args)
            except Exception:  # noqa: BLE001  (any failure of a request goes back to the trainer, which raises)
                self.reply(request, False, traceback.format_exc())
                continue
            self.reply(request, True, value)
            if what == "close":
                break

    def handle(self, what: str, args: tuple):
        engine = self.engine
        if what in ("load_weights", "load_adapter"):
            stream = Receiver(self.conn, self.group, self.device, ack=lambda key: self.reply(key, True))
            try:
                if what == "load_weights":
                    engine.load_weights(stream)
                else:
                    engine.load_adapter(stream, *args)
            finally:
                stream.drain()  # a load that stopped early still takes the rest of what was sent
            self.loads += 1
            return None
        if what == "weight_digests":
            held = engine.weight_digests()
            return held, engine.load_digest_seconds
        if what == "close":
            engine.close()
            return None
        if what in (
            "generate",
            "prompt_logprobs",
            "adapter_digests",
            "weight_held_form",
            "adapter_held_form",
            "memory_stats",
        ):
            return getattr(engine, what)(*args)
        raise ValueError(f"unknown request {what!r}")
