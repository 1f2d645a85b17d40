"""The Lightning strategy of a run, built here and only here: `trainer.strategy` -> `L.Trainer(strategy=...)`.

Every name Lightning knows (`auto`, `ddp`, `ddp_spawn`, ...) is passed through unchanged. `fsdp2` is ours:
Lightning's `FSDPStrategy` (FSDP1) refuses CPU, so FSDP2 runs under `ModelParallelStrategy` with a data-parallel
mesh of all ranks (tensor parallel size 1); the module shards itself in `configure_model()` by calling
`FSDP2Strategy.shard` (below), which applies `fully_shard` to every transformer layer of each backbone and then to
the backbone itself (its root group holds the embeddings). The BiEncoder and the temperature stay plain modules:
the temperature is a replicated scalar whose gradient the module averages explicitly (contrastive/gather.py).

GradCache under FSDP2 (contrastive/module.py): every chunk's backward reduce-scatters (averages) its gradients
into the sharded gradient, which accumulates; a sum of per-chunk averages is the average of the sums, so the
step's gradient is exact, and GradCache's explicit all-reduce skips the (already reduced) DTensor gradients.
We do not defer the reduction with `set_requires_gradient_sync(False)`: it would keep a full unsharded gradient
per layer alive across the step, which is the memory FSDP exists to save.

`deepspeed` is Lightning's `DeepSpeedStrategy` (ZeRO stage 2 or 3, optional CPU offload) with a DeepSpeed config
written here from TrainerConfig, never DeepSpeed's defaults: `gradient_clipping` is trainer.gradient_clip_val
(DeepSpeed would silently clip at 1.0), the optimizer and scheduler are ours (configure_optimizers: a client torch
AdamW, hence `zero_allow_untested_optimizer`), bf16/fp16 follow trainer.precision. Lightning refuses DeepSpeed on
CPU; the CPU subclass below only sets up the process group and the device itself (gloo; facts measured in
../shared/docs/FACTS.md), which is what lets 2 CPU ranks test the ZeRO path. DeepSpeed checkpoints are
directories (one shard file per rank); each gets a small `embedscale.json` naming the strategy and stage, so
that `trainer.resume` refuses a checkpoint of another strategy before DeepSpeed tries to read it. After fit the
fp32 master weights are gathered into a plain encoder for the export (`consolidate_for_export`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.config import TrainerConfig

FSDP2 = "fsdp2"
DEEPSPEED = "deepspeed"
CHECKPOINT_META = "embedscale.json"
"""Written into every DeepSpeed checkpoint directory: {"strategy": "deepspeed", "zero_stage": 2|3}."""


def build_strategy(cfg: TrainerConfig, *, gradcache: bool = False) -> Any:
    """What `L.Trainer(strategy=...)` takes for `cfg.strategy`: the name itself, or a strategy object for fsdp2
    and deepspeed (`gradcache`: GradCache is on; see `deepspeed_config`)."""
    if cfg.strategy == FSDP2:
        return fsdp2_strategy(reshard_after_forward=cfg.reshard_after_forward)
    if cfg.strategy == DEEPSPEED:
        return deepspeed_strategy(cfg, gradcache=gradcache)
    return cfg.strategy


def _model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


def transformer_layers(backbone) -> list:
    """The repeated blocks of a HF backbone: the children of its first ModuleList (BERT `encoder.layer`,
    Llama/Mistral `layers`, ...)."""
    import torch.nn as nn

    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def shard_fsdp2(module, mesh, *, reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 `fully_shard` to each transformer layer of the module's backbone(s), then to each backbone.

    Args:
        module: a ContrastiveModule (its `encoder.query_backbone` / `document_backbone` are sharded; a shared
            tower once).
        mesh: the 1-D data-parallel DeviceMesh.
        reshard_after_forward: free the gathered parameters after each forward (True) or keep them until the
            backward (False); see TrainerConfig.reshard_after_forward.
    """
    from torch.distributed.fsdp import fully_shard

    encoder = module.encoder
    backbones = [encoder.query_backbone] + ([] if encoder.shared else [encoder.document_backbone])
    for backbone in backbones:
        for layer in transformer_layers(backbone):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(backbone, mesh=mesh, reshard_after_forward=reshard_after_forward)


def is_sharded(module) -> bool:
    """True when some parameter of `module` is a DTensor (FSDP2 applied)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module) -> dict:
    """The unsharded state dict of `module` on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


class _FSDP2Mixin:
    reshard_after_forward: bool = True

    def setup_environment(self) -> None:
        # every rank is data parallel; known only now (devices=auto, SLURM), not when the strategy is built
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module) -> None:
        shard_fsdp2(module, self.device_mesh["data_parallel"], reshard_after_forward=self.reshard_after_forward)


def fsdp2_strategy(*, reshard_after_forward: bool = True):
    """ModelParallelStrategy over all ranks (tensor parallel 1) that knows how to FSDP2-shard a ContrastiveModule.

    Checkpoints are saved consolidated (one file, like ddp's) so that the checkpoint callbacks work unchanged;
    their optimizer state is indexed in another parameter order than ddp's, so they resume under fsdp2 only
    (ContrastiveModule.on_load_checkpoint raises otherwise)."""
    cls = type("FSDP2Strategy", (_FSDP2Mixin, _model_parallel_strategy()), {})
    strategy = cls(save_distributed_checkpoint=False)
    strategy.reshard_after_forward = reshard_after_forward
    return strategy


def unshard_for_export(module, model_cfg) -> None:
    """After fit under FSDP2: replace the sharded backbones of `module.encoder` with plain ones holding the trained
    weights (on every rank; a collective), so that export and evaluation see ordinary modules."""
    from embedscale.encoder.biencoder import load_encoder

    encoder = module.encoder
    state = full_state_dict(encoder)
    plain, _ = load_encoder(model_cfg)
    plain.load_state_dict(state)
    _adopt_backbones(encoder, plain)


def _adopt_backbones(encoder, plain) -> None:
    """Give `encoder` the plain backbones of a fresh `plain` encoder (in the encoder's train/eval mode)."""
    plain.train(encoder.training)
    encoder.query_backbone = plain.query_backbone
    encoder.document_backbone = plain.document_backbone


def _on_fit_end(fn) -> list:
    """One Lightning callback that runs fn(module) when fit ends (on every rank)."""
    import lightning as L

    class PlainBackbonesAfterFit(L.Callback):
        def on_fit_end(self, trainer, module) -> None:
            fn(module)

    return [PlainBackbonesAfterFit()]


def fsdp2_callbacks(model_cfg) -> list:
    """Callbacks an fsdp2 run needs: after fit, plain (unsharded) backbones for export."""
    return _on_fit_end(lambda module: unshard_for_export(module, model_cfg) if module.fsdp2 else None)


def deepspeed_config(cfg: TrainerConfig, *, gradcache: bool = False) -> dict:
    """The DeepSpeed config of a `trainer.strategy=deepspeed` run: every setting that changes the numbers is
    explicit here (DeepSpeed's defaults clip at 1.0). Lightning adds gradient_accumulation_steps (from
    trainer.accumulate_grad_batches).

    With GradCache (`gradcache`) the step's backward passes (the cache's, then one per chunk) are micro-steps of
    DeepSpeed's *unmanaged* gradient accumulation (`managed_gradient_accumulation: false`): each backward
    reduce-scatters into the partitioned gradient and `engine.step()` is the boundary, which hands every gradient
    touched during the step to the (offloaded) optimizer. The managed boundary (set on the last backward) hands
    over only those of the last backward under offload -- a chunk of one tower, never the temperature (measured
    4e-6 off under ZeRO-3 with the optimizer offloaded); unmanaged is exact (tests/test_deepspeed.py)."""
    cpu = _on_cpu(cfg)
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        # Reductions on a side stream would overlap the backward on GPUs, but the GradCache micro-steps
        # (contrastive/module.py) are proven exact only without it (CPU tests): off until measured on GPUs.
        "overlap_comm": False,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "gradient_clipping": float(cfg.gradient_clip_val or 0.0),
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
    elif cfg.precision == "16-mixed":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _on_cpu(cfg: TrainerConfig) -> bool:
    if cfg.accelerator == "cpu":
        return True
    if cfg.accelerator == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


def deepspeed_strategy(cfg: TrainerConfig, *, gradcache: bool = False):
    """Lightning's DeepSpeedStrategy with `deepspeed_config(cfg)`; on CPU a subclass that runs it over gloo."""
    import importlib.util

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    if importlib.util.find_spec("deepspeed") is None:  # TrainerConfig checks it at compose time already
        raise ValueError("trainer.strategy=deepspeed needs DeepSpeed: pip install embedscale[deepspeed]")

    class EmbedscaleDeepSpeedStrategy(DeepSpeedStrategy):
        zero_stage = cfg.zero_stage

        def init_deepspeed(self) -> None:
            import warnings

            with warnings.catch_warnings():  # Lightning warns that our (FSDP2) clipping hook will not clip: right,
                # DeepSpeed clips, at trainer.gradient_clip_val (deepspeed_config's gradient_clipping)
                warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
                super().init_deepspeed()

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            path = Path(self.broadcast(filepath))  # rank 0's path, as DeepSpeed wrote it
            if self.is_global_zero:
                meta = {"strategy": DEEPSPEED, "zero_stage": self.zero_stage}
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
    return cls(config=deepspeed_config(cfg, gradcache=gradcache))


def deepspeed_checkpoint_meta(path: str | Path) -> dict | None:
    """The strategy record of a checkpoint: {"strategy": ..., "zero_stage": ...} for a DeepSpeed checkpoint
    directory (None when the directory has no record), {"strategy": "file"} for a one-file checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return {"strategy": "file"}
    meta = path / CHECKPOINT_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def check_resume_strategy(cfg: TrainerConfig, checkpoint: str) -> None:
    """Raise ValueError when `checkpoint` was written under another strategy than `cfg` trains with: DeepSpeed
    checkpoints are directories of per-rank shards (of one ZeRO stage), every other strategy writes one file."""
    meta = deepspeed_checkpoint_meta(checkpoint)
    written = "a one-file checkpoint (ddp, fsdp2, ...)" if meta and meta["strategy"] == "file" else None
    if cfg.strategy == DEEPSPEED:
        if meta is None:
            return  # a DeepSpeed directory written without our record: let DeepSpeed read it
        if meta["strategy"] == DEEPSPEED and meta.get("zero_stage") == cfg.zero_stage:
            return
        written = written or f"deepspeed with trainer.zero_stage={meta.get('zero_stage')}"
        now = f"deepspeed with trainer.zero_stage={cfg.zero_stage}"
    else:
        if meta and meta["strategy"] == "file":
            return
        written, now = "deepspeed (a checkpoint directory)", f"trainer.strategy={cfg.strategy}"
    raise ValueError(
        f"trainer.resume={checkpoint}: the checkpoint was written under {written} and this run uses {now}; the "
        "optimizer state does not carry over between them: resume with the trainer.strategy (and trainer.zero_stage) "
        "that wrote it"
    )


def consolidate_for_export(module, model_cfg) -> None:
    """After fit under DeepSpeed: replace the backbones of `module.encoder` (ZeRO-3 partitioned, or ZeRO-2 copies
    in bf16/fp16 under DeepSpeed's precision) with plain ones holding the trained fp32 master weights (on every
    rank; a collective), so that export sees ordinary modules, as after FSDP2's `unshard_for_export`.

    Only trainable parameters are gathered (one at a time: no rank ever holds the whole model twice); frozen ones
    (LoRA's base weights) did not change and come from the fresh `load_encoder`, in model.torch_dtype.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from embedscale.encoder.biencoder import load_encoder

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
    _adopt_backbones(encoder, plain)


def deepspeed_callbacks(model_cfg) -> list:
    """Callbacks a deepspeed run needs: after fit, plain backbones with the fp32 master weights for export."""
    return _on_fit_end(lambda module: consolidate_for_export(module, model_cfg))
