"""Collators: a list of `PairExample`s -> the batch a model takes (prefixes, tokenisation, content ids).

`PairCollator` makes the bi-encoder's `PairBatch`; `GroupCollator` the cross-encoder's `GroupBatch` (a query paired
with its positive and negatives). Both are called the same way by every batching engine (in-memory global
batches, the sharded stream), which passes per-example instruction templates where sources set them.
"""

from __future__ import annotations

import torch

from embedscale.config import ModelConfig
from embedscale.data.batch import GroupBatch, Objective, PairBatch, PairExample, TextIds, text_id
from embedscale.encoder.tokenize import tokenize


class PairCollator:
    """Turns a list of examples into a `PairBatch`: applies prefixes, tokenises, computes content ids."""

    def __init__(self, tokenizer, *, model_cfg: ModelConfig, num_hard_negatives: int) -> None:
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.num_hard_negatives = num_hard_negatives

    def _tokenize(self, texts: list[str], prefixes: list[str], max_length: int, side: str) -> dict[str, torch.Tensor]:
        # The same function as encoding at evaluation (EOS, prefix exclusion, multi-vector masks): they cannot diverge.
        return tokenize(self.tokenizer, texts, prefixes=prefixes, max_length=max_length, cfg=self.model_cfg, side=side)

    def __call__(
        self,
        examples: list[PairExample],
        *,
        query_prefix: str | None | list[str | None] = None,
        document_prefix: str | None | list[str | None] = None,
        num_hard_negatives: int | None = None,
        loss: str = "contrastive",
        loss_weight: float = 1.0,
    ) -> PairBatch:
        """Prefixes (the model's, or a source's instruction templates: one for the batch or one per
        example, None meaning the model's), tokenisation, ids; a source's objective (`loss`, `loss_weight`) with
        its targets (scores, teacher embeddings) and hard negatives per row (None: the collator's)."""
        k = self.num_hard_negatives if num_hard_negatives is None else num_hard_negatives
        cfg = self.model_cfg

        def per_example(given, default: str) -> list[str]:
            given = given if isinstance(given, list) else [given] * len(examples)
            return [default if p is None else p for p in given]

        q_prefix = per_example(query_prefix, cfg.query_prefix)
        d_prefix = per_example(document_prefix, cfg.document_prefix)
        negatives = [neg for ex in examples for neg in ex.negatives[:k]]  # (B * k,) row-major
        if len(negatives) != k * len(examples):
            raise ValueError(f"a batch needs {k} negatives per example (data.num_hard_negatives); some have fewer")
        with_teacher = [ex.teacher_scores is not None for ex in examples]
        if any(with_teacher) and not all(with_teacher):
            raise ValueError("a batch mixes samples with and without teacher scores (data.teacher_scores)")
        ids = TextIds(
            query_B=torch.tensor([text_id(ex.query) for ex in examples], dtype=torch.long),
            positive_B=torch.tensor([text_id(ex.positive) for ex in examples], dtype=torch.long),
            negatives_Bk=torch.tensor([text_id(n) for n in negatives], dtype=torch.long).view(len(examples), k)
            if k
            else None,
        )
        return PairBatch(
            objective=_objective(examples, loss, loss_weight),
            queries=self._tokenize([ex.query for ex in examples], q_prefix, cfg.query_max_length, "query"),
            documents=self._tokenize(
                [ex.positive for ex in examples] + negatives,
                d_prefix + [d_prefix[i] for i, ex in enumerate(examples) for _ in ex.negatives[:k]],
                cfg.document_max_length,
                "document",
            ),
            ids=ids,
            num_negatives_per_query=k,
            keys=[ex.key for ex in examples],
            teacher_BG=torch.tensor([ex.teacher_scores[: 1 + k] for ex in examples], dtype=torch.float32)
            if examples and all(with_teacher)
            else None,
        )


def _objective(examples: list[PairExample], loss: str, weight: float) -> Objective:
    """The batch's Objective with the targets its loss needs, checked present in every example (the stream turns a
    sample without them into a counted BadSample first, so a miss here is a caller's bug)."""
    objective = Objective(str(loss), float(weight))
    if loss in ("cosent", "angle"):
        if any(ex.score is None for ex in examples):
            raise ValueError(f"loss={loss} needs a gold score in every sample (a source of scored pairs)")
        objective.scores_B = torch.tensor([float(ex.score) for ex in examples], dtype=torch.float32)
    elif loss in ("mse", "kl"):
        if any(ex.teacher_embeddings is None for ex in examples):
            raise ValueError(f"loss={loss} needs the teacher's query_embedding and positive_embedding in every sample")
        objective.teacher_query_BT = torch.tensor([ex.teacher_embeddings[0] for ex in examples], dtype=torch.float32)
        objective.teacher_positive_BT = torch.tensor([ex.teacher_embeddings[1] for ex in examples], dtype=torch.float32)
    elif loss != "contrastive":
        raise ValueError(f"unknown loss {loss!r}: use contrastive, cosent, angle, mse or kl")
    return objective


class GroupCollator:
    """PairExamples -> `GroupBatch`: the query paired with its positive and first `num_negatives` negatives."""

    def __init__(self, tokenizer, *, num_negatives: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.max_length = max_length

    def check(self, examples: list[PairExample]) -> None:
        """Raise on the first example with fewer than `num_negatives` negatives, naming it and the key."""
        n = self.num_negatives
        for ex in examples:
            if len(ex.negatives) < n:
                raise ValueError(
                    f"sample {ex.key or '?'} has {len(ex.negatives)} negatives < reranker.num_negatives={n}: "
                    "lower reranker.num_negatives or mine more negatives per query"
                )

    def __call__(
        self,
        examples: list[PairExample],
        *,
        query_prefix=None,
        document_prefix=None,
        num_hard_negatives: int | None = None,
        loss: str = "contrastive",
        loss_weight: float = 1.0,
    ) -> GroupBatch:
        # The prefixes, negatives per row and objective are the bi-encoder stream's per-source settings: the
        # re-ranker's groups carry reranker.num_negatives and train listwise, whatever a source says.
        from embedscale.encoder.crossencoder import tokenize_pairs

        if loss != "contrastive":
            raise ValueError(
                f"a source with loss={loss}: the re-ranker trains listwise on groups; data.sources[].loss is the "
                "bi-encoder's (remove it from the re-ranker's sources)"
            )

        self.check(examples)
        n = self.num_negatives
        queries = [ex.query for ex in examples for _ in range(1 + n)]
        documents = [doc for ex in examples for doc in [ex.positive, *ex.negatives[:n]]]
        mask_BG = torch.tensor([[False] + [neg == ex.positive for neg in ex.negatives[:n]] for ex in examples])
        return GroupBatch(
            pairs=tokenize_pairs(self.tokenizer, queries, documents, max_length=self.max_length),
            mask_BG=mask_BG,
            group_size=1 + n,
            keys=[ex.key for ex in examples],
        )
