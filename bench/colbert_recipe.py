"""ColBERT vs bi-encoders on SciFact at one budget (issue 22): `embedscale pipeline recipe=colbert_scifact` (mine one
dense hard negative per train pair with all-MiniLM-L6-v2, then fine-tune on those shards as ColBERT and as a
bi-encoder) next to the quickstart (`embedscale train`: the same pairs, in-batch negatives only), with wall times,
index size per document and the ColBERT export's round trip through sentence-transformers' MultiVectorEncoder.

    python bench/colbert_recipe.py                              # about 80 min on 2 cores
    python bench/colbert_recipe.py --work /tmp/colbert --skip-quickstart

Every trained row is 3 epochs of 28 steps at batch 32, lr 1e-4, seed 42, from all-MiniLM-L6-v2, evaluated on
SciFact test (exact search: cosine for the bi-encoders, MaxSim over every document's token vectors for ColBERT).
Columns: train_s = the fit without its evaluations (train.fit_seconds minus the evaluations Lightning runs inside
the fit); eval_s = those evaluations (here the final one on SciFact test); stage_s = the whole job (loading, fit,
evaluation, export); index_bytes_per_doc = what the exact index stores per document: one 384-dim float32 vector
(1,536 B) for a bi-encoder, the mean number of scored token vectors x 128 dims x 2 B (float16) for ColBERT (the
evaluator's scifact/index_bytes_per_doc). The recipe's wall time is its mine + colbert stages, reported with and
without the final evaluation (the issue's target: fine-tuning in under 30 minutes on CPU); the bi-encoder stage
is its comparison. Round trip: the exported ColBERT
loaded by embedscale and by `sentence_transformers.MultiVectorEncoder`, --round-trip-texts SciFact test queries
and corpus documents: the largest |difference| of their token vectors and of their MaxSim score matrices.

The pipeline resumes (stages done are skipped) and the quickstart run is reused when its metrics.json is there, so
an interrupted run continues; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from common import embedscale_cli, report  # noqa: E402

NAME = "colbert_scifact"


def as_list(items: list[str]) -> str:  # Hydra's grammar: list items holding '=' are quoted
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def round_trip(export_dir: Path, data_root: Path, n: int) -> dict:
    """embedscale's encoder vs MultiVectorEncoder on the export: token vectors and MaxSim scores."""
    import torch
    from sentence_transformers import MultiVectorEncoder

    from embedscale.config import ModelConfig
    from embedscale.contrastive.maxsim import maxsim_scores
    from embedscale.data.records import read_corpus, read_queries
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.late_interaction import encode_token_matrices

    queries = list(read_queries(data_root / "scifact").values())[:n]
    documents = list(read_corpus(data_root / "scifact").values())[:n]
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(export_dir)))
    st = MultiVectorEncoder(str(export_dir), device="cpu")
    pad = torch.nn.utils.rnn.pad_sequence

    def matrices(side: str, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        packed = encode_token_matrices(encoder, tokenizer, texts, side=side, dtype=torch.float32)
        ours = [packed.vectors_TD[a:b] for a, b in zip(packed.offsets_N[:-1], packed.offsets_N[1:], strict=True)]
        theirs = (st.encode_query if side == "query" else st.encode_document)(texts)
        return ours, [t.float().cpu() for t in theirs]

    def scores(q: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        mask = lambda xs: pad([torch.ones(len(x), dtype=torch.bool) for x in xs], batch_first=True)  # noqa: E731
        return maxsim_scores(pad(q, batch_first=True), mask(q), pad(d, batch_first=True), mask(d))

    (q_ours, q_st), (d_ours, d_st) = matrices("query", queries), matrices("document", documents)
    shapes_equal = [x.shape for x in q_ours + d_ours] == [y.shape for y in q_st + d_st]
    token_diff = max((x - y).abs().max().item() for x, y in zip(q_ours + d_ours, q_st + d_st, strict=True))
    ours_QD, st_QD = scores(q_ours, d_ours), st.similarity(q_st, d_st).float()
    return {
        "texts": f"{len(queries)} SciFact queries + {len(documents)} documents",
        "token_matrix_shapes_equal": shapes_equal,
        "max_abs_token_vector_diff": float(f"{token_diff:.3g}"),
        "max_abs_maxsim_score_diff": float(f"{(ours_QD - st_QD).abs().max().item():.3g}"),
        "scored_tokens": {
            "query_mean": sum(len(x) for x in q_ours) / len(q_ours),
            "document_mean": sum(len(x) for x in d_ours) / len(d_ours),
        },
    }


def row(name: str, metrics: dict, *, negatives: str, stage_s: float | None, bytes_per_doc: float | None) -> dict:
    after = metrics["eval"]["after"]
    return {
        "model": name,
        "negatives": negatives,
        "ndcg@10": round(after["scifact/ndcg@10"], 4),
        "recall@100": round(after["scifact/recall@100"], 4),
        "steps": metrics["train"]["optimizer_steps"],
        "train_s": train_seconds(metrics),
        "eval_s": round(sum(h["seconds"] for h in metrics.get("eval_history", [])), 1),
        "stage_s": stage_s,
        "index_bytes_per_doc": bytes_per_doc,
    }


def train_seconds(metrics: dict) -> float:
    """The fit without its evaluations (they run inside Lightning's fit: before, every N steps, after)."""
    evals = sum(h["seconds"] for h in metrics.get("eval_history", []))
    return round(metrics["train"]["fit_seconds"] - evals, 1)


def dense_bytes(export_dir: Path) -> int:
    """One float32 vector per document: the exported model's embedding dim x 4 B."""
    dense = sorted(export_dir.glob("*_Dense/config.json"))  # a projection head, when there is one
    dim = json.loads(dense[-1].read_text())["out_features"] if dense else None
    return 4 * (dim or json.loads((export_dir / "config.json").read_text())["hidden_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/embedscale-colbert-recipe")
    parser.add_argument("--data-root", default=None, help="data root (default: embedscale's: ../shared/data)")
    parser.add_argument("--model", default=None, help="starting model for every stage (default: the recipe's)")
    parser.add_argument("--extra-train", default="", help="more overrides of every train run, ';'-separated (smoke)")
    parser.add_argument("--skip-quickstart", action="store_true", help="only the recipe's rows")
    parser.add_argument("--round-trip-texts", type=int, default=100)
    parser.add_argument("--fresh", action="store_true", help="delete --work first")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    from embedscale.data.records import resolve_data_root

    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    data_root = resolve_data_root(args.data_root)
    env = {**os.environ, "EMBEDSCALE_DATA": str(data_root)}
    common = ["logger=csv", "trainer.progress=off", f"eval.cache_dir={work / 'cache'}"]
    common += [f"model.name_or_path={args.model}"] if args.model else []
    train = common + [e for e in args.extra_train.split(";") if e]
    mine = [f"mine.cache_dir={work / 'cache'}"] + ([f"model.name_or_path={args.model}"] if args.model else [])
    pipe = work / "pipeline"
    started = time.perf_counter()
    print("recipe colbert_scifact: mine -> colbert -> biencoder", flush=True)
    pipeline_args = ["pipeline", "recipe=colbert_scifact", f"pipeline.output={pipe}", f"hydra.run.dir={work / 'hydra'}"]
    pipeline_args += ["+pipeline.overrides.train=" + as_list(train), "+pipeline.overrides.mine=" + as_list(mine)]
    embedscale_cli(pipeline_args, work / "pipeline.log", env)
    stages = {s["stage"]: s for s in json.loads((pipe / "pipeline.json").read_text())["stages"]}
    runs = {name: json.loads((pipe / name / "metrics.json").read_text()) for name in ("colbert", "biencoder")}
    quick_dir = work / "quickstart"
    if not args.skip_quickstart:
        if not (quick_dir / "metrics.json").exists():
            print("quickstart: embedscale train (in-batch negatives)", flush=True)
            quick_args = [
                "train",
                f"run_dir={quick_dir}",
                f"hydra.run.dir={work / 'hydra-quickstart'}",
                "overwrite=true",
            ]
            quick_s = embedscale_cli([*quick_args, *train], work / "quickstart.log", env)
            (quick_dir / "stage_seconds.json").write_text(json.dumps({"seconds": round(quick_s, 1)}) + "\n")
        runs["quickstart"] = json.loads((quick_dir / "metrics.json").read_text())
    rows = []
    if "quickstart" in runs:
        quick = runs["quickstart"]
        before = quick["eval"].get("before") or {}
        if before:
            rows.append(
                {
                    "model": "zero-shot bi-encoder",
                    "negatives": "-",
                    "ndcg@10": round(before["scifact/ndcg@10"], 4),
                    "recall@100": round(before["scifact/recall@100"], 4),
                    "steps": 0,
                    "train_s": None,
                    "eval_s": None,
                    "stage_s": None,
                    "index_bytes_per_doc": dense_bytes(Path(quick["export_dir"])),
                }
            )
        quick_s = json.loads((quick_dir / "stage_seconds.json").read_text())["seconds"]
        bytes_ = dense_bytes(Path(quick["export_dir"]))
        rows.append(row("bi-encoder (quickstart)", quick, negatives="in-batch", stage_s=quick_s, bytes_per_doc=bytes_))
    bi = runs["biencoder"]
    rows.append(
        row(
            "bi-encoder",
            bi,
            negatives="in-batch + 1 mined",
            stage_s=stages["biencoder"]["seconds"],
            bytes_per_doc=dense_bytes(Path(bi["export_dir"])),
        )
    )
    colbert = runs["colbert"]
    rows.append(
        row(
            "ColBERT (128-dim tokens)",
            colbert,
            negatives="in-batch + 1 mined",
            stage_s=stages["colbert"]["seconds"],
            bytes_per_doc=round(colbert["eval"]["after"]["scifact/index_bytes_per_doc"], 1),
        )
    )
    print(f"round trip of {colbert['export_dir']} through MultiVectorEncoder", flush=True)
    trip = round_trip(Path(colbert["export_dir"]), data_root, args.round_trip_texts)
    recipe_s = stages["mine"]["seconds"] + stages["colbert"]["seconds"]
    fine_tune_s = stages["mine"]["seconds"] + train_seconds(colbert)
    extra = {
        "recipe_seconds": {
            "mine": stages["mine"]["seconds"],
            "colbert stage": stages["colbert"]["seconds"],
            "colbert fit without evaluation": train_seconds(colbert),
            "mine + colbert stage": round(recipe_s, 1),
            "mine + colbert fit (the fine-tune, no evaluation)": round(fine_tune_s, 1),
            "fine_tune_under_30_min": fine_tune_s < 1800,
            "with_evaluation_under_30_min": recipe_s < 1800,
        },
        "mining": stages["mine"]["produced"],
        "round_trip": trip,
        "colbert_eval_after": colbert["eval"]["after"],
        "configs": {name: runs[name]["config"] for name in runs},
        "total_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    report(args.name, rows, extra)
    if not (trip["token_matrix_shapes_equal"] and trip["max_abs_token_vector_diff"] < 1e-4):
        raise SystemExit(f"the export's round trip differs: {trip}")


if __name__ == "__main__":
    main()
