"""How a job is launched: Hydra composes its config from conf/ onto its schema, the config is validated, `run`
is called with the run directory. Also the composition the pipeline uses for its stages.

Nothing heavy is imported before the config is composed and validated, so a typo or a bad value fails in about
a second; torch, transformers and Lightning load inside `run`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedscale.jobs import JOBS

_LAUNCH_ARGV: list[str] | None = None  # the command line as typed, restored for relaunches (Lightning ddp)


def conf_dir() -> Path:
    """The directory of Hydra configs: inside the installed package, or conf/ of a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def hydra_job(name: str, run: Callable[..., Any]) -> Callable[[], Any]:
    """Wrap `run(cfg, run_dir=...)` of job `name` as a Hydra entry point that validates the config first."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from embedscale.config import register_configs, schema_of, to_config

    register_configs()
    job = JOBS[name]

    @hydra.main(config_path=str(conf_dir()), config_name=job.config, version_base="1.3")
    def _main(raw: DictConfig) -> Any:
        cfg = to_config(raw, schema_of(name))
        if _LAUNCH_ARGV is not None:  # so that `embedscale train ...` relaunches itself with the job name
            sys.argv = list(_LAUNCH_ARGV)
        return run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))

    def _launch() -> Any:
        shared = shared_run_dir(job.config, sys.argv[1:])
        if shared is not None:
            sys.argv.append(f"hydra.run.dir={shared}")
            if _LAUNCH_ARGV is not None:
                _LAUNCH_ARGV.append(f"hydra.run.dir={shared}")
        return _main()

    return _launch


def set_launch_argv(argv: list[str]) -> None:
    """The command line as typed (`embedscale <job> ...`), for Lightning's relaunch of the other ranks."""
    global _LAUNCH_ARGV
    _LAUNCH_ARGV = list(argv)


def shared_run_dir(config_name: str, overrides: list[str]) -> str | None:
    """One Hydra run directory for all ranks of a torchrun or srun launch (each rank runs Hydra itself, and
    `${now:...}` differs between them): runs/<job>/<launcher>-<launch id>. None when one process runs, when
    the command line sets hydra.run.dir, or when Lightning's own launcher already passes it to its children."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
        return None
    if any(o.startswith(("hydra.run.dir=", "+hydra.run.dir=")) for o in overrides):
        return None
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"runs/{config_name}/torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"runs/{config_name}/slurm-{os.environ['SLURM_JOB_ID']}.{step}"
    return None


def compose(name: str, overrides: list[str], extra: dict | None = None) -> Any:
    """The typed config of `embedscale <name> <overrides>`, then `extra` merged over it as a config file would be
    (compose-time errors name the key)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from embedscale.config import register_configs, schema_of, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name=JOBS[name].config, overrides=list(overrides))
    if extra:
        try:
            raw = OmegaConf.merge(raw, OmegaConf.create(extra))
        except ConfigKeyError as err:
            raise ValueError(f"pipeline stage config: {err.msg} (full key: {err.full_key})") from err
    return to_config(raw, schema_of(name))
