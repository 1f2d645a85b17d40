"""Every config option composes into its typed dataclass; typos and bad values fail at compose time
naming the full key; the CLI reports a typo in well under 10 s (no torch import before validation)."""

import os
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from embedscale.cli import conf_dir
from embedscale.config import EvaluateConfig, Pooling, TrainConfig, register_configs, to_config

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
        cfg = to_config(_compose("train", [f"{group}={option}"]), TrainConfig)
        assert isinstance(cfg, TrainConfig)


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
        (["logger.loggers=[mlflow]"], r"logger\.loggers"),
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
        (["data.global_batch_size=0"], r"data\.global_batch_size must be >= 1"),
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
    assert (cfg.data.batch_size_per_rank, cfg.data.global_batch_size) == (per_rank, global_)


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
