"""`embedscale generate` on the SciFact corpus with a tiny random LM: the mechanics and their cost, not query quality.

    python bench/generate_run.py                                   # 500 documents x 2 queries, MiniLM filter
    python bench/generate_run.py --max-documents 0                 # all 5,183 documents
    python bench/generate_run.py generate.batch_size=32            # any Hydra override of `embedscale generate`

The LM is a 2-layer, 32-dim random Llama with a word-level tokenizer over the corpus's most frequent words (built
here, seed 0): it writes word salad, so the round-trip filter (the packaged all-MiniLM-L6-v2 by default) rejects
almost everything -- which is the honest figure for such an LM, and exercises every step: generation in batches,
cleaning, dedup, encoding the whole corpus and the queries, the filter, the shards and the manifest.

The job runs once with filter_top_k = the largest of --top-ks; since every written sample carries its document's
`filter_rank`, the pairs a smaller k keeps are counted from the same run (one row per k). The filter's corpus
embedding cache is a fresh directory under --work (the seconds include encoding the corpus) unless --cache-dir.
Writes bench/results/<--name>.json with the rows, the manifest's `generation` block, the seconds and the machine's
load average before and after (on a shared machine the seconds depend on it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.make_tiny_lm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import report  # noqa: E402


def corpus_words(corpus: Path, size: int) -> list[str]:
    """The `size` most frequent words (whitespace/punctuation split, as the tiny LM's tokenizer splits) of a corpus,
    plus the words of the default prompt templates."""
    from tokenizers import pre_tokenizers

    from embedscale.config import GenerateConfig
    from embedscale.data.records import read_corpus

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    counts = collections.Counter(w for text in read_corpus(corpus).values() for w, _ in split(text))
    prompts = [w for t in GenerateConfig().prompts.values() for w, _ in split(t.replace("{", " ").replace("}", " "))]
    return list(dict.fromkeys([*prompts, *(w for w, _ in counts.most_common(size))]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="holds <corpus>/ (default: the shared data root)")
    parser.add_argument("--corpus", default="scifact")
    parser.add_argument("--max-documents", type=int, default=500, help="0: every document")
    parser.add_argument("--queries-per-document", type=int, default=2)
    parser.add_argument("--filter-model", default=None, help="the filter bi-encoder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--top-ks", default="1,10,100", help="filter depths reported (the run uses the largest)")
    parser.add_argument("--lm-vocab", type=int, default=8000, help="corpus words in the tiny LM's vocabulary")
    parser.add_argument("--work", default=None, help="directory for the LM and the shards (default: a tmp dir)")
    parser.add_argument("--cache-dir", default=None, help="the filter's embedding cache (default: fresh, in --work)")
    parser.add_argument("--name", default="generate_scifact_tiny_lm", help="bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of `embedscale generate`")
    args = parser.parse_args()

    from helpers import make_tiny_lm

    from embedscale.data.records import resolve_data_root
    from embedscale.data.shards import ShardedDataset
    from embedscale.jobs.generate import run
    from embedscale.jobs.launch import compose

    work = Path(args.work or tempfile.mkdtemp(prefix="generate-bench-"))
    root = resolve_data_root(args.data_root)
    lm = make_tiny_lm(work / "tiny-lm", corpus_words(root / args.corpus, args.lm_vocab))
    top_ks = sorted(int(k) for k in args.top_ks.split(","))
    overrides = [
        f"data_root={root}",
        f"generate.corpus={args.corpus}",
        f"generate.lm={lm}",
        f"generate.queries_per_document={args.queries_per_document}",
        f"generate.filter_top_k={top_ks[-1]}",
        f"generate.output={work / 'shards'}",
        "generate.overwrite=true",
        f"generate.cache_dir={args.cache_dir or work / 'cache'}",
        *([f"generate.max_documents={args.max_documents}"] if args.max_documents else []),
        *([f"model.name_or_path={args.filter_model}"] if args.filter_model else []),
        *args.overrides,
    ]
    load_before = os.getloadavg()  # the seconds depend on what else runs: this machine is shared
    manifest = run(compose("generate", overrides))
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    g = manifest["generation"]
    n = g["counts"]
    ds = ShardedDataset.open(work / "shards")
    ranks = [r["filter_rank"] for s, meta in enumerate(ds.shards) for r in ds.read(s, range(meta["samples"]))]
    rows = []
    for k in top_ks:
        kept = sum(rank < k for rank in ranks)
        rows.append(
            {
                "filter_top_k": k,
                "documents": n["documents"],
                "generated": n["generated"],
                "empty": n["empty"],
                "duplicates": n["duplicates_in_document"] + n["duplicates_across_documents"],
                "candidates": n["filter_candidates"],
                "kept": kept,
                "filter_rate": round(1 - kept / n["filter_candidates"], 4) if n["filter_candidates"] else 0.0,
            }
        )
    print(json.dumps(g["seconds"]))
    extra = {"overrides": overrides, "generation": g, "seconds": g["seconds"], "load_average_1_5_15min": load}
    report(args.name, rows, extra)


if __name__ == "__main__":
    main()
