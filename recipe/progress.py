"""Rank-0 progress bar (step, reward, accuracy, step time, sync time, rollout tokens/s, held-out exact
rate when evaluated) and a quiet console.

Unless `logger.verbose=true`, the console shows the bar and errors only: the library warnings
every rank prints at start-up (FSDP's deprecations and frozen-parameter notes, vLLM's start-up
log, the NUMA-binding note vLLM's CPU worker has torch's C++ logger print, wandb's banner, the
resource tracker's warning at exit about a semaphore vLLM leaves) are left out. Everything still goes to metrics.jsonl and wandb. torch's C++ logger reads its level
once, when torch is imported, so `console_env` runs in the launcher before the ranks start (under
torchrun, set TORCH_CPP_LOG_LEVEL=ERROR yourself).
"""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True) if enabled else None
        self.held_out = {}  # the last held-out exact rate (trainer.eval_every), shown until the next one

    def update(self, m: dict) -> None:
        if "eval/exact" in m:
            self.held_out = {"eval": f"{m['eval/exact']:.2f}"}
        if self.bar is None or "reward/mean" not in m:  # the step-0 record holds only the evaluation
            return
        self.bar.set_postfix(
            reward=f"{m['reward/mean']:.3f}",
            acc=f"{m['reward/accuracy']:.2f}",
            step_s=f"{m['time/step_s']:.2f}",
            sync_s=f"{m['sync/total_s']:.3f}",
            tok_s=f"{m['rollout/tokens_per_s']:.0f}",
            **self.held_out,
            refresh=False,
        )
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line above the bar (rank 0)."""
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Start-up warnings of the libraries that say nothing a user of this recipe can act on.
QUIET_WARNINGS = (
    r".*all_gather_into_tensor.* is deprecated",
    r".*_get_pg_default_device.*",
    r"Multiple backends are registered with this ProcessGroup.*",
    r"(?s).*The following parameters have requires_grad=True.*",
    r".*torch.distributed.reduce_op.* is deprecated.*",
)


def console_env(verbose: bool) -> None:
    """The environment variables that quiet the libraries (values the user set win); processes
    started after this call inherit them."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    if not verbose:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # C++ warnings (TORCH_WARN); errors still show
        os.environ.setdefault("WANDB_SILENT", "true")
        # The launcher's resource tracker (a process of its own) warns at exit about a semaphore vLLM leaves.
        quiet_tracker = "ignore::UserWarning:multiprocessing.resource_tracker"
        if quiet_tracker not in os.environ.get("PYTHONWARNINGS", ""):
            os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet_tracker) if w)


def configure_console(verbose: bool) -> None:
    """Called on every rank before anything is built; see the module docstring."""
    import os
    import warnings

    import logging

    console_env(verbose)
    if verbose:
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Some of vLLM's modules log before its logger is configured; the level set here covers them too.
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-rank "Loading weights" bars
