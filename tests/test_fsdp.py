"""`trainer=fsdp2_cpu` (FSDP2 on 2 gloo ranks) trains to the weights of ddp and of one process.

Each run is the real entry point (`python -m embedscale.jobs.train`, a subprocess with a cleaned environment) on a
tiny dropout-free BERT, 3 optimizer steps, global batch 8, learnable temperature, clipping at 1.0 on; the
exported model.safetensors are compared. Proven here: plain FSDP2 == ddp == one process; GradCache (chunk 2)
under FSDP2 == plain FSDP2 == ddp; reshard_after_forward true and false give the same weights; the checkpoint
an FSDP2 run writes is sharded (one file per rank), reads back to the exported weights and resumes one more step as
ddp's does (not across strategies: refused by name); a resume with nothing left to train says so; LoRA under FSDP2
+ GradCache == ddp + LoRA.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_processes

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b|, that over max |b|) over all tensors."""
    diff = max((a[n] - b[n]).abs().max().item() for n in b)
    return diff, diff / max(b[n].abs().max().item() for n in b)


def _losses(run_dir) -> list[float]:
    """Rank 0's logged train/loss per optimizer step (its local query rows over the global batch)."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


COMMON = [
    "model.query_max_length=16",
    "model.document_max_length=32",
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
TWO = ["data.batch_size_per_rank=4"]
RUNS = {
    "single": ["data.batch_size_per_rank=8"],
    "ddp": ["trainer=ddp_cpu", *TWO],
    "fsdp2": ["trainer=fsdp2_cpu", *TWO],
    "fsdp2_gc": ["trainer=fsdp2_cpu", *TWO, "gradcache.chunk_size=2"],
    "fsdp2_gc_keep": ["trainer=fsdp2_cpu", *TWO, "gradcache.chunk_size=2", "trainer.reshard_after_forward=false"],
}
# resume: FSDP2 continuing from its own checkpoint (3 steps) == ddp continuing from its own. Not across
# strategies: the optimizer state of an FSDP2 checkpoint is indexed in another parameter order than ddp's.
RESUMED = {"fsdp2_resumed": "fsdp2_gc", "ddp_resumed": "ddp"}
PAIRS = [
    ("fsdp2", "ddp"),
    ("fsdp2", "single"),
    ("fsdp2_gc", "fsdp2"),
    ("fsdp2_gc", "ddp"),
    ("fsdp2_gc_keep", "fsdp2_gc"),
    ("ddp", "single"),
    ("fsdp2_resumed", "ddp_resumed"),
]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_bert_nodrop, tiny_data, tmp_path_factory) -> dict:
    """Every run of the module, trained once: {name: (run dir, exported weights)}."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("fsdp")
    common = [f"model.name_or_path={tiny_bert_nodrop}", f"data.root={tiny_data}", *COMMON]
    train_processes({name: [*common, *args] for name, args in RUNS.items()}, root)  # two at a time
    resume = ["trainer.max_steps=4", "trainer.max_epochs=6"]
    resumed = {
        name: [*common, *RUNS[ckpt], *resume, f"trainer.resume={root / ckpt / 'checkpoints' / 'last.ckpt'}"]
        for name, ckpt in RESUMED.items()
    }
    train_processes(resumed, root)
    return {name: (root / name, load_file(root / name / "model" / "model.safetensors")) for name in [*RUNS, *RESUMED]}


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_gc", "fsdp2_gc_keep"])
def test_fsdp2_losses_equal_ddp_at_every_step(fsdp_runs, name):
    want, got = _losses(fsdp_runs["ddp"][0]), _losses(fsdp_runs[name][0])  # rank 0's rows (single: all 8)
    print(f"losses {name}: {got}; ddp: {want}")
    assert len(got) == len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7, msg=name)


def test_runs_trained_and_resumed_one_more_step(fsdp_runs, tiny_bert_nodrop):
    from safetensors.torch import load_file

    for name in RESUMED:
        assert json.loads((fsdp_runs[name][0] / "metrics.json").read_text())["train"]["optimizer_steps"] == 4, name
    assert _max_diff(fsdp_runs["fsdp2_resumed"][1], fsdp_runs["fsdp2_gc"][1])[0] > 1e-5  # the resumed step moved
    start = load_file(tiny_bert_nodrop / "model.safetensors")
    single = fsdp_runs["single"][1]
    assert max((single[n] - start[n]).abs().max().item() for n in single if n in start) > 1e-3  # really trained


@pytest.mark.parametrize(("got", "want"), PAIRS, ids=[f"{g}-vs-{w}" for g, w in PAIRS])
def test_fsdp2_weights_equal_ddp_and_one_process(fsdp_runs, got, want):
    """Plain FSDP2 == ddp == one process; GradCache (chunk 2) under FSDP2 == plain FSDP2 == ddp; reshard_after_forward
    true and false give the same weights; the checkpoint an FSDP2 run writes resumes one more step as ddp's does."""
    a, b = fsdp_runs[got][1], fsdp_runs[want][1]
    assert set(a) == set(b)
    diff, rel = _max_diff(a, b)
    print(f"{got} vs {want}: max |diff| = {diff:.1e}, / max |w| = {rel:.1e}")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_build_strategy_passes_lightning_names_through_and_resume_across_strategies_raises(tiny_bert_nodrop):
    import pytest
    from lightning.pytorch.strategies import DDPStrategy

    from embedscale.config import LossConfig, ModelConfig, OptimConfig, TrainerConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.strategy import build_strategy

    assert build_strategy(TrainerConfig(strategy="auto")) == "auto"  # one process: Lightning's single device
    for name, start in (("ddp", "popen"), ("ddp_spawn", "spawn"), ("auto", "popen")):
        devices = 2 if name == "auto" else 1
        strategy = build_strategy(TrainerConfig(strategy=name, devices=devices, collective_timeout=42))
        assert isinstance(strategy, DDPStrategy) and strategy._start_method == start
        assert strategy._timeout.total_seconds() == 42  # trainer.collective_timeout reaches the process group
    fsdp2 = build_strategy(TrainerConfig(strategy="fsdp2", reshard_after_forward=False))
    assert type(fsdp2).__name__ == "FSDP2Strategy" and fsdp2.reshard_after_forward is False
    encoder, _ = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    module.on_load_checkpoint({})  # ddp checkpoint into a ddp run: fine
    with pytest.raises(ValueError, match="written under fsdp2"):
        module.on_load_checkpoint({"embedscale_fsdp2": True})


def test_fsdp2_checkpoints_are_sharded_and_read_back(fsdp_runs):
    """An FSDP2 run's last.ckpt is a directory holding one shard per rank (torch.distributed.checkpoint), not a
    gathered file; read on one process it holds the weights the run exported (step 3); it resumed above
    (fsdp2_resumed == ddp_resumed) and ddp refuses it by name."""
    from embedscale.checkpoints import check_resume_path, checkpoint_meta, read_model_state
    from embedscale.config import TrainerConfig

    last = fsdp_runs["fsdp2_gc"][0] / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_meta(last) == {"strategy": "fsdp2"}
    shards = sorted(p.name for p in last.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards  # each rank wrote its own shard
    state = read_model_state(last)
    exported = fsdp_runs["fsdp2_gc"][1]
    trained = {name: state[f"encoder.query_backbone.{name}"] for name in exported if not name.startswith("pooler.")}
    assert len(trained) > 20  # (the export adds the backbone's untrained pooler)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0, msg=name)
    check_resume_path(TrainerConfig(strategy="fsdp2"), str(last))
    with pytest.raises(
        ValueError, match=r"written under fsdp2 \(a sharded checkpoint directory\).*trainer.strategy=ddp"
    ):
        check_resume_path(TrainerConfig(strategy="ddp"), str(last))


def test_lora_under_fsdp2_with_gradcache_equals_ddp(tiny_data, tmp_path):
    """LoRA adapters on a tiny Mistral (last-token pooling, gradient checkpointing) under FSDP2 + GradCache train to
    ddp's weights, and export merged."""
    from helpers import make_tiny_mistral
    from safetensors.torch import load_file

    mistral = make_tiny_mistral(tmp_path / "tiny_mistral")
    lora = [
        f"model.name_or_path={mistral}",
        "model.pooling=last_token",
        "model.padding_side=left",
        "model.lora_r=4",
        "model.gradient_checkpointing=true",
        f"data.root={tiny_data}",
        *COMMON,
        *TWO,
    ]
    runs = {"ddp": ["trainer=ddp_cpu"], "fsdp2_gc": ["trainer=fsdp2_cpu", "gradcache.chunk_size=2"]}
    train_processes({name: [*lora, *args] for name, args in runs.items()}, tmp_path)  # side by side
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in runs}
    assert not any("lora" in k or "base_layer" in k for k in weights["fsdp2_gc"])  # merged at export
    start = load_file(mistral / "model.safetensors")
    assert _max_diff(weights["ddp"], {n: start[n] for n in weights["ddp"]})[0] > 1e-4  # the adapters trained
    diff, rel = _max_diff(weights["fsdp2_gc"], weights["ddp"])
    print(f"LoRA fsdp2_gc vs ddp: max |diff| = {diff:.1e}, / max |w| = {rel:.1e}")
    for name in weights["ddp"]:
        torch.testing.assert_close(weights["fsdp2_gc"][name], weights["ddp"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_resume_with_nothing_left_to_train_says_so(fsdp_runs, tiny_bert_nodrop, tiny_data, tmp_path):
    """Resuming the sharded checkpoint of a run that ended at max_steps with the same limits trains no step: the run
    says so (and how to continue) instead of exiting as if it had trained, and metrics.json counts 0 steps."""
    last = fsdp_runs["fsdp2_gc"][0] / "checkpoints" / "last.ckpt"
    common = [f"model.name_or_path={tiny_bert_nodrop}", f"data.root={tiny_data}", *COMMON]
    proc = train_processes({"noop": [*common, *RUNS["fsdp2_gc"], f"trainer.resume={last}"]}, tmp_path)["noop"]
    assert (
        "no step was trained" in proc.stderr + proc.stdout and "raise trainer.max_epochs" in proc.stderr + proc.stdout
    )
    train = json.loads((tmp_path / "noop" / "metrics.json").read_text())["train"]
    assert train["steps_this_run"] == 0 and train["optimizer_steps"] == 3
