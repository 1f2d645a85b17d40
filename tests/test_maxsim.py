"""MaxSim (late-interaction) losses equal naive Python loops: scores with masks on both sides, the InfoNCE over
gathered candidates with rank offsets, duplicates, in-batch negatives off and row/document chunking (values and
gradients), the multi-rank decomposition, distillation; and autograd never keeps the token-products block."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from embedscale.contrastive.maxsim import maxsim_distillation_loss, maxsim_loss, maxsim_scores
from embedscale.data.batch import TextIds

INV_TAU = 5.0  # a MaxSim score sums up to L cosines: a cosine's 1/tau would be L times too sharp


def tokens(*shape, seed):
    """Random L2-normalised token vectors (..., T, D) and a mask (..., T) that keeps the first token, drops some."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.rand(*shape[:-1], generator=g) > 0.35
    mask[..., 0] = True
    return x, mask


def naive_maxsim(q_LD, q_mask_L, d_MD, d_mask_M):
    """One (query, document) pair, one dot product at a time."""
    total = q_LD.new_zeros(())
    for t in range(q_LD.shape[0]):
        if q_mask_L[t]:
            total = total + torch.stack([q_LD[t] @ d_MD[m] for m in range(d_MD.shape[0]) if d_mask_M[m]]).max()
    return total


def make_batch(N=6, k=2, L=3, M=4, M_neg=5, D=4, seed=0):
    """Rows with hard negatives padded to another length than the positives, and duplicates: rows 1 and 4 share a
    positive text, rows 2 and 5 a query text, row 3's first negative is row 0's positive, row 0's second negative
    is row 3's positive, row 2's second negative is its own positive."""
    q, q_mask = tokens(N, L, D, seed=seed)
    pos, pos_mask = tokens(N, M, D, seed=seed + 1)
    neg, neg_mask = tokens(N, k, M_neg, D, seed=seed + 2) if k else (None, None)
    qid, pid = list(range(100, 100 + N)), list(range(200, 200 + N))
    nid = [[300 + j * k + m for m in range(k)] for j in range(N)]
    pid[4] = pid[1]
    qid[5] = qid[2]
    if k:
        nid[3][0], nid[0][1], nid[2][1] = pid[0], pid[3], pid[2]
    ids = TextIds(torch.tensor(qid), torch.tensor(pid), torch.tensor(nid).view(N, k) if k else None)
    return (q, q_mask, pos, pos_mask, neg, neg_mask), (qid, pid, nid), ids


def naive_loss(inputs, id_lists, *, inv_tau, rows, mask, in_batch_negatives):
    """Per query row: explicit candidate list in the layout [positives | negatives row-major], plain cross-entropy.
    Returns the mean loss and the reference metrics."""
    q, q_mask, pos, pos_mask, neg, neg_mask = inputs
    qid, pid, nid = id_lists
    N, k = pos.shape[0], 0 if neg is None else neg.shape[1]
    total, correct, negatives, positive = 0.0, 0, 0, 0.0
    for g in rows:
        cands = []  # (raw score, kept in the softmax, is the label)
        for j in range(N):
            dup = j != g and (pid[j] == pid[g] or qid[j] == qid[g])
            kept = not (mask and dup) and (in_batch_negatives or j == g)
            cands.append((naive_maxsim(q[g], q_mask[g], pos[j], pos_mask[j]), kept, j == g))
        for j, m in itertools.product(range(N), range(k)):
            kept = not (mask and nid[j][m] == pid[g]) and (in_batch_negatives or j == g)
            cands.append((naive_maxsim(q[g], q_mask[g], neg[j, m], neg_mask[j, m]), kept, False))
        logits = torch.stack([s for s, kept, _ in cands if kept]) * inv_tau
        label = [s for s, _, is_label in cands if is_label][0]
        total = total + torch.logsumexp(logits, 0) - label * inv_tau
        correct += int(torch.stack([s for s, _, _ in cands]).argmax()) == g  # over all C, as info_nce
        negatives += len(logits) - 1
        positive += label.item() / q_mask[g].sum().item()
    b = len(rows)
    return total / b, {"accuracy": correct / b, "negatives_per_query": negatives / b, "positive_score": positive / b}


@pytest.mark.parametrize("doc_chunk_size", [0, 1, 3])
def test_scores_equal_a_naive_loop_with_masks_on_both_sides(doc_chunk_size):
    q, q_mask = tokens(3, 4, 6, seed=0)
    d, d_mask = tokens(5, 7, 6, seed=1)
    d_mask[2, 1:] = False  # a document with a single token
    want_rows = [[naive_maxsim(q[i], q_mask[i], d[j], d_mask[j]) for j in range(5)] for i in range(3)]
    want = torch.stack([torch.stack(row) for row in want_rows])
    got = maxsim_scores(q, q_mask, d, d_mask.int(), doc_chunk_size=doc_chunk_size)  # a 0/1 mask works too
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # masked tokens take no part: changing their vectors changes nothing
    got_noise = maxsim_scores(q + 5 * ~q_mask[..., None], q_mask, d - 5 * ~d_mask[..., None], d_mask)
    torch.testing.assert_close(got_noise, want, rtol=0, atol=1e-12)


def test_a_text_with_no_unmasked_token_raises():
    q, q_mask = tokens(2, 3, 4, seed=0)
    d, d_mask = tokens(3, 5, 4, seed=1)
    d_mask[1] = False
    with pytest.raises(ValueError, match=r"1 document text\(s\) have no unmasked token \(first at index \(1,\)\)"):
        maxsim_scores(q, q_mask, d, d_mask)
    (q, q_mask, pos, pos_mask, neg, neg_mask), _, _ = make_batch()
    neg_mask[3, 1] = False
    with pytest.raises(ValueError, match=r"negative text\(s\) .* index \(3, 1\)"):
        maxsim_loss(q, q_mask, pos, pos_mask, neg, neg_mask, inverse_temperature=INV_TAU, local=slice(0, 6))


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("local", [slice(0, 6), slice(2, 4), slice(3, 6)])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("in_batch_negatives", [True, False])
def test_loss_metrics_and_gradients_equal_a_naive_loop_for_every_chunking(k, local, mask, in_batch_negatives):
    """Rank offsets (local rows 2..4 is the multi-rank case), duplicates, hard negatives with their own padding,
    in-batch negatives off, and row/document chunks in {0, 1, 2}: the same loss, metrics and gradients of every
    input, the learnable inverse temperature included."""
    inputs, id_lists, ids = make_batch(k=k)
    grads_of = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]

    def leaves():
        leaf = [t.clone().requires_grad_(i in grads_of) if t is not None else None for i, t in enumerate(inputs)]
        return leaf, torch.tensor(INV_TAU, dtype=torch.float64, requires_grad=True)

    leaf, inv_tau = leaves()
    rows = range(local.start, local.stop)
    want, want_metrics = naive_loss(
        leaf, id_lists, inv_tau=inv_tau, rows=rows, mask=mask, in_batch_negatives=in_batch_negatives
    )
    want_grads = torch.autograd.grad(want, [leaf[i] for i in grads_of] + [inv_tau])
    for row_chunk_size, doc_chunk_size in itertools.product([0, 1, 2], [0, 1, 2]):
        leaf, inv_tau = leaves()
        loss, metrics = maxsim_loss(
            *leaf,
            inverse_temperature=inv_tau,
            local=local,
            ids=ids if mask else None,
            row_chunk_size=row_chunk_size,
            doc_chunk_size=doc_chunk_size,
            in_batch_negatives=in_batch_negatives,
        )
        case = f"row_chunk_size={row_chunk_size} doc_chunk_size={doc_chunk_size}"
        assert abs(loss.item() - want.item()) <= 1e-12, case
        assert metrics["loss"].item() == loss.item()
        for name, value in want_metrics.items():
            assert metrics[name].item() == pytest.approx(value, rel=1e-12, abs=1e-12), (name, case)
        grads = torch.autograd.grad(loss, [leaf[i] for i in grads_of] + [inv_tau])
        for got_g, want_g in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12, msg=case)
    if not in_batch_negatives:
        assert want_metrics["negatives_per_query"] <= k  # own negatives only (some masked as duplicates)


def test_ranks_decompose_the_one_process_loss_and_gradient():
    """Three 'ranks' of two rows each: the mean of their losses is the one-process loss, and the mean of their
    gradients the one-process gradient (DDP's average over the gather's summed gradients)."""
    inputs, _, ids = make_batch(k=2)

    def loss_and_grads(local, row_chunk_size=0):
        leaf = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        loss, _ = maxsim_loss(
            *leaf, inverse_temperature=INV_TAU, local=local, ids=ids, row_chunk_size=row_chunk_size, doc_chunk_size=4
        )
        return loss, torch.autograd.grad(loss, [t for t in leaf if t.requires_grad])

    full, full_grads = loss_and_grads(slice(0, 6), row_chunk_size=4)
    parts = [loss_and_grads(slice(r * 2, r * 2 + 2), row_chunk_size=1) for r in range(3)]
    assert abs(sum(loss.item() for loss, _ in parts) / 3 - full.item()) <= 1e-12
    for i, want_g in enumerate(full_grads):
        torch.testing.assert_close(sum(grads[i] for _, grads in parts) / 3, want_g, rtol=1e-10, atol=1e-12)


def test_distillation_loss_equals_a_per_row_loop():
    b, k = 4, 3
    q, q_mask = tokens(b, 3, 5, seed=0)
    pos, pos_mask = tokens(b, 4, 5, seed=1)
    neg, neg_mask = tokens(b, k, 6, 5, seed=2)
    teacher = torch.randn(b, 1 + k, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    loss, metrics = maxsim_distillation_loss(
        q, q_mask, pos, pos_mask, neg, neg_mask, teacher, inverse_temperature=INV_TAU, teacher_temperature=2.0
    )
    want, agree, student = 0.0, 0, []
    for i in range(b):
        s = [naive_maxsim(q[i], q_mask[i], pos[i], pos_mask[i])]
        s += [naive_maxsim(q[i], q_mask[i], neg[i, m], neg_mask[i, m]) for m in range(k)]
        student.append(torch.stack(s) * INV_TAU)
        p_student, p_teacher = torch.softmax(student[-1], 0), torch.softmax(teacher[i] / 2.0, 0)
        want += float((p_teacher * (p_teacher.log() - p_student.log())).sum())
        agree += int(student[-1].argmax() == teacher[i].argmax())
    assert abs(loss.item() - want / b) < 1e-12 and metrics["distill_kl"].item() == loss.item()
    assert metrics["teacher_agreement"].item() == agree / b
    # a student that already agrees with the teacher has zero loss
    same, _ = maxsim_distillation_loss(
        q, q_mask, pos, pos_mask, neg, neg_mask, torch.stack(student), inverse_temperature=INV_TAU
    )
    assert abs(same.item()) < 1e-12


def saved_by_autograd(fn):
    """(shape, dtype, storage pointer) of every tensor autograd saves for backward while fn runs."""
    saved = []

    def pack(t):
        saved.append((t.shape, t.dtype, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("doc_chunk_size", [0, 3])
def test_autograd_keeps_the_inputs_and_argmax_indices_never_the_products(doc_chunk_size):
    """D is small and L, M large so that every products block (c, L, x, M) outnumbers any input: the saved tensors
    are the float inputs themselves (same storage, no copy), bool masks and (c, L, x) int64 argmax indices."""
    c, L, X, M, D = 4, 5, 6, 7, 3
    q, q_mask = tokens(c, L, D, seed=0)
    d, d_mask = tokens(X, M, D, seed=1)
    q.requires_grad_(True)
    d.requires_grad_(True)
    block = c * L * (doc_chunk_size or X) * M
    saved = saved_by_autograd(lambda: maxsim_scores(q, q_mask, d, d_mask, doc_chunk_size=doc_chunk_size))
    inputs = {q.untyped_storage().data_ptr(), d.untyped_storage().data_ptr()}
    assert saved and all(shape.numel() < block for shape, _, _ in saved)
    assert all(ptr in inputs for _, dtype, ptr in saved if dtype.is_floating_point)
    indices = [shape for shape, dtype, _ in saved if dtype == torch.int64]
    assert sum(shape.numel() for shape in indices) == c * L * X and all(shape[:2] == (c, L) for shape in indices)
    # the loss without row chunks keeps the same kinds of tensors (plus its (b, C) scores), never a block
    q, q_mask = tokens(4, L, D, seed=2)
    pos, pos_mask = tokens(4, M, D, seed=3)
    neg, neg_mask = tokens(4, 1, M, D, seed=4)
    leaf = [t.requires_grad_(True) for t in (q, pos, neg)]
    saved = saved_by_autograd(
        lambda: maxsim_loss(
            leaf[0],
            q_mask,
            leaf[1],
            pos_mask,
            leaf[2],
            neg_mask,
            inverse_temperature=INV_TAU,
            local=slice(0, 4),
            doc_chunk_size=2,
        )
    )
    assert all(shape.numel() < 4 * L * 2 * M for shape, _, _ in saved)


def test_normalize_divides_each_query_s_scores_by_its_token_count():
    """normalize=True is MaxSim / (the query's unmasked tokens) before the temperature: with every query keeping
    the same n tokens it equals the raw loss at inverse temperature / n, and its distillation likewise."""
    inputs, _, ids = make_batch(k=2)
    q, q_mask = inputs[0], torch.ones_like(inputs[1])  # every query keeps all L = 3 tokens
    even = (q, q_mask, *inputs[2:])
    normalized, _ = maxsim_loss(*even, inverse_temperature=INV_TAU, local=slice(0, 6), ids=ids, normalize=True)
    raw, _ = maxsim_loss(*even, inverse_temperature=INV_TAU / 3, local=slice(0, 6), ids=ids)
    assert normalized.item() == pytest.approx(raw.item(), rel=1e-12)
    teacher = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kl_n, _ = maxsim_distillation_loss(*even, teacher, inverse_temperature=INV_TAU, normalize=True)
    kl_r, _ = maxsim_distillation_loss(*even, teacher, inverse_temperature=INV_TAU / 3)
    assert kl_n.item() == pytest.approx(kl_r.item(), rel=1e-12)
    uneven, _ = maxsim_loss(*inputs, inverse_temperature=INV_TAU, local=slice(0, 6), ids=ids, normalize=True)
    assert uneven.item() != pytest.approx(
        maxsim_loss(*inputs, inverse_temperature=INV_TAU, local=slice(0, 6), ids=ids)[0].item()
    )
