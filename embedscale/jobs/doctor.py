"""Job `embedscale doctor`: check, on the real launcher and backend, that large-batch training is exact.

    embedscale doctor                                           # one process (spawns nothing)
    torchrun --nproc_per_node=2 -m embedscale.jobs.doctor       # every rank of the real launcher
    srun python -m embedscale.jobs.doctor --json                # same under SLURM, machine-readable

The checks (embedscale/diagnostics.py): the distributed gradient, and the same with GradCache, against the
one-process gradient of the whole global batch on a tiny random BERT with dropout on; all-gather bandwidth and
step throughput. Prints a verdict table (or one JSON document); exits 1 when the gradients differ.
"""

from __future__ import annotations

import argparse
import json
import sys


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedscale doctor: {report['world_size']} rank(s), {report['backend']}, {report['device']}")
    for col in ("check", "value", "verdict"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(c["check"], f"max rel diff {c['max_rel_diff']:.1e}", "[green]OK" if c["ok"] else "[red]WRONG")
    table.add_row("all-gather bandwidth", f"{report['allgather_GBps']:.2f} GB/s", "-")
    table.add_row("step throughput (tiny model)", f"{report['rows_per_s']:.0f} rows/s", "-")
    Console().print(table)
    print("verdict:", "exact" if report["ok"] else "GRADIENTS DIFFER: do not train at scale on this setup")


def main(argv: list[str] | None = None) -> int:
    from embedscale.diagnostics import run_checks
    from embedscale.distributed import destroy

    parser = argparse.ArgumentParser(
        prog="embedscale doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    report = run_checks()
    if report["rank"] == 0:
        report.pop("rank")
        _print(report, args.json)
    destroy()
    return 0 if report.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
