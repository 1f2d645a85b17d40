"""Job `embedscale evaluate`: load any model or embedscale export -> BEIR/STS evaluators -> metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job
from embedscale.config import EvaluateConfig


def run(cfg: EvaluateConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.data.readers import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators, evaluate_all
    from embedscale.retrieval.index import init_distributed_from_env, rank_world

    init_distributed_from_env()  # under torchrun: the encoding is split over the ranks, metrics computed once
    run_dir = Path(run_dir or "runs/evaluate").resolve()
    encoder, tokenizer = load_encoder(cfg.model)
    root = resolve_data_root(cfg.data_root)
    evaluators = build_evaluators(cfg.eval, root=root, default_max_length=encoder.cfg.document_max_length)
    if not evaluators:
        raise ValueError("nothing to evaluate: add sets to eval.beir or eval.sts (e.g. eval=scifact_stsb)")
    metrics = evaluate_all(evaluators, encoder, tokenizer, run_dir=run_dir if cfg.eval.save_runs else None)
    if rank_world()[0] != 0:
        return metrics
    out = Path(cfg.output) if cfg.output else run_dir / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    world = rank_world()[1]
    out.write_text(
        json.dumps({"model": cfg.model.name_or_path, "world_size": world, "metrics": metrics}, indent=2) + "\n"
    )
    width = max(map(len, metrics))
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"wrote {out}")
    if cfg.mteb_output:
        from embedscale.retrieval.mteb_results import evaluated_sets, mteb_model_name, write_mteb_results

        sets = evaluated_sets(cfg.eval, evaluators)
        name, revision = mteb_model_name(cfg.model.name_or_path), encoder.fingerprint("query")
        for path in write_mteb_results(metrics, sets, Path(cfg.mteb_output), model_name=name, revision=revision):
            print(f"wrote {path}")
    return metrics


main = hydra_job("evaluate", EvaluateConfig, run)

if __name__ == "__main__":
    main()
