"""What does embedscale's plain step add to the bare forward+backward? Timed part by part, not as a whole step.

    python bench/plain_overhead.py --sizes 128,1024,8192 --encoder-pairs 128 --threads 2
    python bench/plain_overhead.py --sizes 2,16 --encoder-pairs 2 --encoder-repeats 1 --loss-repeats 1 --model PATH
                                                                   # a smoke run (a tiny model): seconds

A whole step of all-MiniLM-L6-v2 at 128 pairs takes ~20 s on this 2-core VM and varies +-10% from step
to step, so whole-step ratios (bench/step_throughput.py) cannot resolve a 5% target. Here the two
steps are split into what they share and what differs, and the small parts are timed many times:

- encoder: both towers' forward + backward (a stand-in gradient of 1/B on every embedding), and AdamW,
  timed at `--encoder-pairs`, median of `--encoder-repeats`. The encoder, the pooling and the
  normalisation are the same ops in bare HF, sentence-transformers and embedscale
  (bench/step_throughput.py's systems; embedscale runs two fewer matmuls: it drops BERT's unused pooler).
- loss: forward + backward from detached, normalised embeddings, median of `--loss-repeats`:
  `bare` = cross_entropy(q @ d.T * 20); `embedscale` = ContrastiveModule.loss_from_embeddings with its
  defaults (gathers -- identity in one process --, duplicate masking over the ids, row chunks of
  1,024, the metrics it logs).

Reported per size: both loss times, what embedscale adds (`added_ms`) and, where the encoder was
timed at that size, the plain-step ratio `(encoder + loss_es) / (encoder + loss_bare)`; the issue's
target is <= 1.05. For sizes above `--encoder-pairs` the encoder time is scaled linearly from it, an
approximation: on this CPU the cost per pair moves by ~20% with the batch's shape, which changes the
share by as much, not its order of magnitude.

`--model` replaces all-MiniLM-L6-v2 (smoke runs with a tiny model, tests/test_bench_smoke.py; it needs 128
positions); the figures are only comparable with the default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import median_seconds, report, train_mode_encoder  # noqa: E402
from step_throughput import load_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,1024,8192")
    parser.add_argument("--encoder-pairs", type=int, default=128)
    parser.add_argument("--encoder-repeats", type=int, default=3)
    parser.add_argument("--loss-repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--name", default="plain_overhead")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from embedscale.config import LossConfig, OptimConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairExample, TextIds
    from embedscale.data.collate import PairCollator

    encoder, tok = train_mode_encoder(args.model, threads=args.threads, query_max_length=128, document_max_length=128)
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    dim = encoder.query_backbone.config.hidden_size

    # Encoder part: --encoder-pairs pairs of exactly 128 tokens, bench/step_throughput.py's `fixed` text.
    n_enc = args.encoder_pairs
    queries, docs, _ = load_pairs("fixed", n_enc, tok)
    batch = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)(
        [PairExample(q, d) for q, d in zip(queries, docs, strict=True)]
    )
    assert batch.queries["input_ids"].shape == (n_enc, 128)

    def encoder_step() -> None:
        q_BD = encoder.encode(batch.queries, side="query")
        d_BD = encoder.encode(batch.documents, side="document")
        torch.autograd.backward([q_BD, d_BD], [torch.ones_like(q_BD) / n_enc, torch.ones_like(d_BD) / n_enc])
        opt.step()
        opt.zero_grad(set_to_none=True)

    encoder_s = median_seconds(encoder_step, args.encoder_repeats)
    print(f"encoder fwd+bwd+AdamW at {n_enc} pairs: {encoder_s:.2f} s ({1e3 * encoder_s / n_enc:.1f} ms/pair)")

    def loss_seconds(n: int, repeats: int) -> tuple[float, float]:
        """Median fwd+bwd seconds of the bare loss and of embedscale's, from the same detached embeddings."""
        q0_ND = F.normalize(torch.randn(n, dim), dim=-1)
        d0_ND = F.normalize(torch.randn(n, dim), dim=-1)
        ids = TextIds(torch.arange(n), torch.arange(n, 2 * n), None)

        def bare_loss() -> None:
            q_ND, d_ND = q0_ND.clone().requires_grad_(), d0_ND.clone().requires_grad_()
            F.cross_entropy(q_ND @ d_ND.T * 20.0, torch.arange(n)).backward()

        def es_loss() -> None:
            q_ND, d_ND = q0_ND.clone().requires_grad_(), d0_ND.clone().requires_grad_()
            module.loss_from_embeddings(q_ND, d_ND, None, ids)[0].backward()

        return median_seconds(bare_loss, repeats), median_seconds(es_loss, repeats)

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        bare_s, es_s = loss_seconds(n, max(3, args.loss_repeats * 128 // n))
        encoder_at_n = encoder_s * n / n_enc  # linear in the pairs (an approximation, see the docstring)
        row = {
            "pairs": n,
            "loss_bare_ms": round(1e3 * bare_s, 2),
            "loss_embedscale_ms": round(1e3 * es_s, 2),
            "added_ms": round(1e3 * (es_s - bare_s), 2),
            "encoder_s": round(encoder_at_n, 2) if n == n_enc else f"{encoder_at_n:.1f} (linear from {n_enc})",
            "added_pct_of_step": f"{100 * (es_s - bare_s) / (encoder_at_n + bare_s):+.4f}%",
            "plain_vs_bare": f"{(encoder_at_n + es_s) / (encoder_at_n + bare_s):.5f}x",
        }
        print(row, flush=True)
        rows.append(row)
    report(
        args.name,
        rows,
        {
            "encoder_pairs": n_enc,
            "encoder_seconds": round(encoder_s, 3),
            "tokens": 128,
            "threads": args.threads,
            **({"model": args.model} if args.model else {}),
            "note": "loss parts: median of repeated fwd+bwd from detached embeddings (one process, gathers are "
            "identity); encoder part: both towers fwd+bwd + AdamW at encoder_pairs, scaled linearly to larger sizes",
        },
    )


if __name__ == "__main__":
    main()
