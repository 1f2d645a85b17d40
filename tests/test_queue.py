"""loss.queue_size: earlier steps' documents as extra negatives. The queue's part of the loss equals a softmax built
by hand (no gradient into the queue), the FIFO keeps the newest documents, and a resumed run continues with the
queue it checkpointed. (W ranks = one process and GradCache = uncached with a queue: bench/loss_equivalence.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import exported_weights, train_in_process

from embedscale.contrastive.losses import contrastive_loss, duplicate_masks
from embedscale.contrastive.queue import NegativeQueue
from embedscale.data.batch import TextIds


def _unit(*shape, seed: int, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_(grad)


@pytest.mark.parametrize("row_chunk_size", [0, 2])
def test_queue_part_equals_a_softmax_built_by_hand(row_chunk_size):
    N, k, D, Q = 6, 1, 8, 5
    q, pos, neg = _unit(N, D, seed=0), _unit(N, D, seed=1), _unit(N, k, D, seed=2)
    queue_QD = _unit(Q, D, seed=3, grad=False)
    ids = TextIds(torch.arange(N), torch.arange(100, 100 + N), torch.arange(200, 200 + N).view(N, k))
    queue_ids = torch.tensor([7, 102, 9, 10, 104])  # copies of rows 2's and 4's positives: masked for those rows
    inv_t = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    local = slice(1, 5)
    loss, metrics = contrastive_loss(
        q, pos, neg, inverse_temperature=inv_t, ids=ids, local=local, row_chunk_size=row_chunk_size,
        queue=(queue_QD, queue_ids),
    )  # fmt: skip
    got = torch.autograd.grad(loss, (q, pos, neg, inv_t))

    cand = torch.cat([pos, neg.reshape(-1, D)])
    _, mask_bC = duplicate_masks(ids, local)
    rows = torch.arange(local.start, local.stop)
    mask_bQ = queue_ids[None, :] == ids.positive_B[rows][:, None]
    logits = torch.cat([q[rows] @ cand.T, q[rows] @ queue_QD.T], dim=1) * inv_t
    logits = logits.masked_fill(torch.cat([mask_bC, mask_bQ], dim=1), float("-inf"))
    ref = F.cross_entropy(logits, rows)
    want = torch.autograd.grad(ref, (q, pos, neg, inv_t))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-14)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert mask_bQ.sum() == 2 and queue_QD.grad is None
    assert metrics["negatives_per_query"] == pytest.approx((N * (1 + k) + Q - 1) - 2 / 4)  # 2 masked over 4 rows

    plain, _ = contrastive_loss(q, pos, neg, inverse_temperature=inv_t, ids=ids, local=local)
    assert plain < loss  # more negatives, higher loss: the queue really entered the softmax


def test_queue_with_matryoshka_truncates_the_queue():
    """At each Matryoshka dim the queue is cut and re-normalised as the batch is."""
    N, D = 4, 8
    q, pos, queue_QD = _unit(N, D, seed=0), _unit(N, D, seed=1), _unit(3, D, seed=3, grad=False)
    loss, _ = contrastive_loss(q, pos, inverse_temperature=20.0, matryoshka_dims=[4, 8], queue=(queue_QD, None))
    q4, p4, z4 = (F.normalize(x[:, :4], dim=-1) for x in (q, pos, queue_QD))
    small, _ = contrastive_loss(q4, p4, inverse_temperature=20.0, queue=(z4, None))
    full, _ = contrastive_loss(q, pos, inverse_temperature=20.0, queue=(queue_QD, None))
    torch.testing.assert_close(loss, small + full, rtol=0, atol=1e-13)


def test_fifo_keeps_the_newest_and_refuses_what_it_cannot_hold():
    queue = NegativeQueue(5)
    assert queue.view() is None and len(queue) == 0
    queue.push(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    queue.push(2 * torch.ones(4, 2), torch.tensor([4, 5, 6, 7]))
    embeddings, ids = queue.view()
    assert ids.tolist() == [3, 4, 5, 6, 7] and embeddings[:, 0].tolist() == [1, 2, 2, 2, 2]
    queue.push(torch.full((2, 2), float("nan")), torch.tensor([8, 9]))  # a non-finite step is not pushed
    assert queue.skipped_nonfinite == 1 and queue.view()[1].tolist() == [3, 4, 5, 6, 7]
    queue.push(torch.ones(9, 2), None)  # more than fits; no ids (loss.mask_duplicates=false): no masking
    assert len(queue) == 5 and queue.view()[1] is None
    with pytest.raises(ValueError, match="one embedding size"):
        queue.push(torch.ones(1, 3), None)
    again = NegativeQueue(5)
    again.load_state_dict(queue.state_dict())
    assert torch.equal(again.view()[0], queue.view()[0]) and again.skipped_nonfinite == 1


def test_resumed_run_continues_with_its_checkpointed_queue(tiny_bert, tiny_data, tmp_path):
    """4 steps with a queue = 2 steps, then resumed for 2 (the queue saved in the checkpoint and restored); a resume
    whose checkpoint lost the queue ends elsewhere (the check has teeth)."""
    settings = ("optim.lr=1e-3", "loss.queue_size=6")

    def train(name: str, steps: int, *extra: str) -> dict:
        return train_in_process(tiny_bert, tiny_data, tmp_path, name, steps, *settings, *extra)

    weights = exported_weights
    whole = weights(train("whole", 4))
    train("first", 2)
    ckpt_path = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["embedscale_queue"]["embeddings"].shape[0] == 6  # 2 steps x 4 positives, the newest 6
    resumed = weights(train("resumed", 4, f"trainer.resume={ckpt_path}"))
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    del ckpt["embedscale_queue"]
    torch.save(ckpt, tmp_path / "lost.ckpt")
    lost = weights(train("lost", 4, f"trainer.resume={tmp_path / 'lost.ckpt'}"))
    assert max((whole[k] - lost[k]).abs().max().item() for k in whole) > 1e-5


def test_queue_is_refused_for_late_interaction(tiny_bert):
    from embedscale.config import LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder

    settings = dict(multivector=True, multivector_dim=8, query_max_length=16, query_augment_length=16)
    encoder, _ = load_encoder(ModelConfig(name_or_path=str(tiny_bert), **settings))
    with pytest.raises(ValueError, match="loss.queue_size"):
        ContrastiveModule(encoder, loss_cfg=LossConfig(queue_size=8), optim_cfg=OptimConfig())
