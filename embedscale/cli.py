"""`embedscale <job> [hydra overrides]`: dispatches to the job modules.

The CLI imports only Hydra and `embedscale.config` before the config is composed and validated, so
a typo or a bad value fails in about a second; torch, transformers and Lightning load only after
that (see `hydra_job`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

JOBS = {
    "train": ("embedscale.train", "fine-tune a bi-encoder (default: all-MiniLM-L6-v2 on SciFact)"),
    "evaluate": ("embedscale.evaluate", "BEIR/STS metrics of a model or an embedscale export"),
    "shard": ("embedscale.shard", "convert JSONL/BEIR/TSV/CSV/HF datasets into WebDataset tar shards + manifest"),
    "reranker": ("embedscale.reranker", "train a cross-encoder on mined groups; re-rank a bi-encoder's top-k"),
    "mine": ("embedscale.mine", "mine hard negatives (dense/BM25/hybrid, false-negative filters) into training shards"),
    "pipeline": ("embedscale.pipeline", "run stages in order (train -> mine -> train ...), with lineage per stage"),
    "sweep": ("embedscale.sweep", "retrieval metrics vs Matryoshka dim and index precision (fp32/int8/binary)"),
    "plan": ("embedscale.plan", "per-GPU memory by term (ZeRO, LoRA, GradCache) and the largest chunk that fits"),
    "report": ("embedscale.report", "HTML report of a run directory: training curves, eval over steps, sweeps"),
    "doctor": ("embedscale.doctor", "check distributed and GradCache gradients on this launcher; bandwidth"),
}


def conf_dir() -> Path:
    """The directory of Hydra configs: inside the installed package, or conf/ of a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


_LAUNCH_ARGV: list[str] | None = None  # the command line as typed, restored for relaunches (Lightning ddp)


def hydra_job(config_name: str, schema: type, run: Callable[..., Any]) -> Callable[[], Any]:
    """Wrap `run(cfg, run_dir=...)` as a Hydra entry point that validates the config first."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from embedscale.config import register_configs, to_config

    register_configs()

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _main(raw: DictConfig) -> Any:
        cfg = to_config(raw, schema)
        if _LAUNCH_ARGV is not None:  # so that `embedscale train ...` relaunches itself with the job name
            sys.argv = list(_LAUNCH_ARGV)
        return run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))

    def _launch() -> Any:
        shared = shared_run_dir(config_name, sys.argv[1:])
        if shared is not None:
            sys.argv.append(f"hydra.run.dir={shared}")
            if _LAUNCH_ARGV is not None:
                _LAUNCH_ARGV.append(f"hydra.run.dir={shared}")
        return _main()

    return _launch


def shared_run_dir(config_name: str, overrides: list[str]) -> str | None:
    """One Hydra run directory for all ranks of a torchrun or srun launch (each rank runs Hydra itself, and
    `${now:...}` differs between them): runs/<job>/<launcher>-<launch id>. None when one process runs, when
    the command line sets hydra.run.dir, or when Lightning's own launcher already passes it to its children."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
        return None
    if any(o.startswith(("hydra.run.dir=", "+hydra.run.dir=")) for o in overrides):
        return None
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"runs/{config_name}/torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"runs/{config_name}/slurm-{os.environ['SLURM_JOB_ID']}.{step}"
    return None


def start_run(run_dir: Path, *, seed: int, num_threads: int | None) -> Path:
    """What every training job does first: create the run directory (resolved), set torch's threads, seed
    Python, numpy and torch (also in DataLoader workers)."""
    import lightning as L
    import torch

    from embedscale.runtime import quiet_third_party_output

    quiet_third_party_output()  # after Hydra configured logging and Lightning was imported: each message once
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    L.seed_everything(seed, workers=True)
    return run_dir


def _usage() -> str:
    lines = ["usage: embedscale <job> [key=value ...]   (Hydra overrides; --help after the job lists the config)", ""]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"embedscale: unknown job {job!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib

    global _LAUNCH_ARGV
    module = importlib.import_module(JOBS[job][0])
    _LAUNCH_ARGV = [sys.argv[0], job, *rest]
    sys.argv = [sys.argv[0], *rest]  # Hydra parses sys.argv[1:] as overrides
    return module.main()


if __name__ == "__main__":
    main()
