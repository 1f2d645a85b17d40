"""Pooling is correct under left and right padding, and matches a per-row reference."""

import pytest
import torch

from embedscale.config import Pooling
from embedscale.encoder.pooling import pool


def _padded(h_list, side):
    """Stack rows of different lengths (L_i, H) with zero padding on `side`; returns (h_BLH, m_BL)."""
    L = max(h.shape[0] for h in h_list)
    H = h_list[0].shape[1]
    h = torch.zeros(len(h_list), L, H, dtype=torch.float64)
    m = torch.zeros(len(h_list), L, dtype=torch.long)
    for i, row in enumerate(h_list):
        n = row.shape[0]
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        h[i, sl], m[i, sl] = row, 1
    return h, m


def _reference(row, how):
    n = row.shape[0]
    if how is Pooling.cls:
        return row[0]
    if how is Pooling.last_token:
        return row[-1]
    if how is Pooling.mean:
        return row.mean(0)
    w = torch.arange(1, n + 1, dtype=row.dtype)
    return (row * w[:, None]).sum(0) / w.sum()


@pytest.mark.parametrize("how", list(Pooling))
def test_pooling_matches_reference_under_both_padding_sides(how):
    torch.manual_seed(0)
    rows = [torch.randn(n, 5, dtype=torch.float64) for n in (1, 4, 7, 3)]
    expected = torch.stack([_reference(r, how) for r in rows])
    for side in ("left", "right"):
        h, m = _padded(rows, side)
        torch.testing.assert_close(pool(h, m, how), expected, rtol=0, atol=1e-12, msg=f"{how} {side}")


def test_padding_garbage_is_ignored():
    torch.manual_seed(1)
    rows = [torch.randn(n, 4, dtype=torch.float64) for n in (2, 5)]
    h, m = _padded(rows, "right")
    h_noisy = h + (1 - m[..., None]) * 1e3  # huge values in padded positions
    for how in Pooling:
        torch.testing.assert_close(pool(h_noisy, m, how), pool(h, m, how))


def test_attention_kernel_is_passed_to_transformers_and_gives_the_same_embeddings(tmp_path):
    """model.attn_implementation picks transformers' attention kernel (null: its default); same maths."""
    from conftest import make_tiny_bert

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import encode_texts, load_encoder

    path = str(make_tiny_bert(tmp_path / "bert"))
    texts = ["a protein folds", "galaxies collide slowly over time", "river"]
    embeddings = {}
    for impl in ("eager", "sdpa", None):
        encoder, tok = load_encoder(ModelConfig(name_or_path=path, attn_implementation=impl))
        assert encoder.query_backbone.config._attn_implementation == (impl or "sdpa")
        embeddings[impl] = encode_texts(encoder, tok, texts, side="document", batch_size=2)
    torch.testing.assert_close(embeddings["eager"], embeddings["sdpa"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="model.attn_implementation"):
        ModelConfig(attn_implementation="")


def test_model_dropout_overrides_every_dropout_probability(tiny_bert):
    """model.dropout sets the checkpoint's dropout probabilities (hidden and attention); 0 makes a training-mode
    forward deterministic, which it is not with the checkpoint's 0.1."""
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.encoder.tokenize import tokenize

    def two_forwards(**settings):
        encoder, tok = load_encoder(ModelConfig(name_or_path=str(tiny_bert), **settings))
        tokens = tokenize(tok, ["a protein folds slowly", "rivers"], prefixes="", max_length=16, cfg=encoder.cfg)
        encoder.train()
        return encoder, encoder.encode(tokens, side="query"), encoder.encode(tokens, side="query")

    encoder, a, b = two_forwards(dropout=0.0)
    config = encoder.query_backbone.config
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert torch.equal(a, b)
    encoder, a, b = two_forwards()
    assert encoder.query_backbone.config.hidden_dropout_prob == 0.1 and not torch.equal(a, b)
    from embedscale.encoder.biencoder import dropout_overrides

    assert dropout_overrides(str(tiny_bert), ModelConfig(dropout=0.05)) == {
        "attention_probs_dropout_prob": 0.05,
        "hidden_dropout_prob": 0.05,
    }
