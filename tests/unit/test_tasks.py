"""Tasks: seeded prompt sets, reward bounds and ordering, answer parsing, build_task errors.

.venv/bin/python -m pytest tests/unit/test_tasks.py
"""

import random

import pytest
from recipe.config import ConfigError
from recipe.tasks import (
    Arithmetic,
    Prompt,
    Task,
    WordProblems,
    build_task,
    leading_match,
    parse_leading_int,
    parse_last_int,
)
from tests.helpers import typed


@pytest.mark.parametrize("cls", [Arithmetic, WordProblems])
def test_prompts_are_determined_by_seed(cls):
    a, b, other = cls(seed=3), cls(seed=3), cls(seed=4)
    assert a.prompts(50) == b.prompts(50)
    assert a.prompts(50) != other.prompts(50)
    assert a.prompts(10, rng=7) == b.prompts(10, rng=random.Random(7))
    assert a.batch(5, 8) == b.batch(5, 8)
    assert a.batch(5, 8) != a.batch(6, 8)  # successive batches differ
    assert all(p in a.pool for p in a.batch(5, 8))


def test_batch_draws_from_pool_of_num_prompts():
    task = Arithmetic(seed=0, num_prompts=5)
    assert len(task.pool) == 5
    assert len(task.batch(0, 12)) == 12  # more than the pool: drawn with replacement
    assert {p.text for p in task.batch(0, 12)} <= {p.text for p in task.pool}


def test_arithmetic_prompts_and_answers():
    task = Arithmetic(seed=0, max_operand=9, ops="+-*")
    for p in task.prompts(200):
        a, op, b = p.text[0], p.text[1], p.text[2:-1]
        assert p.text.endswith("=")
        assert int(p.answer) == eval(f"{a}{op}{b}")  # digits and one operator: safe to eval
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
    assert {p.text[1] for p in task.prompts(200)} == set("+-*")


def test_arithmetic_reward_bounds_and_ordering():
    task = Arithmetic(seed=0)
    p = Prompt(text="3+4=", answer="7")
    exact, exact_rambling, close, far, garbage = (task.reward(p, c) for c in ["7", "7 abc", "8", "57", "x7"])
    assert exact == pytest.approx(1.0)
    assert exact > exact_rambling > close > far > garbage == 0.0
    assert task.reward(p, "33333333") == 0.0  # longer than any answer: no format/stop credit
    assert task.reward(p, "") == 0.0  # stopping at once earns nothing: no credit for an empty answer
    assert task.reward(p, "8") > task.reward(p, "8" + "z" * 20) > 0  # stopping soon is rewarded
    rng = random.Random(0)
    chars = list("0123456789+-*=?., abcxyz") + ["<unused3>"]
    for _ in range(2000):
        completion = "".join(rng.choice(chars) for _ in range(rng.randint(0, 16)))
        assert 0.0 <= task.reward(p, completion) <= 1.0


def test_arithmetic_digit_credit_rewards_the_first_digit_of_a_two_digit_answer():
    p = Prompt(text="9+5=", answer="14")
    by_value, by_digits, mixed = (
        Arithmetic(seed=0, digit_credit=0.0),
        Arithmetic(seed=0, digit_credit=1.0),
        Arithmetic(seed=0),
    )  # the default: 0.5
    # by value alone, "9" (5 away) beats "1" (13 away): the path to "14" starts downhill
    assert by_value.reward(p, "9") > by_value.reward(p, "1")
    assert by_digits.reward(p, "1") == pytest.approx(0.1 + 0.2 + 0.3 * 0.5)  # half the answer's digits
    assert by_digits.reward(p, "1") > by_digits.reward(p, "9")
    gap = {
        name: t.reward(p, "9") - t.reward(p, "1")
        for name, t in (("value", by_value), ("mixed", mixed), ("digits", by_digits))
    }
    assert gap["value"] > gap["mixed"] > gap["digits"]  # the valley before "14" is shallower, then gone
    assert by_digits.reward(p, "15") == pytest.approx(by_digits.reward(p, "19"))  # one leading digit each
    assert mixed.reward(p, "15") > mixed.reward(p, "19")  # and the value still counts
    assert mixed.reward(p, "14") == by_digits.reward(p, "14") == pytest.approx(1.0)
    assert by_digits.reward(Prompt(text="0+1=", answer="1"), "11") == pytest.approx(0.1 + 0.2 + 0.3 * 0.5)  # "1" of 2
    assert leading_match("-3", "-3") == 1.0 and leading_match("", "7") == 0.0
    with pytest.raises(ConfigError, match="task.params.digit_credit"):
        Arithmetic(seed=0, digit_credit=1.5)


def test_arithmetic_correct():
    task = Arithmetic(seed=0)
    p = Prompt(text="9-3=", answer="6")
    assert task.correct(p, "6") and task.correct(p, "6 and more")
    assert not task.correct(p, "66") and not task.correct(p, "x6") and not task.correct(p, "")
    assert task.correct(Prompt(text="2-5=", answer="-3"), "-3")


def test_word_problems_reward_is_exact_last_integer():
    task = WordProblems(seed=0)
    p = Prompt(text="...", answer="12")
    assert task.reward(p, "He has 3 + 9 = 12 apples.") == 1.0
    assert task.reward(p, "The answer is 1,2") == 0.0  # two numbers, not 12
    assert task.reward(p, "12 ... no wait, 13") == 0.0
    assert task.reward(p, "twelve") == 0.0
    assert task.correct(p, "so 12") and not task.correct(p, "so 11")


def test_parsing():
    assert parse_last_int("3 and then 4,500 pears") == 4500
    assert parse_last_int("it is -3") == -3
    assert parse_last_int("no digits") is None
    assert parse_last_int("ends with 7.") == 7
    assert parse_last_int("1,2") == 2 and parse_last_int("12,345,678!") == 12345678
    assert parse_leading_int("12+3") == (12, 2)
    assert parse_leading_int("-4x") == (-4, 2)
    assert parse_leading_int(" 4") is None and parse_leading_int("") is None


def test_word_problems_answers_are_consistent():
    task = WordProblems(seed=1, max_operand=20)
    prompts = task.prompts(300)
    assert all(int(p.answer) >= 0 for p in prompts)
    assert len({p.question.split(" ")[0] for p in prompts}) > 5  # names vary
    for p in prompts:  # the answer of the two templates we can recompute from the text
        nums = [int(n) for n in __import__("re").findall(r"\d+", p.question)]
        if "buys" in p.question and "more" in p.question:
            assert int(p.answer) == nums[0] + nums[1]
        if "equally among" in p.question:
            assert int(p.answer) * nums[1] == nums[0]
        assert p.text == f"Question: {p.question}\nAnswer:"


def test_word_problems_use_the_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    p = WordProblems(seed=0, tokenizer=Tok()).prompts(1)[0]
    assert p.text.startswith(f"<user>{p.question} ") and p.text.endswith("<assistant>")


def test_build_task_from_config():
    task = build_task(typed(["task.seed=5", "task.num_prompts=7"]).task)
    assert isinstance(task, Arithmetic) and task.seed == 5 and len(task.pool) == 7
    assert isinstance(build_task(typed(["task=gsm"]).task), WordProblems)


def test_build_task_errors_name_the_field():
    with pytest.raises(ConfigError, match="task.target='recipe.tasks.Nope'"):
        build_task(typed(["task.target=recipe.tasks.Nope"]).task)
    with pytest.raises(ConfigError, match="subclass of recipe.tasks.Task"):
        build_task(typed(["task.target=random.Random"]).task)
    with pytest.raises(ConfigError, match=r"task.params has unknown key\(s\) \['max_operandz'\].*max_operand"):
        build_task(typed(["+task.params.max_operandz=3"]).task)
    with pytest.raises(ConfigError, match="task.params.ops"):
        build_task(typed(["+task.params.ops=/"]).task)


class Echo(Task):
    """A user task defined outside recipe/tasks.py: repeat a word."""

    def __init__(self, word: str = "hi", **kwargs):
        super().__init__(**kwargs)
        self.word = word

    def make_prompt(self, rng):
        return Prompt(text=f"say {self.word}{rng.randint(0, 9)}", answer=self.word)

    def reward(self, prompt, completion):
        return float(completion.strip() == prompt.answer)


def test_user_task_by_dotted_path():
    task = build_task(
        typed(["task.target=tests.unit.test_tasks.Echo", "~task.params.max_operand", "+task.params.word=yo"]).task
    )
    assert isinstance(task, Echo) and task.word == "yo"
    p = task.batch(0, 1)[0]
    assert p.text.startswith("say yo") and task.correct(p, "yo") and not task.correct(p, "no")


def test_a_random_policy_already_gets_a_gradient():
    """GRPO learns only from groups whose rewards differ. Sample like the untrained tiny model
    (uniform over its 64 tokens, stopping at <eos>): most groups of 8 must have a spread."""
    from tools.make_tiny_model import CHARS, SPECIALS, VOCAB_SIZE

    tokens = SPECIALS + CHARS + [f"<unused{i}>" for i in range(VOCAB_SIZE - len(SPECIALS) - len(CHARS))]
    task, rng = Arithmetic(seed=0), random.Random(0)

    def sample():
        out = []
        for _ in range(16):  # rollout.max_new_tokens
            tok = rng.choice(tokens)
            if tok == "<eos>":
                break
            out.append("" if tok == "<pad>" else tok)
        return "".join(out)

    groups = [[task.reward(p, sample()) for _ in range(8)] for p in task.prompts(400)]
    spread = sum(max(g) > min(g) for g in groups) / len(groups)
    assert spread > 0.6  # expected 1 - (54/64)^8 = 0.74: a group with a leading digit vs ones without
