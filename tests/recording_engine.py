"""A test double around a real engine: it counts the weight loads (the version the engine holds) and
records, in order, every load and every generation with the version it was generated with.

    engine = RecordingEngine(trainer.engine, in_order=True)
    trainer.engine = trainer.sync.engine = engine

`in_order=True` models an engine that generates elsewhere: `submit` returns at once and the batch is
generated later (when its result is asked for, or before the next load or generation, whichever
comes first), so a load issued after a submit applies after that submit's generation, as
`Engine.submit` asks of such an engine.
"""

from __future__ import annotations

from typing import Callable, List, Tuple


class _Handle:
    def __init__(self, engine: "RecordingEngine", run: Callable):
        self.engine, self.run, self.samples = engine, run, None

    def result(self):
        self.engine.flush()
        return self.samples


class RecordingEngine:
    def __init__(self, inner, in_order: bool = False):
        self.inner, self.in_order = inner, in_order
        self.version = 0  # loads so far
        self.events: List[Tuple] = []  # ("load", version) / ("generate", seed, n, temperature, version)
        self.queue: List[_Handle] = []

    def __getattr__(self, name):  # everything else is the real engine's
        return getattr(self.inner, name)

    def flush(self) -> None:
        """Generate what was submitted, in submit order."""
        while self.queue:
            handle = self.queue.pop(0)
            handle.samples = handle.run()

    def generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        self.flush()
        return self._generate(prompt_token_ids, n, max_new_tokens, temperature, top_p, seed)

    def _generate(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        self.events.append(("generate", seed, n, temperature, self.version))
        return self.inner.generate(
            prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )

    def submit(self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed):
        handle = _Handle(self, lambda: self._generate(prompt_token_ids, n, max_new_tokens, temperature, top_p, seed))
        self.queue.append(handle)
        if not self.in_order:
            self.flush()
        return handle

    def load_weights(self, weights):
        self.flush()
        self.version += 1
        self.events.append(("load", self.version))
        return self.inner.load_weights(weights)
