"""Matryoshka and quantisation sweeps of a model on SciFact test: metric vs dim, and vs index precision.

    python bench/sweeps.py model.name_or_path=/tmp/es_runs/inbatch/model sweep.output=/tmp/es_runs/inbatch/sweep.json

Runs `embedscale sweep` in-process (any of its Hydra overrides; default model: the packaged
all-MiniLM-L6-v2, set: SciFact test, dims 32..full, precisions fp32/int8/binary/binary_rescore/
binary_rescore_int8) and writes bench/results/<--name>.json with one row per (sweep, dim, precision).
The corpus is encoded once (and read from the embedding cache when this model encoded it before).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="sweeps_quickstart", help="bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of `embedscale sweep`")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from embedscale.config import SweepJobConfig, register_configs, to_config
    from embedscale.jobs.launch import conf_dir
    from embedscale.jobs.sweep import run

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = to_config(compose(config_name="sweep", overrides=args.overrides), SweepJobConfig)
    result = run(cfg, run_dir=Path("runs/sweep/bench"))
    rows = [{"sweep": kind, **row} for kind in ("matryoshka", "quantization") for row in result[kind]]
    extra = {"model": result["model"], "rescore_multiplier": result["rescore_multiplier"], "seconds": result["seconds"]}
    report(args.name, rows, extra)


if __name__ == "__main__":
    main()
