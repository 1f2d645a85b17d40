"""FSDP2 on all ranks: `trainer.strategy=fsdp2`.

Lightning's `FSDPStrategy` (FSDP1) refuses CPU, so FSDP2 runs under `ModelParallelStrategy` with a data-parallel
mesh of all ranks (tensor parallel size 1); the driver shards the module in `configure_model()`, applying
`fully_shard` to every transformer layer of each backbone and then to the backbone itself (its root group holds
the embeddings). The BiEncoder and the temperature stay plain modules: the temperature is a replicated parameter
whose gradient the driver averages explicitly.

GradCache under FSDP2: every chunk's backward reduce-scatters (averages) its gradients into the sharded gradient,
which accumulates; a sum of per-chunk averages is the average of the sums, so the step's gradient is exact, and
the explicit all-reduce skips the (already reduced) DTensor gradients. We do not defer the reduction with
`set_requires_gradient_sync(False)`: it would keep a full unsharded gradient per layer alive across the step,
which is the memory FSDP exists to save. Clipping takes the global norm over all shards.

Checkpoints are sharded: every rank writes its own shard of the weights and optimizer state in parallel
(torch.distributed.checkpoint, a directory; embedscale/checkpoints.py), and no rank ever holds the full state. They
resume under fsdp2 only (at any world size). After fit the backbones are unsharded into plain modules for export
and evaluation.
"""

from __future__ import annotations

from embedscale.distributed import all_reduce_gradients_, clip_grad_norm_sharded_
from embedscale.strategy.base import StepDriver


class FSDP2Driver(StepDriver):
    checkpoint_tag = "fsdp2"
    shards_gradients = True
    keeps_params_across_passes = True  # FSDP2 reuses its all-gather buffers across passes

    def __init__(self, *, max_norm: float = 0.0, mesh=None, reshard_after_forward: bool = True) -> None:
        super().__init__(max_norm=max_norm)
        self.mesh, self.reshard_after_forward = mesh, reshard_after_forward
        self.sharded = False

    def configure_model(self, module) -> None:
        if not self.sharded:
            shard_fsdp2(module.encoder, self.mesh, reshard_after_forward=self.reshard_after_forward)
            self.sharded = True

    def after_backward(self, module) -> None:
        all_reduce_gradients_(module.parameters())  # the replicated ones (temperature); DTensors are reduced

    def sync_gradients(self, module) -> None:
        all_reduce_gradients_(module.parameters())  # as above, once per GradCache step

    def clip(self, module, optimizer):
        return clip_grad_norm_sharded_(list(module.parameters()), self.max_norm)  # max_norm 0: the norm alone


def transformer_layers(backbone) -> list:
    """The repeated blocks of a HF backbone: the children of its first ModuleList (BERT `encoder.layer`,
    Llama/Mistral `layers`, ...)."""
    import torch.nn as nn

    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def shard_fsdp2(encoder, mesh, *, reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 `fully_shard` to each transformer layer of the encoder's backbone(s), then to each backbone.

    Args:
        encoder: a BiEncoder (its `query_backbone` / `document_backbone` are sharded; a shared tower once).
        mesh: the 1-D data-parallel DeviceMesh.
        reshard_after_forward: free the gathered parameters after each forward (True) or keep them until the
            backward (False); see TrainerConfig.reshard_after_forward.
    """
    from torch.distributed.fsdp import fully_shard

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


def fsdp2_strategy(*, max_norm: float, reshard_after_forward: bool = True, timeout=None):
    """ModelParallelStrategy over all ranks (tensor parallel 1) whose driver FSDP2-shards a ContrastiveModule."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            # every rank is data parallel; known only now (devices=auto, SLURM), not when the strategy is built
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def embedscale_driver(self) -> FSDP2Driver:
            return FSDP2Driver(
                max_norm=max_norm, mesh=self.device_mesh["data_parallel"], reshard_after_forward=reshard_after_forward
            )

    kwargs = {"timeout": timeout} if timeout is not None else {}
    strategy = FSDP2Strategy(save_distributed_checkpoint=True, **kwargs)
    strategy.reshard_after_forward = reshard_after_forward
    return strategy


def unshard_for_export(module, model_cfg) -> None:
    """After fit: replace the sharded backbones of `module.encoder` with plain ones holding the trained weights (on
    every rank; a collective), so that export and evaluation see ordinary modules."""
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.strategy.build import adopt_backbones

    encoder = module.encoder
    if not is_sharded(encoder):
        return
    state = full_state_dict(encoder)
    plain, _ = load_encoder(model_cfg)
    plain.load_state_dict(state)
    adopt_backbones(encoder, plain)
