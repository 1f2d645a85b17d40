"""Every config option composes into its typed dataclass; typos and bad values fail at compose time
naming the full key; the CLI reports a typo in well under 10 s (no torch import before validation)."""

import os
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from embedscale.config import EvaluateConfig, Pooling, TrainConfig, register_configs, resolve_batch_sizes, to_config
from embedscale.jobs.launch import conf_dir

GROUPS = ["model", "data", "loss", "optim", "trainer", "logger", "eval"]


def _compose(name, overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        # sharded strategies do not evaluate during training: their presets compose with eval=none (and refuse
        # the default evaluation at compose time, test_sharded_strategies_refuse_evaluation_at_compose_time)
        extra = ["eval=none"] if group == "trainer" and option.startswith(("fsdp2", "deepspeed")) else []
        cfg = to_config(_compose("train", [f"{group}={option}", *extra]), TrainConfig)
        assert isinstance(cfg, TrainConfig)


def test_sharded_strategies_refuse_evaluation_at_compose_time():
    for option in ("fsdp2_cpu", "deepspeed_zero2_cpu"):
        with pytest.raises(ValueError, match="does not evaluate during training yet: add eval=none"):
            to_config(_compose("train", [f"trainer={option}"]), TrainConfig)


def test_defaults_are_the_quickstart():
    cfg = to_config(_compose("train"), TrainConfig)
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.model.pooling is Pooling.mean and cfg.model.document_max_length == 256
    assert cfg.data.path == "scifact" and cfg.data.split == "train"
    assert [(s.path, s.split) for s in cfg.eval.beir] == [("scifact", "test")]


def test_evaluate_config_composes():
    cfg = to_config(_compose("evaluate", ["model.name_or_path=/some/export"]), EvaluateConfig)
    assert cfg.model.name_or_path == "/some/export" and cfg.eval.sts


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.temprature=0.05", "loss.temprature"),
        ("data.batch_size_per_rank=abc", "data.batch_size_per_rank"),
        ("model.pooling=max", "model.pooling"),
        ("optim.scheduler=step", "optim.scheduler"),
        ("logger.loggers=[mlflow]", "logger.loggers"),  # every choice is an enum: refused while composing
    ],
)
def test_typos_and_wrong_types_fail_naming_the_full_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose("train", [override])
    assert key in str(err.value) or key in str(err.value.__cause__)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["loss.temperature=0"], r"loss\.temperature"),
        (["optim.lr=-1"], r"optim\.lr"),
        (["trainer.precision=fp8"], r"trainer\.precision"),
        (["model.matryoshka_dims=[384,64,32]", "model.matryoshka_weights=[1.0]"], r"model\.matryoshka_weights"),
        (["data.batch_size_per_rank=1"], r"data\.batch_size_per_rank"),
        (["gradcache.chunk_size=-1"], r"gradcache\.chunk_size"),
        (["gradcache.chunk_size=4", "trainer.accumulate_grad_batches=2"], r"trainer\.accumulate_grad_batches"),
        (["gradcache.chunk_size=4", "trainer.precision=16-mixed"], r"trainer\.precision=16-mixed"),
        (["gradcache.token_budget=-1"], r"gradcache\.token_budget"),
        # batch-size semantics: each message names the value to change
        (["data.global_batch_size=64"], r"data\.global_batch_size=64 but data\.batch_size_per_rank=32 x 1 rank"),
        (["trainer=ddp_cpu", "data.global_batch_size=32"], r"set data\.batch_size_per_rank=null"),
        (["trainer=ddp_cpu", "data.batch_size_per_rank=null", "data.global_batch_size=33"], r"multiple of 2"),
        (["data.batch_size_per_rank=null"], r"both null"),
        (["data.global_batch_size=0"], r"data\.global_batch_size=0 is out of range: use >= 1"),
        (["gradcache.chunk_size=32"], r"lower gradcache\.chunk_size"),
        (["gradcache.token_budget=100"], r"raise gradcache\.token_budget to at least 256"),
    ],
)
def test_post_init_checks_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_config(_compose("train", overrides), TrainConfig)


@pytest.mark.parametrize(
    "overrides, per_rank, global_",
    [
        ([], 32, 32),
        (["trainer=ddp_cpu"], 32, 64),
        (["trainer=ddp_cpu", "data.batch_size_per_rank=null", "data.global_batch_size=256"], 128, 256),
        (
            [
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "data.batch_size_per_rank=null",
                "data.global_batch_size=16384",
            ],
            2048,
            16384,
        ),
        (["trainer=ddp_cpu", "data.global_batch_size=64"], 32, 64),  # both given and consistent
        (
            [
                "trainer.accelerator=gpu",
                "trainer.devices=-1",
                "data.global_batch_size=512",
                "data.batch_size_per_rank=null",
            ],
            None,
            512,
        ),  # world unknown until launch: train.run resolves it
    ],
)
def test_global_batch_size_resolves_against_the_world(overrides, per_rank, global_):
    cfg = to_config(_compose("train", overrides), TrainConfig)
    typed = (cfg.data.batch_size_per_rank, cfg.data.global_batch_size)
    world = cfg.trainer.world_size()
    if per_rank is None:  # world unknown until launch: the train job resolves it with the launcher's
        assert world is None and cfg.data.global_batch_size == global_
        return
    sizes = resolve_batch_sizes(cfg, world)
    assert (sizes.batch_size_per_rank, sizes.global_batch_size, sizes.world_size) == (per_rank, global_, world)
    assert (cfg.data.batch_size_per_rank, cfg.data.global_batch_size) == typed  # resolved once, never written back


@pytest.mark.slow  # a CLI process
def test_cli_typo_fails_fast_naming_the_key():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "embedscale.cli", "train", "loss.temprature=0.05"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert "loss.temprature" in proc.stderr + proc.stdout
    assert seconds < 10, seconds


@pytest.mark.slow  # a CLI process
def test_cli_usage_and_unknown_job():
    proc = subprocess.run([sys.executable, "-m", "embedscale.cli"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout and "evaluate" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "embedscale.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown job" in proc.stderr


def test_every_config_field_has_a_docstring():
    """Every leaf key of every job's schema carries a docstring (the string under the field)."""
    from embedscale.config import schema_of
    from embedscale.config.docs import rows
    from embedscale.jobs import JOBS

    missing = [
        f"{name}: {key}"
        for name, job in JOBS.items()
        if job.schema
        for key, _, _, doc in rows(schema_of(name))
        if not doc.strip()
    ]
    assert not missing, missing


def test_configuration_page_and_readme_table_are_current():
    """docs/configuration.md and the README's group table are generated from the schemas: regenerate them
    (python -m embedscale.config.docs) whenever a field, its docstring, a default or a conf/ option changes."""
    from embedscale.config.docs import GROUP_SECTIONS, main

    assert main(["--check"]) == 0, "run: python -m embedscale.config.docs"
    assert {p.name for p in conf_dir().iterdir() if p.is_dir()} == set(GROUP_SECTIONS)
