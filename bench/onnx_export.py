"""`embedscale export` on all-MiniLM-L6-v2: parity with PyTorch, the int8 graph's retrieval cost, and CPU speed.

    python bench/onnx_export.py [--texts 100] [--speed-docs 256] [--rounds 3] [--threads 1,2] [--model PATH]

1. Exports the model (fp32 + int8) with `export_onnx` into a temporary directory.
2. Parity: the first --texts SciFact test queries and --texts corpus documents encoded by PyTorch
   (`encode_texts`) and by onnxruntime (fp32 and int8 graphs): smallest and mean cosine (target fp32 >= 0.9999).
3. Retrieval: SciFact test NDCG@10 / Recall@100 with exact search over each runtime's embeddings (the whole
   corpus at 256 tokens; --skip-ndcg skips it).
4. Speed: documents per second encoding the first --speed-docs corpus documents at 256 tokens (batch 32), for
   PyTorch, onnxruntime fp32 and int8, at each --threads; rounds interleave the runtimes (ABC CBA ...) and the
   median is reported with the spread (max/min over rounds).

Writes bench/results/onnx_export.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--speed-docs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default=None, help="a model path instead of all-MiniLM-L6-v2 (smoke runs)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--skip-ndcg", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import torch

    from embedscale.config import ModelConfig, OnnxConfig, OnnxQuantize
    from embedscale.data.records import read_corpus, read_queries, resolve_data_root
    from embedscale.encoder.biencoder import encode_texts, load_encoder
    from embedscale.export_onnx import OnnxEncoder, export_onnx
    from embedscale.retrieval.evaluator import RetrievalEvaluator
    from embedscale.retrieval.metrics import retrieval_metrics

    torch.manual_seed(0)
    model = {"name_or_path": args.model} if args.model else {}
    encoder, tok = load_encoder(ModelConfig(**model, document_max_length=args.max_length))
    encoder.eval()
    root = resolve_data_root(args.data_root) / "scifact"
    queries, corpus = list(read_queries(root).values()), list(read_corpus(root).values())
    rows, extra = [], {"model": args.model or "sentence-transformers/all-MiniLM-L6-v2", "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "onnx"
        start = time.perf_counter()
        record = export_onnx(encoder, tok, out, OnnxConfig(quantize=OnnxQuantize.int8), source=extra["model"])
        extra["export_seconds"] = round(time.perf_counter() - start, 1)
        extra["file_MiB"] = {p.name: round(p.stat().st_size / 2**20, 2) for p in out.glob("*.onnx")}
        extra["export_self_check"] = record["parity"]
        runtimes = {"onnx-fp32": OnnxEncoder(out), "onnx-int8": OnnxEncoder(out, int8=True)}

        # 2. parity on real text
        for side, texts in (("query", queries[: args.texts]), ("document", corpus[: args.texts])):
            want_ND = encode_texts(encoder, tok, texts, side=side).numpy()
            for name, runtime in runtimes.items():
                got_ND = runtime.encode(texts, side=side)
                cos_N = (want_ND * got_ND).sum(1) / (np.linalg.norm(want_ND, axis=1) * np.linalg.norm(got_ND, axis=1))
                measure = f"smallest cosine to PyTorch, {len(texts)} {side} texts"
                rows.append(
                    {
                        "measure": measure,
                        "runtime": name,
                        "value": float(cos_N.min()),
                        "note": f"mean {cos_N.mean():.6f}",
                    }
                )

        # 3. retrieval quality of each runtime's embeddings
        if not args.skip_ndcg:
            ev = RetrievalEvaluator.from_beir(root, "test", max_length=args.max_length)
            doc_ids, qids = list(ev.corpus), list(ev.queries)
            embed = {"pytorch": lambda texts, side: encode_texts(encoder, tok, texts, side=side).numpy()}
            embed.update({name: rt.encode for name, rt in runtimes.items()})
            for name, fn in embed.items():
                start = time.perf_counter()
                docs_ND = torch.from_numpy(np.asarray(fn([ev.corpus[d] for d in doc_ids], side="document")))
                q_QD = torch.from_numpy(np.asarray(fn([ev.queries[q] for q in qids], side="query")))
                seconds = time.perf_counter() - start
                metrics = retrieval_metrics(ev.rank(q_QD, docs_ND, normalize=True), ev.qrels, (10, 100))
                for key in ("ndcg@10", "recall@100"):
                    rows.append({"measure": f"SciFact test {key}", "runtime": name, "value": metrics[key], "note": ""})
                rows.append(
                    {
                        "measure": "SciFact encode seconds (corpus + queries)",
                        "runtime": name,
                        "value": round(seconds, 1),
                        "note": f"{torch.get_num_threads()} threads",
                    }
                )

        # 4. speed, interleaved
        docs = corpus[: args.speed_docs]
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            systems = {
                "pytorch": lambda: encode_texts(encoder, tok, docs, side="document", batch_size=32),
                "onnx-fp32": _bound(OnnxEncoder(out, threads=threads), docs),
                "onnx-int8": _bound(OnnxEncoder(out, int8=True, threads=threads), docs),
            }
            times: dict[str, list[float]] = {name: [] for name in systems}
            for fn in systems.values():  # warm-up
                fn()
            for r in range(args.rounds):
                order = list(systems) if r % 2 == 0 else list(reversed(systems))
                for name in order:
                    start = time.perf_counter()
                    systems[name]()
                    times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                rate = [len(docs) / t for t in ts]
                rows.append(
                    {
                        "measure": f"docs/s at {args.max_length} tokens, {threads} thread(s)",
                        "runtime": name,
                        "value": statistics.median(rate),
                        "note": f"median of {len(ts)}, spread {max(ts) / min(ts):.2f}",
                    }
                )
            extra[f"seconds_{threads}_threads"] = times
    report("onnx_export", rows, extra)


def _bound(runtime, docs):
    return lambda: runtime.encode(docs, side="document", batch_size=32)


if __name__ == "__main__":
    main()
