"""`reranker.*`: the cross-encoder job (train on query groups, re-rank a bi-encoder's top-k; docs/mining.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedscale.config.fields import bounded, check_fields
from embedscale.config.model import PACKAGED_MINILM


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
    num_negatives: int = bounded(7, ge=1)
    """Negatives per group: each query is scored with its positive and the first num_negatives of its negatives
    (listwise cross-entropy over 1 + num_negatives pairs). A sample with fewer is an error."""
    global_batch_size: int = bounded(16, ge=1)
    """Groups (queries) per batch, so per optimizer step unless trainer.accumulate_grad_batches > 1; a batch
    scores global_batch_size x (1 + num_negatives) pairs in one forward."""
    max_length: int = bounded(256, ge=1)
    """Token budget of a (query, document) pair, for training and re-ranking."""
    temperature: float = bounded(1.0, gt=0)
    """Logits are divided by it in the listwise softmax."""
    biencoder: str = PACKAGED_MINILM
    """Bi-encoder whose top-k is re-ranked: HF id / directory, or an embedscale export (restores its settings)."""
    biencoder_runs: list[str] = field(default_factory=list)
    """Instead of searching with reranker.biencoder: run JSONs ({qid: {docid: score}}, as `embedscale evaluate`
    writes under runs/), one per eval.beir set, in the same order."""
    top_k: int = bounded(100, ge=1)
    """Documents re-ranked per query (the bi-encoder's best top_k)."""
    alpha: float = bounded(0.5, ge=0, le=1)
    """Interpolated run: alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder), z-scored per query."""
    batch_size: int = bounded(64, ge=1)
    """Pairs per forward when re-ranking."""

    def __post_init__(self) -> None:
        check_fields(self, "reranker")

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
