"""Late-interaction (ColBERT-style MaxSim) contrastive losses as functions of token embeddings.

Each text is a matrix of L2-normalised token vectors with a mask (True = a real token). Query i scores
document j by MaxSim: the sum over i's unmasked tokens l of the max over j's unmasked tokens m of q_il . d_jm.
`maxsim_loss` is losses.info_nce with MaxSim in place of the dot product: the same local-rows-over-gathered-
candidates design (docs/DESIGN.md), candidate layout [positives (N) | negatives row-major (N * k)], labels
`local.start + i`, duplicate masking by ids and in-batch negatives off through the same mask helpers.

Why it is built this way: the score of one (query, document) pair needs all L x M token products, so the dense
score tensor is (b, L, C, M), not (b, C): too big to hold at once for any useful batch. Three things bound it:
  - documents are scored `doc_chunk_size` at a time, and the products block is reduced (max over M) as soon as it
    is made; `max(dim)` saves only its argmax indices for backward, never the products (tests check this), so a
    block is transient in forward and rebuilt from the saved indices in backward;
  - query rows are scored `row_chunk_size` at a time under activation checkpointing (as info_nce does), so even
    the (rows, L, C) argmax indices exist for one row chunk only, during that chunk's recompute in backward;
  - positives and negatives are scored as two blocks and their scores concatenated, so they may be padded to
    different lengths and no (C, M, D) copy of the candidates is made.
A text with no unmasked token raises ValueError rather than scoring 0 or -inf: -inf makes the loss inf/NaN, and
0 would make a broken text a plausible candidate that trains silently on garbage; an empty mask is a data or
collate bug (a real text always keeps [CLS] or its marker token), so we stop and say which row.

Scale: a MaxSim score is a sum of up to L cosines, so an inverse temperature that suits a single cosine is up to
L times too sharp on it. `normalize=True` divides each score by its query's number of unmasked tokens first (a mean
best-match cosine in [-1, 1]; loss.maxsim_normalize), so that the bi-encoder's temperatures keep their meaning; a
query's scores are all divided by the same number, so its ranking of documents does not change.

Legend: N = global rows, b = local rows, k = hard negatives per row, L = query tokens, M = document tokens (may
differ between positives and negatives), D = dim, C = N * (1 + k) candidates, c = rows scored at once,
X = documents scored at once, G = 1 + k (a row's own candidates).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from embedscale.contrastive.losses import _masked_cross_entropy_sum, duplicate_masks, own_candidates_mask
from embedscale.data.batch import TextIds


def _check_nonempty(**masks: torch.Tensor | None) -> None:
    """Raise ValueError naming the first text whose mask keeps no token (one host sync for all masks)."""
    named = [(name, mask) for name, mask in masks.items() if mask is not None]
    empty = [~mask.any(dim=-1) for _, mask in named]
    flags = torch.stack([e.any() for e in empty]).tolist()
    for (name, _), e, flag in zip(named, empty, flags, strict=True):
        if flag:
            where = tuple(e.nonzero()[0].tolist())
            raise ValueError(
                f"maxsim: {int(e.sum())} {name} text(s) have no unmasked token (first at index {where}); every "
                "text's mask must keep at least one token (e.g. [CLS] or the marker token): check the collate step"
            )


def _max_sum(prod_cLXM: torch.Tensor, q_mask_cL: torch.Tensor) -> torch.Tensor:
    """(c, X) MaxSim from a block of token products whose masked document tokens are already -inf."""
    best_cLX = prod_cLXM.max(dim=-1).values  # .max saves only the argmax (c, L, X); amax would save the block
    return best_cLX.masked_fill(~q_mask_cL[:, :, None], 0.0).sum(dim=1)  # masked query tokens add 0


def _maxsim(
    q_cLD: torch.Tensor, q_mask_cL: torch.Tensor, d_XMD: torch.Tensor, d_mask_XM: torch.Tensor, doc_chunk_size: int
) -> torch.Tensor:
    """maxsim_scores without the checks (the loss checks its inputs once, not per row chunk)."""
    c, L, D = q_cLD.shape
    X, M, _ = d_XMD.shape
    step = doc_chunk_size if 0 < doc_chunk_size < X else max(X, 1)
    blocks = []
    # one split, not a slice per chunk: a slice's backward writes a zero-filled gradient of all X documents per chunk
    for d_xMD, d_mask_xM in zip(d_XMD.split(step), d_mask_XM.split(step), strict=True):
        x = d_xMD.shape[0]
        prod = q_cLD.reshape(c * L, D) @ d_xMD.reshape(x * M, D).T  # (c * L, x * M): the transient block
        prod.masked_fill_(~d_mask_xM.reshape(1, x * M), float("-inf"))  # a masked document token never wins the max
        blocks.append(_max_sum(prod.view(c, L, x, M), q_mask_cL))
    return torch.cat(blocks, dim=1) if len(blocks) != 1 else blocks[0]


def maxsim_scores(
    q_cLD: torch.Tensor,
    q_mask_cL: torch.Tensor,
    d_XMD: torch.Tensor,
    d_mask_XM: torch.Tensor,
    *,
    doc_chunk_size: int = 0,
) -> torch.Tensor:
    """MaxSim of c queries against X documents.

    Memory: at most one (c, L, doc_chunk_size, M) products block exists at a time in forward (two in backward: the
    max's gradient scattered into the block, then its masked copy). Autograd keeps only the inputs (a contiguous
    copy of one that is not contiguous), the masks and the argmax indices (c, L, X), never the (c, L, X, M) products.

    Args:
        q_cLD, q_mask_cL: query token embeddings and their mask (True = a real token; bool or 0/1).
        d_XMD, d_mask_XM: document token embeddings and their mask.
        doc_chunk_size: score at most this many documents at once; 0 scores all X at once. Same result.
    Returns:
        s_cX: s[i, j] = sum over unmasked l of max over unmasked m of q_il . d_jm. Masked query tokens add 0.
    Raises:
        ValueError: a query or document whose mask keeps no token.
    """
    q_mask_cL, d_mask_XM = q_mask_cL.bool(), d_mask_XM.bool()
    _check_nonempty(query=q_mask_cL, document=d_mask_XM)
    return _maxsim(q_cLD, q_mask_cL, d_XMD, d_mask_XM, doc_chunk_size)


def _rows(
    q_NLD: torch.Tensor,
    q_mask_NL: torch.Tensor,
    pos_NMD: torch.Tensor,
    pos_mask_NM: torch.Tensor,
    neg_KMD: torch.Tensor | None,
    neg_mask_KM: torch.Tensor | None,
    inverse_temperature: torch.Tensor | float,
    rows: slice,
    ids: TextIds | None,
    in_batch_negatives: bool,
    doc_chunk_size: int,
    normalize: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sums over query rows `rows` (c of them) of: loss, correct, negatives, positive score per query token.
    K = N * k negatives, row-major."""
    N = pos_NMD.shape[0]
    k = 0 if neg_KMD is None else neg_KMD.shape[0] // N
    labels_c = torch.arange(rows.start, rows.stop, device=q_NLD.device)
    mask_cC = duplicate_masks(ids, rows)[1] if ids is not None else None
    if not in_batch_negatives:
        own_cC = own_candidates_mask(rows, N, k, q_NLD.device)[1]
        mask_cC = own_cC if mask_cC is None else mask_cC | own_cC
    q_cLD, q_mask_cL = q_NLD[rows], q_mask_NL[rows]
    raw_cC = _maxsim(q_cLD, q_mask_cL, pos_NMD, pos_mask_NM, doc_chunk_size)  # (c, N)
    if neg_KMD is not None:
        raw_cC = torch.cat([raw_cC, _maxsim(q_cLD, q_mask_cL, neg_KMD, neg_mask_KM, doc_chunk_size)], dim=1)
    scale_c1 = q_mask_cL.sum(dim=1, keepdim=True).to(raw_cC.dtype) if normalize else raw_cC.new_ones((1, 1))
    s_cC = raw_cC / scale_c1 * inverse_temperature
    loss = _masked_cross_entropy_sum(s_cC, labels_c, mask_cC)
    with torch.no_grad():  # as info_nce: accuracy by argmax over all C, negatives = columns left in the softmax
        masked = mask_cC.sum(1) if mask_cC is not None else torch.zeros_like(labels_c)
        correct = (s_cC.argmax(dim=1) == labels_c).sum().to(s_cC.dtype)
        negatives = (s_cC.shape[1] - 1 - masked).sum().to(s_cC.dtype)
        label_c = raw_cC[torch.arange(len(labels_c)), labels_c]
        positive = (label_c / q_mask_cL.sum(dim=1)).sum()
    return loss, correct, negatives, positive


def maxsim_loss(
    q_NLD: torch.Tensor,
    q_mask_NL: torch.Tensor,
    pos_NMD: torch.Tensor,
    pos_mask_NM: torch.Tensor,
    neg_NkMD: torch.Tensor | None,
    neg_mask_NkM: torch.Tensor | None,
    *,
    inverse_temperature: torch.Tensor | float,
    local: slice,
    ids: TextIds | None = None,
    row_chunk_size: int = 0,
    doc_chunk_size: int = 0,
    in_batch_negatives: bool = True,
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE of the local query rows over every gathered candidate, scored by MaxSim.

    Peak memory of the scores: row_chunk x doc_chunk x L x M x (bytes per element) transient (one such block in
    forward, two in backward), plus, during one row chunk's recompute in backward, its saved argmax indices
    (row_chunk, L, C) in int64 and its (row_chunk, C) scores; then the gradients of the inputs themselves, and one
    document block's gradient (N or N * k, M, D) in transit: a row chunk's backward returns a whole block's gradient
    before autograd adds it to the total (bench/late_interaction.py measures this bound). row_chunk_size = 0 keeps
    the (b, L, C) indices from forward to backward instead (no recompute); doc_chunk_size = 0 makes the block
    (chunk, L, N or N * k, M). The loss and gradients are the same either way.

    Args:
        q_NLD, q_mask_NL: query token embeddings of the global batch and their mask (True = a real token).
            Only rows `local` are scored (there is no document -> query term); every row's mask is checked.
        pos_NMD, pos_mask_NM: the N positives (gathered) and their mask.
        neg_NkMD, neg_mask_NkM: the hard negatives (gathered) and their mask, or None (k = 0); their M may differ
            from the positives'.
        inverse_temperature: 1/tau, a float or a scalar tensor (learnable temperature).
        local: the rows whose queries this call scores (this rank's); labels are local.start + i.
        ids: content ids of the N rows for duplicate masking (losses.duplicate_masks); None masks nothing.
        row_chunk_size: score at most this many local rows at once, each chunk under activation checkpointing;
            0 scores all local rows at once.
        doc_chunk_size: score at most this many documents at once (see maxsim_scores); 0: all at once.
        in_batch_negatives: False scores each query against its own positive and own hard negatives only.
        normalize: divide each MaxSim by the query's number of unmasked tokens before the temperature.
    Returns:
        (loss, metrics): the mean over the local rows, and detached scalars: loss; accuracy (the label is the
        argmax over all C candidates, masks not applied, as info_nce); negatives_per_query (candidates left in
        the softmax but the label); positive_score (the label's raw MaxSim, before temperature, divided by the
        query's number of unmasked tokens: a mean best-match cosine in [-1, 1]).
    Raises:
        ValueError: a query, positive or negative whose mask keeps no token.
    """
    b = local.stop - local.start
    q_mask_NL, pos_mask_NM = q_mask_NL.bool(), pos_mask_NM.bool()
    neg_KMD = neg_mask_KM = None
    if neg_NkMD is not None:
        assert neg_mask_NkM is not None, "hard negatives need their mask"
        neg_mask_NkM = neg_mask_NkM.bool()
        neg_KMD = neg_NkMD.reshape(-1, *neg_NkMD.shape[2:])  # (N * k, M, D), row-major as the candidate layout
        neg_mask_KM = neg_mask_NkM.reshape(neg_KMD.shape[:2])
    # every row's mask, not only the local ones: the gathered masks are the same on every rank, so all ranks raise
    # together instead of one raising while the others wait in the next collective
    _check_nonempty(query=q_mask_NL, positive=pos_mask_NM, negative=neg_mask_NkM)
    step = row_chunk_size if 0 < row_chunk_size < b else b
    totals = None
    for start in range(local.start, local.stop, step):
        rows = slice(start, min(start + step, local.stop))
        args = (q_NLD, q_mask_NL, pos_NMD, pos_mask_NM, neg_KMD, neg_mask_KM, inverse_temperature, rows, ids)
        args += (in_batch_negatives, doc_chunk_size, normalize)
        part = checkpoint(_rows, *args, use_reentrant=False) if step < b else _rows(*args)
        totals = part if totals is None else tuple(t + p for t, p in zip(totals, part, strict=True))
    loss, correct, negatives, positive = (t / b for t in totals)
    metrics = {
        "loss": loss.detach(),
        "accuracy": correct,
        "negatives_per_query": negatives,
        "positive_score": positive,
    }
    return loss, metrics


def maxsim_distillation_loss(
    q_bLD: torch.Tensor,
    q_mask_bL: torch.Tensor,
    pos_bMD: torch.Tensor,
    pos_mask_bM: torch.Tensor,
    neg_bkMD: torch.Tensor,
    neg_mask_bkM: torch.Tensor,
    teacher_bG: torch.Tensor,
    *,
    inverse_temperature: torch.Tensor | float,
    teacher_temperature: float = 1.0,
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher || student) over each local query's own candidates G = [positive, its k hard negatives].

    losses.distillation_loss with MaxSim scores: the student's softmax over MaxSim * inverse_temperature is pulled
    towards the softmax of teacher / teacher_temperature. Only a row's own candidates are scored, so the products
    are (b, L, G, M) and the term is local: no gather, a mean over the local rows.

    Args:
        q_bLD, q_mask_bL: the local queries' token embeddings and mask (True = a real token).
        pos_bMD, pos_mask_bM: their positives; neg_bkMD, neg_mask_bkM: their k hard negatives.
        teacher_bG: the teacher's scores of [positive, negatives] per row.
        inverse_temperature: the student's 1/tau; teacher_temperature: divides the teacher's scores.
        normalize: divide the student's MaxSim by the query's number of unmasked tokens first (as maxsim_loss).
    Returns:
        (loss, metrics): the mean KL over rows, and detached distill_kl and teacher_agreement (the fraction of
        rows whose student and teacher argmax agree).
    Raises:
        ValueError: a query or candidate whose mask keeps no token.
    """
    b, L, D = q_bLD.shape
    q_mask_bL, pos_mask_bM, neg_mask_bkM = q_mask_bL.bool(), pos_mask_bM.bool(), neg_mask_bkM.bool()
    _check_nonempty(query=q_mask_bL, positive=pos_mask_bM, negative=neg_mask_bkM)
    blocks = []
    for d_bGMD, d_mask_bGM in ((pos_bMD[:, None], pos_mask_bM[:, None]), (neg_bkMD, neg_mask_bkM)):
        _, G, M, _ = d_bGMD.shape
        prod = torch.bmm(q_bLD, d_bGMD.reshape(b, G * M, D).transpose(1, 2))  # (b, L, G * M)
        prod.masked_fill_(~d_mask_bGM.reshape(b, 1, G * M), float("-inf"))
        blocks.append(_max_sum(prod.view(b, L, G, M), q_mask_bL))
    raw_bG = torch.cat(blocks, dim=1)  # (b, 1 + k)
    scale_b1 = q_mask_bL.sum(dim=1, keepdim=True).to(raw_bG.dtype) if normalize else raw_bG.new_ones((1, 1))
    s_bG = raw_bG / scale_b1 * inverse_temperature
    log_student_bG = s_bG.log_softmax(dim=-1)
    log_teacher_bG = (teacher_bG.to(s_bG.dtype) / teacher_temperature).log_softmax(dim=-1)
    kl_b = (log_teacher_bG.exp() * (log_teacher_bG - log_student_bG)).sum(dim=-1)
    with torch.no_grad():
        agree = (s_bG.argmax(dim=-1) == teacher_bG.argmax(dim=-1)).to(s_bG.dtype).mean()
    return kl_b.mean(), {"distill_kl": kl_b.mean().detach(), "teacher_agreement": agree}
