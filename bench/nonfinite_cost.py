"""What the non-finite guard (trainer.nonfinite_check, contrastive/guard.py) costs per optimizer step.

    python bench/nonfinite_cost.py --pairs 32 --rounds 6 --steps 3

The guard reads the step's loss and the gradient's global norm, and the ranks agree through one all-reduce of a
flag. The norm is what clipping computes anyway (trainer.gradient_clip_val, default 1.0); with clipping off it is
the guard's only large part. Timed part by part (a whole step varies by more than the guard costs), on
all-MiniLM-L6-v2's real gradients after one backward at `--pairs` MedQuAD pairs:

- `norm`: torch.nn.utils.get_total_norm over every gradient (median of `--repeats`);
- `check, 1 rank`: FiniteGuard.check (two host reads, the flag, no collective);
- `check, 2 gloo ranks`: the same with the all-reduce, two processes on this machine;

Then whole steps, norm + check against neither, interleaved (on-off, off-on, ...) for `--rounds` rounds of
`--steps` steps each: the ratio is only as good as the step-to-step noise it also reports (`spread_off`). On a
GPU the host reads are a synchronisation the step would not otherwise have at that point; this machine has none,
so that part is not measured here.

`--model` replaces all-MiniLM-L6-v2 (smoke runs with a tiny model); the figures are only comparable with the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import median_seconds, report, train_mode_encoder  # noqa: E402
from step_throughput import load_pairs  # noqa: E402


def _two_rank_check(rank: int, port: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    from embedscale.contrastive.guard import FiniteGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    guard = FiniteGuard()
    loss, norm = torch.tensor(1.0), torch.tensor(2.0)

    def check():
        guard.check(step=1, loss=loss, grad_norm=norm, lr=1e-5, temperature=0.05)

    seconds = median_seconds(check, repeats)
    dist.barrier()
    if rank == 0:
        out.put(seconds)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a model path instead of all-MiniLM-L6-v2 (smoke runs)")
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp

    from embedscale.contrastive.guard import FiniteGuard
    from embedscale.data.batch import PairExample
    from embedscale.data.collate import PairCollator

    encoder, tok = train_mode_encoder(args.model, threads=args.threads, query_max_length=64, document_max_length=128)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    queries, docs, _ = load_pairs("medquad", args.pairs, tok)
    batch = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)(
        [PairExample(q, d) for q, d in zip(queries, docs, strict=True)]
    )
    guard = FiniteGuard()
    params = list(encoder.parameters())

    def step(check: bool) -> None:
        q_BD = encoder.encode(batch.queries, side="query")
        d_BD = encoder.encode(batch.documents, side="document")
        loss = torch.nn.functional.cross_entropy(q_BD @ d_BD.T * 20, torch.arange(len(q_BD)))
        loss.backward()
        if check:  # what the module does with clipping off: the norm, then the guard
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], norm_type=2.0)
            guard.check(step=1, loss=loss.detach(), grad_norm=norm, lr=1e-5, temperature=0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(True)  # warm-up
    per_step: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):  # interleaved, ABBA: on off, off on, ... (a drift of the machine cancels out)
        for label in ("on", "off") if r % 2 == 0 else ("off", "on"):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(label == "on")
            per_step[label].append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(per_step["off"])

    encoder.encode(batch.documents, side="document").sum().backward()  # gradients to take the norm of
    grads = [p.grad for p in params if p.grad is not None]
    norm_s = median_seconds(lambda: torch.nn.utils.get_total_norm(grads, norm_type=2.0), args.repeats)
    loss, norm = torch.tensor(1.0), torch.tensor(2.0)
    check_s = median_seconds(
        lambda: guard.check(step=1, loss=loss, grad_norm=norm, lr=1e-5, temperature=0.05), args.repeats * 20
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_two_rank_check, args=(r, port, args.repeats * 4, out)) for r in range(2)]
    for p in procs:
        p.start()
    check2_s = out.get(timeout=300)
    for p in procs:
        p.join()

    on, off = statistics.median(per_step["on"]), statistics.median(per_step["off"])
    rows = [
        {"part": "gradient norm (computed anyway when clipping)", "ms": norm_s * 1e3, "share_of_step": norm_s / step_s},
        {"part": "check, 1 rank", "ms": check_s * 1e3, "share_of_step": check_s / step_s},
        {"part": "check, 2 gloo ranks (one all-reduce)", "ms": check2_s * 1e3, "share_of_step": check2_s / step_s},
        {"part": f"step at {args.pairs} pairs, norm + check (median)", "ms": on * 1e3, "share_of_step": on / off},
        {"part": f"step at {args.pairs} pairs, no check (median)", "ms": off * 1e3, "share_of_step": 1.0},
    ]
    report(
        "nonfinite_cost",
        rows,
        {
            "model": args.model or "sentence-transformers/all-MiniLM-L6-v2",
            "pairs": args.pairs,
            "added_share_clip_on": check2_s / step_s,
            "added_share_clip_off": (check2_s + norm_s) / step_s,
            "interleaved_steps_s": per_step,
            "ratio_on_over_off": on / off,
            "spread_off": (max(per_step["off"]) - min(per_step["off"])) / off,
        },
    )


if __name__ == "__main__":
    main()
