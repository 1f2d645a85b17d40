"""The contrastive loss equals a naive per-query Python loop: hard negatives, duplicate masking,
symmetric term, Matryoshka, rank offsets, and the learnable temperature's gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedscale.contrastive.losses import Temperature, contrastive_loss
from embedscale.data.batch import TextIds

TOL = 1e-6


def naive_loss(q, p, n, qid, pid, nid, *, inv_tau, rows, symmetric_weight=0.0, mask=True):
    """Per-query loop over explicit candidate lists; scores built one dot product at a time."""
    N = p.shape[0]
    k = 0 if n is None else n.shape[1]
    total = 0.0
    for g in rows:
        cands = []  # (score, is_label)
        for j in range(N):
            dup = j != g and (pid[j] == pid[g] or qid[j] == qid[g])
            if mask and dup:
                continue
            cands.append(((q[g] * p[j]).sum() * inv_tau, j == g))
        for j in range(N):
            for m in range(k):
                if mask and nid[j][m] == pid[g]:
                    continue
                cands.append(((q[g] * n[j, m]).sum() * inv_tau, False))
        logz = torch.logsumexp(torch.stack([s for s, _ in cands]), 0)
        pos = [s for s, is_label in cands if is_label][0]
        term = logz - pos
        if symmetric_weight:
            sc = []
            for j in range(N):
                if mask and j != g and (pid[j] == pid[g] or qid[j] == qid[g]):
                    continue
                sc.append(((p[g] * q[j]).sum() * inv_tau, j == g))
            logz2 = torch.logsumexp(torch.stack([s for s, _ in sc]), 0)
            term = term + symmetric_weight * (logz2 - [s for s, lab in sc if lab][0])
        total = total + term
    return total / len(rows)


def make_batch(N=8, k=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(N, k, D, generator=g, dtype=torch.float64), dim=-1) if k else None
    qid = list(range(100, 100 + N))
    pid = list(range(200, 200 + N))
    nid = [[300 + j * k + m for m in range(k)] for j in range(N)]
    # duplicates: rows 1 and 5 share a positive text; rows 2 and 6 share a query text;
    # row 3's first hard negative is row 0's positive text; row 7's positive is row 4's negative.
    pid[5] = pid[1]
    qid[6] = qid[2]
    if k:
        nid[3][0] = pid[0]
        nid[4][1] = pid[7]
    ids = TextIds(torch.tensor(qid), torch.tensor(pid), torch.tensor(nid).view(N, k) if k else None)
    return q, p, n, qid, pid, nid, ids


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("symmetric_weight", [0.0, 0.7])
@pytest.mark.parametrize("local", [None, slice(0, 4), slice(4, 8)])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("row_chunk_size", [0, 3])
def test_loss_equals_naive_loop(k, symmetric_weight, local, mask, row_chunk_size):
    q, p, n, qid, pid, nid, ids = make_batch(k=k)
    inv_tau = 20.0
    loss, metrics = contrastive_loss(
        q,
        p,
        n,
        inverse_temperature=inv_tau,
        ids=ids if mask else None,
        local=local,
        symmetric_weight=symmetric_weight,
        row_chunk_size=row_chunk_size,
    )
    rows = range(8) if local is None else range(local.start, local.stop)
    ref = naive_loss(q, p, n, qid, pid, nid, inv_tau=inv_tau, rows=rows, symmetric_weight=symmetric_weight, mask=mask)
    assert abs(loss.item() - ref.item()) <= TOL
    assert metrics["loss"].item() == pytest.approx(loss.item())


def test_masking_changes_the_loss_and_counts_negatives():
    q, p, n, *_, ids = make_batch(k=2)
    masked, m1 = contrastive_loss(q, p, n, inverse_temperature=20.0, ids=ids)
    plain, m2 = contrastive_loss(q, p, n, inverse_temperature=20.0, ids=None)
    assert masked.item() != pytest.approx(plain.item())
    assert m2["negatives_per_query"].item() == 8 * 3 - 1
    # masked: rows 1,5 and 2,6 lose one candidate each; rows 0 and 7 lose one negative each
    assert m1["negatives_per_query"].item() == pytest.approx(23 - 6 / 8)


def test_matryoshka_is_weighted_sum_of_renormalised_prefixes():
    q, p, n, qid, pid, nid, ids = make_batch(k=2, D=16)
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    loss, metrics = contrastive_loss(
        q,
        p,
        n,
        inverse_temperature=20.0,
        ids=ids,
        symmetric_weight=0.5,
        matryoshka_dims=dims,
        matryoshka_weights=weights,
    )
    ref = 0.0
    for d, w in zip(dims, weights):
        cut = lambda x, d=d: x[..., :d] / x[..., :d].norm(dim=-1, keepdim=True)  # noqa: E731
        ref = ref + w * naive_loss(
            cut(q), cut(p), cut(n), qid, pid, nid, inv_tau=20.0, rows=range(8), symmetric_weight=0.5
        )
    assert abs(loss.item() - ref.item()) <= TOL
    assert set(metrics) >= {"loss_dim16", "loss_dim8", "loss_dim4", "accuracy"}


def test_learnable_temperature_gradient_equals_naive():
    q, p, n, qid, pid, nid, ids = make_batch(k=2)
    temp = Temperature(0.05, learnable=True, max_inverse=100.0).double()
    loss, _ = contrastive_loss(q, p, n, inverse_temperature=temp(), ids=ids, symmetric_weight=1.0)
    (grad,) = torch.autograd.grad(loss, temp.log_inverse)
    log_inv = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    ref = naive_loss(q, p, n, qid, pid, nid, inv_tau=log_inv.exp(), rows=range(8), symmetric_weight=1.0)
    (ref_grad,) = torch.autograd.grad(ref, log_inv)
    assert abs(grad.item() - ref_grad.item()) <= TOL
    assert abs(grad.item()) > 1e-3  # a real gradient, not a clamped zero


def test_temperature_clamp_stops_gradient_at_the_bound():
    temp = Temperature(0.005, learnable=True, max_inverse=100.0)
    assert temp().item() == pytest.approx(100.0)
    temp().backward()
    assert temp.log_inverse.grad.item() == 0.0


def test_embedding_gradients_equal_naive():
    q, p, n, qid, pid, nid, ids = make_batch(k=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, p, n)]
    loss, _ = contrastive_loss(*leaves, inverse_temperature=20.0, ids=ids, symmetric_weight=0.3)
    grads = torch.autograd.grad(loss, leaves)
    leaves2 = [t.clone().requires_grad_(True) for t in (q, p, n)]
    ref = naive_loss(*leaves2, qid, pid, nid, inv_tau=20.0, rows=range(8), symmetric_weight=0.3)
    for a, b in zip(grads, torch.autograd.grad(ref, leaves2)):
        assert (a - b).abs().max().item() <= TOL


def test_local_rows_sum_to_the_full_batch_gradient():
    """Two 'ranks' scoring their own rows: mean of their losses is the one-process loss (the DDP identity)."""
    q, p, n, *_, ids = make_batch(k=2)
    full, _ = contrastive_loss(q, p, n, inverse_temperature=20.0, ids=ids, symmetric_weight=1.0)
    parts = [
        contrastive_loss(q, p, n, inverse_temperature=20.0, ids=ids, local=s, symmetric_weight=1.0)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert abs((sum(parts) / 2).item() - full.item()) <= 1e-12


@pytest.mark.parametrize("local", [None, slice(2, 8)])
@pytest.mark.parametrize("row_chunk_size", [1, 3, 5])
def test_row_chunks_give_the_same_loss_metrics_and_gradients(local, row_chunk_size):
    """Checkpointed row chunks (peak scores chunk x C) equal the one-block loss: value, metrics, and the
    gradients of every embedding and of the learnable temperature, with masking, negatives, symmetric."""
    q, p, n, *_, ids = make_batch(k=2)
    results = []
    for chunk in (0, row_chunk_size):
        temp = Temperature(0.05, learnable=True).double()
        leaves = [t.clone().requires_grad_(True) for t in (q, p, n)]
        loss, metrics = contrastive_loss(
            *leaves,
            inverse_temperature=temp(),
            ids=ids,
            local=local,
            symmetric_weight=0.5,
            matryoshka_dims=[16, 8],
            row_chunk_size=chunk,
        )
        loss.backward()
        results.append((loss.detach(), metrics, [t.grad for t in leaves], temp.log_inverse.grad))
    (l0, m0, g0, t0), (l1, m1, g1, t1) = results
    assert abs(l0.item() - l1.item()) <= 1e-12
    for name in m0:
        assert m1[name].item() == pytest.approx(m0[name].item(), rel=1e-12, abs=1e-12), name
    for a, b in zip(g0, g1):
        assert (a - b).abs().max().item() <= 1e-12
    assert abs(t0.item() - t1.item()) <= 1e-12 and abs(t0.item()) > 1e-4


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("local", [None, slice(4, 8)])
@pytest.mark.parametrize("row_chunk_size", [0, 3])
def test_in_batch_negatives_off_scores_only_own_candidates(k, local, row_chunk_size):
    """A source with in-batch negatives off: each query against its own positive and own hard negatives."""
    q, p, n, *_, ids = make_batch(k=k)
    rows = range(8) if local is None else range(local.start, local.stop)
    want = 0.0
    for g in rows:
        cands = [(q[g] * p[g]).sum()] + [(q[g] * n[g, m]).sum() for m in range(k)]
        want = want + torch.logsumexp(torch.stack(cands) * 20.0, 0) - cands[0] * 20.0
    want = want / len(rows)
    got, metrics = contrastive_loss(
        q, p, n, inverse_temperature=20.0, ids=ids, local=local, in_batch_negatives=False, row_chunk_size=row_chunk_size
    )
    assert abs(got.item() - want.item()) < 1e-12
    assert metrics["negatives_per_query"].item() == k  # the duplicates of make_batch are all in other rows
    sym, _ = contrastive_loss(
        q, p, n, inverse_temperature=20.0, local=local, symmetric_weight=0.5, in_batch_negatives=False
    )
    assert abs(sym.item() - want.item()) < 1e-12  # d->q over its own query only: log(1) = 0


def test_distillation_loss_matches_a_per_row_loop():
    from embedscale.contrastive.losses import distillation_loss

    torch.manual_seed(0)
    b, k, d = 5, 3, 8
    q = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(b, k, d, dtype=torch.float64), dim=-1)
    teacher = torch.randn(b, 1 + k, dtype=torch.float64) * 3
    loss, metrics = distillation_loss(q, pos, neg, teacher, inverse_temperature=20.0, teacher_temperature=2.0)
    want = 0.0
    for i in range(b):
        cands = torch.cat([pos[i : i + 1], neg[i]])
        p_student = torch.softmax(cands @ q[i] * 20.0, dim=0)
        p_teacher = torch.softmax(teacher[i] / 2.0, dim=0)
        want += float((p_teacher * (p_teacher.log() - p_student.log())).sum())
    assert abs(loss.item() - want / b) < 1e-12
    # a student that already agrees with the teacher has zero loss
    s_teacher = torch.einsum("bd,bgd->bg", q, torch.cat([pos[:, None], neg], 1)) * 20.0
    same, _ = distillation_loss(q, pos, neg, s_teacher, inverse_temperature=20.0)
    assert abs(same.item()) < 1e-12 and 0 <= metrics["teacher_agreement"] <= 1


def naive_same_side(q, p, n, qid, pid, nid, *, inv_tau, rows, qq, dd, margin=None):
    """GTE's improved contrastive loss, one candidate at a time: row g's softmax holds its q->d candidates
    (masked as naive_loss masks them), then s(q_g, q_j) and s(d_g, d_j) for j != g that are not duplicates."""
    N = p.shape[0]
    k = 0 if n is None else n.shape[1]
    total, guarded = 0.0, []
    for g in rows:
        cands = []
        for j in range(N):
            if j != g and (pid[j] == pid[g] or qid[j] == qid[g]):
                continue
            cands.append(((q[g] * p[j]).sum() * inv_tau, j == g))
        for j in range(N):
            for m in range(k):
                if nid[j][m] != pid[g]:
                    cands.append(((q[g] * n[j, m]).sum() * inv_tau, False))
        if margin is not None:  # the guard: q->d candidates above the positive's cosine minus the margin
            positive = [c for c, is_label in cands if is_label][0] / inv_tau
            kept = [(c, lab) for c, lab in cands if lab or c / inv_tau <= positive - margin]
            guarded.append(len(cands) - len(kept))
            cands = kept
        for on, side in ((qq, q), (dd, p)):
            for j in range(N):
                if on and j != g and pid[j] != pid[g] and qid[j] != qid[g]:
                    cands.append(((side[g] * side[j]).sum() * inv_tau, False))
        logz = torch.logsumexp(torch.stack([s for s, _ in cands]), 0)
        total = total + logz - [s for s, is_label in cands if is_label][0]
    if margin is not None:
        return total / len(rows), sum(guarded) / len(rows)
    return total / len(rows)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize(("qq", "dd"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("local", [None, slice(4, 8)])
@pytest.mark.parametrize("row_chunk_size", [0, 3])
def test_query_query_and_document_document_terms_equal_naive_loop(k, qq, dd, local, row_chunk_size):
    q, p, n, qid, pid, nid, ids = make_batch(k=k)
    loss, metrics = contrastive_loss(
        q, p, n, inverse_temperature=20.0, ids=ids, local=local, row_chunk_size=row_chunk_size,
        query_query=qq, document_document=dd,
    )  # fmt: skip
    rows = range(8) if local is None else range(local.start, local.stop)
    ref = naive_same_side(q, p, n, qid, pid, nid, inv_tau=20.0, rows=rows, qq=qq, dd=dd)
    assert abs(loss.item() - ref.item()) <= TOL
    plain, plain_metrics = contrastive_loss(q, p, n, inverse_temperature=20.0, ids=ids, local=local)
    assert loss.item() > plain.item()  # more negatives in the same softmax
    # every row gains N - 1 same-side negatives per term, minus its duplicates (rows 1, 5 and 2, 6: one each)
    dup = sum(1 for g in rows if g in (1, 5, 2, 6)) / len(rows)
    extra = (int(qq) + int(dd)) * (7 - dup)
    assert metrics["negatives_per_query"].item() == pytest.approx(plain_metrics["negatives_per_query"].item() + extra)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("qq", [False, True])
@pytest.mark.parametrize("row_chunk_size", [0, 3])
def test_margin_guard_equals_naive_loop_and_counts_what_it_masked(k, margin, qq, row_chunk_size):
    """The guard drops, per row, the q->d candidates whose cosine is above the positive's minus the margin (random
    unit vectors in 16 dims: cosines spread over about +-0.5, so each margin masks a different number)."""
    q, p, n, qid, pid, nid, ids = make_batch(k=k)
    p = F.normalize(p + 0.8 * q, dim=-1)  # positives near their queries, as after some training
    loss, metrics = contrastive_loss(
        q, p, n, inverse_temperature=20.0, ids=ids, local=slice(2, 8), row_chunk_size=row_chunk_size,
        query_query=qq, margin_guard=margin,
    )  # fmt: skip
    ref, guarded = naive_same_side(
        q, p, n, qid, pid, nid, inv_tau=20.0, rows=range(2, 8), qq=qq, dd=False, margin=margin
    )
    assert abs(loss.item() - ref.item()) <= TOL
    assert metrics["margin_guard_masked"].item() == pytest.approx(guarded)
    off, off_metrics = contrastive_loss(q, p, n, inverse_temperature=20.0, ids=ids, local=slice(2, 8), query_query=qq)
    assert "margin_guard_masked" not in off_metrics
    dropped = off_metrics["negatives_per_query"].item() - metrics["negatives_per_query"].item()
    assert dropped == pytest.approx(guarded)
    if guarded:
        assert loss.item() < off.item()  # the masked candidates scored high: the loss without them is lower


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("guide_margin", [0.0, 0.2])
@pytest.mark.parametrize("row_chunk_size", [0, 3])
def test_guide_model_masks_what_the_guide_scores_above_the_positive(k, guide_margin, row_chunk_size):
    """GISTEmbed's rule with the guide's own embeddings (another space, other dims): per row, every q->d candidate
    but the positive whose guide score exceeds the guide's score of the positive minus the margin is masked."""
    q, p, n, qid, pid, nid, ids = make_batch(k=k)
    gq, gp, gn, *_ = make_batch(k=k, D=12, seed=5)  # the guide's view of the same 8 rows
    loss, metrics = contrastive_loss(
        q, p, n, inverse_temperature=20.0, ids=ids, local=slice(1, 7), row_chunk_size=row_chunk_size,
        guide=(gq, gp, gn), guide_margin=guide_margin,
    )  # fmt: skip
    masked, total, kept = [], 0.0, 0
    for g in range(1, 7):
        gpos = (gq[g] * gp[g]).sum()
        cands, dropped = [], 0
        for j in range(8):
            if j != g and (pid[j] == pid[g] or qid[j] == qid[g]):
                continue
            if j != g and (gq[g] * gp[j]).sum() > gpos - guide_margin:
                dropped += 1
                continue
            cands.append(((q[g] * p[j]).sum() * 20.0, j == g))
        for j in range(8):
            for m in range(k):
                if nid[j][m] == pid[g]:
                    continue
                if (gq[g] * gn[j, m]).sum() > gpos - guide_margin:
                    dropped += 1
                    continue
                cands.append(((q[g] * n[j, m]).sum() * 20.0, False))
        masked.append(dropped)
        kept += len(cands) - 1
        total = total + torch.logsumexp(torch.stack([s for s, _ in cands]), 0) - [s for s, lab in cands if lab][0]
    assert abs(loss.item() - (total / 6).item()) <= TOL
    assert metrics["guide_masked"].item() == pytest.approx(sum(masked) / 6) and sum(masked) > 0
    assert metrics["negatives_per_query"].item() == pytest.approx(kept / 6)
