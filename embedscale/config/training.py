"""The sections of a training run besides model and data: `loss.*`, `optim.*`, `trainer.*`, `gradcache.*`,
`logger.*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedscale.config.choices import (
    Accelerator,
    LoggerName,
    Precision,
    Progress,
    Scheduler,
    Strategy,
    TriState,
    WandbMode,
    coerce_choices,
)


@dataclass
class LossConfig:
    temperature: float = 0.05
    """Softmax temperature tau (scores are cosine / tau); 0.05 equals sentence-transformers' scale 20."""
    learnable_temperature: bool = False
    """Learn log(1/tau), clamped to 1/tau <= max_inverse_temperature."""
    max_inverse_temperature: float = 100.0
    """Upper bound of 1/tau (the learnable temperature is clamped there; a fixed one must not exceed it)."""
    symmetric_weight: float = 0.0
    """Weight of the document -> query term; 0 disables it."""
    mask_duplicates: bool = True
    """Never count as a negative a candidate with the same text as the query's positive, or the positive
    of a row whose query is the same text."""
    distill_weight: float = 0.0
    """Weight of the distillation term: KL(teacher || student) over each query's own [positive, hard negatives]
    (teacher scores from data.teacher_scores, softmax at distill_temperature; student at loss.temperature)."""
    distill_temperature: float = 1.0
    """Temperature of the teacher's softmax (cross-encoder logits: ~1; cosine scores: ~0.05)."""
    row_chunk_size: int = 1024
    """Score at most this many of a rank's query rows at once (checkpointed): peak score memory is
    row_chunk_size x global candidates instead of local x global. 0 scores all local rows at once."""

    def __post_init__(self) -> None:
        if self.row_chunk_size < 0:
            raise ValueError(f"loss.row_chunk_size must be >= 0 (0 = no chunking), got {self.row_chunk_size}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if 1.0 / self.temperature > self.max_inverse_temperature:
            raise ValueError(
                f"loss.temperature={self.temperature} is below 1/loss.max_inverse_temperature="
                f"{1 / self.max_inverse_temperature:g}: raise one of them"
            )
        if self.symmetric_weight < 0:
            raise ValueError(f"loss.symmetric_weight must be >= 0, got {self.symmetric_weight}")
        if self.distill_weight < 0 or not self.distill_temperature > 0:
            raise ValueError("loss.distill_weight must be >= 0 and loss.distill_temperature > 0")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    """Peak learning rate of AdamW (reached after the warmup)."""
    weight_decay: float = 0.01
    """Applied to matrices only; biases, norm weights and the temperature get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    scheduler: Scheduler = Scheduler.linear
    """Learning-rate schedule after the warmup: linear (to 0), cosine (to 0) or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent warming up linearly from 0 (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps; None: derived from optim.warmup_ratio (rounded up, as transformers)."""
    temperature_lr: float | None = None
    """Learning rate of the learnable temperature; None uses optim.lr."""

    def __post_init__(self) -> None:
        coerce_choices(self, "optim")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {list(self.betas)}")


@dataclass
class TrainerConfig:
    max_epochs: int = 3
    """Stop after this many epochs (unless trainer.max_steps stops first)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run max_epochs)."""
    accelerator: Accelerator = Accelerator.auto
    """auto (a GPU when there is one), cpu, gpu or cuda."""
    devices: Any = 1
    """Processes per node: a number, a list of device ids, or auto (every GPU; 1 on CPU)."""
    strategy: Strategy = Strategy.auto
    """How ranks share the work (embedscale/strategy/): auto (Lightning's pick: one device, or ddp), ddp, ddp_spawn,
    fsdp2 (FSDP2 sharding on all ranks) or deepspeed (DeepSpeed ZeRO, trainer.zero_stage; needs
    `pip install embedscale[deepspeed]`)."""
    zero_stage: int = 2
    """deepspeed only: 2 shards gradients and optimizer states over the ranks, 3 also the weights (each layer is
    all-gathered for its forward and again for its backward)."""
    offload_optimizer: bool = False
    """deepspeed only: keep the fp32 master weights and AdamW states in CPU memory and step there (torch AdamW)."""
    offload_params: bool = False
    """deepspeed with trainer.zero_stage=3 only: keep the weight shards in CPU memory between uses."""
    reshard_after_forward: bool = True
    """fsdp2 only. True frees each layer's gathered parameters after its forward and re-gathers them for the
    backward: with GradCache that is one extra parameter all-gather per chunk per pass. False keeps them gathered
    from the forward to the backward (GradCache: between the embedding pass and the chunk backward passes):
    faster, more memory (a full copy of the gathered layers)."""
    num_nodes: int = 1
    """Nodes of the run (SLURM: $SLURM_NNODES); the world size is trainer.devices x trainer.num_nodes."""
    precision: str = field(default="32-true", metadata={"choices": Precision})
    """32-true, bf16-mixed (autocast, GPUs and recent CPUs), 16-mixed (GPUs), bf16-true or 64-true."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient's global L2 norm to this value before each optimizer step; None or 0: no clipping."""
    accumulate_grad_batches: int = 1
    """Enlarges the optimizer batch, not the negatives each query sees (see docs/training.md)."""
    log_every_n_steps: int = 10
    """Log the training curves every N optimizer steps; also the interval of trainer.progress=lines."""
    num_threads: int | None = None
    """torch.set_num_threads per process; None keeps torch's default."""
    progress: Progress = Progress.auto
    """How training shows its progress: bar (a live progress bar), lines (a plain line every
    trainer.log_every_n_steps steps or trainer.progress_every_seconds seconds: step/total, epoch, loss, lr, pairs/s,
    tokens/s, ETA, peak memory; readable in SLURM output files and `> train.log`), off, or auto: bar when stdout
    and stderr are terminals, lines otherwise."""
    progress_every_seconds: float = 60.0
    """trainer.progress=lines: also print a line when this many seconds passed since the last one."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (Lightning's `deterministic`; slower on GPUs)."""
    checkpoint_every_n_steps: int | None = None
    """Also write checkpoints/last.ckpt every N optimizer steps (mid-epoch), not only at epoch ends."""
    resume: str | None = None
    """Resume from a Lightning checkpoint: a path, or `last` for <run_dir>/checkpoints/last.ckpt (when it
    exists; a fresh start otherwise). Model, optimizer, scheduler and the data stream's cursor are restored."""
    requeue_on_signal: str = field(default="auto", metadata={"choices": TriState})
    """On SIGUSR1 (`#SBATCH --signal=USR1@90`): checkpoint to checkpoints/last.ckpt at the next step boundary,
    `scontrol requeue` the job and exit; run with trainer.resume=last to continue exactly. auto: when running
    as a SLURM batch job (Lightning's own auto-requeue is then off); true: always; false: never."""

    def world_size(self) -> int | None:
        """Processes the run will have, when the config alone says so (None for devices=auto/-1 on GPUs)."""
        devices = self.devices
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        if not isinstance(devices, str) and hasattr(devices, "__len__"):  # a list of device ids (also ListConfig)
            return len(devices) * self.num_nodes
        if isinstance(devices, int) and devices > 0:
            return devices * self.num_nodes
        if devices == "auto" and self.accelerator == Accelerator.cpu:
            return self.num_nodes
        return None

    def __post_init__(self) -> None:
        coerce_choices(self, "trainer")
        if self.accumulate_grad_batches < 1:
            raise ValueError("trainer.accumulate_grad_batches must be >= 1")
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if not self.progress_every_seconds > 0:
            raise ValueError(f"trainer.progress_every_seconds must be > 0, got {self.progress_every_seconds}")
        self._check_deepspeed()

    def _check_deepspeed(self) -> None:
        if self.strategy != Strategy.deepspeed:
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ValueError(
                        f"trainer.{key}=true needs trainer.strategy=deepspeed (got {self.strategy}): use "
                        "trainer=deepspeed_zero2 / deepspeed_zero3 or drop the key"
                    )
            return
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "trainer.strategy=deepspeed needs DeepSpeed, which is not installed: pip install embedscale[deepspeed] "
                "(or pip install deepspeed)"
            )
        if self.zero_stage not in (2, 3):
            raise ValueError(
                f"trainer.zero_stage={self.zero_stage!r}: use 2 (gradients + optimizer states) or 3 (+ weights)"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                "trainer.offload_params=true needs trainer.zero_stage=3 (only ZeRO-3 shards the weights): set "
                "trainer.zero_stage=3 or trainer.offload_params=false"
            )
        if self.precision in (Precision.double, Precision.full_short):
            raise ValueError(
                f"trainer.precision={self.precision} with trainer.strategy=deepspeed: use 32-true, bf16-mixed, "
                "bf16-true or 16-mixed"
            )


@dataclass
class GradCacheConfig:
    chunk_size: int = 0
    """At most this many rows encoded at once with GradCache (queries and documents chunked separately).
    GradCache is on when chunk_size or token_budget is > 0. The gradient is exact either way; GradCache
    trades a second forward for activation memory (one chunk's instead of the batch's)."""
    token_budget: int = 0
    """At most this many padded tokens (rows x the chunk's longest text) per chunk; texts are sorted by
    length first. On variable-length data this keeps activation memory flat and padding low."""
    sort_by_length: bool = True
    """Group texts of similar length into the same chunk (longest first): less padding, same gradient."""

    @property
    def enabled(self) -> bool:
        """The one place that decides whether GradCache is on."""
        return self.chunk_size > 0 or self.token_budget > 0

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"gradcache.chunk_size must be >= 0 (0 = off), got {self.chunk_size}")
        if self.token_budget < 0:
            raise ValueError(f"gradcache.token_budget must be >= 0 (0 = chunk by rows), got {self.token_budget}")


@dataclass
class LoggerConfig:
    loggers: list[LoggerName] = field(default_factory=lambda: [LoggerName.csv, LoggerName.tensorboard])
    """Any of csv, tensorboard, wandb; [] logs nothing."""
    project: str = "embedscale"
    """The wandb project."""
    wandb_mode: WandbMode | None = None
    """online, offline or disabled; None leaves it to $WANDB_MODE (wandb fails at once when online without a key)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "logger")
