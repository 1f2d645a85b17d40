"""embedscale vs sentence-transformers MNRL on SciFact with the randomness paired: same batches, same dropout.

`st_mnrl_scifact.py` compares the two trainers as users run them. Each draws its own dropout masks, so
for one seed the two NDCG@10 differ by luck as well as by any real difference, and the luck is of the
same size (~0.005) as the gap seen there. This bench gives both trainers the same luck:

- the same batches: embedscale's GlobalBatchSampler and sentence-transformers' NoDuplicatesBatchSampler
  build the same global batches from the same seed (same permutation, same deferral of repeated
  texts); this is checked here, epoch by epoch, before anything trains;
- the same dropout masks: both reseed torch's generator to `seed * 10_000 + step` right before each
  optimizer step's forward (a Lightning callback / a transformers TrainerCallback), and both encode the
  queries first, then the documents, through the same transformers BertModel.

Everything else is each system's own, unchanged: embedscale's `embedscale.jobs.train.run` (the quickstart
path: module, optimizer groups, warmup/decay, clipping, the after-training evaluation, export) and
`SentenceTransformerTrainer` + `MultipleNegativesRankingLoss` with the NO_DUPLICATES sampler. Both
finished models are scored by the same evaluator (SciFact test, exact search, 256 tokens). With the
same computation the two runs end with the same weights up to float rounding; any real difference in
the training step would show as a diverging per-step loss and different weights.

    python bench/st_paired.py --seeds 42 --out runs/bench_st_paired

Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import report  # noqa: E402
from st_mnrl_scifact import compose, evaluate, train_sentence_transformers  # noqa: E402

NAMES = ["scifact/ndcg@10", "scifact/recall@100", "scifact/mrr@10"]


def step_seed(seed: int, step: int) -> int:
    return seed * 10_000 + step


def check_same_batches(cfg, examples) -> int:
    """Both samplers' batches for every epoch; raises if they differ. Returns the steps per epoch."""
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from embedscale.data.sampler import GlobalBatchSampler

    dataset = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    G = cfg.data.batch_size_per_rank
    st = NoDuplicatesBatchSampler(dataset, batch_size=G, drop_last=True, generator=torch.Generator(), seed=cfg.seed)
    es = GlobalBatchSampler(examples, global_batch_size=G, world_size=1, rank=0, seed=cfg.seed)
    for epoch in range(cfg.trainer.max_epochs):
        st.set_epoch(epoch)
        es.set_epoch(epoch)
        a, b = list(st), list(es)
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            raise SystemExit(f"epoch {epoch}: the samplers' batches differ from batch {first} on: nothing to pair")
    return len(es)


def train_st(cfg, out: Path) -> tuple[torch.nn.Module, list[float], float]:
    """st_mnrl_scifact's ST run (same arguments), with the per-step reseed and one logged loss per step."""
    from transformers import TrainerCallback

    losses: list[float] = []

    class Paired(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(step_seed(cfg.seed, state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    model, seconds = train_sentence_transformers(cfg, out, callbacks=(Paired(),), logging_steps=1)
    return model[0].auto_model, losses, seconds


def train_embedscale(overrides: list[str], seed: int, run_dir: Path) -> tuple[torch.nn.Module, list[float], dict]:
    """The product's own `embedscale.jobs.train.run`, with one callback added: the per-step reseed (and the losses)."""
    import lightning as L

    import embedscale.contrastive.trainer as es_trainer
    import embedscale.jobs.train as es_train

    losses: list[float] = []
    holder: dict = {}

    class Paired(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.manual_seed(step_seed(seed, trainer.global_step))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            holder["module"] = pl_module

    build = es_trainer.build_trainer
    es_trainer.build_trainer = lambda t, logger, rd, callbacks, **kw: build(t, logger, rd, [*callbacks, Paired()], **kw)
    try:
        result = es_train.run(
            compose([*overrides, f"run_dir={run_dir}", "logger=csv", "eval.before_training=false", "export=false"])
        )
    finally:
        es_trainer.build_trainer = build
    return holder["module"].encoder.query_backbone, losses, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_st_paired", help="runs go to <out>/{embedscale,st}-seed<N>/")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; each trains both systems")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to both (e.g. trainer.max_epochs=1)")
    args = parser.parse_args()

    from embedscale.data.datamodule import load_examples
    from embedscale.data.records import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder

    out = Path(args.out).resolve()
    rows, pairs = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        overrides = [*args.overrides, f"seed={seed}"]
        cfg = compose(overrides)
        examples = load_examples(cfg.data, resolve_data_root(cfg.data.root))
        steps_per_epoch = check_same_batches(cfg, examples)
        encoder, _ = load_encoder(cfg.model)
        initial = {n: p.detach().clone() for n, p in encoder.query_backbone.named_parameters()}
        del encoder
        st_model, st_losses, st_seconds = train_st(cfg, out / f"st-seed{seed}")
        st = evaluate(str(out / f"st-seed{seed}" / "model"), cfg) if cfg.eval.beir else {}
        es_model, es_losses, es_result = train_embedscale(overrides, seed, out / f"embedscale-seed{seed}")
        es = es_result["eval"].get("after", {})  # {} with eval=none (a smoke run)
        es_params = dict(es_model.named_parameters())
        diff_sq = upd_sq = 0.0
        for name, p in st_model.named_parameters():
            if name in es_params:  # BERT's pooler: loaded by ST, unused by both
                d_st, d_es = p.detach() - initial[name], es_params[name].detach() - initial[name]
                diff_sq += (d_st - d_es).pow(2).sum().item()
                upd_sq += d_st.pow(2).sum().item()
        loss_diffs = [abs(a - b) for a, b in zip(st_losses, es_losses, strict=False)]
        pair = {
            "seed": seed,
            "steps": {"st": len(st_losses), "embedscale": len(es_losses), "per_epoch": steps_per_epoch},
            "same_batches_every_epoch": True,
            "max_abs_loss_diff": max(loss_diffs),
            "loss_diff_by_step": [f"{d:.1e}" for d in loss_diffs],
            "relative_update_difference_all_weights": (diff_sq / upd_sq) ** 0.5,
            "train_seconds": {  # training alone (embedscale: fit time minus its after-training evaluation)
                "st": round(st_seconds, 1),
                "embedscale": round(
                    es_result["train"]["fit_seconds"] - sum(h["seconds"] for h in es_result["eval_history"]), 1
                ),
            },
            "metric_differences": {n: f"{es[n] - st[n]:+.1e}" for n in NAMES if n in es and n in st},
        }
        pairs.append(pair)
        print(json.dumps({k: v for k, v in pair.items() if k != "loss_diff_by_step"}))
        for system, metrics in (("sentence-transformers MNRL", st), ("embedscale", es)):
            rows.append({"system": system, "seed": seed, **{n: round(metrics.get(n, float("nan")), 4) for n in NAMES}})
        if st and es:
            rows.append(
                {"system": "difference (embedscale - ST)", "seed": seed, **{n: f"{es[n] - st[n]:+.4f}" for n in NAMES}}
            )
    report("st_paired_scifact", rows, {"pairs": pairs})


if __name__ == "__main__":
    main()
