"""Embedding quantisation and the Matryoshka / precision sweeps: what a smaller index costs in retrieval.

A deployed index stores every document's vector, so the bytes per document set its memory and
speed. Two independent levers shrink them, and these functions measure both on one encoding:

- Matryoshka truncation: keep the first `dim` coordinates (re-normalised when the model normalises;
  `encoder.biencoder.truncate`, as the evaluator does). Only models trained with
  `model.matryoshka_dims` are meant to survive it, but any model can be measured.
- Precision (`PRECISIONS`), always with the float32 query (asymmetric search: the query is computed
  at request time, only the documents are stored):
  - `fp32`   4 x D bytes; exact inner product (the evaluator's search).
  - `int8`   D bytes; scalar quantisation with a range per dimension calibrated on the corpus
             (min and max, 256 levels, as sentence-transformers' `quantize_embeddings`; the 2 x D
             floats of the calibration are per index, not per document). Scored as float query .
             dequantised document, so the only error is the rounding (at most step / 2 per coordinate).
  - `binary` D / 8 bytes; the sign bits, packed; ranked by Hamming distance to the query's sign bits
             (faiss `IndexBinaryFlat`), score = 1 - 2 x hamming / D (the cosine of the sign vectors).
  - `binary_rescore`       the binary index retrieves rescore_multiplier x k candidates, which are
             re-scored with the float query . the documents' +-1 sign vectors (scaled by 1 / sqrt(D)):
             still D / 8 bytes, nothing else stored -- the float query recovers much of the loss.
  - `binary_rescore_int8`  as binary_rescore, but the candidates are re-scored with the float query .
             their dequantised int8 vectors: D / 8 bytes in memory plus D bytes per document on disk,
             read for the candidates only (the layout of the HF "embedding quantization" demo).

The sweeps encode once (`RetrievalEvaluator.embeddings`: the corpus from the on-disk cache) and
truncate or quantise the matrices: never one encoding per setting.

Legend: Q = queries, N = corpus documents, D = dim, K = top k, C = candidates per query, B = bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from embedscale.config import SweepConfig, SweepPrecision
from embedscale.retrieval.metrics import retrieval_metrics

PRECISIONS = tuple(p.value for p in SweepPrecision)

SWEEP_K = 100
"""Documents retrieved per query in the sweeps: enough for recall@100."""
SWEEP_METRICS = ("ndcg@10", "recall@100")


@dataclass
class Int8Calibration:
    """Per-dimension affine map of int8 codes: value = low + (code + 128) x step."""

    low_D: torch.Tensor
    step_D: torch.Tensor


def calibrate_int8(docs_ND: torch.Tensor) -> Int8Calibration:
    """Ranges of each dimension over the corpus (sentence-transformers' calibration: min and max)."""
    low_D = docs_ND.min(dim=0).values.float()
    high_D = docs_ND.max(dim=0).values.float()
    step_D = ((high_D - low_D) / 255).clamp_min(1e-12)  # a constant dimension gets one level
    return Int8Calibration(low_D, step_D)


def quantize_int8(x_ND: torch.Tensor, cal: Int8Calibration) -> torch.Tensor:
    """int8 codes (N, D); values outside the calibrated range are clipped to it."""
    codes_ND = torch.round((x_ND.float() - cal.low_D) / cal.step_D) - 128
    return codes_ND.clamp_(-128, 127).to(torch.int8)


def dequantize_int8(codes_ND: torch.Tensor, cal: Int8Calibration) -> torch.Tensor:
    return cal.low_D + (codes_ND.float() + 128) * cal.step_D


def pack_binary(x_ND: torch.Tensor) -> np.ndarray:
    """Sign bits (x > 0 -> 1), packed 8 per byte: uint8 (N, ceil(D / 8)); the last byte is zero-padded."""
    return np.packbits((x_ND > 0).cpu().numpy(), axis=1)


def unpack_signs(bits_NB: np.ndarray, dim: int) -> torch.Tensor:
    """+-1 float vectors (N, dim) of packed sign bits."""
    bits_ND = np.unpackbits(bits_NB, axis=1, count=dim)
    return torch.from_numpy(bits_ND.astype(np.float32) * 2 - 1)


def hamming_search(q_bits_QB: np.ndarray, doc_bits_NB: np.ndarray, k: int, *, dim: int):
    """Top-k by Hamming distance (faiss IndexBinaryFlat, exact): (scores (Q, K), indices (Q, K)), score =
    1 - 2 x distance / dim, the cosine of the +-1 sign vectors."""
    import faiss

    k = min(k, doc_bits_NB.shape[0])
    index = faiss.IndexBinaryFlat(doc_bits_NB.shape[1] * 8)
    index.add(np.ascontiguousarray(doc_bits_NB))
    dist_QK, idx_QK = index.search(np.ascontiguousarray(q_bits_QB), k)
    scores_QK = 1.0 - 2.0 * torch.from_numpy(dist_QK.astype(np.float32)) / dim
    return scores_QK, torch.from_numpy(idx_QK.astype(np.int64))


def rescore(q_QD: torch.Tensor, cand_QC: torch.Tensor, docs_ND: torch.Tensor, k: int, *, chunk: int = 64):
    """Re-rank each query's candidates by float query . docs_ND[candidate]: (scores (Q, K), indices (Q, K)).
    Queries go `chunk` at a time (the gathered candidates are chunk x C x D floats)."""
    scores, indices = [], []
    for start in range(0, q_QD.shape[0], chunk):
        c_qC = cand_QC[start : start + chunk]
        s_qC = torch.einsum("qd,qcd->qc", q_QD[start : start + chunk], docs_ND[c_qC])
        top = s_qC.topk(min(k, c_qC.shape[1]), dim=1)
        scores.append(top.values)
        indices.append(c_qC.gather(1, top.indices))
    return torch.cat(scores), torch.cat(indices)


def bytes_per_doc(precision: str, dim: int) -> int:
    """Bytes of one document in the searched (in-memory) index."""
    if precision == "fp32":
        return 4 * dim
    if precision == "int8":
        return dim
    return math.ceil(dim / 8)


def rescore_bytes_per_doc(precision: str, dim: int) -> int:
    """Bytes of one document kept outside the index for re-scoring (on disk, read for the candidates only)."""
    return dim if precision == "binary_rescore_int8" else 0


def quantized_search(q_QD: torch.Tensor, docs_ND: torch.Tensor, precision: str, k: int, *, rescore_multiplier: int = 4):
    """Search at one precision (module docstring): (scores (Q, K), indices (Q, K), bytes per document).

    Args:
        q_QD: float query embeddings, as the model returns them.
        docs_ND: float corpus embeddings; quantised here (int8 calibrated on them).
        precision: one of PRECISIONS.
        k: documents returned per query.
        rescore_multiplier: binary_rescore*: candidates per query = rescore_multiplier x k.
    """
    from embedscale.retrieval.evaluator import exact_search

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    dim = docs_ND.shape[1]
    size = bytes_per_doc(precision, dim)
    q_QD = q_QD.float()
    if precision == "fp32":
        return (*exact_search(q_QD, docs_ND.float(), k), size)
    if precision == "int8":
        cal = calibrate_int8(docs_ND)
        return (*exact_search(q_QD, dequantize_int8(quantize_int8(docs_ND, cal), cal), k), size)
    doc_bits_NB = pack_binary(docs_ND)
    if precision == "binary":
        return (*hamming_search(pack_binary(q_QD), doc_bits_NB, k, dim=dim), size)
    _, cand_QC = hamming_search(pack_binary(q_QD), doc_bits_NB, rescore_multiplier * k, dim=dim)
    if precision == "binary_rescore":
        stored_ND = unpack_signs(doc_bits_NB, dim) / math.sqrt(dim)
    else:  # binary_rescore_int8: the int8 codes would be read from disk for the candidates only
        cal = calibrate_int8(docs_ND)
        stored_ND = dequantize_int8(quantize_int8(docs_ND, cal), cal)
    return (*rescore(q_QD, cand_QC, stored_ND, k), size)


def to_run(scores_QK: torch.Tensor, idx_QK: torch.Tensor, qids: list[str], doc_ids: list[str]) -> dict:
    """{query_id: {doc_id: score}} of a search result."""
    return {
        qid: {doc_ids[j]: float(s) for s, j in zip(scores_QK[row].tolist(), idx_QK[row].tolist())}
        for row, qid in enumerate(qids)
    }


def default_dims(full: int, *, smallest: int = 32) -> list[int]:
    """Powers of two from `smallest` below the full dim, then the full dim: 384 -> [32, 64, 128, 256, 384]."""
    dims, d = [], smallest
    while d < full:
        dims.append(d)
        d *= 2
    return [*dims, full]


def _metrics(evaluator, scores_QK, idx_QK) -> dict[str, float]:
    run = to_run(scores_QK, idx_QK, list(evaluator.queries), list(evaluator.corpus))
    found = retrieval_metrics(run, evaluator.qrels, (10, SWEEP_K))
    return {name: found[name] for name in SWEEP_METRICS}


def _check_dims(dims: list[int], full: int) -> None:
    bad = [d for d in dims if not 1 <= d <= full]
    if bad:
        raise ValueError(f"sweep dims {bad} are outside [1, {full}] (the model's embedding dim): fix sweep.dims")


def matryoshka_sweep(evaluator, encoder, tokenizer, dims: list[int] | None = None, *, embeddings=None) -> list[dict]:
    """Metrics vs embedding dim at fp32: one row {set, dim, precision, ndcg@10, recall@100, bytes_per_doc}
    per dim (default `default_dims`). `embeddings` = evaluator.embeddings(...) when the caller has them."""
    from embedscale.encoder.biencoder import truncate

    q_QD, docs_ND = embeddings if embeddings is not None else evaluator.embeddings(encoder, tokenizer)
    full = docs_ND.shape[1]
    dims = list(dims) if dims else default_dims(full)
    _check_dims(dims, full)
    normalize = encoder.cfg.normalize
    rows = []
    for dim in dims:
        scores_QK, idx_QK, size = quantized_search(
            truncate(q_QD, dim, normalize=normalize), truncate(docs_ND, dim, normalize=normalize), "fp32", SWEEP_K
        )
        rows.append(
            {"set": evaluator.name, "dim": dim, "precision": "fp32", **_metrics(evaluator, scores_QK, idx_QK)}
            | {"bytes_per_doc": size, "rescore_bytes_per_doc": 0}
        )
    return rows


def quantization_sweep(
    evaluator,
    encoder,
    tokenizer,
    precisions: list[str] | tuple[str, ...] = PRECISIONS,
    *,
    dims: list[int] | None = None,
    rescore_multiplier: int = 4,
    embeddings=None,
) -> list[dict]:
    """Metrics vs precision: one row per (dim, precision) with the same columns as `matryoshka_sweep`;
    `dims` default: the full dim only."""
    from embedscale.encoder.biencoder import truncate

    q_QD, docs_ND = embeddings if embeddings is not None else evaluator.embeddings(encoder, tokenizer)
    full = docs_ND.shape[1]
    dims = list(dims) if dims else [full]
    _check_dims(dims, full)
    normalize = encoder.cfg.normalize
    rows = []
    for dim in dims:
        q_Qd, docs_Nd = truncate(q_QD, dim, normalize=normalize), truncate(docs_ND, dim, normalize=normalize)
        for precision in precisions:
            scores_QK, idx_QK, size = quantized_search(
                q_Qd, docs_Nd, precision, SWEEP_K, rescore_multiplier=rescore_multiplier
            )
            rows.append(
                {"set": evaluator.name, "dim": dim, "precision": precision, **_metrics(evaluator, scores_QK, idx_QK)}
                | {"bytes_per_doc": size, "rescore_bytes_per_doc": rescore_bytes_per_doc(precision, dim)}
            )
    return rows


SWEEP_COLUMNS = ("set", "dim", "precision", "ndcg@10", "recall@100", "bytes_per_doc", "rescore_bytes_per_doc")


def format_table(rows: list[dict]) -> str:
    """Plain-text table of sweep rows (`embedscale sweep` and bench/sweeps.py print it)."""
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in SWEEP_COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(SWEEP_COLUMNS)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(SWEEP_COLUMNS, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def sweep_rows(cfg: SweepConfig, evaluators: list, encoder, tokenizer) -> dict[str, list[dict]]:
    """{"matryoshka": rows, "quantization": rows} over every evaluator (sweep.*), each set encoded once."""
    out: dict[str, list[dict]] = {"matryoshka": [], "quantization": []}
    for ev in evaluators:
        embeddings = ev.embeddings(encoder, tokenizer)
        out["matryoshka"] += matryoshka_sweep(ev, encoder, tokenizer, cfg.dims, embeddings=embeddings)
        if cfg.precisions:
            out["quantization"] += quantization_sweep(
                ev,
                encoder,
                tokenizer,
                [str(p) for p in cfg.precisions],
                dims=cfg.quantization_dims,
                rescore_multiplier=cfg.rescore_multiplier,
                embeddings=embeddings,
            )
    return out
