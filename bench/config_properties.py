"""The property tests of the config vocabulary (tests/test_config_properties.py) at a chosen example count, with
hypothesis' statistics recorded: how many examples each test ran and what became of them.

    python bench/config_properties.py --examples 600

CI runs the same tests at their default counts (400 validation examples in the fast tier, 150 tiny trainings in
the slow tier); this script runs both at `--examples` each and writes the outcome counts to
bench/results/config_properties.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse(output: str) -> list[dict]:
    """hypothesis' --hypothesis-show-statistics text -> one row per (test, event)."""
    rows = []
    for block in re.split(r"\n(?=tests/test_config_properties\.py::)", output):
        head = re.match(r"tests/test_config_properties\.py::(\w+):", block)
        counts = re.search(r"(\d+) passing, (\d+) failing, and (\d+) invalid", block)
        if not head or not counts:
            continue
        passing, failing, invalid = (int(v) for v in counts.groups())
        for share, event in re.findall(r"\* ([\d.]+)%, (.+)", block):
            rows.append(
                {
                    "test": head.group(1),
                    "examples": passing + failing,
                    "failing": failing,
                    "event": event.strip(),
                    "share": float(share) / 100,
                    "count": round(float(share) / 100 * (passing + failing)),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=600)
    args = parser.parse_args()
    env = dict(os.environ, EMBEDSCALE_HYPOTHESIS_EXAMPLES=str(args.examples), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore"]
    cmd += ["tests/test_config_properties.py", "--hypothesis-show-statistics"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    rows = parse(proc.stdout)
    if proc.returncode != 0 or not rows:
        print(proc.stdout[-5000:], proc.stderr[-2000:])
        raise SystemExit(f"the property tests failed (exit {proc.returncode})")
    sys.path.insert(0, str(REPO / "tests"))
    from test_config_properties import KEYS  # the keys the tests draw from: every numeric field of the schema

    keys = {
        "total": len(KEYS),
        "int": sum(k == "int" for k in KEYS.values()),
        "float": sum(k == "float" for k in KEYS.values()),
    }
    report(
        "config_properties",
        rows,
        {"examples_per_test": args.examples, "seconds": round(seconds, 1), "numeric_keys": keys, "keys": sorted(KEYS)},
    )


if __name__ == "__main__":
    main()
