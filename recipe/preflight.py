"""Checks at start that need the filesystem, the tokenizer or the network.

`validate(cfg)` (recipe/config.py) checks values on their own; these run after it, in the
launching process, before any rank starts or any model is built (recipe/train.py):
- `preflight(cfg)`, before the model directory is even made: the run directory is writable, and
  a fresh run does not write over an earlier run there; a resumed run keeps every field that
  changes the math (the run directory's config.yaml); `logger.mode=online` can reach the wandb
  server, else the run falls back to offline;
- `check_context_length(cfg, model_dir)`, once the model directory exists: the longest prompt of
  the task (training pool and, with `trainer.eval_every`, the held-out prompts, which the task must
  be able to supply) plus `rollout.max_new_tokens` fits `rollout.max_model_len`, and that fits the
  model's `max_position_embeddings`.
Each failure is a ConfigError that names the field.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Dict, List
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from recipe.config import ConfigError

# Fields a resumed run may change: they do not change what is computed.
RESUMABLE = ("trainer.steps", "trainer.resume", "trainer.checkpoint_every", "trainer.keep_checkpoints",
             "trainer.timeout_s", "logger.", "run_dir", "cache_dir", "sync.verify", "sync.tolerance",
             "sync.num_probe_prompts", "sync.bucket_mb", "rollout.kv_cache_gb", "rollout.gpu_memory_utilization",
             "rollout.sleep", "trainer.eval_every", "trainer.eval_prompts", "trainer.profile_steps",
             "trainer.profile_trace")
# What makes a directory hold a run: a fresh run there would mix with or overwrite it.
RUN_FILES = ("checkpoints", "metrics.jsonl")
WANDB_TIMEOUT_S = 10.0


def preflight(cfg: DictConfig) -> None:
    check_run_dir(cfg)
    check_resume_config(cfg)
    check_wandb(cfg)


def check_run_dir(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"run directory {str(run_dir)!r} is not writable ({exc.strerror or exc}); "
                          "choose another with hydra.run.dir=<dir>") from None
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    # Under torchrun rank 0 may have started writing by the time a peer gets here: rank 0 decides.
    if found and not cfg.trainer.resume and int(os.environ.get("RANK", "0")) == 0:
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run ({', '.join(found)}); continue it "
                          "with trainer.resume=true, or start a new run in another hydra.run.dir")


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
    return sorted(k for k in old.keys() & new.keys()
                  if old[k] != new[k] and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE))


def check_resume_config(cfg: DictConfig) -> None:
    if not cfg.trainer.resume:
        return
    saved_path = Path(cfg.run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"trainer.resume=true but {saved_path} does not exist: resume with "
                          "hydra.run.dir=<the directory of the run to continue>")
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = changed_fields(saved, current)
    if changed:
        diffs = "; ".join(f"{k}: {_flat(saved)[k]!r} -> {_flat(current)[k]!r}" for k in changed)
        raise ConfigError(f"trainer.resume=true with a config that changes the run's math ({diffs}); resume "
                          f"with the saved values (see {saved_path}) or start a new run in another directory")


def check_context_length(cfg: DictConfig, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from recipe.tasks import build_task

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    task = build_task(cfg, tokenizer)
    held_out = task.heldout(cfg.trainer.eval_prompts) if cfg.trainer.eval_every else []  # too few: ConfigError
    longest = max(len(tokenizer(p.text, add_special_tokens=False).input_ids) for p in task.pool + held_out)
    need = longest + cfg.rollout.max_new_tokens
    if cfg.rollout.max_model_len < need:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} is shorter than the longest prompt of "
                          f"task {cfg.task.name!r} ({longest} tokens) plus rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens}; set rollout.max_model_len >= {need}")
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit and cfg.rollout.max_model_len > limit:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} is longer than the model's "
                          f"max_position_embeddings={limit} ({model_dir}/config.json); set rollout.max_model_len "
                          f"between {need} and {limit}")


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


def check_wandb(cfg: DictConfig) -> None:
    """Online wandb without a reachable server: fall back to offline (files in the run directory)."""
    if cfg.logger.backend != "wandb" or cfg.logger.mode != "online":
        return
    if not wandb_reachable():
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        print(f"warning: logger.mode=online but the wandb server {url} cannot be reached; logging offline "
              f"instead (the files go under {cfg.run_dir}/wandb; send them later with `wandb sync`)", flush=True)
        cfg.logger.mode = "offline"
