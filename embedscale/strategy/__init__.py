"""How ranks share a training step: the only package that names a distribution strategy.

    base.py       the StepDriver interface (one process) and DDP's; `max_grad_norm`, the one reader of the clip value
    fsdp2.py      FSDP2 sharding under Lightning's ModelParallelStrategy, its driver, unsharding after fit
    deepspeed.py  DeepSpeed ZeRO-2/3 (also on CPU over gloo), its config, driver and checkpoint records
    build.py      trainer.strategy -> the Lightning strategy; the live strategy -> its driver; after-fit callbacks
    memory.py     the memory each strategy needs per GPU (`embedscale plan`)
    shape.py      the model's shape the planner reads (config.json or plan.*)

The LightningModule and GradCache call the driver (`backward`, `sync_gradients`, `clip`, ...) and never ask which
strategy runs; collectives themselves live in embedscale/distributed.py.
"""

from embedscale.strategy.base import StepDriver, max_grad_norm
from embedscale.strategy.build import after_fit_callbacks, build_strategy, check_resume, driver_for

__all__ = ["StepDriver", "after_fit_callbacks", "build_strategy", "check_resume", "driver_for", "max_grad_norm"]
