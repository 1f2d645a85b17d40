"""Multi-vector export round trip: sentence-transformers' MultiVectorEncoder loads the export and returns embedscale's
token matrices (the scored rows) and MaxSim scores; embedscale's load_encoder restores the same encoder."""

import json
import logging

import pytest
import torch

from embedscale.config import ModelConfig
from embedscale.contrastive.maxsim import maxsim_scores
from embedscale.encoder.biencoder import load_encoder
from embedscale.encoder.tokenize import tokenize
from embedscale.export import export_model

QUERIES = [
    "what is the capital of France?",
    "galaxies",
    "why do rivers, lakes and glaciers (all of them) freeze in the winter months of the far north?!",  # > 16 tokens
]
DOCUMENTS = [
    "Paris is the capital -- and the largest city -- of France.",
    "Galaxies: systems of stars, gas & dust; bound by gravity.",
    "Rivers freeze from the top down. " * 6,  # > 24 tokens: truncated
]


def tiny_config(tiny_bert, **overrides) -> ModelConfig:
    settings = dict(
        name_or_path=str(tiny_bert),
        multivector=True,
        multivector_dim=8,
        query_prefix="query: ",
        document_prefix="passage: ",
        query_max_length=16,
        query_augment_length=16,
        document_max_length=24,
    )
    return ModelConfig(**{**settings, **overrides})


def ours(encoder, tokenizer, texts: list[str], side: str) -> list[torch.Tensor]:
    """embedscale's token matrices, each text's scored rows (token_mask == 1) only."""
    cfg = encoder.cfg
    query = side == "query"
    prefix = cfg.query_prefix if query else cfg.document_prefix
    length = cfg.query_max_length if query else cfg.document_max_length
    tokens = tokenize(tokenizer, texts, prefixes=prefix, max_length=length, cfg=cfg, side=side)
    with torch.no_grad():
        e_BLD = encoder.eval().encode(tokens, side=side)
    return [e_LD[mask.bool()] for e_LD, mask in zip(e_BLD, tokens["token_mask"], strict=True)]


def our_maxsim(q: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
    pad = torch.nn.utils.rnn.pad_sequence
    q_mask = pad([torch.ones(len(x), dtype=torch.bool) for x in q], batch_first=True)
    d_mask = pad([torch.ones(len(x), dtype=torch.bool) for x in d], batch_first=True)
    return maxsim_scores(pad(q, batch_first=True), q_mask, pad(d, batch_first=True), d_mask)


def assert_same_matrices(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert [x.shape for x in a] == [y.shape for y in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.float().cpu(), y.float().cpu(), atol=1e-5, rtol=0)


def perturb(encoder, *, towers: bool) -> None:
    """Make the document tower differ from the query tower (separate towers), as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        params = list(encoder.document_projection.parameters())
        params += list(encoder.document_backbone.parameters()) if towers else []
        for param in params:
            param.add_(0.2 * torch.randn_like(param))


@pytest.mark.parametrize(
    "settings",
    [
        {},  # ColBERT: queries expanded to 16 tokens, expansion not attended, punctuation skipped
        {"attend_to_expansion_tokens": True, "skip_punctuation": False},
        {"query_augment_length": None, "query_max_length": 12},
        {"shared_towers": False},  # a Router of two towers
    ],
    ids=["colbert", "attend-no-skiplist", "no-expansion", "separate-towers"],
)
def test_multivector_export_round_trip(tiny_bert, tmp_path, settings):
    from sentence_transformers import MultiVectorEncoder

    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(tiny_config(tiny_bert, **settings))
    if not encoder.shared:
        perturb(encoder, towers=True)
    q, d = ours(encoder, tokenizer, QUERIES, "query"), ours(encoder, tokenizer, DOCUMENTS, "document")
    out = export_model(encoder, tokenizer, tmp_path / "export", metrics={"x/ndcg@10": 0.5})

    st = MultiVectorEncoder(str(out), device="cpu")
    st_q, st_d = st.encode_query(QUERIES), st.encode_document(DOCUMENTS)
    assert_same_matrices(st_q, q)
    assert_same_matrices(st_d, d)
    if encoder.cfg.query_augment_length:
        assert all(len(x) == 16 for x in st_q)  # expansion tokens scored, long queries truncated at 16
    torch.testing.assert_close(st.similarity(st_q, st_d).float(), our_maxsim(q, d), atol=1e-4, rtol=0)

    reloaded, tokenizer2 = load_encoder(ModelConfig(name_or_path=str(out)))
    assert reloaded.cfg.multivector and reloaded.shared is encoder.shared and reloaded.cfg.multivector_dim == 8
    assert reloaded.cfg.query_augment_length == encoder.cfg.query_augment_length
    assert_same_matrices(ours(reloaded, tokenizer2, QUERIES, "query"), q)
    assert_same_matrices(ours(reloaded, tokenizer2, DOCUMENTS, "document"), d)


def test_skiplist_and_separate_projections_matter(tiny_bert, tmp_path):
    """The checks above have teeth: punctuation is dropped from documents (not from queries), and the document
    projection of separate towers is its own."""
    from sentence_transformers import MultiVectorEncoder

    encoder, tokenizer = load_encoder(tiny_config(tiny_bert, shared_towers=False, query_augment_length=None))
    perturb(encoder, towers=False)  # the projections alone differ
    out = export_model(encoder, tokenizer, tmp_path / "export")
    st = MultiVectorEncoder(str(out), device="cpu")
    text = ["a, b. c!"]
    attention = tokenizer(["passage: a, b. c!"])["attention_mask"][0]
    (st_d,), (st_q,) = st.encode_document(text), st.encode_query(text, prompt="passage: ")
    assert len(st_d) == sum(attention) - 4  # ":" "," "." "!" skipped
    assert len(st_q) == sum(attention)  # queries keep their punctuation
    assert not torch.allclose(st_q[1], st_d[1])  # [CLS] is scored by both, through different projections
    assert_same_matrices([st_d], ours(encoder, tokenizer, text, "document"))


def test_export_layout(tiny_bert, tmp_path):
    """The files MultiVectorEncoder needs, in the layout its own save writes, and what embedscale.json records."""
    encoder, tokenizer = load_encoder(tiny_config(tiny_bert))
    out = export_model(encoder, tokenizer, tmp_path / "export", metrics={"x/ndcg@10": 0.5})
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    types = [m["type"].rsplit(".", 1)[1] for m in read("modules.json")]
    assert types == ["Transformer", "Dense", "MultiVectorMask", "Normalize"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Dense/model.safetensors"):
        assert (out / name).is_file(), name
    assert read("config_sentence_transformers.json")["model_type"] == "MultiVectorEncoder"
    assert read("config_sentence_transformers.json")["prompts"] == {"query": "query: ", "document": "passage: "}
    expansion = read("sentence_bert_config.json")["query_expansion"]
    assert expansion == {"strategy": "fixed", "attend": False, "token": "[MASK]", "length": 16}
    assert read("sentence_bert_config.json")["document_length"] == 24
    assert {".", ",", "##.", "?"} <= set(read("2_MultiVectorMask/config.json")["skiplist_words"])
    assert read("1_Dense/config.json")["out_features"] == 8
    meta = read("embedscale.json")
    assert meta["model"]["multivector"] and meta["projection"] == {
        "query": "1_Dense/model.safetensors",
        "document": "1_Dense/model.safetensors",
    }
    assert "x/ndcg@10" in (out / "README.md").read_text() and "MultiVectorEncoder" in (out / "README.md").read_text()


def test_refuses_what_sentence_transformers_cannot_reproduce(tiny_bert, tmp_path, caplog):
    encoder, tokenizer = load_encoder(tiny_config(tiny_bert, query_max_length=12))  # augmented to 16
    with pytest.raises(ValueError, match=r"model\.query_max_length=12 is below model\.query_augment_length=16"):
        export_model(encoder, tokenizer, tmp_path / "export")
    assert not (tmp_path / "export").exists()

    # model.append_eos where the exported tokenizer cannot append EOS itself: BERT's post-processor is
    # [CLS] $A [SEP], not [BOS] $A, so export_tokenizer keeps it (and warns).
    from transformers import AutoTokenizer

    with_eos = AutoTokenizer.from_pretrained(str(tiny_bert), eos_token="[unused0]")
    encoder, _ = load_encoder(tiny_config(tiny_bert, append_eos=True))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"model\.append_eos: .* cannot be made"):
        export_model(encoder, with_eos, tmp_path / "export")
    assert not (tmp_path / "export").exists()
