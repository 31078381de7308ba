"""Config: every fsdp x offload x lora combination composes and validates; bad values fail
with messages that name the field and the choices; every YAML under conf/ composes.

    .venv/bin/python -m pytest tests/unit/test_config.py
"""

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException

from recipe.assets import check_model_path
from recipe.config import (
    FSDP_CHOICES,
    LORA_CHOICES,
    OFFLOAD_CHOICES,
    ConfigError,
    UnsupportedError,
    refuse_renamed,
    validate,
)
from tests.helpers import CONF_DIR, REPO, compose

CPU = "trainer.device=cpu"  # validate() as on a CPU-only machine, wherever the test runs
COMBOS = list(itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES))


def _start_checks(cfg):
    """What train() checks before anything is built: the config (validate) and the model directory."""
    settings = validate(cfg)
    check_model_path(settings.model)
    return settings


def test_choices_match_the_option_files():
    for group, choices in [("fsdp", FSDP_CHOICES), ("offload", OFFLOAD_CHOICES), ("lora", LORA_CHOICES)]:
        assert sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")) == sorted(choices)
    assert len(COMBOS) == 18


@pytest.mark.parametrize("fsdp,offload,lora", COMBOS)
def test_every_combination_composes_and_validates_on_cpu(fsdp, offload, lora):
    cfg = compose([f"fsdp={fsdp}", f"+offload={offload}", f"+lora={lora}", CPU])
    assert (cfg.fsdp.name, cfg.offload.name, cfg.lora.name) == (fsdp, offload, lora)
    if (fsdp, offload) == ("fsdp1", "cpu"):
        with pytest.raises(UnsupportedError) as err:
            validate(cfg)
        msg = str(err.value)
        assert "fsdp=fsdp1 with offload=cpu needs an accelerator" in msg  # what is refused
        assert "pins host memory" in msg  # why
        assert "fsdp=fsdp2 +offload=cpu" in msg and "fsdp=fsdp1 +offload=manual" in msg  # what to use instead
    else:
        validate(cfg)


def test_absent_offload_and_lora_mean_none():
    cfg = compose([])
    assert (cfg.fsdp.name, cfg.offload.name, cfg.lora.name) == ("fsdp2", "none", "none")


@pytest.mark.parametrize(
    "override,group,options",
    [
        ("fsdp=fsdp3", "fsdp/fsdp3", ["fsdp1", "fsdp2"]),
        ("+offload=gpu", "offload/gpu", ["cpu", "manual", "none"]),
    ],
)
def test_unknown_option_lists_the_available_ones(override, group, options):
    with pytest.raises(MissingConfigException) as err:
        compose([override])
    msg = str(err.value)
    assert f"Could not find '{group}'" in msg
    available = msg.split("Available options", 1)[1]
    listed = [line.strip() for line in available.split("Config search path", 1)[0].splitlines()[1:] if line.strip()]
    assert listed == options  # exactly the option files: no schema node offered as a choice


@pytest.mark.parametrize(
    "overrides,field,choices",
    [
        (["trainer.lr=-1"], "trainer.lr", "> 0"),
        (["trainer.steps=0"], "trainer.steps", "> 0"),
        (["trainer.profile_steps=-1"], "trainer.profile_steps", ">= 0"),
        (["trainer.export=always"], "trainer.export", "final, every_checkpoint, none"),
        (["trainer.profile_steps=2", "trainer.steps=1"], "trainer.profile_steps=2", "trainer.steps >= 2"),
        (["model=local"], "model.path", "model.path=/path/to/hf_checkpoint"),
        (["model=local", "model.path=/nonexistent/ckpt"], "model.path='/nonexistent/ckpt'", "model=tiny"),
        (
            ["sync.probe_every=-3"],
            "sync.probe_every must be >= -1",
            "0 = off, 1 = every sync, N = the 1st and every N-th",
        ),
        (["+sync.verify=every"], "sync.verify was renamed: use sync.probe_every", "0 = off, 1 = every sync"),
        (["rollout.n=1"], "rollout.n", ">= 2"),
        (["rollout.top_p=1.5"], "rollout.top_p", "(0, 1]"),
        (["trainer.device=tpu"], "trainer.device='tpu'", "auto, cpu, cuda"),
        (["model.dtype=fp8"], "model.dtype='fp8'", "float32, bfloat16, float16"),
        (["+lora=merged", "lora.target_modules=[]"], "lora.target_modules", "at least one"),
        (["sync.strategy=naive", "+lora=adapter"], "sync.strategy='naive'", "lora=none"),
        (["+trainer.stepz=3"], "trainer.stepz is not a config key", "steps"),
        (["offload.pin_memory=true", CPU], "offload.pin_memory=true", "auto or false"),
    ],
)
def test_bad_values_name_the_field(overrides, field, choices):
    with pytest.raises(ConfigError) as err:
        _start_checks(compose(overrides))
    assert field in str(err.value) and choices in str(err.value)


def test_good_values_pass():
    for overrides in (
        ["sync.probe_every=3"],
        ["sync.probe_every=-1"],
        ["sync.probe_every=0"],
        ["trainer.lr=1e-5"],
        ["model=local", "model.path=."],
    ):
        _start_checks(compose(overrides + [CPU]))


@pytest.mark.parametrize(
    "old,new", [("sync.verify=every", "sync.probe_every"), ("sync.tolerance=0.1", "sync.probe_tolerance")]
)
def test_renamed_key_on_the_command_line_is_refused_naming_the_new_one(old, new):
    """Hydra's schema would say only "Key 'verify' not in 'SyncConfig'"; the entry names the new key in one line."""
    out = subprocess.run(
        [sys.executable, "-m", "recipe.train", "--cfg", "job", old],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {old.split('=')[0]} was renamed: use {new}"
        + (
            " (an int: 0 = off, 1 = every sync, N = the 1st and every N-th, -1 = the first only)"
            if new == "sync.probe_every"
            else ""
        )
    ]


@pytest.mark.parametrize(
    "overrides", [["-m", "fsdp=fsdp1", "sync.verify=every,off"], ["+sync.tolerance=0.1"], ["~sync.verify"]]
)
def test_renamed_keys_are_refused_in_every_override_form(overrides):
    with pytest.raises(ConfigError, match=r"sync\.(verify|tolerance) was renamed: use sync\.probe_"):
        refuse_renamed(overrides)
    refuse_renamed(["sync.probe_every=1", "sync.probe_tolerance=0.1", "trainer.steps=2"])  # the new names pass


def test_typo_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.stepz'"):
        compose(["trainer.stepz=3"])


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="trainer.steps=abc") as err:
        compose(["trainer.steps=abc"])
    cause = str(err.value.__cause__)
    assert "'abc'" in cause and "Integer" in cause and "trainer.steps" in cause


def _primary_configs():
    """{config name: groups in its defaults list} for every top-level YAML under conf/."""
    primaries = {}
    for path in sorted(Path(CONF_DIR).glob("*.yaml")):
        defaults = yaml.safe_load(path.read_text()).get("defaults", [])
        primaries[path.stem] = {next(iter(d)) for d in defaults if isinstance(d, dict)}
    return primaries


def _group_options():
    """(group, option) for every YAML in a group folder under conf/."""
    conf = Path(CONF_DIR)
    return sorted((str(p.parent.relative_to(conf)), p.stem) for p in conf.rglob("*.yaml") if p.parent != conf)


def _compose_primary(config_name, overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    import tools.sync_bench  # noqa: F401  registers the bench schema

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("config_name", sorted(_primary_configs()))
def test_every_primary_config_composes(config_name):
    validate(_compose_primary(config_name, [CPU]))


@pytest.mark.parametrize("group,option", _group_options())
def test_every_group_option_composes(group, option, tmp_path):
    """No file under conf/ can rot: each option composes under the primary config that lists
    its group (added with `+` when none does) and passes validate()."""
    primaries = _primary_configs()
    users = [name for name, groups in primaries.items() if group in groups]
    config_name = "train" if "train" in users or not users else users[0]
    override = f"{group}={option}" if users else f"+{group}={option}"
    extra = [f"model.path={tmp_path}"] if (group, option) == ("model", "local") else []
    cfg = _compose_primary(config_name, [override, CPU] + extra)
    if "name" in cfg.get(group, {}):
        assert cfg[group].name == option  # option files name themselves (dispatch-table keys use this)
    if (group, option) == ("offload", "cpu") and cfg.fsdp.name == "fsdp1":
        pytest.fail("the default fsdp must be able to run offload=cpu on CPU")
    validate(cfg)


def test_default_config_top_level_keys():
    """A snapshot: adding or removing a top-level section is a deliberate change made here too."""
    cfg = compose([])
    assert sorted(cfg.keys()) == [
        "algo",
        "cache_dir",
        "fsdp",
        "logger",
        "lora",
        "model",
        "offload",
        "rollout",
        "run_dir",
        "sync",
        "task",
        "trainer",
    ]


def test_cli_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "recipe.train", "--cfg", "job", "+offload=cpu", "+lora=merged"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert (printed["fsdp"]["name"], printed["offload"]["name"], printed["lora"]["name"]) == ("fsdp2", "cpu", "merged")
    trainer_yaml = yaml.safe_load((REPO / "conf" / "trainer" / "default.yaml").read_text())
    assert printed["lora"]["rank"] == 8 and printed["trainer"]["steps"] == trainer_yaml["steps"]


def test_pin_memory_from_the_command_line():
    # Hydra parses `true`/`false` as bools; the str field stores "True"/"False"; the settings hold
    # Optional[bool] (None = auto) and `pin`, resolved once against the device.
    from recipe.settings import Settings

    def offload(overrides):
        return Settings.from_cfg(compose(overrides)).offload

    assert (offload(["offload.pin_memory=false", CPU]).pin_memory, offload(["offload.pin_memory=false", CPU]).pin) == (
        False,
        False,
    )
    assert (offload(["offload.pin_memory=auto", CPU]).pin_memory, offload(["offload.pin_memory=auto", CPU]).pin) == (
        None,
        False,
    )
    assert offload(["offload.pin_memory=auto", "trainer.device=cuda"]).pin is True  # auto pins on CUDA
    on = offload(["offload.pin_memory=true", "trainer.device=cuda"])
    assert (on.pin_memory, on.pin) == (True, True)


def test_fsdp1_lora_at_world_one_is_refused_with_the_reason(tiny_model_dir):
    from recipe.config import UnsupportedError, validate

    cfg = compose(["fsdp=fsdp1", "+lora=merged", "trainer.world_size=1", f"model.path={tiny_model_dir}"])
    with pytest.raises(UnsupportedError, match="fsdp=fsdp1 with lora=merged at world size 1.*fsdp=fsdp2"):
        validate(cfg)
    validate(compose(["fsdp=fsdp2", "+lora=merged", "trainer.world_size=1", f"model.path={tiny_model_dir}"]))
    validate(compose(["fsdp=fsdp1", "+lora=merged", "trainer.world_size=2", f"model.path={tiny_model_dir}"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.master_dtype=fp8"],
            "model.master_dtype='fp8' is not valid; choose one of: float32, bfloat16, float16",
        ),
        (["model.dtype=bfloat16", "model.master_dtype=float16"], "is not valid; choose one of: float32, bfloat16"),
    ],
)
def test_master_dtype_is_float32_or_the_compute_dtype(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(overrides + [CPU]))
    validate(compose(["model.dtype=bfloat16", "model.master_dtype=bfloat16", CPU]))  # allowed (memory-bound users)


def test_lr_and_warmup_default_to_the_model_group():
    local = compose(["model=local", "model.path=."])
    assert (local.trainer.lr, local.trainer.warmup_steps) == (1e-6, 10)
    assert (local.model.dtype, local.model.master_dtype) == ("bfloat16", "float32")
    assert compose(["model=smollm2"]).trainer.lr == 1e-5
    assert (compose([]).trainer.lr, compose([]).trainer.warmup_steps) == (1e-3, 2)  # tiny
    assert compose(["model=local", "model.path=.", "trainer.lr=3e-6"]).trainer.lr == 3e-6  # an explicit value wins
