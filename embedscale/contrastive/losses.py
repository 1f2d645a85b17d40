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
text as g's positive. The symmetric (document -> query) term masks the same rows, and so do the optional
same-side columns (loss.query_query: s(q_g, q_j); loss.document_document: s(d_g, d_j); j = g always masked).

`distillation_loss` pulls the student's softmax over a query's own candidates towards a teacher's
scores (stored with mined negatives); it is local to a rank's rows.

`listwise_loss` is the cross-encoder's (contrastive/reranker.py): a function of scores, not embeddings,
because a cross-encoder scores each (query, document) pair jointly and there is nothing to gather.

Legend: N = global rows, b = local rows, k = hard negatives per row, D = dim, C = N * (1 + k),
B = groups (queries), G = candidates per group (1 positive + negatives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from embedscale.data.batch import TextIds
from embedscale.encoder.biencoder import truncate


class Temperature(nn.Module):
    """Holds 1/tau: a constant buffer, or a learnable log(1/tau) clamped to 1/tau <= max_inverse.

    log(1/tau) is stored with shape (1,), not as a 0-dim tensor: DeepSpeed broadcasts every parameter at start-up
    as bytes (`p.data.view(torch.uint8)`), which a 0-dim tensor cannot be viewed as. The optimizer's arithmetic is
    elementwise, so the values are the same; forward returns a scalar."""

    def __init__(self, temperature: float, *, learnable: bool = False, max_inverse: float = 100.0) -> None:
        super().__init__()
        self.max_inverse = max_inverse
        log_inv = torch.tensor([math.log(1.0 / temperature)])  # (1,)
        if learnable:
            self.log_inverse = nn.Parameter(log_inv)
        else:
            self.register_buffer("log_inverse", log_inv)

    def forward(self) -> torch.Tensor:
        return self.log_inverse.exp().clamp(max=self.max_inverse)[0]  # scalar 1/tau


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


def own_candidates_mask(rows: slice, N: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (True = excluded) that keep only each row's own positive and own hard negatives: in-batch
    negatives off. Over positives (c, N) and over all candidates (c, N + N * k)."""
    g_c = torch.arange(rows.start, rows.stop, device=device)
    other_cN = torch.arange(N, device=device)[None, :] != g_c[:, None]
    if not k:
        return other_cN, other_cN
    owner_Nk = torch.arange(N, device=device).repeat_interleave(k)  # row that owns each negative column
    return other_cN, torch.cat([other_cN, owner_Nk[None, :] != g_c[:, None]], dim=1)


def _masked_cross_entropy_sum(s_cC: torch.Tensor, labels_c: torch.Tensor, mask_cC: torch.Tensor | None) -> torch.Tensor:
    if mask_cC is not None:
        s_cC = s_cC.masked_fill(mask_cC, float("-inf"))
    return F.cross_entropy(s_cC, labels_c, reduction="sum")


@torch.no_grad()
def _mask_near_positive(
    score_cC: torch.Tensor, labels_c: torch.Tensor, margin: float, mask_cC: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_cC with every candidate but the label scoring above the label's score minus `margin` added, how many
    that added): the guards' shared rule (a decision, no gradient)."""
    label_cC = torch.zeros_like(score_cC, dtype=torch.bool)
    label_cC[torch.arange(len(labels_c)), labels_c] = True
    near_cC = (score_cC > (score_cC[label_cC] - margin)[:, None]) & ~label_cC
    if mask_cC is None:
        return near_cC, near_cC.sum()
    return mask_cC | near_cC, (near_cC & ~mask_cC).sum()


def _rows(
    queries_ND: torch.Tensor,
    positives_ND: torch.Tensor,
    cand_CD: torch.Tensor,
    inverse_temperature: torch.Tensor | float,
    rows: slice,
    ids: TextIds | None,
    symmetric_weight: float,
    in_batch_negatives: bool = True,
    query_query: bool = False,
    document_document: bool = False,
    margin_guard: float | None = None,
    guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    guide_margin: float = 0.0,
    queue: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sums over query rows `rows` (c of them): q->d loss, d->q loss, correct, negatives, positive cosine, and
    the candidates the margin guard and the guide masked.

    guide = (guide queries (N, G), guide candidates (C, G)): a frozen embedder's view of the same texts; every
    q->d candidate but the positive that the guide scores above its score of the positive minus guide_margin is
    masked (GISTEmbed).

    margin_guard masks, for each row, every q->d candidate but its positive whose cosine to the query exceeds the
    positive's minus the margin: a likely unlabelled positive (the rule positive-aware mining applies offline,
    here on the model's own scores of the step; a decision without gradient).

    query_query / document_document add, to each row's q->d softmax, the other queries scored from its query
    (s(q_i, q_j)) / the other positives scored from its positive (s(d_i, d_j)), j != i, masked as the in-batch
    positives are (the same query or positive text): GTE's "improved contrastive loss" terms.

    queue = (embeddings (Q, D), content ids (Q,) or None): earlier steps' documents, constants, added to each row's
    q->d softmax after the batch's candidates; one whose id is the row's positive's is masked."""
    labels_c = torch.arange(rows.start, rows.stop, device=queries_ND.device)
    mask_dq_cN, mask_cC = duplicate_masks(ids, rows) if ids is not None else (None, None)
    if not in_batch_negatives:
        N = positives_ND.shape[0]
        own_dq_cN, own_cC = own_candidates_mask(rows, N, (cand_CD.shape[0] - N) // N, queries_ND.device)
        mask_dq_cN = own_dq_cN if mask_dq_cN is None else mask_dq_cN | own_dq_cN
        mask_cC = own_cC if mask_cC is None else mask_cC | own_cC
    s_cC = queries_ND[rows] @ cand_CD.T * inverse_temperature  # (c, C): the only score block alive
    guarded, guided = s_cC.new_zeros(()), s_cC.new_zeros(())
    if guide is not None:  # the guide's scores of the same candidates
        guide_q_ND, guide_cand_CD = guide
        mask_cC, guided = _mask_near_positive(guide_q_ND[rows] @ guide_cand_CD.T, labels_c, guide_margin, mask_cC)
    if margin_guard is not None:  # the model's own cosines
        mask_cC, guarded = _mask_near_positive(s_cC / inverse_temperature, labels_c, margin_guard, mask_cC)
    guarded, guided = guarded.to(s_cC.dtype), guided.to(s_cC.dtype)
    s_cX, mask_cX = s_cC, mask_cC  # X = C plus the same-side columns (N each) when asked for
    if query_query or document_document:
        N = positives_ND.shape[0]
        self_cN = torch.arange(N, device=queries_ND.device)[None, :] == labels_c[:, None]
        same_cN = self_cN if mask_dq_cN is None else self_cN | mask_dq_cN  # never itself, nor a duplicate
        blocks = [(query_query, queries_ND), (document_document, positives_ND)]
        side_cN = [(side_ND[rows] @ side_ND.T * inverse_temperature, same_cN) for on, side_ND in blocks if on]
        mask_first = mask_cC if mask_cC is not None else torch.zeros_like(s_cC, dtype=torch.bool)
        s_cX = torch.cat([s_cC, *(s for s, _ in side_cN)], dim=1)
        mask_cX = torch.cat([mask_first, *(m for _, m in side_cN)], dim=1)
    if queue is not None and queue[0].shape[0]:
        queue_QD, queue_ids_Q = queue
        s_cQ = queries_ND[rows] @ queue_QD.T * inverse_temperature
        mask_cQ = torch.zeros_like(s_cQ, dtype=torch.bool)
        if ids is not None and queue_ids_Q is not None:
            mask_cQ = queue_ids_Q[None, :] == ids.positive_B[labels_c][:, None]
        mask_first = mask_cX if mask_cX is not None else torch.zeros_like(s_cX, dtype=torch.bool)
        s_cX, mask_cX = torch.cat([s_cX, s_cQ], dim=1), torch.cat([mask_first, mask_cQ], dim=1)
    loss_q2d = _masked_cross_entropy_sum(s_cX, labels_c, mask_cX)
    loss_d2q = torch.zeros_like(loss_q2d)
    if symmetric_weight > 0:
        s_cN = positives_ND[rows] @ queries_ND.T * inverse_temperature  # (c, N): documents -> queries
        loss_d2q = _masked_cross_entropy_sum(s_cN, labels_c, mask_dq_cN)
    with torch.no_grad():  # accuracy over the documents; negatives: every column of the softmax
        masked = mask_cX.sum(1) if mask_cX is not None else torch.zeros_like(labels_c)
        correct = (s_cC.argmax(dim=1) == labels_c).sum().to(s_cC.dtype)
        negatives = (s_cX.shape[1] - 1 - masked).sum().to(s_cC.dtype)
        positive = s_cC[torch.arange(len(labels_c)), labels_c].sum() / inverse_temperature
    return loss_q2d, loss_d2q, correct, negatives, positive, guarded, guided


def info_nce(
    queries_ND: torch.Tensor,
    positives_ND: torch.Tensor,
    negatives_NkD: torch.Tensor | None,
    *,
    inverse_temperature: torch.Tensor | float,
    local: slice,
    ids: TextIds | None = None,
    symmetric_weight: float = 0.0,
    row_chunk_size: int = 0,
    in_batch_negatives: bool = True,
    query_query: bool = False,
    document_document: bool = False,
    margin_guard: float | None = None,
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    guide_margin: float = 0.0,
    queue: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE of the local query rows over every gathered candidate (and the queue's), plus the optional d->q term.

    With `row_chunk_size` < local rows, the rows are scored `row_chunk_size` at a time under activation
    checkpointing: only one (row_chunk_size, C) score block exists at a time, in forward and in
    backward (which recomputes it), instead of (b, C). The result is the same sum, chunk by chunk.
    """
    N, D = positives_ND.shape
    b = local.stop - local.start
    cand_CD = positives_ND if negatives_NkD is None else torch.cat([positives_ND, negatives_NkD.reshape(-1, D)])
    step = row_chunk_size if 0 < row_chunk_size < b else b
    guide_pair = None
    if guide is not None:  # the guide's (queries, candidates) in the candidates' layout
        g_q_NG, g_pos_NG, g_neg_NkG = guide
        g_cand_CG = g_pos_NG if g_neg_NkG is None else torch.cat([g_pos_NG, g_neg_NkG.reshape(-1, g_pos_NG.shape[1])])
        guide_pair = (g_q_NG, g_cand_CG)
    totals = None
    for start in range(local.start, local.stop, step):
        rows = slice(start, min(start + step, local.stop))
        args = (queries_ND, positives_ND, cand_CD, inverse_temperature, rows, ids, symmetric_weight, in_batch_negatives)
        args += (query_query, document_document, margin_guard, guide_pair, guide_margin, queue)
        part = checkpoint(_rows, *args, use_reentrant=False) if step < b else _rows(*args)
        totals = part if totals is None else tuple(t + p for t, p in zip(totals, part, strict=True))
    loss_q2d, loss_d2q, correct, negatives, positive, guarded, guided = (t / b for t in totals)
    loss = loss_q2d + symmetric_weight * loss_d2q if symmetric_weight > 0 else loss_q2d
    metrics = {
        "loss_q2d": loss_q2d.detach(),
        "accuracy": correct,
        "negatives_per_query": negatives,
        "positive_similarity": positive,
    }
    if symmetric_weight > 0:
        metrics["loss_d2q"] = loss_d2q.detach()
    if margin_guard is not None:
        metrics["margin_guard_masked"] = guarded  # candidates per query the guard took out of the softmax
    if guide is not None:
        metrics["guide_masked"] = guided  # candidates per query the guide model took out
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
    row_chunk_size: int = 0,
    in_batch_negatives: bool = True,
    query_query: bool = False,
    document_document: bool = False,
    margin_guard: float | None = None,
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    guide_margin: float = 0.0,
    queue: tuple[torch.Tensor, torch.Tensor | None] | None = None,
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
        row_chunk_size: score at most this many local rows at once (peak score memory chunk x C, not
            b x C); 0 scores all local rows at once. Same loss and gradient either way.
        in_batch_negatives: False scores each query against its own positive and own hard negatives only
            (a source whose other rows are not true negatives, e.g. many near-duplicates).
        query_query, document_document: also put the other in-batch queries (scored from the query) and the
            other in-batch positives (scored from the positive) in each row's softmax, duplicates masked.
        margin_guard: mask every candidate (but the positive) whose cosine to the query exceeds the positive's
            minus this margin; None: off. Logged as margin_guard_masked (candidates per query).
        guide, guide_margin: a frozen guide model's embeddings of the same N rows (queries (N, G), positives
            (N, G), negatives (N, k, G) or None): mask every candidate but the positive that the guide scores
            above its positive's score minus guide_margin (GISTEmbed). Logged as guide_masked.
        queue: (embeddings (Q, D), ids (Q,) or None) of earlier steps' documents, no gradient: more negatives
            for every row (loss.queue_size); a queued copy of a row's positive is masked. Truncated like the
            batch at each Matryoshka dim.
    Returns:
        (loss, metrics): a scalar mean over the local rows, and detached scalar metrics.
    """
    local = local if local is not None else slice(0, queries_ND.shape[0])
    kwargs = dict(
        inverse_temperature=inverse_temperature,
        local=local,
        ids=ids,
        symmetric_weight=symmetric_weight,
        row_chunk_size=row_chunk_size,
        in_batch_negatives=in_batch_negatives,
        query_query=query_query,
        document_document=document_document,
        margin_guard=margin_guard,
        guide=guide,
        guide_margin=guide_margin,
    )
    if not matryoshka_dims:
        loss, metrics = info_nce(queries_ND, positives_ND, negatives_NkD, queue=queue, **kwargs)
        metrics["loss"] = loss.detach()
        return loss, metrics
    weights = list(matryoshka_weights) or [1.0] * len(matryoshka_dims)
    total, metrics = 0.0, {}
    for dim, weight in zip(matryoshka_dims, weights, strict=True):
        loss_m, metrics_m = info_nce(
            truncate(queries_ND, dim, normalize=normalize),
            truncate(positives_ND, dim, normalize=normalize),
            None if negatives_NkD is None else truncate(negatives_NkD, dim, normalize=normalize),
            queue=None if queue is None else (truncate(queue[0], dim, normalize=normalize), queue[1]),
            **kwargs,
        )
        total = total + weight * loss_m
        metrics[f"loss_dim{dim}"] = loss_m.detach()
        if dim == max(matryoshka_dims):  # report accuracy etc. at the largest dim
            metrics.update({k: v for k, v in metrics_m.items() if not k.startswith("loss")})
    metrics["loss"] = total.detach()
    return total, metrics


def listwise_loss(
    scores_BG: torch.Tensor, *, temperature: float = 1.0, mask_BG: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Listwise softmax cross-entropy over each query's group of candidates (the cross-encoder's loss).

    Args:
        scores_BG: scores of B groups of G candidates; column 0 is the positive, columns 1.. its negatives.
        temperature: scores are divided by it before the softmax (1.0: a cross-encoder's raw logits).
        mask_BG: True = candidate excluded (e.g. a negative whose text is the positive's); column 0 must stay False.
    Returns:
        (loss, metrics): the mean over groups of -log softmax(scores / temperature)[0], and detached
        scalars: accuracy (positive strictly above every kept negative), mean positive and negative scores.
    """
    B, G = scores_BG.shape
    if mask_BG is not None:
        assert not mask_BG[:, 0].any(), "the positive (column 0) cannot be masked"
        scores_BG = scores_BG.masked_fill(mask_BG, float("-inf"))
    labels_B = torch.zeros(B, dtype=torch.long, device=scores_BG.device)
    loss = F.cross_entropy(scores_BG / temperature, labels_B)
    with torch.no_grad():
        neg_BG = scores_BG[:, 1:]  # (B, G - 1), -inf where masked
        kept_BG = torch.isfinite(neg_BG)
        correct_B = scores_BG[:, 0] > neg_BG.max(dim=1).values if G > 1 else torch.ones(B, dtype=torch.bool)
        metrics = {
            "loss": loss.detach(),
            "accuracy": correct_B.float().mean(),
            "positive_score": scores_BG[:, 0].mean(),
            "negative_score": neg_BG[kept_BG].mean() if kept_BG.any() else scores_BG.new_tensor(float("nan")),
            "negatives_per_query": kept_BG.sum(dim=1).float().mean(),
        }
    return loss, metrics


def distillation_loss(
    q_bD: torch.Tensor,
    pos_bD: torch.Tensor,
    neg_bkD: torch.Tensor,
    teacher_bG: torch.Tensor,
    *,
    inverse_temperature: torch.Tensor | float,
    teacher_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher || student) over each query's own candidates G = [positive, its k hard negatives].

    The teacher (a cross-encoder's or the mining model's scores, stored by `embedscale mine`) says how
    relevant each candidate is; the student's softmax over the same candidates is pulled towards it, so
    a hard negative the teacher finds half-relevant is pushed away less than one it finds irrelevant.
    Only a row's own candidates have teacher scores, so the term is local: no gather, and a mean over
    the local rows (DDP's gradient average then gives the global mean, like the contrastive term).
    """
    cand_bGD = torch.cat([pos_bD[:, None], neg_bkD], dim=1)  # (b, 1 + k, D)
    s_bG = torch.einsum("bd,bgd->bg", q_bD, cand_bGD) * inverse_temperature
    log_student_bG = s_bG.log_softmax(dim=-1)
    log_teacher_bG = (teacher_bG.to(s_bG.dtype) / teacher_temperature).log_softmax(dim=-1)
    kl_b = (log_teacher_bG.exp() * (log_teacher_bG - log_student_bG)).sum(dim=-1)
    with torch.no_grad():
        agree = (s_bG.argmax(dim=-1) == teacher_bG.argmax(dim=-1)).to(s_bG.dtype).mean()
    return kl_b.mean(), {"distill_kl": kl_b.mean().detach(), "teacher_agreement": agree}
