"""Per-source objectives (data.sources[].loss; contrastive/objectives.py): each equals a reference written another
way, chunking changes nothing, and the data path (sts shards, a mixture with a CoSENT source) delivers the targets.
Equivalence across ranks is in tests/test_distributed.py, GradCache in tests/test_gradcache.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from embedscale.contrastive.objectives import angle_similarity, cosent_loss, embedding_kl_loss, embedding_mse_loss


def _reference_cosent(sim, scores, scale):
    """log(1 + sum over ordered pairs of exp(scale (s_j - s_i))), one pair at a time in Python floats."""
    terms = [
        math.exp(scale * (sim[j] - sim[i])) for i in range(len(sim)) for j in range(len(sim)) if scores[i] > scores[j]
    ]
    return math.log1p(sum(terms))


@pytest.mark.parametrize("row_chunk_size", [0, 1, 3, 7])
def test_cosent_equals_the_pairwise_sum_and_chunks_change_nothing(row_chunk_size):
    g = torch.Generator().manual_seed(0)
    sim = (torch.rand(9, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    scores = torch.tensor([5.0, 3.8, 3.8, 0.0, 1.2, 4.4, 2.0, 3.8, 0.4], dtype=torch.float64)  # ties give no term
    loss, metrics = cosent_loss(sim, scores, scale=20.0, row_chunk_size=row_chunk_size)
    assert loss.item() == pytest.approx(_reference_cosent(sim.tolist(), scores.tolist(), 20.0), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, sim)
    sim_ref = sim.detach().clone().requires_grad_(True)
    loss_ref, _ = cosent_loss(sim_ref, scores, scale=20.0, row_chunk_size=0)
    loss_ref.backward()
    torch.testing.assert_close(grad, sim_ref.grad, rtol=1e-12, atol=0)
    ordered = sum(a > b for a in scores.tolist() for b in scores.tolist())
    assert metrics["ranked_pairs_per_row"].item() == pytest.approx(ordered / 9)
    pearson = torch.corrcoef(torch.stack([sim.detach(), scores]))[0, 1]
    assert metrics["score_pearson"].item() == pytest.approx(pearson.item(), rel=1e-9)


def test_cosent_of_a_perfect_ranking_is_small_and_of_equal_scores_zero():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    right, _ = cosent_loss(scores / 3, scores, scale=20.0)
    wrong, _ = cosent_loss(-scores / 3, scores, scale=20.0)
    assert right.item() < 0.01 < 10 < wrong.item()
    tied, _ = cosent_loss(torch.tensor([0.1, 0.9]), torch.tensor([2.0, 2.0]))
    assert tied.item() == 0.0


def test_angle_similarity_is_the_complex_quotient():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    z, w = torch.complex(x[:, :4], x[:, 4:]), torch.complex(y[:, :4], y[:, 4:])
    quotient = z * w.conj() / (z.abs().pow(2).sum(1, keepdim=True).sqrt() * w.abs().pow(2).sum(1, keepdim=True).sqrt())
    want = (quotient.real + quotient.imag).sum(1).abs()
    torch.testing.assert_close(angle_similarity(x, y), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(angle_similarity(x, x), torch.ones(5, dtype=torch.float64))  # same angle: 1
    torch.testing.assert_close(angle_similarity(x, 3 * y), angle_similarity(x, y))  # scale-invariant
    with pytest.raises(ValueError, match="must be even"):
        angle_similarity(x[:, :7], y[:, :7])


def test_embedding_mse_and_kl_equal_their_definitions():
    g = torch.Generator().manual_seed(2)
    q, pos = (F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    tq, tpos = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    loss, _ = embedding_mse_loss(q, pos, tq, tpos)
    assert loss.item() == pytest.approx((((q - tq) ** 2).mean() + ((pos - tpos) ** 2).mean()).item() / 2, rel=1e-12)
    with pytest.raises(ValueError, match="teacher embeddings have 5 dimensions"):
        embedding_mse_loss(q, pos, tq[:, :5], tpos[:, :5])

    tq5, tpos5 = tq[:, :5], tpos[:, :5]  # kl compares scores: the teacher's dimension is free
    local = slice(2, 5)
    loss, metrics = embedding_kl_loss(
        q, pos, tq5, tpos5, local=local, inverse_temperature=20.0, teacher_temperature=0.1
    )
    rows = []
    for i in range(2, 5):
        student = [20.0 * float(q[i] @ pos[j]) for j in range(6)]
        teacher = [float(F.cosine_similarity(tq5[i], tpos5[j], dim=0)) / 0.1 for j in range(6)]
        ls, lt = (torch.tensor(v, dtype=torch.float64).log_softmax(0) for v in (student, teacher))
        rows.append(float((lt.exp() * (lt - ls)).sum()))
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-9)
    assert 0 <= metrics["teacher_agreement"].item() <= 1


def test_sts_shards_carry_scores_and_a_cosent_source_batches_them(tmp_path, tiny_bert, tiny_data):
    from transformers import AutoTokenizer

    from embedscale.config import ModelConfig, ShardConfig, ShardJobConfig, SourceConfig
    from embedscale.data.collate import PairCollator
    from embedscale.data.shards import ShardedDataset
    from embedscale.data.stream import MixtureStream, Source
    from embedscale.jobs.shard import run as shard_run

    manifest = shard_run(
        ShardJobConfig(
            shard=ShardConfig(
                inputs=[str(tiny_data / "sts" / "test.tsv")], format="sts", name="sts", output=str(tmp_path / "sts")
            )
        )
    )
    assert manifest["num_samples"] == 10 and manifest["schema"]["fields"]["score"] == "float"
    rows = [json.dumps({"q": f"query {i}", "p": f"doc {i}", "n": [f"neg {i}"]}) for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    shard_run(
        ShardJobConfig(
            shard=ShardConfig(
                inputs=[str(tmp_path / "pairs.jsonl")],
                name="pairs",
                output=str(tmp_path / "pairs"),
                query_field="q",
                positive_field="p",
                negatives_field="n",
            )
        )
    )
    sts, pairs = ShardedDataset.open(tmp_path / "sts"), ShardedDataset.open(tmp_path / "pairs")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    collate = PairCollator(tok, model_cfg=ModelConfig(), num_hard_negatives=1)
    sources = [
        Source.of("pairs", pairs, 1.0),
        Source.of("sts", sts, 1.0, loss="cosent", loss_weight=0.5),
    ]
    stream = MixtureStream(sources, global_batch_size=2, seed=0, collate=collate, num_hard_negatives=1)
    batches = list(stream)
    seen = {b.source for b in batches}
    assert seen == {"pairs", "sts"}
    for b in batches:
        if b.source == "sts":  # scored pairs: no hard negatives, the gold scores, the source's weight
            assert b.objective.loss == "cosent" and b.objective.weight == 0.5 and b.num_negatives_per_query == 0
            assert b.objective.scores_B.shape == (2,) and b.documents["input_ids"].shape[0] == 2
        else:
            assert b.objective.contrastive and b.objective.scores_B is None and b.num_negatives_per_query == 1
    with pytest.raises(ValueError, match=r"data.sources\[0\].loss=cosent needs batches of one source"):
        from embedscale.config import DataConfig

        DataConfig(format="shards", sources=[SourceConfig(path="x", loss="cosent")], homogeneous_batches=False)
    with pytest.raises(ValueError, match="homogeneous_batches=false mixes sources"):
        MixtureStream(sources, global_batch_size=2, collate=collate, homogeneous=False)
    # a CoSENT source without scores: the sample is refused naming the fix (or skipped and counted)
    bad = [Source.of("pairs", pairs, 1.0, loss="cosent")]
    with pytest.raises(ValueError, match=r"missing score: loss=cosent trains on scored pairs: shard the source"):
        list(MixtureStream(bad, global_batch_size=2, collate=collate))
    with pytest.raises(ValueError, match="missing teacher embeddings"):
        list(MixtureStream([Source.of("sts", sts, 1.0, loss="kl")], global_batch_size=2, collate=collate))


def test_shard_score_and_embedding_fields(tmp_path):
    from embedscale.config import ShardConfig, ShardJobConfig
    from embedscale.data.shards import ShardedDataset
    from embedscale.jobs.shard import run as shard_run

    rows = [{"a": f"left {i}", "b": f"right {i}", "s": i / 2, "ea": [0.1 * i, 1.0], "eb": [1.0, 0.0]} for i in range(4)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(inputs=[str(tmp_path / "x.jsonl")], name="x", query_field="a", positive_field="b")
    m = shard_run(
        ShardJobConfig(
            shard=ShardConfig(**cfg, output=str(tmp_path / "x"), score_field="s", embedding_fields=["ea", "eb"])
        )
    )
    assert set(m["schema"]["fields"]) >= {"score", "query_embedding", "positive_embedding"}
    got = ShardedDataset.open(tmp_path / "x").read(0, range(4))
    assert [(s["score"], s["query_embedding"], s["positive_embedding"]) for s in got] == [
        (i / 2, [0.1 * i, 1.0], [1.0, 0.0]) for i in range(4)
    ]
    rows[2]["s"] = "high"
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"x.jsonl:3: shard.score_field='s' holds 'high', not a finite number"):
        shard_run(ShardJobConfig(shard=ShardConfig(**cfg, output=str(tmp_path / "y"), score_field="s")))
    with pytest.raises(ValueError, match="name two fields"):
        ShardConfig(**cfg, embedding_fields=["ea"])


@pytest.mark.slow  # CLI processes
def test_train_a_mixture_with_a_cosent_source_on_two_ranks_with_gradcache(tiny_bert, tiny_data, tmp_path):
    """`embedscale shard` STS data (format=sts) and pairs, then `embedscale train` on 2 gloo ranks with GradCache
    and a learnable temperature: both sources' batches train, each logs its own loss."""
    import csv
    import subprocess
    import sys

    from helpers import clean_env

    def cli(*args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "embedscale.cli", *args], capture_output=True, text=True, env=clean_env()
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.dumps({"query": f"query {i}", "positive": f"doc {i}", "negatives": [f"neg {i}"]}) for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    cli("shard", f"shard.inputs=[{tmp_path / 'pairs.jsonl'}]", f"shard.output={tmp_path / 'pairs'}")
    cli(
        "shard",
        "shard.format=sts",
        f"shard.inputs=[{tiny_data / 'sts' / 'test.tsv'}]",
        f"shard.output={tmp_path / 'sts'}",
    )
    run_dir = tmp_path / "run"
    sources = f"[{{path:{tmp_path / 'pairs'}}},{{path:{tmp_path / 'sts'},loss:cosent,loss_weight:0.5}}]"
    cli(
        "train",
        f"model.name_or_path={tiny_bert}",
        "model.query_max_length=16",
        "model.document_max_length=16",
        "data.format=shards",
        f"data.sources={sources}",
        "data.num_hard_negatives=1",
        "data.global_batch_size=4",
        "data.batch_size_per_rank=null",
        "gradcache.chunk_size=1",
        "loss.learnable_temperature=true",
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.progress=off",
        "eval=none",
        "logger=csv",
        "export=false",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    )
    with open(run_dir / "logs" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    logged = [r for r in logged if r.get("train/loss")]
    cosent = [r for r in logged if r["train/loss_cosent"] not in ("", "nan")]
    contrastive = [r for r in logged if r["train/accuracy"] not in ("", "nan")]
    assert len(cosent) + len(contrastive) == len(logged) == 6 and cosent and contrastive, logged
    for r in cosent:  # each step logs its own objective's metrics; the other's are NaN, never a stale value
        assert r["train/accuracy"] == "nan" and r["train/loss_cosent"] == r["train/loss"]
        assert -1 <= float(r["train/score_pearson"]) <= 1
    for r in contrastive:
        assert r["train/loss_cosent"] in ("", "nan") and r["train/score_pearson"] in ("", "nan")
