"""`trainer=fsdp2_cpu` (FSDP2 on 2 gloo ranks) trains to the weights of ddp and of one process.

Each run is the real entry point (`python -m embedscale.train`, a subprocess with a cleaned environment) on a
tiny dropout-free BERT, 3 optimizer steps, global batch 8, learnable temperature, clipping at 1.0 on; the
exported model.safetensors are compared. Proven here: plain FSDP2 == ddp == one process; GradCache (chunk 2)
under FSDP2 == plain FSDP2 == ddp; reshard_after_forward true and false give the same weights; the checkpoint
an FSDP2 run writes resumes one more step as ddp's does (not across strategies: optimizer state order differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)


def _train(args: list[str], run_dir) -> None:
    launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "embedscale.train", *args, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b|, that over max |b|) over all tensors."""
    diff = max((a[n] - b[n]).abs().max().item() for n in b)
    return diff, diff / max(b[n].abs().max().item() for n in b)


def _losses(run_dir) -> list[float]:
    """Rank 0's logged train/loss per optimizer step (its local query rows over the global batch)."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_fsdp2_equals_ddp_and_one_process_with_and_without_gradcache(tiny_bert_nodrop, tiny_data, tmp_path):
    from safetensors.torch import load_file

    common = [
        f"model.name_or_path={tiny_bert_nodrop}",
        "model.query_max_length=16",
        "model.document_max_length=32",
        f"data.root={tiny_data}",
        "data.path=tiny",
        "trainer.max_steps=3",
        "trainer.max_epochs=3",
        "eval=none",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "optim.lr=1e-3",
        "optim.scheduler=constant",  # a learning rate still > 0 after step 3, for the resumed step
        "loss.learnable_temperature=true",
        "trainer.progress=off",
        "trainer.num_threads=1",
    ]
    two = ["data.batch_size_per_rank=4"]
    runs = {
        "single": ["data.batch_size_per_rank=8"],
        "ddp": ["trainer=ddp_cpu", *two],
        "fsdp2": ["trainer=fsdp2_cpu", *two],
        "fsdp2_gc": ["trainer=fsdp2_cpu", *two, "gradcache.chunk_size=2"],
        "fsdp2_gc_keep": ["trainer=fsdp2_cpu", *two, "gradcache.chunk_size=2", "trainer.reshard_after_forward=false"],
    }
    weights = {}
    for name, args in runs.items():
        _train([*common, *args], tmp_path / name)
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    losses = {name: _losses(tmp_path / name) for name in runs if name != "single"}  # single: all 8 rows, not rank 0's
    assert all(len(v) == 3 for v in losses.values()), losses
    for name, got in losses.items():
        print(f"losses {name}: {got}")
        torch.testing.assert_close(torch.tensor(got), torch.tensor(losses["ddp"]), rtol=1e-5, atol=1e-7, msg=name)
    # resume: FSDP2 continuing from its own checkpoint (3 steps) == ddp continuing from its own. Not across
    # strategies: the optimizer state of an FSDP2 checkpoint is indexed in another parameter order than ddp's.
    resume = ["trainer.max_steps=4", "trainer.max_epochs=6"]
    for name, args, ckpt in [
        ("fsdp2_resumed", runs["fsdp2_gc"], "fsdp2_gc"),
        ("ddp_resumed", runs["ddp"], "ddp"),
    ]:
        last = tmp_path / ckpt / "checkpoints" / "last.ckpt"
        _train([*common, *args, *resume, f"trainer.resume={last}"], tmp_path / name)
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    for name in ("fsdp2_resumed", "ddp_resumed"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["train"]["optimizer_steps"] == 4, name
    assert _max_diff(weights["fsdp2_resumed"], weights["fsdp2_gc"])[0] > 1e-5  # the resumed step really moved
    start = load_file(tiny_bert_nodrop / "model.safetensors")
    single = weights["single"]
    assert max((single[n] - start[n]).abs().max().item() for n in single if n in start) > 1e-3  # really trained
    pairs = [
        ("fsdp2", "ddp"),
        ("fsdp2", "single"),
        ("fsdp2_gc", "fsdp2"),
        ("fsdp2_gc", "ddp"),
        ("fsdp2_gc_keep", "fsdp2_gc"),
        ("ddp", "single"),
        ("fsdp2_resumed", "ddp_resumed"),
    ]
    for got, want in pairs:
        assert set(weights[got]) == set(weights[want])
        diff, rel = _max_diff(weights[got], weights[want])
        print(f"{got} vs {want}: max |diff| = {diff:.1e}, / max |w| = {rel:.1e}")
        for name in weights[want]:
            torch.testing.assert_close(weights[got][name], weights[want][name], rtol=1e-5, atol=1e-6, msg=name)


def test_build_strategy_passes_lightning_names_through_and_resume_across_strategies_raises(tiny_bert_nodrop):
    import pytest

    from embedscale.config import LossConfig, ModelConfig, OptimConfig, TrainerConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.strategy import build_strategy

    for name in ("auto", "ddp", "ddp_spawn"):
        assert build_strategy(TrainerConfig(strategy=name)) == name
    fsdp2 = build_strategy(TrainerConfig(strategy="fsdp2", reshard_after_forward=False))
    assert type(fsdp2).__name__ == "FSDP2Strategy" and fsdp2.reshard_after_forward is False
    encoder, _ = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    module.on_load_checkpoint({})  # ddp checkpoint into a ddp run: fine
    with pytest.raises(ValueError, match="written under fsdp2"):
        module.on_load_checkpoint({"embedscale_fsdp2": True})
