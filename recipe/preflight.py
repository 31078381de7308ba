"""Checks at start that need the filesystem, the tokenizer or the network, and the run directory's owner.

`RunDir(path)` is the run directory's exclusive lock (`fcntl.flock` on `<run dir>/.lock`, held for the
whole run and released by the kernel on any exit, a kill included): a second run started into the same
directory is refused while the first holds it. A fresh run into a directory that holds a run is refused
before anything is written there; the run *owns* the directory (writes status.json, `.hydra/`,
config.yaml) only once it holds the lock and the directory held no run, or, for `trainer.resume=true`,
once the start checks passed. A refused or failed start that does not own the directory writes nothing
into it.

`validate(cfg)` (recipe/config.py) checks values on their own; these run after it, in the
launching process, before any rank starts or any model is built (recipe/train.py):
- `preflight(cfg)`, before the model directory is even made: the run directory is writable, and
  a fresh run does not write over an earlier run there; a resumed run keeps every field that
  changes the math (the run directory's config.yaml, which must be intact), does not ask for fewer
  steps than it has done, and has a metrics.jsonl that holds each step done once; wandb's project
  name is one wandb accepts, and `logger.mode=online` can reach the server with an API key, else the
  run falls back to offline; the engine runs in the rank's process (VLLM_ENABLE_V1_MULTIPROCESSING=0);
- `check_context_length(task, trainer, rollout, model_dir)`, once the model directory exists: the longest prompt of
  the task (training pool and, with `trainer.eval_every`, the held-out prompts, which the task must
  be able to supply) plus `rollout.max_new_tokens` fits `rollout.max_model_len`, and that fits the
  model's `max_position_embeddings`.
Each failure is a ConfigError that names the field.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from recipe.config import ConfigError
from recipe.files import write_atomic
from recipe.metrics import check_history
from recipe.settings import Rollout, Trainer
from recipe.settings import Task as TaskSettings

# Fields a resumed run may change: they do not change what is computed.
RESUMABLE = (
    "trainer.steps",
    "trainer.resume",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.timeout_s",
    "logger.",
    "run_dir",
    "cache_dir",
    "sync.probe_every",
    "sync.probe_tolerance",
    "sync.num_probe_prompts",
    "sync.bucket_mb",
    "rollout.kv_cache_gb",
    "rollout.gpu_memory_utilization",
    "rollout.sleep",
    "trainer.eval_every",
    "trainer.eval_prompts",
    "trainer.profile_steps",
    "trainer.profile_trace",
    "trainer.export",
    "rollout.placement",
    "rollout.transport",
    "rollout.num_engines",
    "rollout.devices",
)
# What makes a directory hold a run: a fresh run there would mix with or overwrite it.
RUN_FILES = ("checkpoints", "metrics.jsonl")
WANDB_TIMEOUT_S = 10.0
LOCK = ".lock"
# The last line of every config.yaml the recipe writes: a file without it was cut short.
CONFIG_END = "# end of config.yaml\n"
CHECKPOINT_DIR = re.compile(r"^step_(\d+)(\.old)?$")  # complete checkpoints, as recipe/checkpoint.py names them
ENGINE_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


def preflight(cfg: DictConfig) -> None:
    """The checks that need I/O, on the composed config (it is what config.yaml records and a resume
    compares); each check is given only the fields it reads."""
    check_run_dir(cfg.run_dir, bool(cfg.trainer.resume))
    check_resume_config(cfg)
    check_wandb(cfg.logger, cfg.run_dir)
    engine_in_process(cfg.rollout)


def engine_in_process(rollout) -> None:
    """vLLM runs in the rank's own process (the weight sync hands it tensors, the digest reads its
    parameters): VLLM_ENABLE_V1_MULTIPROCESSING is set to 0 before the ranks start, which inherit it,
    with a message when the environment said otherwise (its engine core would run in another process).
    `rollout`: the rollout group (its backend)."""
    if rollout.backend != "vllm":
        return
    value = os.environ.get(ENGINE_IN_PROCESS)
    if value not in (None, "0") and _is_rank_zero():
        print(
            f"note: {ENGINE_IN_PROCESS}={value} in the environment is overridden with 0: the recipe's weight sync "
            "and digest need the engine in the rank's own process",
            flush=True,
        )
    os.environ[ENGINE_IN_PROCESS] = "0"


def _is_rank_zero() -> bool:
    # Under torchrun every rank runs the start; rank 0 decides about the run directory.
    return int(os.environ.get("RANK", "0")) == 0


def held_run(run_dir: Path) -> List[str]:
    """What in `run_dir` makes it hold a run (a fresh run there would mix with or overwrite it)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _holds_a_run(run_dir: Path, found: List[str]) -> ConfigError:
    if "checkpoints" not in found:
        how = (
            "it has no checkpoint yet: restart it in place from step 0 with trainer.resume=true (same "
            "config), or start a new run in another hydra.run.dir"
        )
    else:
        how = "continue it with trainer.resume=true, or start a new run in another hydra.run.dir"
    return ConfigError(f"run directory {str(run_dir)!r} already holds a run ({', '.join(found)}); {how}")


class RunDirBusy(ConfigError):
    """Another process holds the run directory's lock; `holder` says which (pid, host, since when)."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


class RunDir:
    """The run directory and its owner: see the module docstring. `files` ({relative path: text}) are
    written into the directory when the run comes to own it (Hydra's record of the run, `.hydra/*`)."""

    def __init__(self, path, files: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.files = dict(files or {})
        self.fd: Optional[int] = None
        self.owned = False

    def claim(self, resume: bool) -> None:
        """Take the lock (idempotent). A fresh run into a directory holding a run is refused first, writing nothing."""
        if self.fd is not None or not _is_rank_zero():
            return
        if not resume and held_run(self.path):
            raise _holds_a_run(self.path, held_run(self.path))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"run directory {str(self.path)!r} is not writable ({exc.strerror or exc}); "
                "choose another with hydra.run.dir=<dir>"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(
                f"run directory {str(self.path)!r} is in use by another run ({holder}); wait for it "
                "to end, or start this one in another hydra.run.dir",
                holder,
            ) from None
        self.fd = fd
        if not resume and held_run(self.path):  # another start won the race and began writing before our lock
            self.release()
            raise _holds_a_run(self.path, held_run(self.path))
        try:  # who holds it, for the message another start gets (the lock itself needs no space)
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
                0,
            )
        except OSError:
            pass
        if not resume:
            self.adopt()

    def adopt(self) -> None:
        """The run owns the directory from here on: its status, config and records may be written."""
        if self.owned or self.fd is None:
            return
        self.owned = True
        for rel, text in self.files.items():
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / rel, text)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def check_run_dir(run_dir, resume: bool) -> None:
    """The run directory can be made and written; a fresh run (not `resume`) into a directory that holds
    a run is refused. Nothing is written into it (RunDir.claim checks again, under the lock)."""
    run_dir = Path(run_dir)
    found = held_run(run_dir)
    if found and not resume and _is_rank_zero():
        raise _holds_a_run(run_dir, found)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(
            f"run directory {str(run_dir)!r} is not writable ({exc.strerror or exc}); "
            "choose another with hydra.run.dir=<dir>"
        ) from None


def _flat(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def changed_fields(saved: dict, current: dict) -> List[str]:
    """Fields present in both configs whose values differ, except the ones a resume may change."""
    old, new = _flat(saved), _flat(current)
    return sorted(
        k
        for k in old.keys() & new.keys()
        if old[k] != new[k] and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE)
    )


def save_run_config(cfg: DictConfig, path: Path) -> None:
    """config.yaml, written whole (recipe/files.py) and ending with CONFIG_END, so a resume can tell a cut file."""
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True) + CONFIG_END)


def load_run_config(path: Path) -> dict:
    """The saved config.yaml, refused (naming the file, in one line) when damaged: a cut file would let a
    resume change the math unseen (the fields it lost are not compared)."""
    text = path.read_text(errors="replace")
    if not text.endswith(CONFIG_END):
        raise ConfigError(
            f"{path} is damaged: it does not end with the line {CONFIG_END.strip()!r} (cut short, or "
            "written by an older version of the recipe), so what the run computed cannot be checked; "
            "restore the file, or start a new run in another hydra.run.dir"
        )
    try:
        saved = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception as exc:  # noqa: BLE001  (yaml and OmegaConf errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path} cannot be parsed ({first}); restore the file, or start a new run in another hydra.run.dir"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is damaged: it does not hold a config")
    return saved


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the run's newest complete checkpoint (None: none yet), from the folder names alone."""
    root = Path(run_dir) / "checkpoints"
    steps = [
        int(m.group(1))
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir()
    ]
    return max(steps) if steps else None


def check_resume_config(cfg: DictConfig) -> None:
    """A resume continues the run in its directory: the same math (config.yaml intact), a steps target not
    below what was done, and a metrics.jsonl that holds every step done once. Without a checkpoint yet
    (stopped early) it restarts the run from step 0 in place."""
    if not cfg.trainer.resume:
        return
    run_dir = Path(cfg.run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(
            f"trainer.resume=true but {saved_path} does not exist: resume with "
            "hydra.run.dir=<the directory of the run to continue>"
        )
    saved = load_run_config(saved_path)
    current = OmegaConf.to_container(cfg, resolve=True)
    lost = sorted(set(_flat(current)) - set(_flat(saved)))
    if lost:
        raise ConfigError(
            f"{saved_path} is damaged or from another version of the recipe: it lacks "
            f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; restore it, or start a new run "
            "in another hydra.run.dir"
        )
    changed = changed_fields(saved, current)
    if changed:
        diffs = "; ".join(f"{k}: {_flat(saved)[k]!r} -> {_flat(current)[k]!r}" for k in changed)
        world = ""
        if "trainer.world_size" in changed:
            old = _flat(saved)["trainer.world_size"]
            world = (
                f"; the checkpoint holds {old} ranks' shards, RNG and prompt shares and is not re-sharded: resume "
                f"with {old} ranks (trainer.world_size={old}, or torchrun --nproc-per-node={old})"
            )
        raise ConfigError(
            f"trainer.resume=true with a config that changes the run's math ({diffs}); resume "
            f"with the saved values (see {saved_path}) or start a new run in another directory{world}"
        )
    _check_progress(int(cfg.trainer.steps), run_dir)


def _check_progress(steps: int, run_dir: Path) -> None:
    """`trainer.steps` (`steps`) not below the run's newest checkpoint; metrics.jsonl holds each step done once."""
    done = checkpoint_step(run_dir)
    if done is not None and steps < done:
        newest = run_dir / "checkpoints" / f"step_{done}"
        raise ConfigError(
            f"trainer.steps={steps} is lower than the steps the run has done ({done}, its "
            f"newest checkpoint {newest}); give trainer.steps >= {done}"
        )
    try:
        notes = check_history(run_dir / "metrics.jsonl", done or 0)
    except ValueError as exc:
        raise ConfigError(
            f"{exc}; the run's record would not hold each step once. Restore the file, or start a new "
            "run in another hydra.run.dir"
        ) from None
    if done is None:
        notes.append("the run has no checkpoint yet: it restarts from step 0 in place")
    if _is_rank_zero():
        for note in notes:
            print(f"resume: {note}", flush=True)


def check_context_length(task: TaskSettings, trainer: Trainer, rollout: Rollout, model_dir: Path) -> None:
    """The longest prompt (training pool and held-out set) plus the completion fits the engine and the model."""
    from transformers import AutoTokenizer

    from recipe.tasks import build_task

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    settings, task = task, build_task(task, tokenizer)
    held_out = task.heldout(trainer.eval_prompts) if trainer.eval_every else []  # too few: ConfigError
    longest = max(len(tokenizer(p.text, add_special_tokens=False).input_ids) for p in task.pool + held_out)
    need = longest + rollout.max_new_tokens
    if rollout.max_model_len < need:
        raise ConfigError(
            f"rollout.max_model_len={rollout.max_model_len} is shorter than the longest prompt of "
            f"task {settings.name!r} ({longest} tokens) plus rollout.max_new_tokens="
            f"{rollout.max_new_tokens}; set rollout.max_model_len >= {need}"
        )
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit and rollout.max_model_len > limit:
        raise ConfigError(
            f"rollout.max_model_len={rollout.max_model_len} is longer than the model's "
            f"max_position_embeddings={limit} ({model_dir}/config.json); set rollout.max_model_len "
            f"between {need} and {limit}"
        )


def wandb_reachable(timeout_s: float = WANDB_TIMEOUT_S) -> bool:
    """Can a TCP connection reach WANDB_BASE_URL (default https://api.wandb.ai) within `timeout_s`?
    Name lookup has no timeout of its own, so the attempt runs in a thread that is not waited for."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    address = (url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443))
    result: List[bool] = []

    def attempt():
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


# wandb's rule for project names (wandb_settings.validate_project), checked before the ranks start.
WANDB_PROJECT_CHARS = "/\\#?%:"


def wandb_api_key_found(host: str) -> bool:
    """An API key for `host` where wandb looks: WANDB_API_KEY, or a .netrc entry (`wandb login` writes one)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def check_wandb(logger, run_dir) -> None:
    """wandb's settings (the logger group `logger`), before any rank starts: a project name wandb refuses is
    a ConfigError; online without a reachable server or without an API key falls back to offline (files in
    the run directory; `logger.mode` is set to "offline" in the group given)."""
    if logger.backend != "wandb" or logger.mode == "disabled":
        return
    project = str(logger.project)
    bad = sorted({c for c in project if c in WANDB_PROJECT_CHARS})
    if bad or not project or len(project) > 128:
        raise ConfigError(
            f"logger.project={project!r} is not a name wandb accepts: 1 to 128 characters, none of "
            f"{' '.join(WANDB_PROJECT_CHARS)}" + (f" (found {' '.join(bad)})" if bad else "")
        )
    if logger.mode != "online":
        return
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not wandb_reachable():
        why = f"the wandb server {url} cannot be reached"
    elif not wandb_api_key_found(urlparse(url).hostname or "api.wandb.ai"):
        why = f"no API key for {url} (set WANDB_API_KEY, or run `wandb login`)"
    else:
        return
    print(
        f"warning: logger.mode=online but {why}; logging offline instead (the files go under "
        f"{run_dir}/wandb; send them later with `wandb sync`)",
        flush=True,
    )
    logger.mode = "offline"
