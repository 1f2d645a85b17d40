"""DeepSpeed ZeRO-2/3: `trainer.strategy=deepspeed`, Lightning's DeepSpeedStrategy with a config written here.

Every setting that changes the numbers is explicit, never DeepSpeed's defaults: `gradient_clipping` is the run's
`max_grad_norm` (DeepSpeed would silently clip at 1.0), the optimizer and scheduler are ours (a client torch AdamW,
hence `zero_allow_untested_optimizer`), bf16/fp16 follow trainer.precision. Lightning refuses DeepSpeed on CPU; the
CPU subclass below only sets up the process group and the device itself (gloo; facts measured in
../shared/docs/FACTS.md), which is what lets 2 CPU ranks test the ZeRO path.

The engine owns backward, reduction, clipping (at the global norm over all partitions) and the step. GradCache
runs every backward of a step -- the cache's and each chunk's -- through the engine as micro-steps of its own
*unmanaged* gradient accumulation (`managed_gradient_accumulation: false`), whose boundary is `engine.step()`:
ZeRO-2/3 reduce-scatter each micro-step's (averaged) gradient into the partitioned gradient, where the micro-steps
add up (a sum of averages: exact, as under FSDP2), and the engine steps once. Nothing is divided by the
accumulation count: gradient_accumulation_steps is 1. The managed boundary (set on the last backward) hands over
only those of the last backward under offload -- a chunk of one tower, never the temperature (measured 4e-6 off
under ZeRO-3 with the optimizer offloaded); unmanaged is exact (tests/test_deepspeed.py).

DeepSpeed checkpoints are directories (one shard file per rank); each gets a small `embedscale.json` naming the
strategy and stage, so that `trainer.resume` refuses a checkpoint of another strategy before DeepSpeed tries to
read it. After fit the fp32 master weights are gathered into a plain encoder for the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.checkpoints import CHECKPOINT_META
from embedscale.config import Accelerator, Precision, TrainerConfig
from embedscale.strategy.base import StepDriver, max_grad_norm


class DeepSpeedDriver(StepDriver):
    shards_gradients = True
    cannot_skip_steps = "DeepSpeed's engine owns the partitioned gradients and steps them"
    keeps_params_across_passes = True  # ZeRO-3 keeps small ("persistent") parameters gathered across passes

    def __init__(self, *, zero_stage: int, engine=None) -> None:
        super().__init__(max_norm=0.0)  # the engine clips (deepspeed_config's gradient_clipping)
        self.zero_stage, self.engine = zero_stage, engine
        self.checkpoint_tag = f"deepspeed-zero{zero_stage}"
        self._in_step = False

    def backward(self, module, loss, *, is_last: bool, cache: bool = False) -> None:
        """A micro-step of the engine's unmanaged gradient accumulation (Lightning's manual_backward ->
        engine.backward), the cache's backward too: the engine must run every backward of the step;
        engine.step() is the boundary."""
        if self.zero_stage == 3 and not self._in_step:
            # ZeRO-3 *copies* a gradient partition in the first micro-step of a step and adds in later ones, and it
            # never zeroes the partitions: a parameter the first backward does not reach (the cache's backward
            # reaches only the temperature; a chunk only its own tower) would add onto the previous step's
            # gradient. Start each step from zeros, adding in every micro-step (without: 1.8e-3 off after 3 steps).
            optimizer = module.trainer.model.optimizer  # DeepSpeed's ZeRO-3 optimizer
            optimizer.grad_partitions_flat_buffer.zero_()
            optimizer.micro_step_id = 1
        self._in_step = not is_last
        module.manual_backward(loss)

    def sync_gradients(self, module) -> None:
        """Nothing: the engine reduces each micro-step and finalises at engine.step()."""

    def clip(self, module, optimizer) -> None:
        """Nothing: the engine clips at the global norm over all partitions (gradient_clipping); the norm is the
        engine's, so the non-finite guard checks the loss alone."""
        return None


def deepspeed_config(cfg: TrainerConfig, *, gradcache: bool = False) -> dict:
    """The DeepSpeed config of a `trainer.strategy=deepspeed` run. Lightning adds gradient_accumulation_steps (from
    trainer.accumulate_grad_batches). With GradCache (`gradcache`) the accumulation is unmanaged (see above)."""
    cpu = _on_cpu(cfg)
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        # Reductions on a side stream would overlap the backward on GPUs, but the GradCache micro-steps
        # are proven exact only without it (CPU tests): off until measured on GPUs.
        "overlap_comm": False,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "gradient_clipping": max_grad_norm(cfg),
        "zero_allow_untested_optimizer": True,  # our torch AdamW (configure_optimizers), not DeepSpeed's
        # with offload, torch AdamW steps the CPU partitions (DeepSpeedCPUAdam would need a JIT-built op)
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's throughput log only; our sampler has no batch_size
        "steps_per_print": 2**31 - 1,  # Lightning logs; DeepSpeed's own progress lines are noise
        "wall_clock_breakdown": False,
    }
    if gradcache:
        config["managed_gradient_accumulation"] = False
    if cfg.precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
        # gradients of the micro-steps (GradCache chunks, accumulated batches) add up in fp32, not bf16
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif cfg.precision == Precision.fp16_mixed:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _on_cpu(cfg: TrainerConfig) -> bool:
    if cfg.accelerator == Accelerator.cpu:
        return True
    if cfg.accelerator == Accelerator.auto:
        import torch

        return not torch.cuda.is_available()
    return False


def deepspeed_strategy(cfg: TrainerConfig, *, gradcache: bool = False, timeout=None):
    """Lightning's DeepSpeedStrategy with `deepspeed_config(cfg)`; on CPU a subclass that runs it over gloo."""
    import importlib.util

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    if importlib.util.find_spec("deepspeed") is None:  # TrainerConfig checks it at compose time already
        raise ValueError("trainer.strategy=deepspeed needs DeepSpeed: pip install embedscale[deepspeed]")

    class EmbedscaleDeepSpeedStrategy(DeepSpeedStrategy):
        zero_stage = cfg.zero_stage

        def embedscale_driver(self) -> DeepSpeedDriver:
            return DeepSpeedDriver(zero_stage=cfg.zero_stage)

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            path = Path(self.broadcast(filepath))  # rank 0's path, as DeepSpeed wrote it
            if self.is_global_zero:
                meta = {"strategy": "deepspeed", "zero_stage": cfg.zero_stage}
                (path / CHECKPOINT_META).write_text(json.dumps(meta) + "\n")
            self.barrier("embedscale_checkpoint_meta")

    class CPUDeepSpeedStrategy(EmbedscaleDeepSpeedStrategy):
        """DeepSpeed ZeRO on CPU processes over gloo (Lightning only allows CUDA)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            import deepspeed.ops
            from lightning.fabric.utilities.seed import reset_seed

            # DeepSpeed would JIT-compile its shared-memory all-reduce for CPU ranks (~50 s, a C++ toolchain):
            # marking the op incompatible keeps every collective on plain gloo and builds nothing.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):
            import torch

            return torch.device("cpu", self.local_rank)

    cls = CPUDeepSpeedStrategy if _on_cpu(cfg) else EmbedscaleDeepSpeedStrategy
    kwargs = {"timeout": timeout} if timeout is not None else {}
    return cls(config=deepspeed_config(cfg, gradcache=gradcache), **kwargs)


def consolidate_for_export(module, model_cfg) -> None:
    """After fit: replace the backbones of `module.encoder` (ZeRO-3 partitioned, or ZeRO-2 copies in bf16/fp16
    under DeepSpeed's precision) with plain ones holding the trained fp32 master weights (on every rank; a
    collective), so that export sees ordinary modules, as after FSDP2's `unshard_for_export`.

    Only trainable parameters are gathered (one at a time: no rank ever holds the whole model twice); frozen ones
    (LoRA's base weights) did not change and come from the fresh `load_encoder`, in model.torch_dtype.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from embedscale.encoder.biencoder import load_encoder
    from embedscale.strategy.build import adopt_backbones

    encoder = module.encoder
    plain, _ = load_encoder(model_cfg)
    targets = dict(plain.named_parameters())  # shared towers: each parameter once, as in the trained encoder
    trained = [(name, p) for name, p in encoder.named_parameters() if p.requires_grad]
    fresh = sorted(name for name, p in targets.items() if p.requires_grad)
    if sorted(name for name, _ in trained) != fresh:
        raise RuntimeError("the trained encoder and a fresh load_encoder(model) disagree on the trainable parameters")
    with torch.no_grad():
        for name, param in trained:
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3: every rank, same order
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no fp32 master copy of the trainable parameter {name}")
            targets[name].copy_(full.reshape(targets[name].shape))
    adopt_backbones(encoder, plain)
