"""Tasks: prompts with their ground truth, and a programmatic reward.

A task is a class named by `task.target` (a dotted path) and built with `task.params` as
keyword arguments, so a new task needs no change here:

    python -m recipe.train task.target=mypkg.tasks.Palindromes +task.params.max_len=8

Its prompt pool (`task.num_prompts` prompts) is generated from `task.seed`, and batch `i`
is drawn from that pool with a seed derived from (`task.seed`, i): two runs with the same
config see the same prompts in the same order. The held-out prompts of the evaluation
(`trainer.eval_prompts`, `Task.heldout`) come from a separate RNG stream and never include a
prompt of the pool.

Built in:
- `Arithmetic` (conf/task/arith.yaml): "3+4=" for the tiny char-level model, with a shaped
  reward that a random policy already gets a gradient from (see the class docstring).
- `WordProblems` (conf/task/gsm.yaml): GSM8K-style word problems for SmolLM2, reward 1 for
  the exact answer (the last integer in the completion), else 0.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from recipe.config import ConfigError
from recipe.settings import Task as TaskSettings

# Held-out prompts: draws per prompt asked for before the task's prompt space counts as exhausted.
HELDOUT_TRIES = 50
# Thousands separators only in groups of three ("1,200"); "1,2" is two numbers.
_INT = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")


@dataclass(frozen=True)
class Prompt:
    text: str  # what the model is given (chat template applied where the task uses one)
    answer: str  # the ground truth
    question: str = ""  # the bare question, for logs


def parse_last_int(text: str) -> Optional[int]:
    """The last integer in `text` ("1,200" counts as 1200), or None."""
    found = [m.group().replace(",", "") for m in _INT.finditer(text)]
    return int(found[-1]) if found else None


def parse_leading_int(text: str) -> Optional[tuple]:
    """(value, characters consumed) for an integer at the very start of `text`, or None."""
    m = re.match(r"-?\d+", text)
    return (int(m.group()), m.end()) if m else None


def leading_match(text: str, answer: str) -> float:
    """Characters `text` and `answer` share from the start, over the longer one's length: "1" or
    "15" for "14" gives 0.5, "14" gives 1, "9" gives 0."""
    same = 0
    for a, b in zip(text, answer):
        if a != b:
            break
        same += 1
    return same / max(len(text), len(answer), 1)


class Task:
    """Base class. Subclasses implement `make_prompt(rng)` and `reward(prompt, completion)`.

    `reward` is in [0, 1]; `correct` (for the accuracy metric) defaults to reward == 1.
    """

    def __init__(self, seed: int = 0, num_prompts: int = 512, tokenizer: Any = None):
        self.seed, self.num_prompts, self.tokenizer = seed, num_prompts, tokenizer
        self._pool: Optional[List[Prompt]] = None

    def make_prompt(self, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def reward(self, prompt: Prompt, completion: str) -> float:
        raise NotImplementedError

    def correct(self, prompt: Prompt, completion: str) -> bool:
        return self.reward(prompt, completion) >= 1.0

    def prompts(self, num: int, rng: Union[random.Random, int, None] = None) -> List[Prompt]:
        """`num` fresh prompts from `rng` (a Random, or a seed; default `self.seed`)."""
        if not isinstance(rng, random.Random):
            rng = random.Random(self.seed if rng is None else rng)
        return [self.make_prompt(rng) for _ in range(num)]

    @property
    def pool(self) -> List[Prompt]:
        """The task's fixed prompt set: `num_prompts` prompts generated from `seed`."""
        if self._pool is None:
            self._pool = self.prompts(self.num_prompts, self.seed)
        return self._pool

    def heldout(self, num: int) -> List[Prompt]:
        """`num` distinct prompts that are not in the training pool, for evaluation: drawn from
        their own RNG stream (seed "<seed>/heldout"), any prompt whose text is in the pool skipped.
        Raises ConfigError when the task's prompt space cannot supply them."""
        rng = random.Random(f"{self.seed}/heldout")
        seen = {p.text for p in self.pool}
        out: List[Prompt] = []
        for _ in range(HELDOUT_TRIES * num):
            if len(out) == num:
                break
            prompt = self.make_prompt(rng)
            if prompt.text not in seen:
                seen.add(prompt.text)
                out.append(prompt)
        if len(out) < num:
            raise ConfigError(
                f"trainer.eval_prompts={num}: only {len(out)} prompts of {type(self).__name__} are "
                f"outside the training pool (task.num_prompts={self.num_prompts}); lower "
                "trainer.eval_prompts or task.num_prompts, or widen the task (e.g. task.params)"
            )
        return out

    def batch(self, index: int, num: int) -> List[Prompt]:
        """Batch number `index` (e.g. step * world_size + rank): `num` prompts from the pool."""
        rng = random.Random(f"{self.seed}/{index}")  # str seeds hash deterministically
        pool = self.pool
        if num <= len(pool):
            return rng.sample(pool, num)
        return [rng.choice(pool) for _ in range(num)]


class Arithmetic(Task):
    """ "a+b=" with small operands, answered by the number and then end of sequence.

    Reward shape (sums to 1.0 for the exact answer followed by nothing; always in [0, 1]).
    Each term gives a random policy a gradient towards the next:
    - 0.1 format: the completion starts with an integer (a random 64-token policy does
      this ~1 time in 6, so GRPO groups of 8 usually contain one);
    - 0.2 stop: given a leading integer, 0.2 * (1 - extra / stop_window), where `extra` is
      the number of characters after it (end of sequence right after the number: 0.2);
    - 0.3 close: given a leading integer, 0.3 * ((1 - digit_credit) * by_value + digit_credit *
      by_digits), by_value = max(0, 1 - |value - answer| / close_window), by_digits = the
      leading characters it shares with the answer over the longer one's length ("1" or "15"
      for 14: 0.5);
    - 0.4 exact: the leading integer equals the answer.
    A completion that does not start with an integer gets 0: an empty completion (end of
    sequence at once) must not earn the stop credit, or the policy would learn to stop.

    `digit_credit` (default 0.5; 0 is by value alone, as before it existed): by value alone, "9" earns
    more than "1" for every answer in 10..18, so the one-digit answer a policy learns first is a
    local optimum and it never starts a two-digit one (a run stalls at ~45% exact with every
    sum above 9 answered "9"; docs/LEARNING.md).
    """

    def __init__(
        self,
        max_operand: int = 9,
        ops: str = "+",
        stop_window: int = 12,
        close_window: int = 10,
        digit_credit: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if max_operand < 1:
            raise ConfigError(f"task.params.max_operand must be >= 1, got {max_operand}")
        if not ops or set(ops) - set("+-*"):
            raise ConfigError(f"task.params.ops={ops!r} is not valid; use a string of: + - *")
        self.max_operand, self.ops = max_operand, ops
        if not 0.0 <= digit_credit <= 1.0:
            raise ConfigError(f"task.params.digit_credit must be in [0, 1], got {digit_credit}")
        self.stop_window, self.close_window, self.digit_credit = stop_window, close_window, digit_credit
        largest = max({"+": 2 * max_operand, "-": max_operand, "*": max_operand**2}[op] for op in ops)
        self.max_chars = len(str(largest)) + ("-" in ops)  # digits of the longest answer, plus a sign

    def make_prompt(self, rng: random.Random) -> Prompt:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(self.ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"{a}{op}{b}="
        return Prompt(text=question, answer=str(answer), question=question)

    def reward(self, prompt: Prompt, completion: str) -> float:
        lead = parse_leading_int(completion)
        if lead is None:
            return 0.0
        value, used = lead
        if used > self.max_chars:
            return 0.0
        answer = int(prompt.answer)
        extra = len(completion) - used
        stop = max(0.0, 1.0 - extra / self.stop_window)
        close = max(0.0, 1.0 - abs(value - answer) / self.close_window)
        if self.digit_credit:
            close += self.digit_credit * (leading_match(completion[:used], prompt.answer) - close)
        return 0.1 + 0.2 * stop + 0.3 * close + 0.4 * float(value == answer)

    def correct(self, prompt: Prompt, completion: str) -> bool:
        lead = parse_leading_int(completion)
        return lead is not None and lead[0] == int(prompt.answer)


# (template, answer) pairs; {n}: a name, {x}/{y}: operands, {item}: a plural noun.
_WORD_TEMPLATES = [
    ("{n} has {x} {item} and buys {y} more. How many {item} does {n} have now?", lambda x, y: x + y),
    ("{n} had {x} {item} and gave {y} of them to a friend. How many {item} does {n} have left?", lambda x, y: x - y),
    ("{n} has {x} boxes with {y} {item} in each box. How many {item} does {n} have in total?", lambda x, y: x * y),
    (
        "{n} picked {x} {item} on Monday and twice as many on Tuesday, then ate {y}. How many {item} are left?",
        lambda x, y: 3 * x - y,
    ),
    (
        "{n} shares {x} {item} equally among {y} friends and keeps none. How many {item} does each friend get?",
        None,
    ),  # built as a division with a whole answer, below
    (
        "A shop sells {item} for {x} dollars each. {n} buys {y} of them. How many dollars does {n} pay?",
        lambda x, y: x * y,
    ),
]
_NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Fatima", "Olga", "Kwame", "Sofia", "Diego", "Yuki", "Ben"]
_ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "shells", "cards"]


class WordProblems(Task):
    """GSM8K-style one- or two-step word problems; reward 1.0 iff the last integer in the
    completion equals the answer, else 0.0. Templates, names and items come from the
    seeded RNG; every answer is a non-negative integer.

    With a tokenizer that has a chat template (SmolLM2-Instruct), the prompt is the
    question as a user turn plus the assistant header; otherwise "Question: ...\\nAnswer:".
    """

    # SmolLM2-135M-Instruct, greedy, 96 new tokens, the first 96 held-out prompts of seed 0: this
    # wording got 17 right, "Answer with only the final number." 11, and with 64 new tokens on 16
    # prompts "Solve the problem and end with the final answer as a number." got 0 (it reasons
    # at length and is cut off before the answer).
    INSTRUCTION = "Reply with just the number."

    def __init__(self, max_operand: int = 20, **kwargs):
        super().__init__(**kwargs)
        if max_operand < 2:
            raise ConfigError(f"task.params.max_operand must be >= 2, got {max_operand}")
        self.max_operand = max_operand

    def make_question(self, rng: random.Random) -> tuple:
        template, fn = rng.choice(_WORD_TEMPLATES)
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        x, y = rng.randint(2, self.max_operand), rng.randint(2, self.max_operand)
        if fn is None:  # division: pick the quotient, so the answer is whole
            y, answer = rng.randint(2, 9), x
            x = answer * y
        else:
            if fn(x, y) < 0:  # keep answers non-negative: no one gives away more than they have
                x, y = y, x
            answer = fn(x, y)
        return template.format(n=name, x=x, y=y, item=item), answer

    def make_prompt(self, rng: random.Random) -> Prompt:
        question, answer = self.make_question(rng)
        return Prompt(text=self.render(question), answer=str(answer), question=question)

    def render(self, question: str) -> str:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": f"{question} {self.INSTRUCTION}"}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"Question: {question}\nAnswer:"

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(parse_last_int(completion) == int(prompt.answer))


def _import(target: str):
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.target={target!r} cannot be imported: {exc}") from None
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ConfigError(
            f"task.target={target!r} must name a subclass of recipe.tasks.Task, e.g. "
            "recipe.tasks.Arithmetic or recipe.tasks.WordProblems"
        )
    return cls


def _accepted_params(cls) -> List[str]:
    """Keyword arguments the task's __init__ chain accepts (its own plus its bases')."""
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, Task):
            names += [
                n
                for n, p in inspect.signature(klass.__init__).parameters.items()
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            ]
    return names


def build_task(settings: TaskSettings, tokenizer: Any = None) -> Task:
    """Instantiate `task.target` with `task.params` (+ seed, num_prompts, tokenizer): the `task` slice."""
    cls = _import(settings.target)
    params = dict(settings.params)
    accepted = _accepted_params(cls)
    unknown = sorted(k for k in params if k not in accepted or k in ("seed", "num_prompts", "tokenizer"))
    if unknown:
        known = [n for n in accepted if n not in ("seed", "num_prompts", "tokenizer")]
        raise ConfigError(
            f"task.params has unknown key(s) {unknown} for {settings.target}; "
            f"accepted: {', '.join(known) or '(none)'} (seed and num_prompts are task.seed, "
            "task.num_prompts)"
        )
    return cls(seed=settings.seed, num_prompts=settings.num_prompts, tokenizer=tokenizer, **params)
