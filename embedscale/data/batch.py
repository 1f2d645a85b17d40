"""Batch types: the one contract between the data layer and the model.

A `PairExample` is one training sample as read from disk; a `PairBatch` is what the model receives.
Every text carries a stable 63-bit id derived from its content (`text_id`), so the loss can mask
duplicates by identity -- never by embedding similarity, which dropout makes unreliable -- and the
ids can be all-gathered alongside the embeddings in multi-rank training.

Legend: B = queries in the batch, k = hard negatives per query, L = tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


def text_id(text: str) -> int:
    """Stable content id of a text: the first 63 bits of its blake2b digest (fits a signed int64)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class PairExample:
    """One query with its positive document and optional hard negatives."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    key: str = ""
    """Stable sample key (source:line or query-id:doc-id), for provenance and exact resume."""
    teacher_scores: list[float] | None = None
    """Teacher scores of [positive, negatives...] (mined shards; data.teacher_scores), for distillation."""
    score: float | None = None
    """The gold score of a scored pair (STS-style data; a source with loss cosent or angle)."""
    teacher_embeddings: tuple[list[float], list[float]] | None = None
    """A teacher's embeddings of (query, positive), stored in the shards (a source with loss mse or kl)."""


@dataclass
class TextIds:
    """Content ids of a batch's texts, used to mask duplicates in the loss."""

    query_B: torch.Tensor  # (B,) int64
    positive_B: torch.Tensor  # (B,) int64
    negatives_Bk: torch.Tensor | None  # (B, k) int64


@dataclass
class Objective:
    """What a global batch trains: its source's `data.sources[].loss` and `loss_weight`, and that loss's targets
    (contrastive/objectives.py). The same on every rank (homogeneous batches)."""

    loss: str = "contrastive"
    weight: float = 1.0
    scores_B: torch.Tensor | None = None
    """(B,) gold scores (cosent, angle)."""
    teacher_query_BT: torch.Tensor | None = None
    """(B, T) the teacher's query embeddings (mse, kl)."""
    teacher_positive_BT: torch.Tensor | None = None
    """(B, T) the teacher's positive embeddings (mse, kl)."""

    @property
    def contrastive(self) -> bool:
        return self.loss == "contrastive"


@dataclass
class PairBatch:
    """A tokenised batch. `documents` holds the B positives first, then the B*k negatives row by row."""

    queries: dict[str, torch.Tensor]  # input_ids/attention_mask (B, Lq)
    documents: dict[str, torch.Tensor]  # input_ids/attention_mask (B * (1 + k), Ld)
    ids: TextIds
    num_negatives_per_query: int
    keys: list[str]
    source: str = ""
    """The data source of this global batch (streamed data); empty for in-memory data."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad samples of this rank's slice replaced under data.on_error=skip, by reason."""
    skip_notes: dict[str, str] = field(default_factory=dict)
    """For each reason in `skipped`: the first such sample seen (where, what, the fix), for the log."""
    in_batch_negatives: bool = True
    """False: each query is scored against its own positive and hard negatives only (a per-source switch)."""
    teacher_BG: torch.Tensor | None = None
    """(B, 1 + k) teacher scores of each row's positive and hard negatives (data.teacher_scores), or None."""
    objective: Objective = field(default_factory=Objective)
    """The loss this batch trains (its source's data.sources[].loss); contrastive unless a source says otherwise."""

    @property
    def batch_size(self) -> int:
        return int(self.ids.query_B.shape[0])

    @property
    def token_masks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(queries (B, L), documents (B * (1 + k), M)) token masks of a multi-vector batch (1 = scored by MaxSim;
        embedscale/encoder/tokenize.py), or None for a single-vector batch."""
        if "token_mask" not in self.queries:
            return None
        return self.queries["token_mask"], self.documents["token_mask"]


@dataclass
class GroupBatch:
    """A re-ranker's tokenised batch of groups: pair g * G + j is (query g, candidate j); candidate 0 is the
    positive. Legend: B = groups, G = 1 + n candidates per group, L = tokens."""

    pairs: dict[str, torch.Tensor]  # input_ids/attention_mask[/token_type_ids] (B * G, L)
    mask_BG: torch.Tensor  # (B, G) bool: True = negative with the positive's exact text, excluded
    group_size: int
    keys: list[str]
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    """Set by the stream (always empty here: the re-ranker's stream runs with on_error=raise)."""
    skip_notes: dict[str, str] = field(default_factory=dict)
    in_batch_negatives: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.keys)
