"""`data.*`: what a training run reads and how it batches it (the global-batch contract, docs/data.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedscale.config.choices import (
    DataFormat,
    OnError,
    PretrainTask,
    ShardFormat,
    SourceLoss,
    TeacherScores,
    Verify,
)
from embedscale.config.fields import bounded, check_fields


@dataclass
class SourceConfig:
    """One source of a sharded mixture (data.format=shards)."""

    path: str = "???"
    """Directory written by `embedscale shard` (holds manifest.json), relative to data.root unless absolute."""
    name: str | None = None
    """Source name in logs and the loader state; default: the manifest's name."""
    weight: float | None = bounded(None, ge=0)
    """Share of global batches drawn from this source; None: (samples) ** data.mixture_alpha."""
    global_batch_size: int | None = bounded(None, ge=1)
    """This source's global batch size; None: the run's (data.global_batch_size). Must split over the ranks."""
    in_batch_negatives: bool = True
    """False: queries of this source see only their own positive and hard negatives (other rows are not
    true negatives here, e.g. sources with many near-duplicate texts)."""
    query_prefix: str | None = None
    """Instruction template prepended to this source's queries at collate time (e.g. "Instruct: Given a claim,
    find evidence\\nQuery: "); None: the model's (model.query_prefix)."""
    document_prefix: str | None = None
    """The same for this source's documents; None: the model's (model.document_prefix)."""
    loss: SourceLoss = SourceLoss.contrastive
    """The objective of this source's global batches (docs/training.md, "Per-source objectives"):
    contrastive: InfoNCE over the gathered batch (the loss.* terms); cosent / angle: scored pairs (query = first
    text, positive = second, each sample's `score`, e.g. STS data sharded with shard.format=sts), the CoSENT
    ranking of every pair of the global batch by cosine (cosent) or by AnglE's angle similarity (angle);
    mse: each text's embedding pulled to the teacher's stored with it (`query_embedding`, `positive_embedding`,
    written by shard.embedding_fields); kl: the student's in-batch softmax over the gathered positives pulled to
    the teacher's (from the same stored embeddings). Needs data.homogeneous_batches; every non-contrastive source
    reads (query, positive) only (no hard negatives)."""
    loss_weight: float = bounded(1.0, gt=0)
    """Multiplies this source's loss (e.g. to balance a CoSENT source against a contrastive one)."""

    def __post_init__(self) -> None:
        check_fields(self, "data.sources[]")


@dataclass
class PretrainConfig:
    """data.format=corpus: (query, positive) pairs made from unlabelled documents, fresh each epoch
    (embedscale/data/pretrain.py). Deterministic from (seed, epoch, document id)."""

    task: PretrainTask = PretrainTask.mixed
    """ict: inverse cloze task (a sentence -> the rest of its document, ORQA); spans: two independent random word
    spans of a document (Contriever's cropping); mixed: each document picks one per epoch with probability 0.5."""
    ict_keep_prob: float = bounded(0.1, ge=0, le=1)
    """ICT: probability that the query sentence is left in its positive (ORQA keeps it 10% of the time, so the
    model also learns that word overlap matters)."""
    span_min_ratio: float = bounded(0.1, gt=0, le=1)
    """spans: each span's length, in words, is uniform in [span_min_ratio, span_max_ratio] x the document's
    word count."""
    span_max_ratio: float = bounded(0.5, gt=0, le=1)
    """spans: the upper end of that range."""
    min_words: int = bounded(16, ge=2)
    """Documents with fewer words are not used (counted and logged)."""
    min_query_words: int = bounded(4, ge=1)
    """ICT picks its query among sentences of at least this many words; spans are at least this long when the
    document allows. A document without such a sentence, or with fewer than 2 sentences, uses spans (counted)."""
    text_field: str = "text"
    """Field of a JSONL corpus file holding the text (a BEIR directory always uses `text`)."""
    title_field: str = "title"
    """Field of a JSONL corpus file holding the title (a BEIR directory always uses `title`); a title is
    prepended to the ICT positive, as ORQA does."""

    def __post_init__(self) -> None:
        check_fields(self, "data.pretrain")
        if not self.span_min_ratio <= self.span_max_ratio <= 1:
            raise ValueError(
                f"data.pretrain.span_max_ratio={self.span_max_ratio}: use a value in "
                f"[data.pretrain.span_min_ratio={self.span_min_ratio}, 1]"
            )
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
    """JSONL field holding the query."""
    positive_field: str = "positive"
    """JSONL field holding the positive document."""
    negatives_field: str = "negatives"
    """JSONL field holding the hard negatives: a string or a list of strings."""
    num_hard_negatives: int = bounded(0, ge=0)
    """Hard negatives per query taken from each sample (k); samples with fewer are an error."""
    batch_size_per_rank: int | None = bounded(32, ge=1)
    """Queries per rank per step. null: derived from global_batch_size / world size."""
    global_batch_size: int | None = bounded(None, ge=1)
    """Queries per optimizer step over all ranks: each query sees global_batch_size - 1 in-batch negatives
    (plus hard negatives). The world size is trainer.devices x trainer.num_nodes. Give this or
    batch_size_per_rank (the other null), or both when they agree; anything else fails at compose time."""
    num_workers: int = bounded(0, ge=0)
    """DataLoader workers (tokenisation happens in them)."""
    shuffle: bool = True
    """Shuffle the examples (in memory) or the shards and samples (data.format=shards) every epoch, seeded."""
    no_duplicates: bool = True
    """Compose each global batch without repeated texts (query, positive or hard negative) where the data
    allows, deferring a colliding example to the next batch; what cannot be avoided is masked by
    loss.mask_duplicates. No example is dropped for being a duplicate."""
    max_samples: int | None = bounded(None, ge=1)
    """Use only the first N samples (smoke tests, debugging)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """data.format=shards: the mixture's sources; empty: one source at data.path."""
    homogeneous_batches: bool = True
    """data.format=shards: each global batch from one source (the same on every rank: in-batch negatives
    of one kind); false: every global batch mixes the sources' rows by weight."""
    mixture_alpha: float = bounded(1.0, ge=0)
    """Weight of a source without an explicit weight: samples ** alpha (1: proportional to size, 0: uniform)."""
    shuffle_window: int = bounded(8, ge=1)
    """data.format=shards: samples are shuffled within windows of this many (shuffled) shards."""
    length_bucket: int = bounded(0, ge=0)
    """data.format=shards: sort runs of this many shuffled samples by size so batches pad little (e.g. 16 x
    the global batch); 0: off. In-batch negatives then share a length range; the order stays exact."""
    steps_per_epoch: int | None = bounded(None, ge=1)
    """data.format=shards: global batches per epoch; None: all samples of all sources // global batch."""
    on_error: str = field(default="raise", metadata={"choices": OnError})
    """data.format=shards, a sample that cannot be read or is invalid (truncated or missing shard, bad JSON
    or UTF-8, empty text, too few negatives): `raise` (names the shard, the sample and the fix) or `skip`
    (its row is refilled with a copy of a good row of the slice, which the loss masks; counted per reason
    in the logs and metrics.json)."""
    verify: Verify = Verify.full
    """data.format=shards: check each source's files against its manifest when it opens -- full: sizes and sha256
    (cached by size and mtime: a dataset is hashed once, not every run), size: sizes only, off: nothing (see
    docs/reliability.md)."""
    max_skipped_fraction: float = bounded(0.001, ge=0, le=1)
    """data.on_error=skip: the run fails once more than this fraction of the dataset's samples were skipped (each
    rank its share); every skip reason is logged once with an example, and counted."""
    teacher_scores: TeacherScores | None = None
    """data.format=shards from `embedscale mine`: distil from the scores stored with each sample's positive and
    negatives -- `cross_encoder` (mined with mine.cross_encoder) or `retriever` (the mining model's); see
    loss.distill_weight. None: no teacher."""
    record_keys: bool = False
    """Write every consumed batch's sample keys to <run_dir>/samples/rank<r>.jsonl (step, source, keys)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """data.format=corpus: how pairs are made from the documents (ICT, spans); ignored by the other formats.
    data.max_samples then limits documents."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.batch_size_per_rank is None and self.global_batch_size is None:
            raise ValueError("data.batch_size_per_rank and data.global_batch_size are both null: set one of them")
        for i, source in enumerate(self.sources):
            if source.loss != SourceLoss.contrastive and not self.homogeneous_batches:
                raise ValueError(
                    f"data.sources[{i}].loss={source.loss.value} needs batches of one source: set "
                    "data.homogeneous_batches=true (a global batch mixing objectives has no single loss)"
                )
        if self.format is DataFormat.corpus and self.num_hard_negatives:
            raise ValueError(
                f"data.format=corpus makes (query, positive) pairs only, but data.num_hard_negatives="
                f"{self.num_hard_negatives}: set data.num_hard_negatives=0"
            )


@dataclass
class ShardConfig:
    """`embedscale shard`: convert inputs into WebDataset tar shards with a manifest (docs/data.md)."""

    inputs: list[str] = field(default_factory=list)
    """Input files (jsonl/tsv/csv, optionally .gz) or directories (beir layout, hf save_to_disk),
    relative to data_root unless absolute; each is converted in parallel with the others."""
    format: ShardFormat = ShardFormat.jsonl
    """jsonl, beir, tsv, csv, hf (a `datasets` save_to_disk directory) or sts (a TSV with sentence1, sentence2,
    score: scored pairs, e.g. STS-B train, for a source with loss cosent or angle)."""
    name: str | None = None
    """Dataset name: shard file prefix, the samples' `source` and key prefix. Default: the first input's stem."""
    output: str | None = None
    """Output directory; None: shards/<name> under the working directory."""
    split: str = "train"
    """qrels split (beir) or DatasetDict split (hf)."""
    query_field: str = "query"
    """Field (jsonl, hf) or column (tsv, csv) holding the query."""
    positive_field: str = "positive"
    """Field or column holding the positive."""
    negatives_field: str = "negatives"
    """Field holding the negatives (jsonl, hf: a string or a list); for tsv/csv, every column whose name starts
    with it."""
    score_field: str | None = None
    """Field or column holding each pair's gold score (a number), written as the sample's `score` (for a source with
    loss cosent or angle); None: no score (shard.format=sts always writes its score column)."""
    embedding_fields: list[str] = field(default_factory=list)
    """jsonl, hf: the two fields holding a teacher's embeddings of the query and of the positive (lists of numbers,
    as the trained model would output them: normalised if it normalises), written as query_embedding and
    positive_embedding (for a source with loss mse or kl); empty: none."""
    target_mb: float = bounded(64.0, ge=0)
    """Close a shard before it exceeds this size (MB = 2**20 bytes). 0: no byte limit."""
    samples_per_shard: int = bounded(0, ge=0)
    """Close a shard at this many samples. 0: no count limit."""
    workers: int = bounded(1, ge=1)
    """Inputs converted in parallel (processes)."""
    overwrite: bool = False
    """Replace an existing output dataset (its manifest's files); otherwise an existing manifest is an error."""

    def __post_init__(self) -> None:
        check_fields(self, "shard")
        if self.target_mb <= 0 and self.samples_per_shard <= 0:
            raise ValueError("shard.target_mb and shard.samples_per_shard are both 0: set a shard size")
        if self.embedding_fields and len(self.embedding_fields) != 2:
            raise ValueError(
                f"shard.embedding_fields={list(self.embedding_fields)}: name two fields, the query's embedding and "
                "the positive's"
            )
        if self.embedding_fields and self.format not in (ShardFormat.jsonl, ShardFormat.hf):
            raise ValueError(
                f"shard.embedding_fields needs shard.format=jsonl or hf (lists of numbers), not {self.format}"
            )
        if self.name is not None and (not self.name or any(c in self.name for c in "./ ")):
            raise ValueError(f"shard.name={self.name!r} must be non-empty without '.', '/' or spaces")
