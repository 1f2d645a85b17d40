"""Tokenisation of (prefix, text) pairs: the one function that training collate and encoding share.

Both paths call `tokenize`, so what the model sees in training is what it sees at evaluation and
inference; decoders need two things a plain `tokenizer(texts)` call does not give:

- EOS at the end (`model.append_eos`): Mistral, Llama and Qwen tokenizers add BOS only, so
  last-token pooling would read the state of the text's last word -- or, for a truncated text, of
  some word in the middle. Texts are truncated to max_length - 1 tokens and EOS is appended
  afterwards, so a truncated text ends with EOS too (attention mask 1), under either padding side.
- A pooling mask (`model.pool_exclude_prefix`): mean pooling over the text only, not over the
  instruction (NV-Embed, GritLM). The instruction's tokens are found from character offsets rather
  than by tokenising the prefix alone: a prefix ending in a space ("Query: ") tokenises on its own
  with a trailing space token that does not exist in context (SentencePiece merges the space into
  the next word), and counting would then drop the text's first token. Everything before the first
  token whose characters reach past the prefix (BOS and the instruction) is excluded; the text's
  tokens and the special tokens after it (EOS, SEP) are pooled.

Padding is done here, on the tokenizer's padding side, so the pooling mask pads exactly like the
attention mask. Without either feature the tokenizer is called as before (same tensors).

Legend: B = texts, L = tokens.
"""

from __future__ import annotations

import torch

from embedscale.config import ModelConfig, Pooling

_PROBE = "a b"


# Texts per tokenizer call. A fast (Rust) tokenizer's per-call scratch (encodings with tokens, offsets and
# overflow) is freed into glibc's heap, which keeps it: one call over a 8,192-text batch left ~350-640 MiB of
# resident memory behind for good, pieces of 512 ~50 MiB (all-MiniLM-L6-v2 tokenizer, 128 tokens). The
# tensors are the same either way.
TOKENIZE_PIECE = 512


def tokenizer_ends_with_eos(tokenizer) -> bool:
    """Whether the tokenizer itself ends a tokenised text with its EOS token (e5-mistral's tokenizer does)."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer(_PROBE)["input_ids"][-1] == eos


def eos_to_append(tokenizer, cfg: ModelConfig) -> int | None:
    """The EOS id `tokenize` appends to every text, or None (model.append_eos; None = automatic)."""
    want = cfg.append_eos if cfg.append_eos is not None else cfg.pooling is Pooling.last_token
    if not want:
        return None
    if tokenizer.eos_token_id is None:
        if cfg.append_eos:
            raise ValueError(
                f"model.append_eos=true but the tokenizer of {cfg.name_or_path} has no EOS token: "
                "set model.append_eos=null or false"
            )
        return None  # automatic: nothing to append (BERT-style tokenizers end with SEP)
    return None if tokenizer_ends_with_eos(tokenizer) else tokenizer.eos_token_id


def tokenize(
    tokenizer,
    texts: list[str],
    *,
    prefixes: str | list[str],
    max_length: int,
    cfg: ModelConfig,
    side: str | None = None,
) -> dict[str, torch.Tensor]:
    """Prefix + text -> padded tensors: input_ids and attention_mask (B, L), plus pool_mask (B, L) with
    model.pool_exclude_prefix (1 = pooled), and token_mask (B, L) with model.multivector (1 = scored by MaxSim;
    `late_interaction_tokens`).

    Args:
        texts: the texts, without their prefix.
        prefixes: one prefix for every text, or one per text (instructions differ per source).
        max_length: token budget per text, prefix, special tokens and the appended EOS included.
        cfg: the model config (append_eos, pool_exclude_prefix, pooling, multivector).
        side: "query" or "document": needed with model.multivector (queries are augmented, documents skip
            punctuation).
    """
    tokens = _tokenize(tokenizer, texts, prefixes=prefixes, max_length=max_length, cfg=cfg)
    if not cfg.multivector:
        return tokens
    if side not in ("query", "document"):
        raise ValueError(f"tokenize: model.multivector needs side='query' or 'document', got {side!r}")
    return late_interaction_tokens(tokens, tokenizer, cfg, side)


def late_interaction_tokens(tokens: dict[str, torch.Tensor], tokenizer, cfg: ModelConfig, side: str):
    """Add the multi-vector token_mask (1 = scored) to tokenised texts, ColBERT's way.

    Queries (model.query_augment_length = A): every row is padded to A tokens with the tokenizer's mask token (its
    pad token if it has none); the expansion tokens are encoded and scored, and attended to only with
    model.attend_to_expansion_tokens. Documents (model.skip_punctuation): tokens made only of punctuation are
    attended to but not scored."""
    ids_BL, mask_BL = tokens["input_ids"], tokens["attention_mask"]
    if side == "query":
        A = cfg.query_augment_length
        if A is None:
            return {**tokens, "token_mask": mask_BL.clone()}
        if tokenizer.padding_side == "left":
            raise ValueError(
                "model.query_augment_length appends expansion tokens after the query: it needs right padding "
                "(model.padding_side=right), or set model.query_augment_length=null"
            )
        B, L = ids_BL.shape
        fill = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.pad_token_id
        ids_BA = torch.full((B, max(A, L)), fill, dtype=ids_BL.dtype)
        attention_BA = torch.zeros((B, max(A, L)), dtype=mask_BL.dtype)
        ids_BA[:, :L] = torch.where(mask_BL.bool(), ids_BL, torch.full_like(ids_BL, fill))
        attention_BA[:, :L] = mask_BL
        if cfg.attend_to_expansion_tokens:
            attention_BA[:] = 1
        return {"input_ids": ids_BA, "attention_mask": attention_BA, "token_mask": torch.ones_like(attention_BA)}
    scored_BL = mask_BL.clone()
    if cfg.skip_punctuation:
        scored_BL = scored_BL * ~torch.isin(ids_BL, punctuation_ids(tokenizer))
    return {**tokens, "token_mask": scored_BL}


_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def punctuation_ids(tokenizer) -> torch.Tensor:
    """Ids of the vocabulary's tokens made only of ASCII punctuation (word-piece markers ##, \u0120, \u2581
    stripped), computed once per tokenizer."""
    cached = getattr(tokenizer, "_embedscale_punctuation_ids", None)
    if cached is not None:
        return cached
    ids = []
    for token, i in tokenizer.get_vocab().items():
        core = token.removeprefix("##").lstrip("\u0120\u2581")
        if core and all(ch in _PUNCTUATION for ch in core):
            ids.append(i)
    cached = torch.tensor(sorted(ids), dtype=torch.long)
    try:
        tokenizer._embedscale_punctuation_ids = cached
    except AttributeError:  # a tokenizer that refuses attributes: recomputed each call
        pass
    return cached


def _tokenize(
    tokenizer,
    texts: list[str],
    *,
    prefixes: str | list[str],
    max_length: int,
    cfg: ModelConfig,
) -> dict[str, torch.Tensor]:
    prefixes = prefixes if isinstance(prefixes, list) else [prefixes] * len(texts)
    if len(prefixes) != len(texts):
        raise ValueError(f"tokenize: {len(prefixes)} prefixes for {len(texts)} texts")
    full = [p + t for p, t in zip(prefixes, texts, strict=True)]
    eos = eos_to_append(tokenizer, cfg)
    if eos is None and not cfg.pool_exclude_prefix:
        parts = []
        for start in range(0, len(full), TOKENIZE_PIECE):
            enc = tokenizer(
                full[start : start + TOKENIZE_PIECE],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            parts.append((enc["input_ids"], enc["attention_mask"]))
        if len(parts) == 1:
            return {"input_ids": parts[0][0], "attention_mask": parts[0][1]}
        return _concat_padded(parts, tokenizer)
    if cfg.pool_exclude_prefix and not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"model.pool_exclude_prefix=true needs a fast tokenizer (character offsets); {cfg.name_or_path} "
            "has a slow one: set model.pool_exclude_prefix=false"
        )
    budget = max(1, max_length - 1) if eos is not None else max_length
    rows, pooled = [], []
    for first in range(0, len(full), TOKENIZE_PIECE):
        enc = tokenizer(
            full[first : first + TOKENIZE_PIECE],
            truncation=True,
            max_length=budget,
            return_offsets_mapping=cfg.pool_exclude_prefix,
            return_special_tokens_mask=cfg.pool_exclude_prefix,
        )
        for i, ids in enumerate(enc["input_ids"]):
            ids = list(ids) + ([eos] if eos is not None else [])
            rows.append(ids)
            if cfg.pool_exclude_prefix:
                start = text_start(enc["offset_mapping"][i], enc["special_tokens_mask"][i], len(prefixes[first + i]))
                pooled.append([0] * start + [1] * (len(ids) - start))
    return _pad(rows, pooled if cfg.pool_exclude_prefix else None, tokenizer)


def _concat_padded(parts: list[tuple[torch.Tensor, torch.Tensor]], tokenizer) -> dict[str, torch.Tensor]:
    """Stack separately padded pieces (ids (b, l_i), mask (b, l_i)) into (B, max l_i) on the tokenizer's
    padding side: the same tensors one padded call over all texts gives."""
    L = max(ids.shape[1] for ids, _ in parts)
    left = tokenizer.padding_side == "left"
    ids_out, mask_out = [], []
    for ids_bl, mask_bl in parts:
        pad = (L - ids_bl.shape[1], 0) if left else (0, L - ids_bl.shape[1])
        ids_out.append(torch.nn.functional.pad(ids_bl, pad, value=tokenizer.pad_token_id))
        mask_out.append(torch.nn.functional.pad(mask_bl, pad, value=0))
    return {"input_ids": torch.cat(ids_out), "attention_mask": torch.cat(mask_out)}


def text_start(offsets: list[tuple[int, int]], special: list[int], prefix_chars: int) -> int:
    """Index of the first pooled token: the first non-special token whose characters end past the prefix
    (a token straddling the boundary is text). 0 without a prefix. Without such a token (empty text, or
    truncated inside the prefix): the position after the last non-special token, so that only trailing
    special tokens (EOS) are pooled -- the row length if there are none (`_pad` then pools the whole row)."""
    if prefix_chars == 0:
        return 0
    for j, ((_, end), is_special) in enumerate(zip(offsets, special, strict=True)):
        if not is_special and end > prefix_chars:
            return j
    # No text token (empty text or truncated inside the prefix): pool what follows the prefix, if anything.
    last_prefix = max((j for j, s in enumerate(special) if not s), default=-1)
    return last_prefix + 1


def _pad(rows: list[list[int]], pooled: list[list[int]] | None, tokenizer) -> dict[str, torch.Tensor]:
    """Pad token rows to the longest on the tokenizer's padding side; masks pad the same way."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (load_encoder uses EOS)")
    B, L = len(rows), max((len(r) for r in rows), default=0)
    ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.long)
    pool_BL = torch.zeros(B, L, dtype=torch.long) if pooled is not None else None
    left = tokenizer.padding_side == "left"
    for i, ids in enumerate(rows):
        cols = slice(L - len(ids), L) if left else slice(0, len(ids))
        ids_BL[i, cols] = torch.tensor(ids, dtype=torch.long)
        mask_BL[i, cols] = 1
        if pool_BL is not None:
            row = torch.tensor(pooled[i], dtype=torch.long)
            pool_BL[i, cols] = row if row.any() else 1  # nothing after the prefix: pool the whole text
    out = {"input_ids": ids_BL, "attention_mask": mask_BL}
    if pool_BL is not None:
        out["pool_mask"] = pool_BL
    return out
