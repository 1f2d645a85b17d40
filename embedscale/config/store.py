"""Registration with Hydra's ConfigStore, and the composed tree -> typed dataclass conversion.

Why dataclasses and not free YAML: Hydra merges the YAML files of `conf/` onto these schemas, so a typo
(`loss.temprature=0.05`) or a wrong type (`data.batch_size_per_rank=abc`) fails at compose time, in well under a
second, naming the full key -- not ten minutes into a job after the model loaded. Checks that span fields live in
`__post_init__`, which runs when `to_config` converts the composed tree into the dataclasses (still before any
heavy import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedscale.jobs import JOBS

if TYPE_CHECKING:
    from omegaconf import DictConfig


def schema_of(job: str) -> type:
    """The config dataclass of `embedscale <job>` (the registry names it)."""
    import embedscale.config as config

    return getattr(config, JOBS[job].schema)


def register_configs() -> None:
    """Register each job's schema as `<config>_schema`; every group file of conf/ is merged onto its typed node."""
    # Hydra and OmegaConf are imported here, not at the top: library code (and bench/gpu_check.py on a machine
    # without them) uses the dataclasses alone.
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for job in JOBS.values():
        if job.schema is not None:
            cs.store(name=f"{job.config}_schema", node=schema_of(job.name))
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)


def _required(what: str) -> Any:
    """`key: ${required:what it must be}` in a group file (conf/stage/): a value the user must give. (`???`
    cannot mark it: merged over a default, OmegaConf keeps the default.) Resolved only if never overridden."""
    raise ValueError(f"required value missing: {what}")


def to_config(cfg: DictConfig, schema: type) -> Any:
    """Turn a composed Hydra config into its dataclass, running every `__post_init__` check."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    obj = OmegaConf.to_object(cfg)
    for node in (obj, *vars(obj).values()):  # required values (see RerankerConfig.validate)
        if callable(getattr(node, "validate", None)):
            node.validate()
    return obj
