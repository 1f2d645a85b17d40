"""Retrieval with a multi-vector (ColBERT) model: token matrices of a corpus, exact MaxSim search, STS by MaxSim.

`encode_token_matrices` keeps, for every text, only the vectors MaxSim scores (tokenize's token_mask: a query's
real and expansion tokens; a document's tokens but punctuation), packed one after another with offsets: the index
holds sum(scored tokens) x D values (float16 by default) and reports its bytes per document. `maxsim_search`
scores every query against every document exactly, in blocks of queries x documents (each block pads its
documents to their longest), keeping a running top-k: the memory is one block's products
(query_chunk x L x doc_chunk x M), never queries x documents x tokens x tokens. This is exact search for corpora
that fit (SciFact's 5,183 documents: a few hundred MiB at 128 dims in float16). `candidate_search`
(eval.maxsim_candidates) scores only the documents that own one of each query token's nearest token vectors
(ColBERT's end-to-end retrieval): exact over its candidates, approximate overall.

Inference only (no autograd), and independent of the training code, as the single-vector evaluation is.

Legend: Q = queries, N = documents, T = scored tokens of all texts, L = query tokens, M = document tokens,
D = dim, K = top k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedscale.encoder.biencoder import BiEncoder, length_batches
from embedscale.encoder.tokenize import tokenize


@dataclass
class TokenMatrices:
    """Texts' scored token vectors, packed: text i's are vectors_TD[offsets_N[i]:offsets_N[i + 1]]."""

    vectors_TD: torch.Tensor
    offsets_N: torch.Tensor  # (N + 1,) int64

    def __len__(self) -> int:
        return int(self.offsets_N.numel()) - 1

    @property
    def lengths_N(self) -> torch.Tensor:
        return self.offsets_N[1:] - self.offsets_N[:-1]

    @property
    def bytes_per_text(self) -> float:
        """Mean storage per text: its vectors at the stored dtype (the offsets add 8 bytes)."""
        return self.vectors_TD.numel() * self.vectors_TD.element_size() / max(1, len(self)) + 8

    def padded(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts `rows` as (n, longest, D) float32 with their mask (n, longest)."""
        lengths = self.lengths_N[rows]
        n, longest = int(lengths.numel()), int(lengths.max()) if lengths.numel() else 0
        out_nMD = self.vectors_TD.new_zeros((n, longest, self.vectors_TD.shape[1]), dtype=torch.float32)
        mask_nM = torch.arange(longest)[None, :] < lengths[:, None]
        start = int(self.offsets_N[rows.start])
        out_nMD[mask_nM] = self.vectors_TD[start : start + int(lengths.sum())].float()
        return out_nMD, mask_nM


@torch.inference_mode()
def encode_token_matrices(
    encoder: BiEncoder,
    tokenizer,
    texts: list[str],
    *,
    side: str,
    batch_size: int = 64,
    max_length: int | None = None,
    prefix: str | None = None,
    dtype: torch.dtype = torch.float16,
) -> TokenMatrices:
    """Encode texts (prefix: `prefix`, else the model's for `side`) into their scored token vectors, in input order,
    on CPU at `dtype`. Batches are length-sorted, as encode_texts does."""
    cfg = encoder.cfg
    if not cfg.multivector:
        raise ValueError("encode_token_matrices needs a model.multivector model")
    prefix = prefix if prefix is not None else (cfg.query_prefix if side == "query" else cfg.document_prefix)
    if max_length is None:
        max_length = cfg.query_max_length if side == "query" else cfg.document_max_length
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    per_text: list[torch.Tensor | None] = [None] * len(texts)
    for idx in length_batches(texts, batch_size):
        batch = [texts[i] for i in idx]
        tokens = tokenize(tokenizer, batch, prefixes=prefix, max_length=max_length, cfg=cfg, side=side)
        e_BLD = encoder.encode({k: v.to(device) for k, v in tokens.items()}, side=side).float().cpu()
        for row, i in enumerate(idx):
            per_text[i] = e_BLD[row][tokens["token_mask"][row].bool()].to(dtype)
    encoder.train(was_training)
    empty = [i for i, v in enumerate(per_text) if v is not None and len(v) == 0]
    if empty:
        raise ValueError(
            f"{side} text {empty[0]} ({texts[empty[0]][:60]!r}) keeps no token to score (e.g. only punctuation "
            "with model.skip_punctuation and a tokenizer that adds no special token): it could never be ranked"
        )
    lengths = torch.tensor([0] + [len(v) for v in per_text], dtype=torch.long)
    dim = cfg.multivector_dim
    vectors = torch.cat(per_text) if per_text else torch.empty(0, dim, dtype=dtype)
    return TokenMatrices(vectors, torch.cumsum(lengths, 0))


def maxsim_block(q_qLD: torch.Tensor, q_mask_qL: torch.Tensor, d_nMD: torch.Tensor, d_mask_nM: torch.Tensor):
    """MaxSim of q queries against n documents (q, n): for each query token its best document token, summed over
    the query's scored tokens."""
    prod_qLnM = torch.einsum("qld,nmd->qlnm", q_qLD, d_nMD)
    prod_qLnM.masked_fill_(~d_mask_nM[None, None], float("-inf"))
    best_qLn = prod_qLnM.max(dim=-1).values
    return (best_qLn * q_mask_qL[:, :, None]).sum(dim=1)


@torch.inference_mode()
def maxsim_search(
    queries: TokenMatrices, docs: TokenMatrices, k: int, *, query_chunk: int = 32, doc_chunk: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MaxSim top-k of every query over every document: (scores (Q, K), indices (Q, K)), scores descending."""
    k = min(k, len(docs))
    scores, indices = [], []
    for q0 in range(0, len(queries), query_chunk):
        q_qLD, q_mask_qL = queries.padded(slice(q0, min(q0 + query_chunk, len(queries))))
        best_s, best_i = None, None
        for d0 in range(0, len(docs), doc_chunk):
            d_nMD, d_mask_nM = docs.padded(slice(d0, min(d0 + doc_chunk, len(docs))))
            s_qn = maxsim_block(q_qLD, q_mask_qL, d_nMD, d_mask_nM)
            i_qn = torch.arange(d0, d0 + s_qn.shape[1]).expand_as(s_qn)
            if best_s is not None:
                s_qn, i_qn = torch.cat([best_s, s_qn], dim=1), torch.cat([best_i, i_qn], dim=1)
            top = s_qn.topk(min(k, s_qn.shape[1]), dim=1)
            best_s, best_i = top.values, i_qn.gather(1, top.indices)
        scores.append(best_s)
        indices.append(best_i)
    return torch.cat(scores), torch.cat(indices)


@torch.inference_mode()
def candidate_search(
    queries: TokenMatrices, docs: TokenMatrices, k: int, *, per_token: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-k by MaxSim over candidates: each query token's `per_token` nearest document token vectors (exact inner
    product, faiss flat over all the corpus's token vectors) name the candidate documents, which are re-scored by
    exact MaxSim. (scores (Q, K), indices (Q, K), -inf / -1 past a query's candidates; mean candidates per query).
    """
    from embedscale.retrieval.index import build_index, search

    owner_T = torch.repeat_interleave(torch.arange(len(docs)), docs.lengths_N)  # document of each token vector
    index = build_index(docs.vectors_TD.float(), _flat())
    scores_QK = torch.full((len(queries), k), float("-inf"))
    ids_QK = torch.full((len(queries), k), -1, dtype=torch.long)
    sizes = []
    for row in range(len(queries)):
        q_1LD, q_mask_1L = queries.padded(slice(row, row + 1))
        _, token_ids = search(index, q_1LD[0][q_mask_1L[0]], per_token)
        candidates = torch.unique(owner_T[torch.from_numpy(token_ids[token_ids >= 0])])
        sizes.append(len(candidates))
        d_nMD, d_mask_nM = _gather(docs, candidates)
        s_n = maxsim_block(q_1LD, q_mask_1L, d_nMD, d_mask_nM)[0]
        top = s_n.topk(min(k, len(candidates)))
        scores_QK[row, : len(top.values)], ids_QK[row, : len(top.values)] = top.values, candidates[top.indices]
    return scores_QK, ids_QK, sum(sizes) / max(1, len(sizes))


def _flat():
    from embedscale.config import IndexConfig

    return IndexConfig(kind="flat", gpu="false")


def _gather(docs: TokenMatrices, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents `rows` (any order) as (n, longest, D) float32 with their mask."""
    lengths = docs.lengths_N[rows]
    out_nMD = torch.zeros((len(rows), int(lengths.max()), docs.vectors_TD.shape[1]))
    mask_nM = torch.arange(out_nMD.shape[1])[None, :] < lengths[:, None]
    starts = docs.offsets_N[rows]
    flat_T = torch.cat([torch.arange(int(a), int(a) + int(n)) for a, n in zip(starts, lengths, strict=True)])
    out_nMD[mask_nM] = docs.vectors_TD[flat_T].float()
    return out_nMD, mask_nM


def sts_scores(
    encoder: BiEncoder, tokenizer, left: list[str], right: list[str], *, batch_size: int = 64, max_length=None
) -> list[float]:
    """A symmetric MaxSim similarity of sentence pairs: the mean of MaxSim(a -> b) / |a| and MaxSim(b -> a) / |b|,
    each text encoded as a query (augmented, at the model's query length) when it is the scoring side and as a
    document (at `max_length`) otherwise."""
    out = torch.zeros(len(left))
    for a_texts, b_texts in ((left, right), (right, left)):
        a = encode_token_matrices(encoder, tokenizer, a_texts, side="query", batch_size=batch_size)
        b = encode_token_matrices(
            encoder, tokenizer, b_texts, side="document", batch_size=batch_size, max_length=max_length
        )
        for i0 in range(0, len(a), 256):
            rows = slice(i0, min(i0 + 256, len(a)))
            q_qLD, q_mask = a.padded(rows)
            d_qMD, d_mask = b.padded(rows)
            prod_qLM = torch.einsum("qld,qmd->qlm", q_qLD, d_qMD).masked_fill(~d_mask[:, None], float("-inf"))
            s_q = (prod_qLM.max(dim=-1).values * q_mask).sum(1) / q_mask.sum(1)
            out[rows] += s_q / 2
    return out.tolist()
