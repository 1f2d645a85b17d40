"""The objectives a source of a mixture may declare instead of InfoNCE (`data.sources[].loss`), as functions of
embeddings returning (loss, metrics), like contrastive/losses.py.

- `cosent_loss`: scored pairs (STS-style data). For every two pairs (i, j) of the *global* batch whose gold scores
  order i above j, the model's similarity of i should exceed j's: log(1 + sum over such (i, j) of
  exp(scale (s_j - s_i))) (CoSENT, Su 2022). `s` is the cosine (cosent) or AnglE's angle similarity
  (`angle_similarity`, Li & Li 2023), which keeps a gradient where the cosine saturates.
- `embedding_mse_loss`: each text's embedding pulled to a teacher's embedding of it (stored in the shards).
- `embedding_kl_loss`: each local query's softmax over every gathered positive pulled to the teacher's softmax
  over the same texts, from the teacher's stored embeddings (in-batch distillation).

Exactness across ranks (docs/DESIGN.md's local loss): the module gathers (with gradient) what a term needs. CoSENT's
loss is one log-sum-exp over all pairs of the global batch, not a sum over rows, so every rank computes the same
value from the gathered similarities (N scalars); autograd through the gather then gives each rank W times its share
of the gradient, which the strategy's average over W ranks turns into the one-process gradient. The score matrix is
built `row_chunk_size` rows at a time under checkpointing: peak (row_chunk_size, N), never (N, N). The MSE term is a
mean over local rows (no gather); the KL term scores the local rows against the gathered positives.

Legend: N = global rows (pairs), b = local rows, D = student dim, T = teacher dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def angle_similarity(x_BD: torch.Tensor, y_BD: torch.Tensor) -> torch.Tensor:
    """AnglE's similarity of row pairs: each vector read as D/2 complex numbers z = a + ib (a its first half, b its
    second), |sum_k Re(z_k conj(w_k)) + Im(z_k conj(w_k))| / (|z| |w|), i.e. the real plus the imaginary part of the
    normalised complex quotient z / w summed over dimensions, in absolute value. (B,)"""
    D = x_BD.shape[-1]
    if D % 2:
        raise ValueError(f"loss=angle reads an embedding as D/2 complex numbers: the dimension {D} must be even")
    a_BH, b_BH = x_BD.chunk(2, dim=-1)
    c_BH, d_BH = y_BD.chunk(2, dim=-1)
    real_B = (a_BH * c_BH + b_BH * d_BH).sum(-1)
    imag_B = (b_BH * c_BH - a_BH * d_BH).sum(-1)
    return (real_B + imag_B).abs() / (x_BD.norm(dim=-1) * y_BD.norm(dim=-1)).clamp_min(1e-12)


def _ranking_lse(sim_N: torch.Tensor, scores_N: torch.Tensor, rows: slice, scale: float) -> torch.Tensor:
    """log sum_j exp(scale (s_j - s_i)) over the pairs j the gold scores rank below i, for each row i of `rows`
    (-inf where there is none). (c,)"""
    diff_cN = (sim_N[None, :] - sim_N[rows, None]) * scale
    below_cN = scores_N[rows, None] > scores_N[None, :]
    return diff_cN.masked_fill(~below_cN, float("-inf")).logsumexp(dim=1)


def cosent_loss(
    sim_N: torch.Tensor, scores_N: torch.Tensor, *, scale: float = 20.0, row_chunk_size: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoSENT over the N pairs of the global batch.

    Args:
        sim_N: the model's similarity of each pair (cosine, or `angle_similarity`), gathered over ranks.
        scores_N: the gold scores (only their order matters; ties give no term).
        scale: lambda (loss.cosent_scale).
        row_chunk_size: build the (rows, N) difference matrix this many rows at a time (checkpointed); 0: at once.
    Returns:
        (loss, metrics): log(1 + sum exp(scale (s_j - s_i))) over the ordered pairs (0 when the batch's scores are
        all equal), and detached metrics: ordered pairs per row, the Pearson correlation of similarity and gold
        score in the batch, the mean similarity.
    """
    N = sim_N.shape[0]
    scores_N = scores_N.to(sim_N.dtype)
    step = row_chunk_size if 0 < row_chunk_size < N else N
    parts = []
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        args = (sim_N, scores_N, rows, scale)
        parts.append(checkpoint(_ranking_lse, *args, use_reentrant=False) if step < N else _ranking_lse(*args))
    lse_N = torch.cat(parts)
    loss = torch.cat([lse_N, sim_N.new_zeros(1)]).logsumexp(dim=0)  # the 1 + ...: exp(0)
    with torch.no_grad():
        ranked = (scores_N[:, None] > scores_N[None, :]).sum() / N
        s, y = sim_N - sim_N.mean(), scores_N - scores_N.mean()
        pearson = (s * y).sum() / (s.norm() * y.norm()).clamp_min(1e-12)
    metrics = {"ranked_pairs_per_row": ranked.to(sim_N.dtype), "score_pearson": pearson}
    return loss, {**metrics, "pair_similarity": sim_N.mean().detach()}


def embedding_mse_loss(
    q_bD: torch.Tensor, pos_bD: torch.Tensor, teacher_q_bD: torch.Tensor, teacher_pos_bD: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error of the student's embeddings of both texts to the teacher's, averaged over the local rows,
    both texts and the dimensions (the strategy's average over ranks makes it the global mean)."""
    if teacher_q_bD.shape[-1] != q_bD.shape[-1]:
        raise ValueError(
            f"loss=mse: the stored teacher embeddings have {teacher_q_bD.shape[-1]} dimensions, the model's "
            f"{q_bD.shape[-1]}: store embeddings of the model's dimension (or use loss=kl, which compares scores)"
        )
    mse_q = F.mse_loss(q_bD, teacher_q_bD.to(q_bD.dtype))
    mse_pos = F.mse_loss(pos_bD, teacher_pos_bD.to(pos_bD.dtype))
    loss = (mse_q + mse_pos) / 2
    return loss, {"mse_query": mse_q.detach(), "mse_positive": mse_pos.detach()}


def embedding_kl_loss(
    q_ND: torch.Tensor,
    pos_ND: torch.Tensor,
    teacher_q_NT: torch.Tensor,
    teacher_pos_NT: torch.Tensor,
    *,
    local: slice,
    inverse_temperature: torch.Tensor | float,
    teacher_temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher || student) of each local query's softmax over all N gathered positives, mean over local rows.

    The student scores q_i . d_j x 1/tau (its embeddings as the contrastive loss scores them); the teacher scores
    the cosine of its stored embeddings / teacher_temperature. No gradient flows to the teacher's embeddings."""
    s_bN = q_ND[local] @ pos_ND.T * inverse_temperature
    t_q = F.normalize(teacher_q_NT[local].to(s_bN.dtype), dim=-1)
    t_bN = t_q @ F.normalize(teacher_pos_NT.to(s_bN.dtype), dim=-1).T / teacher_temperature
    log_student_bN, log_teacher_bN = s_bN.log_softmax(dim=-1), t_bN.log_softmax(dim=-1)
    kl_b = (log_teacher_bN.exp() * (log_teacher_bN - log_student_bN)).sum(dim=-1)
    with torch.no_grad():
        agree = (s_bN.argmax(dim=-1) == t_bN.argmax(dim=-1)).to(s_bN.dtype).mean()
    return kl_b.mean(), {"embedding_kl": kl_b.mean().detach(), "teacher_agreement": agree}
