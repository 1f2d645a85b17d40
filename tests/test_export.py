"""Export round trip: sentence-transformers and HF AutoModel load the export and give embedscale's embeddings."""

import pytest
import torch
import torch.nn.functional as F

from embedscale.config import ModelConfig, Pooling
from embedscale.encoder.biencoder import encode_texts, load_encoder
from embedscale.encoder.pooling import pool
from embedscale.export import export_model

TEXTS = [
    f"Sentence number {i}: {w} are studied in the context of {v}."
    for i, (w, v) in enumerate(
        [
            (a, b)
            for a in (
                "proteins",
                "galaxies",
                "rivers",
                "violins",
                "engines",
                "forests",
                "vaccines",
                "crystals",
                "neurons",
                "glaciers",
            )
            for b in (
                "biology",
                "physics",
                "music",
                "history",
                "chemistry",
                "medicine",
                "geology",
                "economics",
                "art",
                "law",
            )
        ]
    )
]


def cosine_rows(a, b):
    return F.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=-1)


def test_minilm_export_loads_in_sentence_transformers_and_automodel(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    assert len(TEXTS) == 100
    encoder, tokenizer = load_encoder(ModelConfig())
    ours = encode_texts(encoder, tokenizer, TEXTS, side="document")
    out = export_model(encoder, tokenizer, tmp_path / "export", metrics={"x/ndcg@10": 0.5})
    st = SentenceTransformer(str(out), device="cpu")
    theirs = st.encode(TEXTS, convert_to_tensor=True, batch_size=32)
    assert cosine_rows(ours, theirs).min().item() >= 0.9999
    hf, tok = AutoModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = hf(**enc).last_hidden_state
        hf_emb = F.normalize(pool(h, enc["attention_mask"], Pooling.mean), dim=-1)
    assert cosine_rows(ours, hf_emb).min().item() >= 0.9999
    assert "x/ndcg@10" in (out / "README.md").read_text()


@pytest.mark.parametrize("pooling", [Pooling.cls, Pooling.weighted_mean, Pooling.last_token])
def test_separate_towers_prefixes_and_pooling_round_trip(tiny_bert, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    cfg = ModelConfig(
        name_or_path=str(tiny_bert),
        pooling=pooling,
        shared_towers=False,
        query_prefix="query: ",
        document_prefix="passage: ",
        query_max_length=32,
        document_max_length=32,
    )
    encoder, tokenizer = load_encoder(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # make the towers differ, as after training
        for param in encoder.document_backbone.parameters():
            param.add_(0.2 * torch.randn_like(param))
    texts = TEXTS[:10]
    q, d = (encode_texts(encoder, tokenizer, texts, side=s) for s in ("query", "document"))
    assert cosine_rows(q, d).max().item() < 0.9999  # towers and prefixes make a difference
    out = export_model(encoder, tokenizer, tmp_path / "export")
    reloaded, tok2 = load_encoder(ModelConfig(name_or_path=str(out)))
    assert not reloaded.shared and reloaded.cfg.pooling is pooling and reloaded.cfg.query_prefix == "query: "
    torch.testing.assert_close(encode_texts(reloaded, tok2, texts, side="query"), q, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_texts(reloaded, tok2, texts, side="document"), d, atol=1e-5, rtol=0)
    st_q = SentenceTransformer(str(out / "query"), device="cpu").encode(
        texts, prompt_name="query", convert_to_tensor=True
    )
    st_d = SentenceTransformer(str(out / "document"), device="cpu").encode(
        texts, prompt_name="document", convert_to_tensor=True
    )
    assert cosine_rows(q, st_q).min().item() >= 0.9999
    assert cosine_rows(d, st_d).min().item() >= 0.9999
