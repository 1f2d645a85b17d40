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


@pytest.mark.slow  # the real MiniLM
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


def _load_report(capfd, load) -> str:
    """What loading prints: transformers' log records (its logger keeps its own stderr handler, bound to the stream
    of the moment it was created, so they are collected from the logger itself) and stdout/stderr."""
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    collect = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger("transformers"), logging.getLogger()]
    capfd.readouterr()
    for logger in loggers:
        logger.addHandler(collect)
    try:
        load()
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    out, err = capfd.readouterr()
    return "\n".join(records + [line for line in (out + err).splitlines() if "Loading weights" not in line])


@pytest.mark.slow  # the real MiniLM
@pytest.mark.parametrize("source", ["minilm", "tiny_without_pooler"])
def test_export_loads_without_a_load_report(source, tiny_bert, tmp_path, capfd):
    """Our own load of the source and loading the export (SentenceTransformer, AutoModel) print no transformers
    LOAD REPORT: the export carries the pooler the source had (the packaged MiniLM's own weights), or a fresh one
    when the source has none (the tiny test model is saved without), so every weight its config builds exists."""
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from embedscale.encoder.biencoder import POOLER_FOR_EXPORT, checkpoint_has_pooler, resolve_model_path

    cfg = ModelConfig() if source == "minilm" else ModelConfig(name_or_path=str(tiny_bert))
    src = resolve_model_path(cfg.name_or_path)
    assert checkpoint_has_pooler(src) is (source == "minilm")
    holder = {}
    printed = _load_report(capfd, lambda: holder.update(zip(("encoder", "tokenizer"), load_encoder(cfg))))
    assert "LOAD REPORT" not in printed and "MISSING" not in printed and "UNEXPECTED" not in printed, printed
    encoder = holder["encoder"]
    assert encoder.query_backbone.pooler is None  # never trained, never in the state dict
    assert not any("pooler" in name for name in encoder.state_dict())
    stash = encoder.query_backbone.__dict__[POOLER_FOR_EXPORT]
    out = export_model(encoder, holder["tokenizer"], tmp_path / "export")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys() if k.startswith("pooler.")}
    assert sorted(exported) == ["pooler.dense.bias", "pooler.dense.weight"]
    torch.testing.assert_close(exported["pooler.dense.weight"], stash.dense.weight.detach(), rtol=0, atol=0)
    if source == "minilm":  # the checkpoint's own pooler, carried through unchanged
        with safe_open(f"{src}/model.safetensors", framework="pt") as f:
            torch.testing.assert_close(exported["pooler.dense.weight"], f.get_tensor("pooler.dense.weight"))
    for load in (lambda: SentenceTransformer(str(out), device="cpu"), lambda: AutoModel.from_pretrained(out)):
        printed = _load_report(capfd, load)
        assert "LOAD REPORT" not in printed and "MISSING" not in printed and "UNEXPECTED" not in printed, printed
    assert encoder.query_backbone.pooler is None  # detached again after saving
