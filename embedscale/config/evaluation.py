"""`eval.*`: the BEIR and STS sets a model is measured on, during training and by `embedscale evaluate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedscale.config.choices import MissingDocuments
from embedscale.config.fields import bounded, check_fields


@dataclass
class BeirSet:
    path: str = "scifact"
    """BEIR-layout directory, relative to the data root unless absolute."""
    split: str = "test"
    """qrels split evaluated (qrels/<split>.tsv)."""
    name: str | None = None
    """Metric prefix; None uses the directory name."""
    query_prefix: str | None = None
    """This task's query instruction (e.g. "Instruct: Given a scientific claim, retrieve documents that
    support or refute it\\nQuery: "), used instead of the model's model.query_prefix; None: the model's.
    Documents always take the model's document prefix (their cached embeddings stay valid)."""


@dataclass
class StsSet:
    path: str = "stsb/test.tsv"
    """TSV with sentence1, sentence2, score columns, relative to the data root unless absolute."""
    name: str | None = None
    """Metric prefix; None uses the file's directory name (stsb for stsb/test.tsv)."""
    query_prefix: str | None = None
    """Instruction prepended to both sentences instead of model.query_prefix; None: the model's."""


@dataclass
class EvalConfig:
    beir: list[BeirSet] = field(default_factory=lambda: [BeirSet()])
    """Retrieval sets (NDCG, recall, MRR, MAP at eval.k_values, exact search)."""
    sts: list[StsSet] = field(default_factory=list)
    """Sentence-similarity sets (Spearman correlation of cosine scores with the gold scores)."""
    k_values: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 100])
    """Cutoffs of the retrieval metrics."""
    batch_size: int = bounded(64, ge=1)
    """Texts per encoding batch at evaluation."""
    max_length: int | None = bounded(None, ge=1)
    """Token budget at evaluation; None uses model.document_max_length (the model's own length)."""
    before_training: bool = True
    """Evaluate the initial model before the first step (the 'before' column)."""
    every_n_steps: int = bounded(0, ge=0)
    """Also evaluate every N optimizer steps; 0 evaluates only before and after training."""
    cache_dir: str | None = None
    """Embedding cache keyed by model weights and corpus hash; None uses $EMBEDSCALE_CACHE or ~/.cache/embedscale."""
    primary_metric: str = "ndcg@10"
    """Selects the best evaluation during training (of the first eval.beir set, or the first eval.sts set's
    `spearman`); each new best is saved to checkpoints/best.ckpt and recorded in metrics.json (`best`)."""
    export_best: bool = False
    """Export the best evaluated weights (checkpoints/best.ckpt) instead of the final ones."""
    missing_documents: str = field(default="raise", metadata={"choices": MissingDocuments})
    """qrels that judge a document the corpus lacks: raise (an error naming the file and the ids) or warn (logged
    with the count; the judgments stay, as trec_eval counts them: such a document can never be retrieved)."""
    save_runs: bool = True
    """Write each BEIR set's ranked run (top max(k_values) per query) under <run_dir>/runs/."""
    maxsim_candidates: int = bounded(0, ge=0)
    """model.multivector: 0 scores every document by exact MaxSim; n > 0 first gathers candidates -- each query
    token's n nearest document token vectors (exact inner product over the corpus's token vectors, faiss) -- and
    re-scores only their documents by exact MaxSim (ColBERT's end-to-end retrieval), for corpora too large to score
    whole. Each query's candidates are reported as <set>/maxsim_candidates_per_query."""

    def __post_init__(self) -> None:
        check_fields(self, "eval")
        if not self.k_values or min(self.k_values) < 1:
            raise ValueError(f"eval.k_values must be positive cutoffs, got {list(self.k_values)}")
