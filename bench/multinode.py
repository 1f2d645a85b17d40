"""Node boundaries on one machine: two torchrun "nodes" (c10d rendezvous on 127.0.0.1, 2 processes each) and the
multi-node sbatch template on the local SLURM cluster (2 srun tasks) against 4 processes on one node.

    python bench/multinode.py                 # ~2 min; the SLURM row needs the local cluster (.ci/run starts it)
    python bench/multinode.py --no-slurm      # the torchrun rows only

Every run is `embedscale train` on conftest's tiny dropout-free BERT and tiny BEIR set, GradCache (chunk 1), global
batch 8, 3 optimizer steps, the same data order for every world size; the exported weights are compared (max
|a - b| / max |b|). tests/test_multinode.py runs the same functions and asserts rtol 1e-5. What a node boundary
could break and these runs would show: ranks numbered per node instead of globally (a wrong offset of the loss's
labels), data split by local rank (two nodes reading the same samples), a second rank 0 writing.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import rel_diff, report, train_env, weights  # noqa: E402

EMBEDSCALE = str(Path(sys.executable).parent / "embedscale")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(model: Path, data_root: Path, run_dir: Path | None) -> list[str]:
    """The run of every row (run_dir None: the SLURM template sets it from RUN_DIR)."""
    args = [
        f"model.name_or_path={model}",
        "model.query_max_length=16",
        "model.document_max_length=32",
        f"data.root={data_root}",
        "data.path=tiny",
        "data.global_batch_size=8",
        "data.batch_size_per_rank=null",
        "gradcache.chunk_size=1",
        "trainer=ddp_cpu",
        "trainer.max_steps=3",
        "trainer.max_epochs=3",
        "trainer.num_threads=1",
        "trainer.progress=off",
        "eval=none",
        "logger=none",
        "optim.lr=1e-3",
    ]
    return args + ([f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"] if run_dir else [])


def _torchrun(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "-m", "embedscale.jobs.train"]


def one_node(model: Path, data_root: Path, run_dir: Path, world: int = 4) -> float:
    """`torchrun --standalone --nproc_per_node=world`; returns the seconds."""
    start = time.perf_counter()
    cmd = [*_torchrun(["--standalone", f"--nproc_per_node={world}"]), *overrides(model, data_root, run_dir)]
    proc = subprocess.run(
        [*cmd, f"trainer.devices={world}"], capture_output=True, text=True, env=train_env(), timeout=600
    )
    if proc.returncode:
        raise RuntimeError(f"one node x {world}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def two_nodes(model: Path, data_root: Path, run_dir: Path, per_node: int = 2) -> float:
    """Two torchrun agents, `--nnodes=2 --node_rank=0|1 --rdzv-backend=c10d` on 127.0.0.1."""
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-backend=c10d", "--rdzv-id=embedscale-bench"]
    args = [*overrides(model, data_root, run_dir), f"trainer.devices={per_node}", "trainer.num_nodes=2"]
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = [run_dir.parent / f"{run_dir.name}-node{rank}.log" for rank in (0, 1)]
    start = time.perf_counter()
    nodes = [
        subprocess.Popen(
            [*_torchrun(["--nnodes=2", f"--node_rank={rank}", f"--nproc_per_node={per_node}", *rdzv]), *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=train_env(),
        )
        for rank, log in zip((0, 1), logs)
    ]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    if codes != [0, 0]:
        raise RuntimeError(f"two nodes: exit codes {codes}\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return time.perf_counter() - start


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "allocated"))


def _slurm_state(job: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return next((t.split("=", 1)[1] for t in proc.stdout.split() if t.startswith("JobState=")), "GONE")


def slurm_tasks(model: Path, data_root: Path, run_dir: Path, tasks: int = 2, timeout: float = 400) -> float:
    """slurm/train_multinode.sbatch with `tasks` srun tasks on the (one-node) cluster, TRAINER=ddp_cpu."""
    out = run_dir.parent / f"{run_dir.name}.out"
    env = {**train_env(), "RUN_DIR": str(run_dir), "EMBEDSCALE": EMBEDSCALE, "TRAINER": "ddp_cpu"}
    options = ["--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    template = str(ROOT / "slurm" / "train_multinode.sbatch")
    args = [a for a in overrides(model, data_root, None) if a != "trainer=ddp_cpu"]  # TRAINER picks it
    start = time.perf_counter()
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}", *options, template, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir.parent,
    )
    if proc.returncode:
        raise RuntimeError(f"sbatch: {proc.stderr}")
    job = proc.stdout.strip().split(";")[0]
    state = _slurm_state(job)
    while state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"):
        if time.perf_counter() - start > timeout:
            subprocess.run(["scancel", job])
            raise RuntimeError(f"SLURM job {job} still {state} after {timeout} s")
        time.sleep(1)
        state = _slurm_state(job)
    log = out.read_text() if out.exists() else ""
    if state not in ("COMPLETED", "GONE") or not (run_dir / "model" / "model.safetensors").exists():
        raise RuntimeError(f"SLURM job {job}: {state}\n{log[-3000:]}")
    if f"1 nodes x {tasks} tasks" not in log:
        raise RuntimeError(f"SLURM job {job} did not report 1 node x {tasks} tasks:\n{log[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-slurm", action="store_true", help="skip the SLURM row")
    parser.add_argument("--name", default="multinode")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_beir, make_tiny_bert

    tmp = Path(tempfile.mkdtemp(prefix="multinode-"))
    model = make_tiny_bert(tmp / "tiny_bert_nodrop", dropout=0.0)
    data_root = make_tiny_beir(tmp / "data")
    seconds = {"one node x 4": one_node(model, data_root, tmp / "one-node")}
    seconds["2 nodes x 2 (torchrun c10d)"] = two_nodes(model, data_root, tmp / "two-nodes")
    dirs = {"one node x 4": tmp / "one-node", "2 nodes x 2 (torchrun c10d)": tmp / "two-nodes"}
    if not args.no_slurm:
        if not cluster_up():
            raise SystemExit("no SLURM cluster: start ../shared/tools/local-slurm/start_local_slurm.sh or --no-slurm")
        seconds["SLURM multinode template, 2 tasks"] = slurm_tasks(model, data_root, tmp / "slurm")
        dirs["SLURM multinode template, 2 tasks"] = tmp / "slurm"
    ref, start = weights(dirs["one node x 4"]), weights(model)
    rows = [
        {"case": name, "vs": "one node x 4", "max_rel_diff": float(f"{rel_diff(weights(d), ref):.3e}"),
         "seconds": round(seconds[name], 1)}
        for name, d in dirs.items() if name != "one node x 4"
    ]  # fmt: skip
    moved = max((ref[k] - start[k]).abs().max().item() for k in start)
    report(args.name, rows, {"weights_moved_max_abs": moved, "one_node_seconds": round(seconds["one node x 4"], 1)})


if __name__ == "__main__":
    main()
