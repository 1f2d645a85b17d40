"""embedscale vs sentence-transformers MultipleNegativesRankingLoss on SciFact, same everything.

Same model (packaged all-MiniLM-L6-v2), same training pairs (SciFact train qrels), batch size,
epochs, learning rate, warmup, weight decay, gradient clipping, seed and drop-last; temperature
0.05 = ST's scale 20. ST runs its own SentenceTransformerTrainer with its recommended
NO_DUPLICATES batch sampler. Both models are then scored by the same evaluator (SciFact test,
exact search, 256 tokens).

    python bench/st_mnrl_scifact.py --seeds 42,1,2 --out runs/bench_st_mnrl

Each seed trains both systems (runs already in <out>/{embedscale,st}-seed<N>/ are reused, so a
quickstart run can be placed there as embedscale-seed42). On 919 pairs and 84 steps the seed moves
NDCG@10 by about a point, so compare means over seeds. `train_s` is training time alone (embedscale:
fit time minus its before/after evaluations).

Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from common import report  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from embedscale.config import TrainConfig, register_configs, to_config
    from embedscale.jobs.launch import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_config(hydra_compose(config_name="train", overrides=overrides), TrainConfig)


def train_sentence_transformers(
    cfg, out_dir: Path, device: str = "cpu", *, callbacks: tuple = (), logging_steps: int = 10
):
    """Train ST's MNRL on the configured pairs with the run's settings; returns (SentenceTransformer, train seconds)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    try:
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers

    from embedscale.data.datamodule import load_examples
    from embedscale.data.records import resolve_data_root
    from embedscale.encoder.biencoder import resolve_model_path

    examples = load_examples(cfg.data, resolve_data_root(cfg.data.root))
    dataset = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    model = SentenceTransformer(resolve_model_path(cfg.model.name_or_path), device=device)
    model.max_seq_length = cfg.model.document_max_length
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.loss.temperature)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=cfg.trainer.max_epochs,
        per_device_train_batch_size=cfg.data.batch_size_per_rank,
        learning_rate=cfg.optim.lr,
        warmup_ratio=cfg.optim.warmup_ratio,
        weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type=cfg.optim.scheduler.value,
        max_grad_norm=cfg.trainer.gradient_clip_val or 0.0,
        seed=cfg.seed,
        dataloader_drop_last=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to="none",
        logging_steps=logging_steps,
        use_cpu=device == "cpu",
    )
    start = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=list(callbacks)
    )
    trainer.train()
    seconds = time.perf_counter() - start
    model.save(str(out_dir / "model"))
    (out_dir / "train_seconds.json").write_text(json.dumps({"train_seconds": seconds}))
    return model, seconds


def evaluate(model_dir: str, cfg, device: str = "cpu") -> dict:
    import dataclasses

    from embedscale.data.records import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators, evaluate_all

    encoder, tokenizer = load_encoder(dataclasses.replace(cfg.model, name_or_path=model_dir))
    encoder.to(device)
    evaluators = build_evaluators(cfg.eval, root=resolve_data_root(cfg.data.root), default_max_length=256)
    return evaluate_all(evaluators, encoder, tokenizer)


def _embedscale(cfg_overrides: list[str], run_dir: Path) -> dict:
    """A finished embedscale run in run_dir (reused when its metrics.json exists), else train one."""
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    from embedscale.jobs.train import run

    return run(compose([*cfg_overrides, f"run_dir={run_dir}", "logger=csv"]))


def _sentence_transformers(cfg, out_dir: Path, device: str = "cpu") -> tuple[float, dict]:
    """(train seconds, metrics) of an ST run in out_dir (its model reused when present), else train one."""
    import torch

    if not (out_dir / "train_seconds.json").exists():
        torch.manual_seed(cfg.seed)
        train_sentence_transformers(cfg, out_dir, device)
    seconds = json.loads((out_dir / "train_seconds.json").read_text())["train_seconds"]
    return seconds, evaluate(str(out_dir / "model"), cfg, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_st_mnrl", help="runs go to <out>/{embedscale,st}-seed<N>/")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; each trains both systems")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to both (e.g. trainer.max_epochs=2)")
    args = parser.parse_args()
    import statistics

    out = Path(args.out).resolve()
    names = ["scifact/ndcg@10", "scifact/recall@100", "scifact/mrr@10"]
    rows, per_system = [], {"sentence-transformers MNRL": [], "embedscale": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        overrides = [*args.overrides, f"seed={seed}"]
        cfg = compose(overrides)
        es = _embedscale(overrides, out / f"embedscale-seed{seed}")
        if es["config"]["seed"] != seed or es["config"]["optim"]["lr"] != cfg.optim.lr:
            raise SystemExit(f"{out}/embedscale-seed{seed} was trained with other settings: remove it")
        st_seconds, st = _sentence_transformers(cfg, out / f"st-seed{seed}")
        es_seconds = es["train"]["fit_seconds"] - sum(h["seconds"] for h in es["eval_history"])
        if not rows:
            rows.append(
                {
                    "system": "zero-shot all-MiniLM-L6-v2",
                    "seed": "-",
                    **{n: es["eval"]["before"][n] for n in names},
                    "train_s": 0.0,
                }
            )
        for system, metrics, seconds in (
            ("sentence-transformers MNRL", st, st_seconds),
            ("embedscale", es["eval"]["after"], es_seconds),
        ):
            rows.append(
                {"system": system, "seed": seed, **{n: metrics[n] for n in names}, "train_s": round(seconds, 1)}
            )
            per_system[system].append(metrics)
    for system, runs in per_system.items():
        if len(runs) > 1:
            mean = {n: statistics.mean(r[n] for r in runs) for n in names}
            std = statistics.stdev(r["scifact/ndcg@10"] for r in runs)
            rows.append(
                {
                    "system": f"{system} mean ({len(runs)} seeds)",
                    "seed": f"ndcg@10 std {std:.4f}",
                    **mean,
                    "train_s": "-",
                }
            )
    cfg = compose(args.overrides)
    settings = {
        "epochs": cfg.trainer.max_epochs,
        "batch_size": cfg.data.batch_size_per_rank,
        "lr": cfg.optim.lr,
        "warmup_ratio": cfg.optim.warmup_ratio,
        "weight_decay": cfg.optim.weight_decay,
        "temperature": cfg.loss.temperature,
        "seeds": args.seeds,
    }
    print("settings: " + json.dumps(settings))
    report("st_mnrl_scifact", rows, {"settings": settings})


if __name__ == "__main__":
    main()
