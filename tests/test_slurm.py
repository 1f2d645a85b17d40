"""SLURM on the real local cluster (.ci/run starts it from ../shared/tools/local-slurm): a 2-task CPU
training job gets USR1 mid-run, checkpoints at a step boundary, requeues itself, resumes, and ends with
the weights of an uninterrupted job (rtol 1e-6), having consumed every sample exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import clean_env

from embedscale.data.batch import PairExample
from embedscale.data.shards import write_records

ROOT = Path(__file__).resolve().parent.parent
EMBEDSCALE = str(Path(sys.executable).parent / "embedscale")


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "allocated"))


pytestmark = [
    pytest.mark.slow,  # SLURM jobs (tests/conftest.py: tiers)
    # a skip outside CI only: .ci/run starts the cluster, and there a missing one must fail, not pass unseen
    pytest.mark.skipif(
        not _cluster_up() and not os.environ.get("CI"),
        reason="no SLURM cluster: start one with ../shared/tools/local-slurm/start_local_slurm.sh (.ci/run does)",
    ),
]


def _shards(tmp_path: Path) -> Path:
    from embedscale.data.manifest import new_manifest, write_manifest

    out = tmp_path / "shards"
    out.mkdir()
    topics = ["protein", "galaxy", "river", "violin", "engine", "forest", "vaccine", "crystal"]
    examples = [
        PairExample(f"what about {topics[i % 8]} {i}", f"document {i} about {topics[i % 8]}", key=f"row{i}")
        for i in range(96)
    ]
    result = write_records(examples, out, name="tiny", file_index=0, max_bytes=0, max_samples=32)
    write_manifest(out, new_manifest("tiny", result["shards"], samples=96, negatives=(0, 0), created_by="test"))
    return out


def _sbatch(run_dir: Path, overrides: list[str], out: Path) -> str:
    env = {**clean_env(), "RUN_DIR": str(run_dir), "EMBEDSCALE": EMBEDSCALE}
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}", str(ROOT / "slurm" / "train_cpu.sbatch"), *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _state(job: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    for token in proc.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return "GONE"


def _wait_done(job: str, timeout: float = 400) -> str:
    start = time.time()
    while time.time() - start < timeout:
        state = _state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still {state} after {timeout} s")


def _ledger(run_dir: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    rows = []
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows.append((r["step"], path.stem, tuple(r["keys"])))
    return sorted(rows)


def test_usr1_checkpoint_requeue_resume_is_exact(tmp_path, tiny_bert_nodrop):
    shards = _shards(tmp_path)
    overrides = [
        f"model.name_or_path={tiny_bert_nodrop}",
        "model.document_max_length=16",
        "model.query_max_length=16",
        "data.format=shards",
        f"data.path={shards}",
        "data.batch_size_per_rank=4",
        "data.record_keys=true",
        "trainer.max_epochs=4",  # 96 samples / 8 per step = 12 steps per epoch: 48 steps
        "trainer.log_every_n_steps=1",
        "trainer.progress=off",
        "eval=none",
        "logger=none",
        "export=false",
        "seed=7",
    ]
    plain_dir, preempted_dir = tmp_path / "plain", tmp_path / "preempted"
    plain = _sbatch(plain_dir, overrides, tmp_path / "plain.out")
    assert _wait_done(plain) == "COMPLETED", (tmp_path / "plain.out").read_text()[-3000:]

    job = _sbatch(preempted_dir, overrides, tmp_path / "preempted.out")
    ledger = preempted_dir / "samples" / "rank0.jsonl"
    start = time.time()
    while not (ledger.exists() and len(ledger.read_text().splitlines()) >= 5):  # mid-run: step 5 of 48
        assert time.time() - start < 300 and _state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _state(job)
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # to the srun tasks, as --signal=USR1@90 does
    assert _wait_done(job) == "COMPLETED", (tmp_path / "preempted.out").read_text()[-3000:]

    log = (tmp_path / "preempted.out").read_text()
    assert "restart 1" in log and "scontrol requeue" in log, log[-3000:]
    # every global batch exactly once, with the same samples as the uninterrupted job
    assert _ledger(preempted_dir) == _ledger(plain_dir)
    steps = [s for s, rank, _ in _ledger(preempted_dir) if rank == "rank0"]
    assert steps == list(range(48))
    a = torch.load(plain_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(preempted_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 48
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-6, atol=1e-9)


def test_sbatch_templates_parse():
    for name in ("train.sbatch", "train_multinode.sbatch", "train_cpu.sbatch"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "slurm" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert os.access(ROOT / "slurm" / "train_cpu.sbatch", os.X_OK)


def _tiny_train_args(tiny_bert, tiny_data, tmp_path) -> list[str]:
    from helpers import tiny_overrides

    args = [a for a in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not a.startswith("trainer.max_steps")]
    return args + ["trainer.max_steps=2", "logger.loggers=[csv]", "trainer.progress=off", "export=false"]


@pytest.mark.parametrize("where", ["local", "slurm"])
def test_four_point_hydra_sweep(tiny_bert, tiny_data, tmp_path, where):
    """`embedscale train -m optim.lr=a,b seed=1,2`: 4 runs with the basic launcher, or as 4 SLURM jobs through
    hydra-submitit-launcher on the local cluster; each job's metrics.json under the sweep directory."""
    sweep = tmp_path / "sweep"
    args = ["optim.lr=1e-4,3e-4", "seed=1,2", f"hydra.sweep.dir={sweep}", "eval.before_training=false"]
    if where == "slurm":
        args += [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.tasks_per_node=1",
            f"hydra.launcher.submitit_folder={tmp_path / 'submitit' / '%j'}",
        ]
    cmd = [sys.executable, "-m", "embedscale.cli", "train", "-m", *_tiny_train_args(tiny_bert, tiny_data, tmp_path)]
    cmd += args  # Hydra's parser wants -m before all the overrides
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 4, list(sweep.iterdir())
    points = {(m["config"]["optim"]["lr"], m["config"]["seed"]) for m in (json.loads(r.read_text()) for r in runs)}
    assert points == {(1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)}
    if where == "slurm":  # the jobs really ran under SLURM
        assert len(list((tmp_path / "submitit").glob("*/*_result.pkl"))) == 4


def test_pipeline_stages_as_dependent_slurm_jobs(tiny_bert, tiny_data, tmp_path):
    """slurm/pipeline.sh: round1 -> mine1 -> round2 as three jobs chained with afterok; lineage as locally."""
    from helpers import tiny_pipeline_overrides as _tiny

    overrides = [o for o in _tiny(tiny_bert, tiny_data, tmp_path) if not o.startswith("pipeline.output=")]
    out = tmp_path / "pipe"
    env = {**clean_env(), "EMBEDSCALE": EMBEDSCALE, "SBATCH_ARGS": "--cpus-per-task=1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "pipeline.sh"), str(out), "round1", "mine1", "round2", "--", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = [line.split("job ")[1] for line in proc.stdout.splitlines()]
    assert len(jobs) == 3
    deps = subprocess.run(["scontrol", "show", "job", jobs[2]], capture_output=True, text=True).stdout
    assert f"afterok:{jobs[1]}" in deps.replace("(unfulfilled)", "")
    for job in jobs:
        assert _wait_done(job) == "COMPLETED", "\n".join(p.read_text()[-2000:] for p in out.glob("slurm-*.out"))
    lineage = {s: json.loads((out / s / "lineage.json").read_text()) for s in ("round1", "mine1", "round2")}
    assert all(v["status"] == "done" for v in lineage.values())
    assert lineage["round2"]["parents"] == {"round1": str(out / "round1"), "mine1": str(out / "mine1")}
    assert (out / "round2" / "model" / "model.safetensors").is_file()
