"""Shared helpers of the bench/ scripts: the command, the machine, a table, and bench/results/*.json.

Results go to bench/results/ (committed), or to $EMBEDSCALE_BENCH_RESULTS when set (the smoke tests set it so
that a tiny run never overwrites a committed figure)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

COMMITTED = Path(__file__).resolve().parent / "results"
"""The committed results (also read as inputs, e.g. by loader_throughput.py)."""
RESULTS = Path(os.environ.get("EMBEDSCALE_BENCH_RESULTS") or COMMITTED)
"""Where the scripts write: $EMBEDSCALE_BENCH_RESULTS, else bench/results/."""


def machine() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print command, machine and table; write RESULTS/<name>.json (bench/results/) with the same figures."""
    info = machine()
    print(f"command: {command()}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"command": command(), "machine": info, "rows": rows, **(extra or {})}, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def train_mode_encoder(model: str | None, *, threads: int, query_max_length: int, document_max_length: int):
    """(encoder in train mode, tokenizer): `model` (a path; None: the packaged all-MiniLM-L6-v2), torch on
    `threads` threads, seed 0."""
    import torch

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = {"name_or_path": model} if model else {}
    encoder, tok = load_encoder(
        ModelConfig(**path, query_max_length=query_max_length, document_max_length=document_max_length)
    )
    return encoder.train(), tok


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (allocator, lazy inits)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weights(path: Path) -> dict:
    """The exported weights of a training run directory (its model/), or of a model directory itself."""
    from safetensors.torch import load_file

    exported = path / "model" / "model.safetensors"
    return load_file(exported if exported.exists() else path / "model.safetensors")


def rel_diff(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over all tensors of two state dicts with the same names."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    return max((a[k] - b[k]).abs().max().item() for k in b) / max(b[k].abs().max().item() for k in b)


def train_env(**extra: str) -> dict:
    """The environment of a training subprocess: no launcher variables of this process (MASTER_*, RANK, ...), no
    allocator setting, offline hub, no W&B, one OpenMP thread; plus `extra`."""
    launch = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MALLOC_MMAP_THRESHOLD_",
        "EMBEDSCALE_MALLOC",
    )
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", **extra)
    return env


def embedscale_cli(args: list[str], log: Path, env: dict | None = None) -> float:
    """`python -m embedscale.cli ARGS` with its output in `log`; seconds; SystemExit naming the log on failure."""
    import subprocess

    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "embedscale.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode:
        raise SystemExit(f"embedscale {args[0]} failed ({proc.returncode}): see {log}")
    return time.perf_counter() - start


def cell_dir(work: Path, overrides: list[str]) -> Path:
    """A cell's run directory, named by its overrides: work/runs/cell-<hash>."""
    import hashlib
    import json

    return work / "runs" / f"cell-{hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]}"


def seed_table(
    name: str,
    spec: dict[str, list[str]],
    rows: list[str],
    seeds: list[int],
    *,
    common: list[str],
    metrics: tuple[str, ...],
    work: Path,
    fresh: bool = False,
    env: dict | None = None,
    extra=None,
    resume_from: dict[str, str] | None = None,
) -> list[dict]:
    """Train-and-evaluate cells (row x seed: `embedscale train` with common + spec[row] overrides), resumable:
    RESULTS/<name>.json is rewritten after every cell and read back on start, and a cell already there is skipped
    (fresh: rerun all). A cell's run directory is named by its overrides (cell_dir), so two tables over one work
    directory share a cell that both define the same way (objective_quality's base is domain_forgetting's
    quickstart): a finished run (its metrics.json) is read back instead of trained again.

    resume_from[row] = source: the row trains the same steps as the source row and differs only in what happens
    after them (anchor.interpolation): its cell resumes the source cell's final checkpoint (the same seed), trains no
    step, and is interpolated, evaluated and exported by the train job (docs/domain.md): the model of a full run, in
    one evaluation's time. Its `seconds` are then the source's plus its own, and `from` names the source.

    The table: per row the mean and sample std over its seeds (n says how many), then the cells; the json also holds
    the cells, the zero-shot metrics (the `before` evaluation) and extra(cells, zero_shot) when given (a dict:
    derived figures). Returns the cells."""
    import json

    previous = RESULTS / f"{name}.json"
    cells = [] if fresh or not previous.exists() else json.loads(previous.read_text()).get("cells", [])
    zero_shot = {} if fresh or not previous.exists() else json.loads(previous.read_text()).get("zero_shot", {})
    keys = ["row", "seed", "n"] + [k for m in metrics for k in (m, f"{m} std")] + ["steps", "fit_s", "seconds", "from"]
    resume_from = resume_from or {}

    def write(cells: list[dict], zero_shot: dict) -> None:
        lines = []
        for r in dict.fromkeys([*spec, *(c["row"] for c in cells)]):  # also rows this call did not name
            got = [c for c in cells if c["row"] == r]
            if not got:
                continue
            line = {"row": r, "seed": "mean", "n": len(got), "from": got[0].get("from")}
            for m in metrics:
                values = [c[m] for c in got]
                line[m] = round(statistics.mean(values), 4)
                line[f"{m} std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
            for k in ("steps", "fit_s", "seconds"):
                present = [c[k] for c in got if c.get(k) is not None]
                line[k] = round(statistics.mean(present), 1) if present else None
            lines.append(line)
        table = [{k: line.get(k) for k in keys} for line in lines + cells]
        derived = extra(cells, zero_shot) if extra else {}
        report(name, table, {"cells": cells, "zero_shot": zero_shot, **derived})

    for seed in seeds:  # seed-major: every row of a seed before the next seed
        for row in rows:
            if any(c["row"] == row and c["seed"] == seed for c in cells):
                print(f"{row} seed {seed}: already in the results: skipped", flush=True)
                continue
            run_dir = cell_dir(work, [*common, *spec[row], f"seed={seed}"])
            source = resume_from.get(row)
            source_dir = cell_dir(work, [*common, *spec[source], f"seed={seed}"]) if source else None
            if (run_dir / "metrics.json").exists() and not fresh:
                print(f"{row} seed {seed}: the same cell already ran in {run_dir}: read back", flush=True)
            else:
                overrides = [*common, *spec[row], f"seed={seed}", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
                if source_dir is not None:
                    if not (source_dir / "metrics.json").exists():
                        raise SystemExit(f"{row} seed {seed} resumes {source} seed {seed}: run that row first")
                    overrides.append(f"trainer.resume={source_dir / 'checkpoints' / 'last.ckpt'}")
                print(f"{row} seed {seed}: {'resuming' if source else 'training'} in {run_dir}", flush=True)
                embedscale_cli(["train", *overrides, "overwrite=true"], work / f"train-{row}-{seed}.log", env)
            result = json.loads((run_dir / "metrics.json").read_text())
            after = result["eval"]["after"]
            cell = {"row": row, "seed": seed, **{m: round(after[m], 4) for m in metrics}}
            seconds = result["wall_seconds"]
            if source_dir is not None:
                seconds += json.loads((source_dir / "metrics.json").read_text())["wall_seconds"]
            cell.update(steps=result["train"]["optimizer_steps"], fit_s=result["train"]["fit_seconds"])
            cell.update(seconds=round(seconds, 1), overrides=spec[row], **({"from": source} if source else {}))
            cells.append(cell)
            before = result["eval"].get("before", {})
            zero_shot = {m: round(before[m], 4) for m in metrics if m in before} or zero_shot
            write(cells, zero_shot)
    write(cells, zero_shot)  # also when every cell was already there: the derived figures follow the code
    return cells


def quality_args(parser) -> None:
    """The arguments objective_quality.py and domain_forgetting.py share (one work directory by default, so that
    their common cells run once)."""
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data-root", default=None, help="data root (default: embedscale's: ../shared/data)")
    parser.add_argument("--scifact", default="scifact", help="BEIR SciFact directory under the data root")
    parser.add_argument("--sts-train", default="stsb/train.tsv")
    parser.add_argument("--sts-test", default="stsb/test.tsv")
    parser.add_argument("--medquad", default="medquad/pairs.jsonl.gz")
    parser.add_argument("--steps-per-epoch", type=int, default=28, help="the mixture's (919 // 32 = the quickstart's)")
    parser.add_argument("--work", default="/tmp/embedscale-quality", help="shards, caches and the cells' runs")
    parser.add_argument("--extra", default="", help="more overrides for every cell, separated by ';' (smoke tests)")
    parser.add_argument("--fresh", action="store_true", help="rerun cells the results file already holds")


def quality_common(args) -> list[str]:
    """The overrides every quality cell shares: the model, eval=scifact_general (SciFact test, MedQuAD retrieval
    over 2,000 sampled pairs, STS-B test) with the data paths of `args`, no export."""
    work = Path(args.work)
    common = [
        f"model.name_or_path={args.model}",
        "eval=scifact_general",
        f"eval.beir.0.path={args.scifact}",
        f"eval.pairs.0.path={args.medquad}",
        f"eval.sts.0.path={args.sts_test}",
        f"eval.cache_dir={work / 'cache'}",
        "logger=csv",
        "trainer.progress=off",
        "export=false",
    ]
    common += [f"data.root={args.data_root}"] if args.data_root else []
    return common + [e for e in args.extra.split(";") if e]


MIXTURE = {"scifact": {"weight": 3}, "stsb": {"loss": "cosent", "weight": 1}}
"""The SciFact + STS-B mixture's sources (shards under work/shards/<name>): weights by global batches, STS-B's loss."""


def mixture_overrides(args) -> list[str]:
    """SciFact train (InfoNCE) + STS-B train (CoSENT) as a sharded mixture, 3 : 1 by global batches, with the
    quickstart's steps per epoch; builds the two sources' shards under args.work when missing."""
    work = Path(args.work)
    make_mixture_shards(work, args.data_root, args.scifact, args.sts_train)
    sources = ", ".join(
        "{" + ", ".join([f"path: {work / 'shards' / name}", *(f"{k}: {v}" for k, v in spec.items())]) + "}"
        for name, spec in MIXTURE.items()
    )
    sources = f"[{sources}]"
    return ["data.format=shards", f"data.sources={sources}", f"data.steps_per_epoch={args.steps_per_epoch}"]


def make_mixture_shards(work: Path, data_root: str | None, scifact: str, sts_train: str) -> None:
    """work/shards/scifact (SciFact train pairs) and work/shards/stsb (STS-B train, scored): the sources of a
    SciFact + STS-B (CoSENT) mixture; kept when already there."""
    root = [f"data_root={data_root}"] if data_root else []
    for name, args in (
        ("scifact", ["shard.format=beir", f"shard.inputs=[{scifact}]", "shard.split=train"]),
        ("stsb", ["shard.format=sts", f"shard.inputs=[{sts_train}]"]),
    ):
        out = work / "shards" / name
        if not (out / "manifest.json").exists():
            embedscale_cli(
                ["shard", *args, *root, f"shard.name={name}", f"shard.output={out}"], work / f"shard-{name}.log"
            )
