"""Job `embedscale evaluate`: load any model or embedscale export -> BEIR/STS evaluators -> metrics.json.

embedscale evaluate model.name_or_path=runs/train/<ts>/model eval=scifact_stsb
torchrun --standalone --nproc_per_node=2 -m embedscale.jobs.evaluate ...   # encoding sharded, same metrics
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.config import EvaluateConfig
from embedscale.jobs.launch import hydra_job


def run(cfg: EvaluateConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.data.records import resolve_data_root
    from embedscale.distributed import init_from_env, world
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators, evaluate_all

    init_from_env()  # under torchrun: the encoding is split over the ranks, metrics computed once
    run_dir = Path(run_dir or "runs/evaluate").resolve()
    encoder, tokenizer = load_encoder(cfg.model)
    evaluators = build_evaluators(
        cfg.eval, root=resolve_data_root(cfg.data_root), default_max_length=encoder.cfg.document_max_length
    )
    if not evaluators:
        raise ValueError("nothing to evaluate: add sets to eval.beir, eval.pairs or eval.sts (e.g. eval=scifact_stsb)")
    metrics = evaluate_all(evaluators, encoder, tokenizer, run_dir=run_dir if cfg.eval.save_runs else None)
    rank, size = world()
    if rank != 0:
        return metrics
    out = Path(cfg.output) if cfg.output else run_dir / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": cfg.model.name_or_path, "world_size": size, "metrics": metrics}, indent=2) + "\n"
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


main = hydra_job("evaluate", run)

if __name__ == "__main__":
    main()
