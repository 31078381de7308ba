"""Rank-0 progress bar: step, reward, accuracy, sync time, rollout tokens/s."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True) if enabled else None

    def update(self, m: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m['reward/accuracy']:.2f}",
                             sync_s=f"{m['sync/total_s']:.3f}", tok_s=f"{m['rollout/tokens_per_s']:.0f}",
                             refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
