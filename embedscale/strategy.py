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
"""

from __future__ import annotations

from typing import Any

from embedscale.config import TrainerConfig

FSDP2 = "fsdp2"


def build_strategy(cfg: TrainerConfig) -> Any:
    """What `L.Trainer(strategy=...)` takes for `cfg.strategy`: the name itself, or a strategy object for fsdp2."""
    if cfg.strategy != FSDP2:
        return cfg.strategy
    return fsdp2_strategy(reshard_after_forward=cfg.reshard_after_forward)


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
    plain.train(encoder.training)
    encoder.query_backbone = plain.query_backbone
    encoder.document_backbone = plain.document_backbone


def fsdp2_callbacks(model_cfg) -> list:
    """Callbacks an fsdp2 run needs: after fit, plain (unsharded) backbones for export (UnshardAfterFit)."""
    import lightning as L

    class UnshardAfterFit(L.Callback):
        def on_fit_end(self, trainer, module) -> None:
            if getattr(module, "fsdp2", False):
                unshard_for_export(module, model_cfg)

    return [UnshardAfterFit()]
