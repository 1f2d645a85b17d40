"""The cross-encoder (re-ranker): (query, document) read together by one HF encoder -> one relevance logit.

Any HF encoder works: it is loaded as `AutoModelForSequenceClassification` with `num_labels=1`. A
checkpoint without a classification head (a bi-encoder such as the packaged all-MiniLM-L6-v2, or a
bare backbone) gets a fresh one, and the loader says so: such a model must be trained before its
scores mean anything. The score is the raw logit -- no sigmoid -- because the listwise loss
(contrastive/losses.py) and re-ranking only compare scores within a query's candidates.

One tokenisation function (`tokenize_pairs`) serves training and inference, so both truncate the
same way: a pair is cut to `max_length` tokens, longest text first (HF's `longest_first`, what
sentence-transformers' CrossEncoder does). `save_cross_encoder` writes the plain HF layout with
`sentence_transformers.activation_fn = Identity` in config.json, so that
`sentence_transformers.CrossEncoder(dir).predict` returns the same logits as `score_pairs`.

Legend: B = pairs in a batch, L = tokens, N = pairs scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from embedscale.encoder.biencoder import resolve_model_path

log = logging.getLogger(__name__)

IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"


class CrossEncoder(nn.Module):
    """A sequence-classification model with one output: tokenised pairs -> logits (B,)."""

    def __init__(self, model: nn.Module, *, max_length: int, new_parameters: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.max_length = max_length
        self.new_parameters = list(new_parameters or [])
        """Parameters initialised fresh at load time (an untrained head); empty for a trained cross-encoder."""

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**tokens).logits.squeeze(-1)  # (B,)


def tokenize_pairs(tokenizer, queries: list[str], documents: list[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """(query, document) pairs -> padded tensors: input_ids, attention_mask (and token_type_ids for BERT-likes)."""
    enc = tokenizer(
        queries, documents, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt"
    )
    return dict(enc)


def load_cross_encoder(name_or_path: str, *, max_length: int = 256) -> tuple[CrossEncoder, object]:
    """Load (CrossEncoder, tokenizer) from a hub id or directory; a checkpoint without a head gets a fresh one.

    Args:
        name_or_path: a cross-encoder, or any HF encoder (bi-encoder, bare backbone) to start training from.
            `sentence-transformers/all-MiniLM-L6-v2` resolves to the offline package when installed.
        max_length: token budget of a (query, document) pair, used by training and `score_pairs`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if path != name_or_path:
        log.info("cross-encoder %s: using the offline copy at %s", name_or_path, path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, output_loading_info=True, ignore_mismatched_sizes=True
    )
    new = sorted(
        set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]}
    )
    if new:
        log.info(
            "cross-encoder %s has no trained single-logit head (a bi-encoder or bare backbone?): %s initialised "
            "fresh; train it (embedscale reranker) before using its scores",
            path,
            ", ".join(new),
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds {path}'s max_position_embeddings={limit}: lower it (reranker.max_length)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without a pad token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder heads score the last non-pad token
    return CrossEncoder(model, max_length=max_length, new_parameters=new), tokenizer


@torch.inference_mode()
def score_pairs(
    model: CrossEncoder,
    tokenizer,
    queries: list[str],
    documents: list[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Relevance logits of (queries[i], documents[i]) -> (N,) float32 on CPU, in the input order.

    Pairs are sorted by length before batching (each batch pads to similar lengths, as `encode_texts`
    does) and the order is restored afterwards; `max_length` None uses the model's own.
    """
    if len(queries) != len(documents):
        raise ValueError(f"score_pairs: {len(queries)} queries but {len(documents)} documents")
    max_length = max_length or model.max_length
    device = next(model.parameters()).device
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]) + len(documents[i]), reverse=True)
    was_training = model.training
    model.eval()
    chunks = []
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"score {len(order)} pairs", unit="batch", leave=False, disable=None)
    for start in batches:
        idx = order[start : start + batch_size]
        tokens = tokenize_pairs(
            tokenizer, [queries[i] for i in idx], [documents[i] for i in idx], max_length=max_length
        )
        chunks.append(model({k: v.to(device) for k, v in tokens.items()}).float().cpu())
    model.train(was_training)
    out_N = torch.empty(len(queries))
    if chunks:
        out_N[torch.tensor(order)] = torch.cat(chunks)
    return out_N


def save_cross_encoder(model: CrossEncoder, tokenizer, out_dir: Path | str) -> Path:
    """Write the HF layout that `AutoModelForSequenceClassification.from_pretrained(dir)` and
    `sentence_transformers.CrossEncoder(dir)` both load, scoring raw logits with the same token budget."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.model
    settings = dict(getattr(hf.config, "sentence_transformers", None) or {})
    hf.config.sentence_transformers = {**settings, "activation_fn": IDENTITY_ACTIVATION}
    hf.save_pretrained(out, safe_serialization=True)
    saved_limit = tokenizer.model_max_length
    tokenizer.model_max_length = model.max_length  # sentence-transformers truncates pairs at this length
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.model_max_length = saved_limit
    return out
