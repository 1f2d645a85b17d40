"""Memory of one rank's local loss at a 65,536 global batch vs the full N x N score matrix.

    python bench/local_loss_scale.py                 # N = 65,536, W = 64, d = 768 (+ full-matrix points)

Each configuration runs in a fresh process: random unit embeddings for the whole gathered batch
(queries and positives, N x d each, with gradient, as after an all-gather), content ids for masking,
then `contrastive_loss` forward + backward with the symmetric term. `local` scores only the last
rank's b = N / W query rows (what embedscale does); `full` scores all N rows on every rank (what
peers that build the global score matrix do). Peak RSS above the process's state before the loss
is what the loss costs; the full-matrix cost at N = 65,536 is extrapolated (x4 per doubling of N;
it would need ~50 GiB here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402


def _child(n: int, world: int, dim: int, mode: str) -> None:
    import time

    import torch
    import torch.nn.functional as F

    from embedscale.contrastive.losses import contrastive_loss
    from embedscale.data.batch import TextIds

    torch.manual_seed(0)
    q_ND = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    p_ND = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    ids = TextIds(torch.randint(0, 2**62, (n,)), torch.randint(0, 2**62, (n,)), None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = n // world
    local = slice(n - b, n) if mode == "local" else None
    start = time.perf_counter()
    loss, _ = contrastive_loss(q_ND, p_ND, None, inverse_temperature=20.0, ids=ids, local=local, symmetric_weight=1.0)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"inputs_MiB": before / 1024, "loss_MiB": (peak - before) / 1024, "seconds": seconds}))


def _run(n: int, world: int, dim: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), str(world), str(dim), mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--full-n", default="4096,8192,16384", help="N values measured for the full matrix")
    args = parser.parse_args()
    if args.child:
        n, world, dim, mode = args.child
        _child(int(n), int(world), int(dim), mode)
        return
    rows = []
    for n in sorted({8192, args.n}):
        r = _run(n, args.world, args.dim, "local")
        rows.append(
            {
                "approach": "local rows (embedscale)",
                "N": n,
                "W": args.world,
                "score rows": n // args.world,
                "loss peak MiB": round(r["loss_MiB"]),
                "inputs MiB": round(r["inputs_MiB"]),
                "seconds": round(r["seconds"], 2),
                "measured": "yes",
            }
        )
    full = []
    for n in [int(x) for x in args.full_n.split(",")]:
        r = _run(n, args.world, args.dim, "full")
        full.append((n, r["loss_MiB"]))
        rows.append(
            {
                "approach": "full N x N (peers)",
                "N": n,
                "W": args.world,
                "score rows": n,
                "loss peak MiB": round(r["loss_MiB"]),
                "inputs MiB": round(r["inputs_MiB"]),
                "seconds": round(r["seconds"], 2),
                "measured": "yes",
            }
        )
    n_last, mib_last = full[-1]
    scale = (args.n / n_last) ** 2
    rows.append(
        {
            "approach": "full N x N (peers)",
            "N": args.n,
            "W": args.world,
            "score rows": args.n,
            "loss peak MiB": round(mib_last * scale),
            "inputs MiB": "-",
            "seconds": "-",
            "measured": f"no: {n_last} x {scale:.0f} (N^2)",
        }
    )
    report("local_loss_scale", rows, {"dim": args.dim})


if __name__ == "__main__":
    main()
