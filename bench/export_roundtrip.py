"""Export round trip on a real export: embedscale vs SentenceTransformer vs AutoModel embeddings.

    python bench/export_roundtrip.py runs/train/<timestamp>/model [--num-texts 100]

Encodes the first N SciFact test queries and N corpus documents with embedscale's loader, with
`SentenceTransformer(path)` and with `AutoModel` + embedscale's pooling; reports the minimum cosine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--num-texts", type=int, default=100)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from embedscale.config import ModelConfig
    from embedscale.data.records import read_corpus, read_queries, resolve_data_root
    from embedscale.encoder.biencoder import encode_texts, load_encoder
    from embedscale.encoder.pooling import pool

    root = resolve_data_root(args.data_root) / "scifact"
    n = args.num_texts
    sides = {"query": list(read_queries(root).values())[:n], "document": list(read_corpus(root).values())[:n]}
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=args.export_dir))
    st = SentenceTransformer(args.export_dir, device="cpu")
    hf, hf_tok = AutoModel.from_pretrained(args.export_dir).eval(), AutoTokenizer.from_pretrained(args.export_dir)
    rows = []
    for side, texts in sides.items():
        ours = encode_texts(encoder, tokenizer, texts, side=side, max_length=encoder.cfg.document_max_length)
        theirs = st.encode(texts, prompt_name=side, convert_to_tensor=True, batch_size=32).cpu()
        with torch.no_grad():
            enc = hf_tok(texts, padding=True, truncation=True, max_length=st.max_seq_length, return_tensors="pt")
            h = hf(**enc).last_hidden_state
            hf_emb = F.normalize(pool(h, enc["attention_mask"], encoder.cfg.pooling), dim=-1)
        rows.append(
            {
                "texts": f"{len(texts)} SciFact {'queries' if side == 'query' else 'documents'}",
                "min cos(embedscale, SentenceTransformer)": round(F.cosine_similarity(ours, theirs).min().item(), 7),
                "min cos(embedscale, AutoModel+pool)": round(F.cosine_similarity(ours, hf_emb).min().item(), 7),
            }
        )
    report("export_roundtrip", rows, {"export_dir": args.export_dir})


if __name__ == "__main__":
    main()
