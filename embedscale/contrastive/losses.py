"""Contrastive losses as functions of embeddings: `contrastive_loss(...) -> (loss, metrics)`.

Built for the local-loss-over-gathered-candidates design (docs/DESIGN.md): the function receives the
candidates of the *whole global batch* (all ranks' queries, positives and hard negatives, gathered
column by column) and scores only this rank's query rows, given by `local = slice(offset, offset+b)`.
Labels are `offset + i`. On one process `local` is every row and this is plain InfoNCE; the next
layer up only has to gather and pass the slice -- the maths here does not change.

Candidate layout for query row i: [positives (N) | negatives of row 0 (k) | ... | row N-1 (k)].

Duplicate masking (by content ids, never by embedding similarity): for query g, a positive column j
!= g is masked when it is the same text as g's positive or belongs to a row whose query is the same
text as g's query (then it is a correct answer too); a hard negative is masked when it is the same
text as g's positive. The symmetric (document -> query) term masks the same rows.

Legend: N = global rows, b = local rows, k = hard negatives per row, D = dim, C = N * (1 + k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedscale.data.batch import TextIds
from embedscale.encoder.biencoder import truncate


class Temperature(nn.Module):
    """Holds 1/tau: a constant buffer, or a learnable log(1/tau) clamped to 1/tau <= max_inverse."""

    def __init__(self, temperature: float, *, learnable: bool = False, max_inverse: float = 100.0) -> None:
        super().__init__()
        self.max_inverse = max_inverse
        log_inv = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_inverse = nn.Parameter(log_inv)
        else:
            self.register_buffer("log_inverse", log_inv)

    def forward(self) -> torch.Tensor:
        return self.log_inverse.exp().clamp(max=self.max_inverse)  # scalar 1/tau


def duplicate_masks(ids: TextIds, local: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (True = not a negative) of the local rows over positives (b, N) and over all candidates (b, C)."""
    g_b = torch.arange(local.start, local.stop, device=ids.query_B.device)
    b = g_b.shape[0]
    same_pos_bN = ids.positive_B[None, :] == ids.positive_B[g_b][:, None]
    same_query_bN = ids.query_B[None, :] == ids.query_B[g_b][:, None]
    dup_bN = same_pos_bN | same_query_bN
    dup_bN[torch.arange(b), g_b] = False  # the label itself stays
    if ids.negatives_Bk is None:
        return dup_bN, dup_bN
    dup_neg_bNk = ids.negatives_Bk.reshape(1, -1) == ids.positive_B[g_b][:, None]  # (b, N*k)
    return dup_bN, torch.cat([dup_bN, dup_neg_bNk], dim=1)


def _masked_cross_entropy(s_bC: torch.Tensor, labels_b: torch.Tensor, mask_bC: torch.Tensor | None) -> torch.Tensor:
    if mask_bC is not None:
        s_bC = s_bC.masked_fill(mask_bC, float("-inf"))
    return F.cross_entropy(s_bC, labels_b)


def info_nce(
    queries_ND: torch.Tensor,
    positives_ND: torch.Tensor,
    negatives_NkD: torch.Tensor | None,
    *,
    inverse_temperature: torch.Tensor | float,
    local: slice,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    symmetric_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE of the local query rows over every gathered candidate, plus the optional d->q term."""
    N, D = positives_ND.shape
    q_bD = queries_ND[local]
    labels_b = torch.arange(local.start, local.stop, device=q_bD.device)
    cand_CD = positives_ND if negatives_NkD is None else torch.cat([positives_ND, negatives_NkD.reshape(-1, D)])
    s_bC = q_bD @ cand_CD.T * inverse_temperature  # (b, C)
    mask_dq_bN, mask_bC = masks if masks is not None else (None, None)
    loss_q2d = _masked_cross_entropy(s_bC, labels_b, mask_bC)
    loss = loss_q2d
    with torch.no_grad():
        masked = mask_bC.sum(1) if mask_bC is not None else torch.zeros_like(labels_b)
        metrics = {
            "loss_q2d": loss_q2d.detach(),
            "accuracy": (s_bC.argmax(dim=1) == labels_b).float().mean(),
            "negatives_per_query": (cand_CD.shape[0] - 1 - masked).float().mean(),
            "positive_similarity": s_bC[torch.arange(len(labels_b)), labels_b].mean() / inverse_temperature,
        }
    if symmetric_weight > 0:
        s_bN = positives_ND[local] @ queries_ND.T * inverse_temperature  # (b, N): documents -> queries
        loss_d2q = _masked_cross_entropy(s_bN, labels_b, mask_dq_bN)
        loss = loss + symmetric_weight * loss_d2q
        metrics["loss_d2q"] = loss_d2q.detach()
    return loss, metrics


def contrastive_loss(
    queries_ND: torch.Tensor,
    positives_ND: torch.Tensor,
    negatives_NkD: torch.Tensor | None = None,
    *,
    inverse_temperature: torch.Tensor | float,
    ids: TextIds | None = None,
    local: slice | None = None,
    symmetric_weight: float = 0.0,
    matryoshka_dims: Sequence[int] = (),
    matryoshka_weights: Sequence[float] = (),
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE with in-batch + hard negatives, duplicate masking, symmetric term and Matryoshka dims.

    Args:
        queries_ND, positives_ND: embeddings of every row of the global batch (N, D).
        negatives_NkD: hard negatives (N, k, D) or None.
        inverse_temperature: 1/tau, a float or a scalar tensor (learnable temperature).
        ids: content ids of the N rows for duplicate masking; None masks nothing.
        local: the rows whose queries this call scores (this rank's); None = all rows.
        symmetric_weight: weight of the document -> query term (0 = off).
        matryoshka_dims: if given, the loss is the weighted sum over these prefix dims.
        normalize: re-normalise Matryoshka prefixes (set when the model normalises).
    Returns:
        (loss, metrics): a scalar mean over the local rows, and detached scalar metrics.
    """
    local = local if local is not None else slice(0, queries_ND.shape[0])
    masks = duplicate_masks(ids, local) if ids is not None else None
    kwargs = dict(inverse_temperature=inverse_temperature, local=local, masks=masks, symmetric_weight=symmetric_weight)
    if not matryoshka_dims:
        loss, metrics = info_nce(queries_ND, positives_ND, negatives_NkD, **kwargs)
        metrics["loss"] = loss.detach()
        return loss, metrics
    weights = list(matryoshka_weights) or [1.0] * len(matryoshka_dims)
    total, metrics = 0.0, {}
    for dim, weight in zip(matryoshka_dims, weights, strict=True):
        loss_m, metrics_m = info_nce(
            truncate(queries_ND, dim, normalize=normalize),
            truncate(positives_ND, dim, normalize=normalize),
            None if negatives_NkD is None else truncate(negatives_NkD, dim, normalize=normalize),
            **kwargs,
        )
        total = total + weight * loss_m
        metrics[f"loss_dim{dim}"] = loss_m.detach()
        if dim == max(matryoshka_dims):  # report accuracy etc. at the largest dim
            metrics.update({k: v for k, v in metrics_m.items() if not k.startswith("loss")})
    metrics["loss"] = total.detach()
    return total, metrics
