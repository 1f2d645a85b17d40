"""The sections of a training run besides model and data: `loss.*`, `optim.*`, `trainer.*`, `gradcache.*`,
`logger.*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedscale.config.choices import (
    Accelerator,
    HostAllocator,
    LoggerName,
    Precision,
    Progress,
    Scheduler,
    Strategy,
    TriState,
    WandbMode,
)
from embedscale.config.fields import bounded, check_fields


@dataclass
class LossConfig:
    temperature: float = bounded(0.05, gt=0)
    """Softmax temperature tau (scores are cosine / tau); 0.05 equals sentence-transformers' scale 20."""
    learnable_temperature: bool = False
    """Learn log(1/tau), clamped to 1/tau <= max_inverse_temperature."""
    max_inverse_temperature: float = bounded(100.0, gt=0, le=1e4)
    """Upper bound of 1/tau (the learnable temperature is clamped there; a fixed one must not exceed it); at most
    1e4 (scores of cosine x 1e4 already saturate float32's softmax)."""
    symmetric_weight: float = bounded(0.0, ge=0)
    """Weight of the document -> query term; 0 disables it."""
    mask_duplicates: bool = True
    """Never count as a negative a candidate with the same text as the query's positive, or the positive
    of a row whose query is the same text."""
    query_query: bool = False
    """Also put the other in-batch queries, scored against the query (q->q), in each query's softmax as negatives
    (GTE's improved contrastive loss); a query of the same text, or whose positive is the same text, is masked."""
    document_document: bool = False
    """Also put the other in-batch positives, scored against this row's positive (d->d), in its softmax as
    negatives, masked as query_query is."""
    margin_guard: float | None = bounded(None, ge=0, le=2)
    """In-batch false-negative guard on the model's own scores: mask every candidate (but the positive) whose
    cosine to the query is above the positive's minus this margin (0: only those above the positive); null: off.
    Logged per step as train/margin_guard_masked (candidates per query)."""
    guide_model: str | None = None
    """In-batch false-negative guard by a frozen guide embedder (GISTEmbed): a path or hub name, loaded with this
    run's model.* settings and tokenizer (it must tokenize as the trained model does; e.g. the starting
    checkpoint). A candidate the guide scores above its score of the positive minus guide_margin is masked; logged
    as train/guide_masked. Computed once per step under GradCache (no gradient); never trained or exported."""
    guide_margin: float = bounded(0.0, ge=0, le=2)
    """Margin of the guide rule (0: mask what the guide scores above the positive)."""
    distill_weight: float = bounded(0.0, ge=0)
    """Weight of the distillation term: KL(teacher || student) over each query's own [positive, hard negatives]
    (teacher scores from data.teacher_scores, softmax at distill_temperature; student at loss.temperature)."""
    distill_temperature: float = bounded(1.0, gt=0)
    """Temperature of the teacher's softmax (cross-encoder logits: ~1; cosine scores: ~0.05)."""
    cosent_scale: float = bounded(20.0, gt=0)
    """CoSENT / AnglE sources (data.sources[].loss): the scale lambda of log(1 + sum exp(lambda (s_j - s_i))) over
    the pairs (i, j) of the global batch whose gold scores order i above j (20, as the CoSENT and AnglE papers)."""
    embedding_teacher_temperature: float = bounded(0.05, gt=0)
    """kl sources: temperature of the teacher's in-batch softmax over its stored embeddings' cosines."""
    maxsim_normalize: bool = True
    """model.multivector: divide each MaxSim score by its query's number of scored tokens before the temperature
    (a mean best-match cosine in [-1, 1]), so loss.temperature means what it means for one cosine; a query's
    ranking does not change. false: raw sums (ColBERTv2 trains raw sums at temperature 1, which with 32-token
    queries equals true at loss.temperature=1/32)."""
    maxsim_row_chunk_size: int = bounded(32, ge=1)
    """model.multivector: score at most this many of a rank's query rows at once (checkpointed)."""
    maxsim_doc_chunk_size: int = bounded(128, ge=1)
    """model.multivector: and each such row chunk against at most this many candidate documents at once. Peak score
    memory: maxsim_row_chunk_size x maxsim_doc_chunk_size x query tokens x document tokens x 4 bytes (32 x 128 x
    32 x 256 x 4 B = 128 MiB), plus the row chunk's argmax indices over all candidates (32 x C x 32 x 8 B);
    never the full local x global x tokens x tokens tensor (docs/late_interaction.md)."""
    row_chunk_size: int = bounded(1024, ge=0)
    """Score at most this many of a rank's query rows at once (checkpointed): peak score memory is
    row_chunk_size x global candidates instead of local x global. 0 scores all local rows at once."""
    queue_size: int = bounded(0, ge=0)
    """Negatives beyond one step (MoCo / ContAccum style): keep the last queue_size gathered documents (positives
    and hard negatives) of earlier contrastive steps, detached, and add them to every query's softmax as negatives
    (a queued copy of the row's own positive text masked; in-batch negatives off leaves them out). Every rank
    holds the same queue (it is built from gathered embeddings: no extra communication) and it is checkpointed.
    Queued embeddings come from earlier weights and carry no gradient: the loss is no longer a function of this
    batch alone, but stays the same for any world size and GradCache chunking (docs/training.md). 0: off."""

    def __post_init__(self) -> None:
        check_fields(self, "loss")
        if 1.0 / self.temperature > self.max_inverse_temperature:
            raise ValueError(
                f"loss.temperature={self.temperature} is below 1/loss.max_inverse_temperature="
                f"{1 / self.max_inverse_temperature:g}: raise one of them"
            )


@dataclass
class OptimConfig:
    lr: float = bounded(2e-5, gt=0, le=1)
    """Peak learning rate of AdamW (reached after the warmup); at most 1 (AdamW moves each weight by up to lr per
    step: fine-tuning uses 1e-6 to 1e-3)."""
    weight_decay: float = bounded(0.01, ge=0)
    """Applied to matrices only; biases, norm weights and the temperature get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    eps: float = bounded(1e-8, gt=0)
    """AdamW's epsilon."""
    scheduler: Scheduler = Scheduler.linear
    """Learning-rate schedule after the warmup: linear (to 0), cosine (to 0) or constant."""
    warmup_ratio: float = bounded(0.1, ge=0, lt=1)
    """Fraction of the optimizer steps spent warming up linearly from 0 (ignored when warmup_steps is set)."""
    warmup_steps: int | None = bounded(None, ge=0)
    """Warmup length in optimizer steps; None: derived from optim.warmup_ratio (rounded up, as transformers)."""
    temperature_lr: float | None = bounded(None, gt=0, le=1)
    """Learning rate of the learnable temperature; None uses optim.lr."""

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if len(self.betas) != 2 or any(not 0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas needs two values in [0, 1), got {list(self.betas)}")
        if self.lr * self.weight_decay >= 1:  # AdamW's decoupled decay: w <- w * (1 - lr * weight_decay) per step
            raise ValueError(
                f"optim.weight_decay={self.weight_decay} with optim.lr={self.lr}: AdamW multiplies every weight by "
                f"1 - lr x weight_decay = {1 - self.lr * self.weight_decay:.3g} at each step; keep lr x weight_decay "
                "< 1 (usual weight decay: 0.01 to 0.1)"
            )


@dataclass
class AnchorConfig:
    l2_sp_weight: float = bounded(0.0, ge=0)
    """L2-SP towards the starting weights, decoupled as AdamW's weight decay: after each optimizer step every trained
    weight moves lr x l2_sp_weight of the way back to its starting value (lr: that step's learning rate). 0: off.
    lr x l2_sp_weight is the fraction pulled back per step, so with lr 1e-4 useful weights are 10 to 1,000. Keeps a
    copy of the starting trainable weights in memory (embedscale/contrastive/anchor.py; docs/domain.md)."""
    interpolation: float = bounded(1.0, ge=0, le=1)
    """WiSE-FT: when training ends, before the final evaluation and the export, the weights become start +
    interpolation x (trained - start); 1 keeps the trained weights, 0 is the starting model. Evaluations during
    training see the trained weights."""

    def __post_init__(self) -> None:
        check_fields(self, "anchor")


@dataclass
class TrainerConfig:
    max_epochs: int = bounded(3, ge=-1)
    """Stop after this many epochs (unless trainer.max_steps stops first)."""
    max_steps: int = bounded(-1, ge=-1)
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
    num_nodes: int = bounded(1, ge=1)
    """Nodes of the run (SLURM: $SLURM_NNODES); the world size is trainer.devices x trainer.num_nodes."""
    precision: str = field(default="32-true", metadata={"choices": Precision})
    """32-true, bf16-mixed (autocast, GPUs and recent CPUs), 16-mixed (GPUs), bf16-true or 64-true."""
    gradient_clip_val: float | None = bounded(1.0, ge=0)
    """Clip the gradient's global L2 norm to this value before each optimizer step; None or 0: no clipping."""
    accumulate_grad_batches: int = bounded(1, ge=1)
    """Enlarges the optimizer batch, not the negatives each query sees (see docs/training.md)."""
    log_every_n_steps: int = bounded(10, ge=1)
    """Log the training curves every N optimizer steps; also the interval of trainer.progress=lines."""
    num_threads: int | None = bounded(None, ge=1)
    """torch.set_num_threads per process; None keeps torch's default."""
    host_allocator: HostAllocator = HostAllocator.lean
    """How the process's host (CPU) memory is handed back (glibc only; embedscale/runtime.py, docs/large-batch.md).
    lean: blocks of 1 MiB and more go back to the OS when freed, so the resident set follows the live tensors, and
    each new block is faulted in and zeroed again; reuse: freed memory stays in the process for the next step (almost
    no page faults after the first step, so CPU training steps are faster; the resident set keeps its high-water mark
    and the heap's fragmentation, so it is larger: both measured in docs/large-batch.md, "The host allocator"); glibc:
    leave malloc as it is. GPU tensors are not affected.
    MALLOC_MMAP_THRESHOLD_ in the environment wins, and EMBEDSCALE_MALLOC=default means glibc."""
    progress: Progress = Progress.auto
    """How training shows its progress: bar (a live progress bar), lines (a plain line every
    trainer.log_every_n_steps steps or trainer.progress_every_seconds seconds: step/total, epoch, loss, lr, pairs/s,
    tokens/s, ETA, peak memory; readable in SLURM output files and `> train.log`), off, or auto: bar when stdout
    and stderr are terminals, lines otherwise."""
    progress_every_seconds: float = bounded(60.0, gt=0)
    """trainer.progress=lines: also print a line when this many seconds passed since the last one."""
    skip_nonfinite_steps: int = bounded(0, ge=0)
    """Skip up to this many optimizer steps whose loss or gradient norm is NaN or infinite (counted and named in
    metrics.json under train.nonfinite); the next one stops the run. 0: the first one stops it, with an error naming
    the step, the last finite loss, the learning rate and what to change (contrastive/guard.py)."""
    nonfinite_check: bool = True
    """Check every optimizer step's loss and gradient norm for NaN/inf on every rank (one small all-reduce per step;
    bench/nonfinite_cost.py measures it). Turning it off lets a diverging run train on and export NaN weights."""
    collective_timeout: float = bounded(1800.0, gt=0, le=604800)
    """Seconds a rank waits in a collective (all-gather, all-reduce, barrier) before the run stops with an error
    naming the rank that stopped responding (a stalled rank, not a dead one: a dead rank ends the job at once).
    torch's default is the same 1800 s; lower it to learn sooner. At most a week (604800)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (Lightning's `deterministic`; slower on GPUs)."""
    checkpoint_every_n_steps: int | None = bounded(None, ge=1)
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
        check_fields(self, "trainer")
        for key in ("max_epochs", "max_steps"):
            if getattr(self, key) == 0:
                raise ValueError(
                    f"trainer.{key}=0 trains nothing (and would export the untrained model): use -1 or >= 1"
                )
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
    chunk_size: int = bounded(0, ge=0)
    """At most this many rows encoded at once with GradCache (queries and documents chunked separately).
    GradCache is on when chunk_size or token_budget is > 0. The gradient is exact either way; GradCache
    trades a second forward for activation memory (one chunk's instead of the batch's)."""
    token_budget: int = bounded(0, ge=0)
    """At most this many padded tokens (rows x the chunk's longest text) per chunk; texts are sorted by
    length first. On variable-length data this keeps activation memory flat and padding low."""
    sort_by_length: bool = True
    """Group texts of similar length into the same chunk (longest first): less padding, same gradient."""

    @property
    def enabled(self) -> bool:
        """The one place that decides whether GradCache is on."""
        return self.chunk_size > 0 or self.token_budget > 0

    def __post_init__(self) -> None:
        check_fields(self, "gradcache")


@dataclass
class LoggerConfig:
    loggers: list[LoggerName] = field(default_factory=lambda: [LoggerName.csv, LoggerName.tensorboard])
    """Any of csv, tensorboard, wandb; [] logs nothing."""
    project: str = "embedscale"
    """The wandb project."""
    wandb_mode: WandbMode | None = None
    """online, offline or disabled; None leaves it to $WANDB_MODE (wandb fails at once when online without a key)."""

    def __post_init__(self) -> None:
        check_fields(self, "logger")
