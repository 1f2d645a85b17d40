"""Decoder backbones (E5-mistral style) on a tiny random Mistral with a Llama-like tokenizer (BOS, no EOS):
EOS-terminated texts and last-token pooling under both padding sides, instructions and their exclusion
from mean pooling, LoRA (only adapters train; the export is merged), gradient checkpointing (same
gradients), bidirectional attention. Each reference is computed on one unpadded sequence, by hand."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FILLER, QUERY_PREFIX, TEXTS, make_tiny_mistral

from embedscale.config import LossConfig, ModelConfig, OptimConfig, Pooling
from embedscale.data.batch import PairExample
from embedscale.data.collate import PairCollator
from embedscale.encoder.biencoder import encode_texts, load_encoder
from embedscale.encoder.tokenize import text_start, tokenize


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"))


@pytest.fixture(scope="module")
def mistral_no_window(tmp_path_factory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral_no_window"), sliding_window=None)


def _load(path, **kw):
    kw = {"pooling": Pooling.last_token, "normalize": False, "query_max_length": 48, "document_max_length": 48, **kw}
    return load_encoder(ModelConfig(name_or_path=str(path), **kw))


@torch.no_grad()
def _states(encoder, tokenizer, text: str, *, eos: bool = True) -> tuple[list[int], torch.Tensor]:
    """Token ids and hidden states (L, H) of one unpadded text, as the reference."""
    ids = tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    encoder.eval()
    h = encoder.query_backbone(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return ids, h.last_hidden_state[0]


def _last_real(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    last_B = mask_BL.shape[1] - 1 - mask_BL.flip(dims=[1]).argmax(dim=1)
    return ids_BL[torch.arange(ids_BL.shape[0]), last_B]


# -- EOS and last-token pooling -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["bert", "eos", "exclude_prefix"])
def test_tokenizing_in_pieces_gives_the_tensors_of_one_call(mistral, monkeypatch, side, kind):
    """Big batches are tokenized TOKENIZE_PIECE texts per call (bounded tokenizer scratch); the padded
    tensors must equal one call over all texts, on both padding sides and all three code paths."""
    from conftest import minilm_tokenizer_path

    import embedscale.encoder.tokenize as tokenize_module

    if kind == "bert":  # the padded fast path (no EOS to append, whole text pooled)
        cfg = ModelConfig(padding_side=side, query_max_length=16)
        tok = __import__("transformers").AutoTokenizer.from_pretrained(minilm_tokenizer_path())
        tok.padding_side = side
    else:
        pooling = Pooling.last_token if kind == "eos" else Pooling.mean  # last token: EOS appended (list path)
        encoder, tok = _load(mistral, padding_side=side, pool_exclude_prefix=kind == "exclude_prefix", pooling=pooling)
        cfg = encoder.cfg
        assert (tokenize_module.eos_to_append(tok, cfg) is not None) == (kind == "eos")
    texts = [TEXTS[i % len(TEXTS)] + (" " + FILLER) * (i % 3 if i < 9 else 0) for i in range(11)]
    prefixes = [QUERY_PREFIX if i % 2 and i < 9 else "" for i in range(11)]  # the last piece (9, 10) is short
    whole = tokenize(tok, texts, prefixes=prefixes, max_length=40, cfg=cfg)
    monkeypatch.setattr(tokenize_module, "TOKENIZE_PIECE", 3)
    pieces = tokenize(tok, texts, prefixes=prefixes, max_length=40, cfg=cfg)
    keys = ["input_ids", "attention_mask"] + (["pool_mask"] if kind == "exclude_prefix" else [])
    assert sorted(pieces) == sorted(whole) == sorted(keys)
    for key in whole:
        assert torch.equal(pieces[key], whole[key]), key
    # the last piece was padded narrower than the others before stacking
    assert whole["attention_mask"][9:].sum(1).max() < whole["attention_mask"].shape[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_text_ends_with_eos_truncated_too(mistral, side):
    encoder, tok = _load(mistral, padding_side=side)
    eos = tok.eos_token_id
    full = tokenize(tok, TEXTS, prefixes="", max_length=48, cfg=encoder.cfg)
    assert (_last_real(full["input_ids"], full["attention_mask"]) == eos).all()
    for i, text in enumerate(TEXTS):  # exactly the tokenizer's ids, then one EOS
        row = full["input_ids"][i][full["attention_mask"][i].bool()].tolist()
        assert row == tok(text)["input_ids"] + [eos]
    short = tokenize(tok, TEXTS, prefixes="", max_length=4, cfg=encoder.cfg)
    assert short["attention_mask"].sum(1).max() == 4
    for i, text in enumerate(TEXTS):  # the first max_length - 1 tokens, then EOS
        row = short["input_ids"][i][short["attention_mask"][i].bool()].tolist()
        assert row == tok(text)["input_ids"][:3] + [eos]
    if side == "left":
        assert (short["input_ids"][:, -1] == eos).all()


def test_append_eos_automatic_explicit_and_not_twice(mistral):
    from tokenizers import processors

    encoder, tok = _load(mistral)
    eos = tok.eos_token_id

    def last(cfg_kw, tokenizer=tok):
        cfg = ModelConfig(name_or_path=str(mistral), **cfg_kw)
        enc = tokenize(tokenizer, ["galaxy"], prefixes="", max_length=8, cfg=cfg)
        return enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()

    assert last({"pooling": Pooling.last_token})[-1] == eos  # automatic: last_token pooling
    assert last({"pooling": Pooling.mean})[-1] != eos  # automatic: not for mean pooling
    assert last({"pooling": Pooling.mean, "append_eos": True})[-1] == eos
    assert last({"pooling": Pooling.last_token, "append_eos": False})[-1] != eos
    # A tokenizer that ends texts with EOS itself (e5-mistral's) gets no second one, truncated or not.
    with_eos = tok.__class__.from_pretrained(mistral, pad_token="</s>")
    with_eos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", eos)]
    )
    for cfg_kw in ({"pooling": Pooling.last_token}, {"append_eos": True}):
        row = last(cfg_kw, with_eos)
        assert row[-1] == eos and row[-2] != eos
    cfg = ModelConfig(name_or_path=str(mistral), append_eos=True)
    assert tokenize(with_eos, [TEXTS[2]], prefixes="", max_length=5, cfg=cfg)["input_ids"][0].tolist()[-1] == eos


def test_last_token_embedding_is_independent_of_padding_side_and_batch(mistral):
    out = {}
    for side in ("left", "right"):
        encoder, tok = _load(mistral, padding_side=side)
        alone = torch.cat([encode_texts(encoder, tok, [t], side="document") for t in TEXTS])
        together = encode_texts(encoder, tok, TEXTS, side="document")
        mixed = encode_texts(encoder, tok, [FILLER, *TEXTS[::-1]], side="document", batch_size=3)[1:].flip(0)
        for got in (together, mixed):
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        out[side] = alone
    torch.testing.assert_close(out["left"], out["right"], rtol=0, atol=1e-5)
    # and it is the state of the EOS that ends the text, computed on the text alone
    encoder, tok = _load(mistral)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(out["left"][i], _states(encoder, tok, text)[1][-1], rtol=0, atol=1e-5)


# -- instructions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_query_gets_the_instruction_document_none_in_training_and_encoding(mistral, side):
    encoder, tok = _load(mistral, padding_side=side, query_prefix=QUERY_PREFIX)
    eos = tok.eos_token_id
    examples = [PairExample(TEXTS[i], TEXTS[i + 1]) for i in range(3)]
    batch = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)(examples)
    for tokens, texts in ((batch.queries, [QUERY_PREFIX + ex.query for ex in examples]), (batch.documents, None)):
        texts = texts or [ex.positive for ex in examples]
        for i, text in enumerate(texts):
            assert tokens["input_ids"][i][tokens["attention_mask"][i].bool()].tolist() == tok(text)["input_ids"] + [eos]
    assert QUERY_PREFIX.startswith("Instruct: ") and QUERY_PREFIX.endswith("\nQuery: ")
    # Encoding applies the same prefixes: embeddings equal the training forward's and the by-hand states.
    with torch.no_grad():
        q_train = encoder.eval().encode(batch.queries, side="query")
        d_train = encoder.encode(batch.documents, side="document")
    q = encode_texts(encoder, tok, [ex.query for ex in examples], side="query")
    d = encode_texts(encoder, tok, [ex.positive for ex in examples], side="document")
    torch.testing.assert_close(q, q_train, rtol=0, atol=1e-5)
    torch.testing.assert_close(d, d_train, rtol=0, atol=1e-5)
    for i, ex in enumerate(examples):
        torch.testing.assert_close(q[i], _states(encoder, tok, QUERY_PREFIX + ex.query)[1][-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(d[i], _states(encoder, tok, ex.positive)[1][-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", [Pooling.mean, Pooling.weighted_mean])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_exclude_prefix_pools_exactly_the_text_tokens(mistral, side, how):
    kw = dict(padding_side=side, pooling=how, query_prefix=QUERY_PREFIX, append_eos=True)
    encoder, tok = _load(mistral, pool_exclude_prefix=True, **kw)
    got = encode_texts(encoder, tok, TEXTS, side="query")
    plain = encode_texts(_load(mistral, **kw)[0], tok, TEXTS, side="query")
    for i, text in enumerate(TEXTS):
        _, h_LH = _states(encoder, tok, QUERY_PREFIX + text)
        n_text = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # the text's tokens and the EOS
        pooled_nH = h_LH[-n_text:].double()
        w_n = torch.ones(n_text, dtype=torch.float64) if how is Pooling.mean else torch.arange(1.0, n_text + 1).double()
        expected = (pooled_nH * w_n[:, None]).sum(0) / w_n.sum()
        torch.testing.assert_close(got[i].double(), expected, rtol=0, atol=1e-5)
        assert (plain[i] - got[i]).abs().max() > 1e-3  # without the flag, BOS and the instruction are pooled too
    # documents have no prefix: nothing to exclude, BOS included, as without the flag
    docs = encode_texts(encoder, tok, TEXTS, side="document")
    torch.testing.assert_close(docs, encode_texts(_load(mistral, **kw)[0], tok, TEXTS, side="document"))


def test_text_start_handles_a_space_merged_into_the_next_token():
    # SentencePiece style: "Query: what" -> <s>, "_Query" (0, 5), ":" (5, 6), "_what" (6, 11); the prefix is
    # "Query: " (7 chars) and its trailing space lives in the text's first token: that token is text.
    offsets, special = [(0, 0), (0, 5), (5, 6), (6, 11), (0, 0)], [1, 0, 0, 0, 1]
    assert text_start(offsets, special, 7) == 3
    assert text_start(offsets, special, 0) == 0
    assert text_start(offsets[:3] + [(0, 0)], special[:3] + [1], 7) == 3  # empty text: pool the EOS only


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"pooling": Pooling.last_token, "pool_exclude_prefix": True}, "pool_exclude_prefix"),
        ({"lora_r": -1}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": [""]}, "lora_target_modules"),
    ],
)
def test_config_checks_name_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"model\.{key}"):
        ModelConfig(**kw)


# -- LoRA -----------------------------------------------------------------------------------------------


def _module(encoder):
    from embedscale.contrastive.module import ContrastiveModule

    return ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig()).train()


def _batch(tok, cfg):
    examples = [PairExample(TEXTS[i], TEXTS[(i + 1) % len(TEXTS)]) for i in range(4)]
    return PairCollator(tok, model_cfg=cfg, num_hard_negatives=0)(examples)


def test_lora_trains_only_adapters_and_exports_merged(mistral, tmp_path):
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from embedscale.contrastive.optim import param_groups
    from embedscale.export import export_model

    r = 4
    encoder, tok = _load(mistral, lora_r=r, lora_alpha=8, padding_side="left", query_prefix=QUERY_PREFIX)
    trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    plain, _ = _load(mistral)
    targets = [m for n, m in plain.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert len(targets) == 8
    assert sum(p.numel() for p in trainable.values()) == sum(r * (m.in_features + m.out_features) for m in targets)

    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    module = _module(encoder)
    optimizer = torch.optim.AdamW(param_groups(module.encoder, OptimConfig()), lr=1e-2)
    loss, _ = module.compute_loss(_batch(tok, encoder.cfg))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)

    # A Lightning checkpoint holds the adapters: a fresh LoRA encoder loading it computes the same embeddings.
    q = encode_texts(encoder, tok, TEXTS, side="query")
    fresh, _ = _load(mistral, lora_r=r, lora_alpha=8, padding_side="left", query_prefix=QUERY_PREFIX)
    assert any("lora_" in k for k in encoder.state_dict())
    fresh.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(encode_texts(fresh, tok, TEXTS, side="query"), q, rtol=0, atol=0)

    out = export_model(encoder, tok, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k or "base_model" in k for k in keys)
    hf = AutoModel.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in hf.named_modules())
    enc = tokenize(tok, TEXTS, prefixes=QUERY_PREFIX, max_length=48, cfg=encoder.cfg)
    with torch.no_grad():
        h = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(h[:, -1], q, rtol=0, atol=1e-5)  # left padding: the last column is each EOS
    # The exported tokenizer appends EOS itself, truncated texts too: a plain call tokenises as training did.
    exported_tok = AutoTokenizer.from_pretrained(out)
    for max_length in (48, 5):
        ours = tokenize(tok, TEXTS, prefixes=QUERY_PREFIX, max_length=max_length, cfg=encoder.cfg)
        theirs = exported_tok([QUERY_PREFIX + t for t in TEXTS], truncation=True, max_length=max_length)["input_ids"]
        assert theirs == [row[m.bool()].tolist() for row, m in zip(ours["input_ids"], ours["attention_mask"])]
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True, batch_size=2)
    torch.testing.assert_close(got, q, rtol=0, atol=1e-5)
    reloaded, tok2 = load_encoder(ModelConfig(name_or_path=str(out)))
    assert reloaded.cfg.pooling is Pooling.last_token and reloaded.cfg.lora_r == 0
    torch.testing.assert_close(encode_texts(reloaded, tok2, TEXTS, side="query"), q, rtol=0, atol=1e-5)


# -- gradient checkpointing -----------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(mistral, lora):
    grads, forwards = {}, {}
    for gc in (False, True):
        torch.manual_seed(1)  # the same LoRA initialisation both times
        encoder, tok = _load(mistral, gradient_checkpointing=gc, lora_r=4 if lora else 0)
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # non-zero B, so that A gets a gradient too
        # the layer's first module: a recomputation (which may stop early, after the last saved tensor) runs it
        norm = next(m for n, m in encoder.named_modules() if n.endswith("layers.0.input_layernorm"))
        calls = []
        norm.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        module = _module(encoder)
        loss, _ = module.compute_loss(_batch(tok, encoder.cfg))
        loss.backward()
        grads[gc] = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
        forwards[gc] = len(calls)
    assert forwards == {False: 2, True: 4}  # queries + documents; checkpointing recomputes each in backward
    assert grads[False].keys() == grads[True].keys()
    assert all(g.abs().sum() > 0 for g in grads[True].values())
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-8, msg=name)


# -- bidirectional attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [True, False])
def test_bidirectional_attention_lets_early_tokens_see_later_ones(mistral, mistral_no_window, tmp_path, window):
    """Unpadded texts take the path where transformers builds no mask (SDPA's own is_causal flag decides)."""
    from embedscale.export import export_model

    path = mistral if window else mistral_no_window
    a, b = "galaxy river protein", "galaxy river violin"  # differ in the last word only
    first = {}
    for bidirectional in (False, True):
        encoder, tok = _load(path, pooling=Pooling.cls, bidirectional=bidirectional, append_eos=False)
        first[bidirectional] = encode_texts(encoder, tok, [a, b], side="document", batch_size=1)  # unpadded
        for side in ("left", "right"):  # padded, in a batch: padding stays invisible
            tok.padding_side = side
            batch = encode_texts(encoder, tok, [a, FILLER, b], side="document", batch_size=3)
            torch.testing.assert_close(batch[[0, 2]], first[bidirectional], rtol=0, atol=1e-5)
    torch.testing.assert_close(first[False][0], first[False][1], rtol=0, atol=0)  # causal: BOS sees only itself
    assert (first[True][0] - first[True][1]).abs().max() > 1e-4
    # Both switches are set: the config's (masks; transformers passes it to attention) and every attention
    # module's own flag (read by attention kernels when no mask is built, e.g. flash attention without padding).
    assert encoder.query_backbone.config.is_causal is False
    assert not any(getattr(m, "is_causal", False) for m in encoder.modules())
    # The export records it: embedscale and plain transformers load it bidirectional.
    out = export_model(encoder, tok, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    reloaded, tok2 = load_encoder(ModelConfig(name_or_path=str(out)))
    assert reloaded.cfg.bidirectional
    torch.testing.assert_close(encode_texts(reloaded, tok2, [a, b], side="document"), first[True], rtol=0, atol=1e-5)
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        states = [hf(**tok2(text, return_tensors="pt")).last_hidden_state[0, 0] for text in (a, b)]
    torch.testing.assert_close(torch.stack(states), first[True], rtol=0, atol=1e-5)


def test_bidirectional_fails_naming_the_key_where_unsupported():
    from embedscale.encoder.backbone import make_bidirectional

    class Stub(torch.nn.Module):  # no masking_utils mask, no causal attention flag
        config = SimpleNamespace(model_type="stub")

    with pytest.raises(ValueError, match=r"model\.bidirectional=true is not supported for Stub"):
        make_bidirectional(Stub())


# -- the training job -----------------------------------------------------------------------------------


def test_train_job_with_lora_checkpoints_resumes_and_exports_merged(mistral, tiny_data, tmp_path):
    """`embedscale train` on the decoder with LoRA and checkpointing: last.ckpt holds the adapters, a resumed
    run continues from it, and the export is merged."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from embedscale.config import TrainConfig, register_configs, to_config
    from embedscale.jobs.launch import conf_dir
    from embedscale.jobs.train import run

    def cfg(max_steps, *extra):
        overrides = [
            f"model.name_or_path={mistral}",
            "model.pooling=last_token",
            "model.padding_side=left",
            f"model.query_prefix='{QUERY_PREFIX}'",
            "model.query_max_length=16",
            "model.document_max_length=24",
            "model.lora_r=4",
            "model.gradient_checkpointing=true",
            f"data.root={tiny_data}",
            "data.path=tiny",
            "data.batch_size_per_rank=4",
            "eval.beir.0.path=tiny",
            f"eval.cache_dir={tmp_path / 'cache'}",
            f"trainer.max_steps={max_steps}",
            "trainer.progress=off",
            "logger.loggers=[csv]",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ]
        register_configs()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return to_config(compose(config_name="train", overrides=overrides), TrainConfig)

    run(cfg(2))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and any("lora_B" in k for k in ckpt["state_dict"])
    result = run(cfg(4, "trainer.resume=last"))
    assert result["train"]["optimizer_steps"] == 4
    exported = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert exported and not any("lora" in k or "base_layer" in k for k in exported)
    reloaded, tok = load_encoder(ModelConfig(name_or_path=str(tmp_path / "run" / "model")))
    assert reloaded.cfg.query_prefix == QUERY_PREFIX and reloaded.cfg.lora_r == 0
    assert encode_texts(reloaded, tok, TEXTS, side="query").shape == (len(TEXTS), 64)
