"""GradCache gives the uncached gradient, dropout on: hard negatives, symmetric, Matryoshka, separate
towers, learnable temperature; and the same metrics. float64 on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch
from helpers import build_module as build
from helpers import make_batch

from embedscale.config import GradCacheConfig
from embedscale.contrastive.gradcache import gradcache_step, split_tokens


def uncached_chunked(module, batch, plan):
    """Reference: the same chunks encoded with grad in the same order (same RNG draws), one backward."""
    B, k = batch.batch_size, batch.num_negatives_per_query

    def encode(tokens, side):
        chunks = split_tokens(tokens, **plan)
        e = torch.cat([module.encoder.encode(c.tokens, side=side) for c in chunks])
        return e[torch.argsort(torch.cat([c.rows_c for c in chunks]))]  # back to batch order

    q, d = encode(batch.queries, "query"), encode(batch.documents, "document")
    loss, metrics = module.loss_from_embeddings(
        q,
        d[:B],
        d[B:].view(B, k, -1) if k else None,
        batch.ids,
        teacher_BG=batch.teacher_BG,
        guide=module.guide_embeddings(batch),
        objective=batch.objective,
    )
    loss.backward()
    return loss.detach(), metrics


PLANS = [
    dict(chunk_size=1),
    dict(chunk_size=4),
    dict(chunk_size=4, sort_by_length=True),
    dict(token_budget=40),  # length-sorted, rows x longest <= 40 tokens
    dict(chunk_size=3, token_budget=60),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize(
    "shared, matryoshka, symmetric, extras",
    [(True, [], 0.0, False), (True, [32, 16], 1.0, False), (False, [32, 8], 0.5, False), (False, [32, 16], 0.5, True)],
)
def test_gradcache_equals_uncached(tiny_bert, plan, shared, matryoshka, symmetric, extras):
    grads, losses = [], []
    for cached in (False, True):
        module, tokenizer = build(tiny_bert, shared=shared, matryoshka=matryoshka, symmetric=symmetric, extras=extras)
        batch = make_batch(tokenizer, module.encoder.cfg)
        torch.manual_seed(123)  # dropout stays on: both paths draw the same masks
        if cached:
            loss, metrics = gradcache_step(module, batch, plan=GradCacheConfig(**{"sort_by_length": False, **plan}))
        else:
            loss, metrics = uncached_chunked(module, batch, plan)
        losses.append((loss.item(), metrics["accuracy"].item(), metrics["negatives_per_query"].item()))
        if extras:  # the guards really masked candidates, the same in both paths
            losses[-1] += (metrics["margin_guard_masked"].item(), metrics["guide_masked"].item())
            assert losses[-1][-1] > 0 and losses[-1][-2] > 0
            assert not any(n.startswith("guide") for n, _ in module.named_parameters())  # never trained or saved
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert set(grads[0]) == set(grads[1]) and "temperature.log_inverse" in grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-12)


def test_dropout_replay_matters(tiny_bert):
    """Without replaying the RNG the gradient differs: the equality above is not vacuous."""
    module, tokenizer = build(tiny_bert, shared=True, matryoshka=[], symmetric=0.0)
    batch = make_batch(tokenizer, module.encoder.cfg)
    torch.manual_seed(123)
    gradcache_step(module, batch, plan=GradCacheConfig(chunk_size=4, sort_by_length=False))
    g1 = module.encoder.query_backbone.embeddings.word_embeddings.weight.grad.clone()
    module.zero_grad()
    torch.manual_seed(999)
    uncached_chunked(module, batch, dict(chunk_size=4))
    g2 = module.encoder.query_backbone.embeddings.word_embeddings.weight.grad
    assert not torch.allclose(g1, g2, rtol=1e-5, atol=1e-12)


def test_split_tokens_trims_padding_both_sides():
    ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [1, 2, 0, 0], [3, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[0] = torch.tensor([0, 0, 1, 1])
    mask[1] = torch.tensor([0, 1, 1, 1])  # noqa: E702
    mask[2] = torch.tensor([1, 1, 0, 0])
    mask[3] = torch.tensor([1, 0, 0, 0])  # noqa: E702
    chunks = split_tokens({"input_ids": ids, "attention_mask": mask}, 2)
    assert chunks[0].tokens["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert chunks[1].tokens["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert [c.rows_c.tolist() for c in chunks] == [[0, 1], [2, 3]]


def test_token_budget_chunks_sort_by_length_and_respect_the_budget():
    lengths = [3, 17, 5, 30, 8, 8, 2, 21, 12, 1]
    L = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])
    tokens = {"input_ids": mask * 7, "attention_mask": mask}
    chunks = split_tokens(tokens, token_budget=45)
    rows = torch.cat([c.rows_c for c in chunks]).tolist()
    assert sorted(rows) == list(range(len(lengths)))  # every row exactly once
    assert [lengths[r] for r in rows] == sorted(lengths, reverse=True)  # longest first
    for c in chunks:
        padded = c.tokens["input_ids"].numel()
        assert padded <= 45 or len(c.rows_c) == 1  # over budget only as a single text
        assert c.tokens["attention_mask"].shape[1] == max(lengths[r] for r in c.rows_c.tolist())
    by_count = split_tokens(tokens, 3)
    assert sum(c.tokens["input_ids"].numel() for c in chunks) < sum(c.tokens["input_ids"].numel() for c in by_count)
    with pytest.raises(ValueError):
        split_tokens(tokens)


@pytest.mark.parametrize("plan", PLANS[1:3], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_gradcache_with_distillation_equals_uncached(tiny_bert, plan):
    grads, losses = [], []
    for cached in (False, True):
        module, tokenizer = build(tiny_bert, shared=True, matryoshka=[], symmetric=0.0, distill=0.7)
        batch = make_batch(tokenizer, module.encoder.cfg)
        batch.teacher_BG = torch.linspace(-2, 3, batch.batch_size * 3, dtype=torch.float64).view(-1, 3)
        torch.manual_seed(123)
        loss, metrics = (
            gradcache_step(module, batch, plan=GradCacheConfig(**{"sort_by_length": False, **plan}))
            if cached
            else uncached_chunked(module, batch, plan)
        )
        losses.append((loss.item(), metrics["distill_kl"].item()))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12) and losses[0][1] > 0
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kind", ["cosent", "angle", "mse", "kl"])
def test_gradcache_with_source_objectives_equals_uncached(tiny_bert, kind):
    """A non-contrastive source's batch (data.sources[].loss): no hard negatives, its targets; Matryoshka on."""
    from embedscale.data.batch import Objective

    plan = dict(chunk_size=2)
    grads, losses = [], []
    for cached in (False, True):
        module, tokenizer = build(tiny_bert, shared=False, matryoshka=[32, 16], symmetric=0.0)
        batch = make_batch(tokenizer, module.encoder.cfg, k=0)
        B = batch.batch_size
        g = torch.Generator().manual_seed(3)
        if kind in ("cosent", "angle"):
            batch.objective = Objective(kind, 0.5, scores_B=torch.tensor([3.0, 1.0, 1.0, 4.5, 0.0, 2.0]))
        else:
            T = 32 if kind == "mse" else 12
            batch.objective = Objective(
                kind,
                0.5,
                teacher_query_BT=torch.randn(B, T, generator=g),
                teacher_positive_BT=torch.randn(B, T, generator=g),
            )
        torch.manual_seed(123)
        loss, metrics = (
            gradcache_step(module, batch, plan=GradCacheConfig(sort_by_length=False, **plan))
            if cached
            else uncached_chunked(module, batch, plan)
        )
        losses.append((loss.item(), metrics[f"loss_{kind}"].item()))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12) and losses[0][0] > 0
    assert set(grads[0]) == set(grads[1]) and any(n.startswith("encoder.query") for n in grads[0])
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-12)
