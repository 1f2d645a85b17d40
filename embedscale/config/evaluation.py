"""`eval.*`: the BEIR and STS sets a model is measured on, during training and by `embedscale evaluate`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

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

    @property
    def metric_name(self) -> str:
        """The prefix of this set's metrics: eval.beir[i].name, else the directory's name."""
        return self.name or PurePath(self.path).name


@dataclass
class StsSet:
    path: str = "stsb/test.tsv"
    """TSV with sentence1, sentence2, score columns, relative to the data root unless absolute."""
    name: str | None = None
    """Metric prefix; None uses the file's directory name (stsb for stsb/test.tsv)."""
    query_prefix: str | None = None
    """Instruction prepended to both sentences instead of model.query_prefix; None: the model's."""

    @property
    def metric_name(self) -> str:
        """The prefix of this set's metric: eval.sts[i].name, else the file's directory name."""
        return self.name or PurePath(self.path).parent.name


@dataclass
class PairsSet:
    path: str = "medquad/pairs.jsonl.gz"
    """A JSONL file (gzipped or not) of {"query", "positive"} pairs, relative to the data root unless absolute,
    evaluated as retrieval: each sampled pair's query against the positives of all sampled pairs (the corpus); a
    query relevant to every sampled positive it was paired with. For held-out pairs of a domain without BEIR files
    (e.g. MedQuAD, as a general set next to a domain set: docs/domain.md)."""
    name: str | None = None
    """Metric prefix; None uses the file's directory name (medquad for medquad/pairs.jsonl.gz)."""
    max_pairs: int = bounded(2000, ge=0)
    """Pairs sampled from the file (uniformly, seeded by eval.pairs[i].seed); 0 takes all. The corpus is their
    distinct positives, so the task gets harder as it grows."""
    seed: int = bounded(0, ge=0)
    """Seed of the sample (the same pairs for every model evaluated)."""
    query_prefix: str | None = None
    """This set's query instruction instead of model.query_prefix; None: the model's."""

    @property
    def metric_name(self) -> str:
        """The prefix of this set's metrics: eval.pairs[i].name, else the file's directory name."""
        return self.name or PurePath(self.path).parent.name


@dataclass
class EvalConfig:
    beir: list[BeirSet] = field(default_factory=lambda: [BeirSet()])
    """Retrieval sets (NDCG, recall, MRR, MAP at eval.k_values, exact search)."""
    pairs: list[PairsSet] = field(default_factory=list)
    """Retrieval sets built from (query, positive) pairs files (the BEIR metrics, exact search)."""
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
    selection: list[str] = field(default_factory=list)
    """Metrics averaged into one selection score, logged as eval/selection, which then selects the best evaluation
    instead of eval.primary_metric: a domain metric next to general ones (e.g. [scifact/ndcg@10, stsb/spearman,
    medquad/ndcg@10]), so that the best checkpoint and early stopping favour gaining on the domain without
    forgetting the rest (docs/domain.md). Each is <set>/<metric> of a set of eval.beir, eval.pairs or eval.sts
    (the set's name, else its directory's): ndcg, recall, map or mrr @ one of eval.k_values for retrieval sets,
    spearman for STS."""
    early_stopping_patience: int = bounded(0, ge=0)
    """Stop training after this many evaluations in a row (eval.every_n_steps) without a new best selection score
    (eval.selection, else the primary metric); 0 never stops early. With eval.export_best the best weights are
    still the ones exported."""
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
        self._check_selection()
        if self.early_stopping_patience and not self.every_n_steps:
            raise ValueError(
                "eval.early_stopping_patience needs evaluations during training: set eval.every_n_steps > 0"
            )

    def _check_selection(self) -> None:
        beir = {s.metric_name for s in [*self.beir, *self.pairs]}
        sts = {s.metric_name for s in self.sts}
        for key in self.selection:
            name, _, metric = key.rpartition("/")
            if name in sts and metric == "spearman":
                continue
            if name in beir:
                match = re.fullmatch(r"(ndcg|recall|map|mrr)@(\d+)", metric)
                if match and int(match[2]) in self.k_values:
                    continue
            sets = ", ".join(sorted(beir | sts)) or "none"
            raise ValueError(
                f"eval.selection: {key!r} is not a metric of this evaluation: use <set>/<metric> with a set of "
                f"eval.beir, eval.pairs or eval.sts ({sets}) and ndcg|recall|map|mrr@k (k in eval.k_values = "
                f"{list(self.k_values)}) for retrieval sets, spearman for STS"
            )
