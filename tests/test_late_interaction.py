"""Late interaction (model.multivector, ColBERT): the tokens MaxSim scores, the token-matrix encoder, GradCache equal
to uncached with dropout on, and W gloo ranks equal to one process. The MaxSim loss itself against naive loops:
tests/test_maxsim.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig
from embedscale.data.batch import PairExample
from embedscale.data.collate import PairCollator
from embedscale.encoder.tokenize import punctuation_ids, tokenize


def mv_config(model, **kw) -> ModelConfig:
    base = dict(name_or_path=str(model), multivector=True, multivector_dim=16, query_max_length=8)
    return ModelConfig(**{**base, "query_augment_length": 8, "document_max_length": 24, **kw})


def test_queries_are_augmented_and_documents_skip_punctuation(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = mv_config(tiny_bert)
    q = tokenize(tok, ["a short query", "x"], prefixes="", max_length=8, cfg=cfg, side="query")
    assert q["input_ids"].shape == (2, 8) and q["token_mask"].all()  # every query padded to 8, all scored
    real = tok(["a short query", "x"], padding=True)["attention_mask"]
    for row, mask in enumerate(real):
        n = sum(mask)
        assert q["attention_mask"][row].tolist() == [1] * n + [0] * (8 - n)  # expansion tokens: not attended to
        assert (q["input_ids"][row, n:] == tok.mask_token_id).all()
    attend = tokenize(
        tok, ["x"], prefixes="", max_length=8, cfg=mv_config(tiny_bert, attend_to_expansion_tokens=True), side="query"
    )
    assert attend["attention_mask"].all()
    d = tokenize(tok, ["hello, world! (yes)"], prefixes="", max_length=24, cfg=cfg, side="document")
    words = tok.convert_ids_to_tokens(d["input_ids"][0])
    skipped = {w for w, m, a in zip(words, d["token_mask"][0], d["attention_mask"][0], strict=True) if a and not m}
    assert skipped == {",", "!", "(", ")"} and "[CLS]" not in skipped
    assert tok.convert_tokens_to_ids(",") in punctuation_ids(tok).tolist()
    keep = tokenize(
        tok,
        ["hello, world"],
        prefixes="",
        max_length=24,
        cfg=mv_config(tiny_bert, skip_punctuation=False),
        side="document",
    )
    assert torch.equal(keep["token_mask"], keep["attention_mask"])
    with pytest.raises(ValueError, match="needs side="):
        tokenize(tok, ["x"], prefixes="", max_length=8, cfg=cfg)
    with pytest.raises(ValueError, match=r"model.query_max_length=16 is above model.query_augment_length=8"):
        mv_config(tiny_bert, query_max_length=16)
    with pytest.raises(ValueError, match="needs right padding"):
        mv_config(tiny_bert, padding_side="left")


def test_the_encoder_gives_normalised_token_matrices_zero_where_unscored(tiny_bert):
    from embedscale.encoder.biencoder import encode_texts, load_encoder

    encoder, tok = load_encoder(mv_config(tiny_bert, shared_towers=False))
    tokens = tokenize(tok, ["first doc, here", "second"], prefixes="", max_length=24, cfg=encoder.cfg, side="document")
    e_BMD = encoder.eval().encode(tokens, side="document")
    assert e_BMD.shape == (*tokens["input_ids"].shape, 16)
    norms = e_BMD.norm(dim=-1)
    torch.testing.assert_close(norms[tokens["token_mask"].bool()], torch.ones(int(tokens["token_mask"].sum())))
    assert (norms[~tokens["token_mask"].bool()] == 0).all()
    assert encoder.query_projection is not encoder.document_projection  # one per tower
    shared, _ = load_encoder(mv_config(tiny_bert))
    assert shared.query_projection is shared.document_projection
    with pytest.raises(ValueError, match="token matrices"):
        encode_texts(encoder, tok, ["x"], side="query")
    with pytest.raises(ValueError, match="unset loss.symmetric_weight, loss.margin_guard"):
        from embedscale.contrastive.module import ContrastiveModule

        ContrastiveModule(shared, loss_cfg=LossConfig(symmetric_weight=1.0, margin_guard=0.1), optim_cfg=OptimConfig())


def build(tiny_bert, **model_kw):
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder

    torch.manual_seed(0)
    encoder, tok = load_encoder(mv_config(tiny_bert, **model_kw))
    loss_cfg = LossConfig(learnable_temperature=True, maxsim_row_chunk_size=2, maxsim_doc_chunk_size=3)
    module = ContrastiveModule(encoder, loss_cfg=loss_cfg, optim_cfg=OptimConfig()).double().train()
    return module, PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=2)


def rows(n: int = 6) -> list[PairExample]:
    out = [
        PairExample(f"question {i} " + "word " * i, f"answer {i}, " + "text! " * (2 * i), [f"neg {i} a", f"neg {i} b"])
        for i in range(n)
    ]
    out[4].positive = out[1].positive  # a duplicate, masked identically in both paths
    return out


def uncached(module, batch, plan: dict):
    """The same chunks as GradCache's, encoded with gradient in the same order, back in the batch's columns, then
    one loss and one backward."""
    from embedscale.contrastive.gradcache import in_batch_order, split_tokens

    def encode(tokens, side):
        chunks = split_tokens(tokens, plan.get("chunk_size", 0), token_budget=plan.get("token_budget", 0))
        parts = [module.encoder.encode(c.tokens, side=side) for c in chunks]
        return in_batch_order(parts, chunks, tokens["input_ids"].shape[1])

    q, d = encode(batch.queries, "query"), encode(batch.documents, "document")
    B = batch.batch_size
    neg = d[B:].view(B, 2, *d.shape[1:])
    loss, metrics = module.loss_from_embeddings(q, d[:B], neg, batch.ids, token_masks=batch.token_masks)
    loss.backward()
    return loss, metrics


@pytest.mark.slow  # 12 encodes of a batch per case: outside the fast tier's 3 minutes
@pytest.mark.parametrize(  # the other combinations: bench/results/late_interaction_equivalence.json
    ("plan", "shared"),
    [(dict(chunk_size=1), False), (dict(chunk_size=4), True), (dict(token_budget=40), False)],
    ids=str,
)
def test_gradcache_equals_uncached_for_token_matrices(tiny_bert, plan, shared):
    from embedscale.contrastive.gradcache import gradcache_step

    grads, losses = [], []
    for cached in (False, True):
        module, collate = build(tiny_bert, shared_towers=shared)
        batch = collate(rows())
        torch.manual_seed(123)  # dropout on: both paths draw the same masks
        if cached:
            loss, metrics = gradcache_step(module, batch, plan=GradCacheConfig(sort_by_length=False, **plan))
        else:
            loss, metrics = uncached(module, batch, plan)
        losses.append((loss.item(), metrics["accuracy"].item(), metrics["negatives_per_query"].item()))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert set(grads[0]) == set(grads[1]) and any("projection" in n for n in grads[0])
    assert "temperature.log_inverse" in grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-12)


def _encode_slice(module, collate, examples, seed):
    """A rank's forward of its rows: (queries, positives, negatives, token masks, ids), dropout seeded."""
    batch = collate(examples)
    torch.manual_seed(seed)
    b = batch.batch_size
    q = module.encoder.encode(batch.queries, side="query")
    d = module.encoder.encode(batch.documents, side="document")
    return q, d[:b], d[b:].view(b, 2, *d.shape[1:]), batch.token_masks, batch.ids


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _rank(rank: int, world_size: int, tiny_bert: str, out: str) -> None:
    import torch.distributed as dist

    module, collate = build(tiny_bert, shared_towers=False)
    b = 8 // world_size
    q, pos, neg, masks, ids = _encode_slice(module, collate, rows(8)[rank * b : (rank + 1) * b], seed=100 + rank)
    loss, _ = module.loss_from_embeddings(q, pos, neg, ids, token_masks=masks)
    loss.backward()
    for p in module.parameters():  # what DDP does
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    if rank == 0:
        torch.save(_grads(module), out)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim -2 (tokens) of token matrices, or dim -1 of masks, to `width`."""
    if x.dim() >= 3:
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[-2]))
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def reference(tiny_bert: str, chunks: int) -> dict[str, torch.Tensor]:
    """One process: the 8 rows encoded in `chunks` slices seeded as the ranks, padded to one width, one loss."""
    from embedscale.data.batch import TextIds

    module, collate = build(tiny_bert, shared_towers=False)
    b = 8 // chunks
    parts = [_encode_slice(module, collate, rows(8)[r * b : (r + 1) * b], seed=100 + r) for r in range(chunks)]
    L, M = max(p[0].shape[1] for p in parts), max(p[1].shape[1] for p in parts)
    q = torch.cat([_pad(p[0], L) for p in parts])
    pos, neg = torch.cat([_pad(p[1], M) for p in parts]), torch.cat([_pad(p[2], M) for p in parts])
    q_mask = torch.cat([_pad(p[3][0], L) for p in parts])
    pos_mask = torch.cat([_pad(p[3][1][:b], M) for p in parts])
    neg_mask = torch.cat([_pad(p[3][1][b:], M) for p in parts])
    ids = TextIds(*(torch.cat([getattr(p[4], f) for p in parts]) for f in ("query_B", "positive_B", "negatives_Bk")))
    loss, _ = module.loss_from_embeddings(q, pos, neg, ids, token_masks=(q_mask, torch.cat([pos_mask, neg_mask])))
    loss.backward()
    return _grads(module)


@pytest.mark.slow  # starts gloo ranks
@pytest.mark.parametrize("world_size", [2, 4])
def test_multi_rank_maxsim_equals_one_process(tiny_bert, tmp_path, world_size):
    from dist import spawn

    out = tmp_path / "grads.pt"
    spawn(_rank, world_size, str(tiny_bert), str(out))
    got, want = torch.load(out), reference(str(tiny_bert), chunks=world_size)
    assert set(got) == set(want) and "temperature.log_inverse" in got and "encoder.document_projection.weight" in got
    flat_got, flat_want = (torch.cat([g[n].reshape(-1) for n in sorted(want)]) for g in (got, want))
    worst = ((flat_got - flat_want).abs().max() / flat_want.abs().max()).item()
    print(f"MaxSim W={world_size}: max |difference| / max |gradient| = {worst:.1e}")
    assert worst < 1e-10


def test_exact_maxsim_search_equals_brute_force():
    from embedscale.contrastive.maxsim import maxsim_scores
    from embedscale.retrieval.late_interaction import TokenMatrices, maxsim_search

    g = torch.Generator().manual_seed(0)

    def packed(lengths: list[int]) -> TokenMatrices:
        vectors = torch.nn.functional.normalize(torch.randn(sum(lengths), 8, generator=g), dim=-1)
        return TokenMatrices(vectors, torch.cumsum(torch.tensor([0, *lengths]), 0))

    queries, docs = packed([3, 5, 4, 1, 2]), packed([7, 1, 12, 4, 9, 3, 6, 2, 5, 8, 11])
    scores, idx = maxsim_search(queries, docs, 4, query_chunk=2, doc_chunk=3)
    q, q_mask = queries.padded(slice(0, 5))
    d, d_mask = docs.padded(slice(0, 11))
    want = maxsim_scores(q, q_mask, d, d_mask)  # the training loss's implementation, another way of computing it
    top = want.topk(4, dim=1)
    torch.testing.assert_close(scores, top.values, rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, top.indices)
    assert docs.bytes_per_text == pytest.approx(68 * 8 * 4 / 11 + 8)


@pytest.mark.slow  # CLI processes
def test_train_a_colbert_model_on_two_ranks_with_gradcache_and_evaluate(tiny_bert, tiny_data, tmp_path):
    """`embedscale train model.multivector=true` under DDP (2 gloo ranks, GradCache, hard negatives mined by id
    cycling are not needed: in-batch), evaluated by exact MaxSim before and after, index size reported."""
    import json
    import subprocess
    import sys

    from helpers import clean_env, tiny_overrides

    run_dir = tmp_path / "run"
    args = [o for o in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not o.startswith("model.query_max")]
    args += ["model.multivector=true", "model.multivector_dim=16", "model.query_max_length=12"]
    args += ["model.query_augment_length=12", "trainer=ddp_cpu", "gradcache.chunk_size=2", "logger=csv"]
    args += ["eval=scifact_stsb", "eval.beir.0.path=tiny", "eval.sts.0.path=sts/test.tsv", "trainer.progress=off"]
    args += [f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", "export=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "embedscale.cli", "train", *args], capture_output=True, text=True, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["optimizer_steps"] == 3
    for tag in ("before", "after"):
        got = metrics["eval"][tag]
        assert 0 <= got["tiny/ndcg@10"] <= 1 and -1 <= got["stsb/spearman"] <= 1
        assert got["tiny/index_bytes_per_doc"] > 8  # float16 vectors of the scored tokens, 16 dims
    before, after = (json.loads((run_dir / "runs" / f"tiny-{tag}.json").read_text()) for tag in ("before", "after"))
    assert before.keys() == after.keys() and before != after  # the model moved: MaxSim scores changed


def test_a_colbert_run_can_start_from_a_bi_encoder_export_and_its_export_reloads(tiny_bert, tmp_path):
    """A bi-encoder export records multivector=false: starting a multi-vector model from it keeps the run's
    multi-vector settings (the export's backbone, a fresh projection); the multi-vector export restores them all."""
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.export import export_model

    bi, tok = load_encoder(ModelConfig(name_or_path=str(tiny_bert)))
    export_model(bi, tok, tmp_path / "bi")
    colbert, tok = load_encoder(mv_config(tmp_path / "bi", multivector_dim=12))
    assert colbert.cfg.multivector and colbert.cfg.multivector_dim == 12 and colbert.cfg.query_augment_length == 8
    export_model(colbert, tok, tmp_path / "colbert")
    again, _ = load_encoder(ModelConfig(name_or_path=str(tmp_path / "colbert")))  # settings from the export
    assert again.cfg.multivector and again.cfg.multivector_dim == 12 and again.cfg.query_augment_length == 8
    torch.testing.assert_close(again.query_projection.weight, colbert.query_projection.weight)


@pytest.mark.slow  # starts ranks (3 training runs)
def test_colbert_under_fsdp2_and_zero3_with_gradcache_trains_to_ddp_s_weights(tiny_bert_nodrop, tiny_data, tmp_path):
    """model.multivector under every strategy: FSDP2 + GradCache and DeepSpeed ZeRO-3 + GradCache, 2 gloo ranks,
    3 steps with hard negatives, train to the weights ddp does (backbone and projection, read from the exports)."""

    from helpers import train_processes
    from safetensors.torch import load_file

    common = [
        f"model.name_or_path={tiny_bert_nodrop}",
        "model.multivector=true",
        "model.multivector_dim=16",
        "model.query_max_length=8",
        "model.query_augment_length=8",
        "model.document_max_length=24",
        f"data.root={tiny_data}",
        "data.path=tiny",
        "data.batch_size_per_rank=4",
        "trainer.max_steps=3",
        "optim.lr=1e-3",
        "loss.learnable_temperature=true",
        "eval=none",
        "logger=none",
        "trainer.progress=off",
        "trainer.num_threads=1",
    ]
    runs = {
        "ddp": ["trainer=ddp_cpu"],
        "fsdp2_gc": ["trainer=fsdp2_cpu", "gradcache.chunk_size=2"],
        "zero3_gc": ["trainer=deepspeed_zero3_cpu", "gradcache.chunk_size=2"],
    }
    train_processes({name: [*common, *args] for name, args in runs.items()}, tmp_path)  # two at a time
    weights = {}
    for name in runs:
        dense = load_file(tmp_path / name / "model" / "1_Dense" / "model.safetensors")
        weights[name] = {
            **load_file(tmp_path / name / "model" / "model.safetensors"),
            **{f"dense.{k}": v for k, v in dense.items()},
        }
    start = load_file(tiny_bert_nodrop / "model.safetensors")
    moved = max((weights["ddp"][n] - start[n]).abs().max().item() for n in start if n in weights["ddp"])
    assert moved > 1e-4 and "dense.linear.weight" in weights["ddp"]
    for name in ("fsdp2_gc", "zero3_gc"):
        assert set(weights[name]) == set(weights["ddp"])
        for key, want in weights["ddp"].items():
            torch.testing.assert_close(weights[name][key], want, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("method", ["dense", "hybrid"])
def test_mining_with_a_colbert_retriever(tmp_path, tiny_bert, method):
    """`embedscale mine` with a multi-vector model: candidates by exact MaxSim, every stored score is the MaxSim of
    (query, text) computed directly, and the usual filters hold (no labelled positive is a negative)."""
    from test_mining import _beir

    from embedscale.config import IndexConfig, MineConfig, MineJobConfig
    from embedscale.data.shards import ShardedDataset
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.export import export_model
    from embedscale.jobs.mine import run
    from embedscale.retrieval.late_interaction import encode_token_matrices, maxsim_block

    encoder, tok = load_encoder(mv_config(tiny_bert))
    export_model(encoder, tok, tmp_path / "colbert")
    beir = _beir(tmp_path)
    cfg = MineJobConfig(
        model=ModelConfig(name_or_path=str(tmp_path / "colbert")),
        mine=MineConfig(input=str(beir), method=method, num_negatives=3, window_end=8, output=str(tmp_path / "out")),
        index=IndexConfig(gpu="false"),
    )
    manifest = run(cfg)
    ds = ShardedDataset.open(tmp_path / "out")
    rows = [r for s, meta in enumerate(ds.shards) for r in ds.read(s, range(meta["samples"]))]
    assert len(rows) == 2 == manifest["num_samples"] and manifest["mining"]["model"]["fingerprint"]
    loaded, tok = load_encoder(ModelConfig(name_or_path=str(tmp_path / "colbert")))

    def maxsim(query: str, text: str) -> float:
        q = encode_token_matrices(loaded, tok, [query], side="query")
        d = encode_token_matrices(loaded, tok, [text], side="document")
        return float(maxsim_block(*q.padded(slice(0, 1)), *d.padded(slice(0, 1)))[0, 0])

    for row in rows:
        assert "cats are small furry pets" not in row["negatives"] or "dog" in row["query"]
        assert row["positive_score"] == pytest.approx(maxsim(row["query"], row["positive"]), rel=1e-3)
        for text, score in zip(row["negatives"], row["negative_scores"], strict=True):
            assert score == pytest.approx(maxsim(row["query"], text), rel=1e-3)


def test_candidate_search_rescores_the_documents_of_each_query_token_s_nearest_tokens():
    from embedscale.retrieval.late_interaction import TokenMatrices, candidate_search, maxsim_search

    g = torch.Generator().manual_seed(1)

    def packed(lengths: list[int]) -> TokenMatrices:
        vectors = torch.nn.functional.normalize(torch.randn(sum(lengths), 8, generator=g), dim=-1)
        return TokenMatrices(vectors, torch.cumsum(torch.tensor([0, *lengths]), 0))

    queries, docs = packed([3, 5, 2]), packed([7, 1, 12, 4, 9, 3, 6, 2, 5, 8, 11, 4])
    exact_s, exact_i = maxsim_search(queries, docs, 5)
    all_s, all_i, per_query = candidate_search(queries, docs, 5, per_token=int(docs.lengths_N.sum()))
    assert per_query == 12 and torch.equal(all_i, exact_i)  # every token a candidate: exact search
    torch.testing.assert_close(all_s, exact_s)
    scores, ids, per_query = candidate_search(queries, docs, 5, per_token=2)
    owner = torch.repeat_interleave(torch.arange(12), docs.lengths_N)
    for row in range(3):
        q, q_mask = queries.padded(slice(row, row + 1))
        sims = q[0][q_mask[0]] @ docs.vectors_TD.T  # brute force: each query token's 2 nearest token vectors
        want = set(owner[sims.topk(2, dim=1).indices.reshape(-1)].tolist())
        got = [i for i in ids[row].tolist() if i >= 0]
        assert set(got) <= want and len(got) == min(5, len(want))
        full_s, full_i = maxsim_search(TokenMatrices(*_row(queries, row)), docs, 12)
        by_doc = dict(zip(full_i[0].tolist(), full_s[0].tolist(), strict=True))
        for s, i in zip(scores[row].tolist(), got, strict=False):
            assert s == pytest.approx(by_doc[i], rel=1e-5)  # exact MaxSim of each candidate
    assert 1 <= per_query <= 12


def _row(m, row: int):
    """One text of packed token matrices as its own (vectors, offsets)."""
    a, b = int(m.offsets_N[row]), int(m.offsets_N[row + 1])
    return m.vectors_TD[a:b], torch.tensor([0, b - a])


def test_the_evaluator_reports_index_size_and_candidates_and_large_candidate_pools_are_exact(tiny_bert, tiny_data):
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import RetrievalEvaluator

    encoder, tok = load_encoder(mv_config(tiny_bert))
    exact = RetrievalEvaluator.from_beir(tiny_data / "tiny", "test", max_length=24)
    pooled = RetrievalEvaluator.from_beir(tiny_data / "tiny", "test", max_length=24, maxsim_candidates=10_000)
    few = RetrievalEvaluator.from_beir(tiny_data / "tiny", "test", max_length=24, maxsim_candidates=1)
    m_exact, m_pooled, m_few = (ev(encoder, tok) for ev in (exact, pooled, few))
    assert m_exact["tiny/index_bytes_per_doc"] > 8 and "tiny/maxsim_candidates_per_query" not in m_exact
    assert m_pooled["tiny/maxsim_candidates_per_query"] == len(exact.corpus)
    assert {k: v for k, v in m_pooled.items() if "candidates" not in k} == pytest.approx(m_exact)
    assert 1 <= m_few["tiny/maxsim_candidates_per_query"] < len(exact.corpus)
