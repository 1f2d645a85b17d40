"""Job `embedscale report RUN_DIR`: an HTML page with the run's training curves, evaluations and sweeps.

    embedscale report runs/train/<ts>                 # writes runs/train/<ts>/report/index.html + PNGs
    embedscale report runs/train/<ts> --wandb         # also logs the figures to the run's wandb page

A plain argparse entry point rather than a Hydra job: the one argument is a path, and a report must not create
a Hydra output directory of its own. What the page shows and how: embedscale/reporting.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from embedscale.reporting import log_report_to_wandb, write_report

    parser = argparse.ArgumentParser(prog="embedscale report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="directory of an `embedscale train` run")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the figures to the run's wandb run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir} is not a directory")
    if args.wandb and args.out is not None:
        parser.error("--wandb logs RUN_DIR/report: drop --out")
    page = write_report(args.run_dir, args.out)
    print(f"wrote {page}")
    if args.wandb and log_report_to_wandb(args.run_dir, resume=True):
        print(f"logged {len(list(page.parent.glob('*.png')))} figures to the wandb run of {args.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
