"""Batch sizes, resolved once: the config's two keys and the world size -> one `BatchSizes` value.

`data.global_batch_size` and `data.batch_size_per_rank` may each be null; the world size comes from the config
(trainer.devices x trainer.num_nodes) when it says, else from the launcher (torchrun, SLURM, devices=auto).
`resolve_batch_sizes` checks them once -- at compose time when the config fixes the world size, and by the train
job with the launcher's world size -- and returns the value the data modules take. The config itself is never
written back: what the user typed stays what metrics.json records under `config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedscale.config.jobs import TrainConfig


@dataclass(frozen=True)
class BatchSizes:
    global_batch_size: int
    """Queries per optimizer step over all ranks."""
    batch_size_per_rank: int
    """Queries per rank per step (global_batch_size / world_size)."""
    world_size: int
    """Ranks of the run."""


def resolve_batch_sizes(cfg: TrainConfig, world: int) -> BatchSizes:
    """The run's batch sizes over `world` ranks, or a ValueError naming the keys and the fix. Also checks
    GradCache's chunking against the per-rank batch."""
    data, gc, t = cfg.data, cfg.gradcache, cfg.trainer
    ranks = f"{world} rank(s) (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes})"
    if data.batch_size_per_rank is None:
        if data.global_batch_size % world:
            low, high = data.global_batch_size // world * world, -(-data.global_batch_size // world) * world
            raise ValueError(
                f"data.global_batch_size={data.global_batch_size} does not split over {ranks}: "
                f"set data.global_batch_size to a multiple of {world} (e.g. {low or world} or {high})"
            )
        sizes = BatchSizes(data.global_batch_size, data.global_batch_size // world, world)
    elif data.global_batch_size is None:
        sizes = BatchSizes(data.batch_size_per_rank * world, data.batch_size_per_rank, world)
    elif data.global_batch_size != data.batch_size_per_rank * world:
        raise ValueError(
            f"data.global_batch_size={data.global_batch_size} but data.batch_size_per_rank={data.batch_size_per_rank} "
            f"x {ranks} = {data.batch_size_per_rank * world}: set data.batch_size_per_rank=null to derive it "
            "from the global batch, or drop data.global_batch_size"
        )
    else:
        sizes = BatchSizes(data.global_batch_size, data.batch_size_per_rank, world)
    if gc.chunk_size and gc.chunk_size >= sizes.batch_size_per_rank * (1 + data.num_hard_negatives):
        raise ValueError(
            f"gradcache.chunk_size={gc.chunk_size} holds a whole rank's batch (data.batch_size_per_rank="
            f"{sizes.batch_size_per_rank}): GradCache would only add a second forward; lower gradcache.chunk_size "
            "or set it to 0"
        )
    longest = max(cfg.model.query_max_length, cfg.model.document_max_length)
    if gc.token_budget and gc.token_budget < longest:
        raise ValueError(
            f"gradcache.token_budget={gc.token_budget} is below one text of model.document_max_length/"
            f"query_max_length={longest} tokens: raise gradcache.token_budget to at least {longest}"
        )
    return sizes
