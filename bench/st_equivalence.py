"""Is embedscale's training step the same computation as sentence-transformers' MNRL step?

Seed noise on SciFact (919 pairs, 84 steps) moves NDCG@10 by ~0.007 between runs, so an NDCG
comparison cannot tell a small implementation difference from luck. This removes the luck: both
systems train the same packaged all-MiniLM-L6-v2 on the *same batches in the same order* (the first
`--steps` x `--batch` SciFact train pairs, no shuffling) with dropout off, through their own full training
stacks (embedscale: Lightning module, optimizer, scheduler, clipping; ST: SentenceTransformerTrainer
with MultipleNegativesRankingLoss). Identical maths gives identical weights up to float rounding.

    python bench/st_equivalence.py --steps 10
    python bench/st_equivalence.py --steps 2 --batch 4 model.name_or_path=PATH data.root=DIR   # a smoke run

Positional arguments are Hydra overrides of the train config (the smoke test's tiny model and data); the
settings that make the comparison (no shuffling, no duplicate masking, --steps, --batch, --lr) are applied after
them.

Reported: per-step training loss of both; after the last step, the relative difference of the
weight updates ||dW_st - dW_es|| / ||dW_st|| over all weights and for the worst single parameter
(the attention key biases, whose gradient is mathematically zero -- softmax ignores a per-query
constant -- so Adam turns their rounding noise into lr-sized steps), and the min cosine between
the two trained models' embeddings of 64 SciFact texts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import report  # noqa: E402
from st_mnrl_scifact import compose  # noqa: E402
from torch import nn  # noqa: E402

_dropout_init = nn.Dropout.__init__


def no_dropout(self, p: float = 0.5, inplace: bool = False) -> None:  # every nn.Dropout built from now on
    _dropout_init(self, 0.0, inplace)


def train_st(cfg, examples, steps: int, out: Path) -> tuple[nn.Module, list[float]]:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    from embedscale.encoder.biencoder import resolve_model_path

    class InOrder(SentenceTransformerTrainer):  # the batches in dataset order, as embedscale gets them
        def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
            return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dataset = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    model = SentenceTransformer(resolve_model_path(cfg.model.name_or_path), device="cpu")
    model.max_seq_length = cfg.model.document_max_length
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st"),
        num_train_epochs=1,
        per_device_train_batch_size=cfg.data.batch_size_per_rank,
        learning_rate=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type=cfg.optim.scheduler.value,
        max_grad_norm=cfg.trainer.gradient_clip_val,
        seed=cfg.seed,
        dataloader_drop_last=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        use_cpu=True,
    )
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.loss.temperature)
    InOrder(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[Losses()]).train()
    return model[0].auto_model, losses


def train_embedscale(cfg) -> tuple[nn.Module, list[float]]:
    import lightning as L

    from embedscale.config import resolve_batch_sizes
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.datamodule import build_datamodule
    from embedscale.data.records import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder

    encoder, tokenizer = load_encoder(cfg.model)
    module = ContrastiveModule(encoder, loss_cfg=cfg.loss, optim_cfg=cfg.optim, trainer_cfg=cfg.trainer)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Losses()],
    )
    root = resolve_data_root(cfg.data.root)
    data = build_datamodule(
        cfg.data,
        resolve_batch_sizes(cfg, 1),
        tokenizer=tokenizer,
        model_cfg=encoder.cfg,
        root=root,
        seed=cfg.seed,
        run_dir=Path("."),
    )
    trainer.fit(module, datamodule=data)
    return encoder.query_backbone, losses


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    from embedscale.encoder.biencoder import load_encoder

    encoder, _ = load_encoder(cfg.model)
    return {n: p.detach().clone() for n, p in encoder.query_backbone.named_parameters()}


def embedding_cosines(st_backbone: nn.Module, es_backbone: nn.Module, texts: list[str], cfg) -> float:
    """Min cosine between the two trained backbones' mean-pooled embeddings of `texts`."""
    from transformers import AutoTokenizer

    from embedscale.encoder.biencoder import resolve_model_path
    from embedscale.encoder.pooling import pool

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    t = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        e = [
            pool(m.eval()(**t).last_hidden_state, t["attention_mask"], cfg.model.pooling)
            for m in (st_backbone, es_backbone)
        ]
    return torch.nn.functional.cosine_similarity(e[0], e[1], dim=-1).min().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lr", default="1e-4")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step (data.batch_size_per_rank)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (e.g. a tiny model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    nn.Dropout.__init__ = no_dropout
    cfg = compose(
        [
            *args.overrides,
            f"data.max_samples={args.batch * args.steps}",
            f"data.batch_size_per_rank={args.batch}",
            "data.shuffle=false",
            "data.no_duplicates=false",
            "loss.mask_duplicates=false",  # ST masks nothing; the batches here do hold repeated texts
            f"optim.lr={args.lr}",
            f"optim.warmup_steps={args.warmup_steps}",
            "eval=none",
        ]
    )
    from embedscale.data.datamodule import load_examples
    from embedscale.data.records import resolve_data_root

    examples = load_examples(cfg.data, resolve_data_root(cfg.data.root))
    initial = initial_weights(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        st_model, st_losses = train_st(cfg, examples, args.steps, Path(tmp))
    es_model, es_losses = train_embedscale(cfg)
    es_params = dict(es_model.named_parameters())
    # Compare the updates (final - initial), not the weights: an update is ~1e-4 of a weight.
    diff_sq = upd_sq = 0.0
    worst, worst_rel = "", 0.0
    for name, p in st_model.named_parameters():
        if name not in es_params:  # BERT's pooler: loaded by ST, unused by both (no gradient)
            continue
        d_st = p.detach() - initial[name]
        d_es = es_params[name].detach() - initial[name]
        diff_sq += (d_st - d_es).pow(2).sum().item()
        upd_sq += d_st.pow(2).sum().item()
        rel = ((d_st - d_es).norm() / d_st.norm().clamp_min(1e-12)).item()
        if rel > worst_rel:
            worst, worst_rel = name, rel
    texts = [e.query for e in examples[:32]] + [e.positive for e in examples[:32]]
    cos = embedding_cosines(st_model, es_model, texts, cfg)
    rows = [
        {"step": i + 1, "ST loss": round(a, 6), "embedscale loss": round(b, 6), "abs diff": f"{abs(a - b):.2e}"}
        for i, (a, b) in enumerate(zip(st_losses, es_losses, strict=False))
    ]
    summary = {
        "steps": args.steps,
        "st_steps_logged": len(st_losses),
        "embedscale_steps": len(es_losses),
        "relative_update_difference_all_weights": (diff_sq / upd_sq) ** 0.5,
        "worst_parameter": worst,
        "worst_parameter_relative_update_difference": worst_rel,
        "min_cosine_final_embeddings_64_texts": cos,
    }
    print(json.dumps(summary, indent=1))
    report("st_equivalence", rows, summary)


if __name__ == "__main__":
    main()
