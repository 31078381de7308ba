"""The held-out evaluation: its prompts are outside the training pool, its config errors name the
field, the ranks' shares cover the set once, and the summary reports it.

    .venv/bin/python -m pytest tests/unit/test_eval.py
"""

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from recipe.config import ConfigError, validate
from recipe.grpo import held_out_share, summarize
from recipe.tasks import Arithmetic, WordProblems
from tests.helpers import compose

CPU = "trainer.device=cpu"
# A prompt space small enough (50 questions) that a pool of 20 and 10 fresh draws overlap unless the
# held-out draw skips the pool's prompts.
SMALL_SPACE = dict(max_operand=4, ops="+-")


@pytest.mark.parametrize("cls,params", [(Arithmetic, SMALL_SPACE), (WordProblems, {})])
def test_heldout_prompts_are_outside_the_training_pool(cls, params):
    task = cls(seed=0, num_prompts=20, **params)
    held = task.heldout(10)
    texts = [p.text for p in held]
    assert len(texts) == 10 and len(set(texts)) == 10
    assert not set(texts) & {p.text for p in task.pool}
    assert held == cls(seed=0, num_prompts=20, **params).heldout(10)  # the same set in every process


def test_the_small_space_would_overlap_without_the_filter():
    """What makes the test above able to fail: the same stream, unfiltered, repeats pool prompts."""
    task = Arithmetic(seed=0, num_prompts=20, **SMALL_SPACE)
    unfiltered = {p.text for p in task.prompts(10, rng="0/heldout")}
    assert unfiltered & {p.text for p in task.pool}


def test_heldout_leaves_the_training_batches_alone():
    task, fresh = Arithmetic(seed=0, num_prompts=20, **SMALL_SPACE), Arithmetic(seed=0, num_prompts=20, **SMALL_SPACE)
    task.heldout(10)
    assert [task.batch(i, 8) for i in range(5)] == [fresh.batch(i, 8) for i in range(5)]


def test_a_task_without_prompts_outside_its_pool_is_refused():
    task = Arithmetic(seed=0, num_prompts=64, max_operand=1, ops="+")  # 4 questions, all in the pool
    with pytest.raises(ConfigError, match=r"trainer.eval_prompts=1: only 0 prompts .*task.num_prompts=64"):
        task.heldout(1)


@pytest.mark.parametrize("world,count", [(1, 5), (2, 5), (3, 7)])
def test_rank_shares_cover_the_held_out_set_once(world, count):
    task = WordProblems(seed=0, num_prompts=16)
    cfg = OmegaConf.create({"trainer": {"eval_every": 2, "eval_prompts": count}})
    shares = [held_out_share(task, cfg.trainer, SimpleNamespace(rank=r, world_size=world)) for r in range(world)]
    assert sorted(p.text for s in shares for p in s) == sorted(p.text for p in task.heldout(count))
    assert all(shares)  # every rank has a prompt: validate() asks for eval_prompts >= world size


def test_no_held_out_prompts_when_eval_is_off():
    cfg = OmegaConf.create({"trainer": {"eval_every": 0, "eval_prompts": 5}})
    assert (
        held_out_share(
            Arithmetic(seed=0, max_operand=1, num_prompts=64), cfg.trainer, SimpleNamespace(rank=0, world_size=1)
        )
        == []
    )  # not even drawn: this task has none


@pytest.mark.parametrize(
    "overrides,field,rule",
    [
        (["trainer.eval_every=-1"], "trainer.eval_every", ">= 0"),
        (["trainer.eval_every=5", "trainer.eval_prompts=0"], "trainer.eval_prompts", "> 0"),
        (
            ["trainer.eval_every=5", "trainer.eval_prompts=1", "trainer.world_size=2"],
            "trainer.eval_prompts=1",
            "at least one per rank",
        ),
    ],
)
def test_bad_eval_settings_name_the_field(overrides, field, rule):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides + [CPU]))
    assert field in str(err.value) and rule in str(err.value)


def test_eval_settings_that_pass():
    validate(compose(["trainer.eval_every=0", "trainer.eval_prompts=0", CPU]))  # off: the count is not used
    validate(compose(["trainer.eval_every=10", "trainer.eval_prompts=2", "trainer.world_size=2", CPU]))


def _step(step, reward, **extra):
    return {"step": step, "reward/mean": reward, "sync/total_s": 0.01, **extra}


def test_summary_reports_the_first_and_last_evaluation():
    history = [
        {"step": 0, "eval/exact": 0.1, "eval/reward": 0.2},
        _step(1, 0.3),
        _step(2, 0.4, **{"eval/exact": 0.25, "eval/reward": 0.5}),
        _step(3, 0.5, **{"eval/exact": 0.5, "eval/reward": 0.75}),
    ]
    out = summarize(history)
    assert out["steps"] == 3 and out["reward/first10"] == pytest.approx(0.4)
    assert (out["eval/exact_first"], out["eval/exact_last"]) == (0.1, 0.5)
    assert (out["eval/reward_first"], out["eval/reward_last"]) == (0.2, 0.75)
    assert (out["eval/first_step"], out["eval/last_step"]) == (0, 3)
    assert "eval/exact_first" not in summarize([_step(1, 0.3)])
