"""`trainer=deepspeed_zero2_cpu` / `deepspeed_zero3_cpu` (DeepSpeed ZeRO on 2 gloo ranks) train to the weights of ddp.

Each run is the real entry point (`python -m embedscale.jobs.train`, a subprocess with a cleaned environment) on a tiny
dropout-free model, 3 optimizer steps, global batch 8, learnable temperature, clipping at 0.5 (gradient norms are
11-17, so clipping is active, and a DeepSpeed that fell back to its silent default of 1.0 would differ); the exported
safetensors are compared. Proven here: ZeRO-2 (with the optimizer offloaded to CPU) and ZeRO-3 == ddp; GradCache
(chunk 2) under ZeRO-2, ZeRO-3, and ZeRO-3 with optimizer and parameters offloaded == ddp; a ZeRO-3 + GradCache
checkpoint (a directory of per-rank shards) resumes one more step as ddp's does; LoRA + gradient checkpointing +
GradCache under ZeRO-3 == ddp, exported merged; the export loads in sentence-transformers; nothing is
JIT-compiled. DeepSpeed is imported, not skipped: CI installs it (the `dev` extra), and a CI without it must fail
here.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed  # noqa: F401  (see the module docstring: never a silent skip)
import pytest
import torch
from helpers import train_processes

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)

COMMON = [
    "model.query_max_length=16",
    "model.document_max_length=32",
    "data.path=tiny",
    "trainer.max_steps=3",
    "trainer.max_epochs=3",
    "trainer.gradient_clip_val=0.5",
    "eval=none",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "optim.lr=1e-3",
    "optim.scheduler=constant",  # a learning rate still > 0 after step 3, for the resumed step
    "loss.learnable_temperature=true",
    "trainer.progress=off",
    "trainer.num_threads=1",
    "data.batch_size_per_rank=4",
]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _assert_equal(weights: dict, pairs: list[tuple[str, str]]) -> None:
    for got, want in pairs:
        print(f"{got} vs {want}: max |diff| = {_max_diff(weights[got], weights[want]):.1e}")
        for name in weights[want]:
            torch.testing.assert_close(weights[got][name], weights[want][name], rtol=1e-5, atol=1e-6, msg=name)


GC = "gradcache.chunk_size=2"
RUNS = {
    "ddp": ["trainer=ddp_cpu"],
    "zero2_offload": ["trainer=deepspeed_zero2_cpu", "trainer.offload_optimizer=true"],
    "zero3": ["trainer=deepspeed_zero3_cpu"],
    "zero2_gc": ["trainer=deepspeed_zero2_cpu", GC],
    "zero3_gc": ["trainer=deepspeed_zero3_cpu", GC],
    "zero3_gc_offload": [
        "trainer=deepspeed_zero3_cpu",
        GC,
        "trainer.offload_optimizer=true",
        "trainer.offload_params=true",
    ],
}
RESUMED = {"zero3_gc_resumed": "zero3_gc", "ddp_resumed": "ddp"}
PAIRS = [
    ("zero2_offload", "ddp"),
    ("zero3", "ddp"),
    ("zero2_gc", "ddp"),
    ("zero3_gc", "ddp"),
    ("zero3_gc_offload", "ddp"),
    ("zero3_gc_resumed", "ddp_resumed"),
]


@pytest.fixture(scope="module")
def zero_runs(tiny_bert_nodrop, tiny_data, tmp_path_factory) -> dict:
    """Every ZeRO run of the module, trained once: {name: run dir}, plus "extensions": DeepSpeed's JIT folder."""
    root = tmp_path_factory.mktemp("zero")
    common = [f"model.name_or_path={tiny_bert_nodrop}", f"data.root={tiny_data}", *COMMON]
    extensions = root / "torch_extensions"
    train_processes(
        {name: [*common, *args] for name, args in RUNS.items()}, root, TORCH_EXTENSIONS_DIR=str(extensions)
    )  # two at a time
    resume = ["trainer.max_steps=4", "trainer.max_epochs=6"]
    resumed = {
        name: [*common, *RUNS[run], *resume, f"trainer.resume={root / run / 'checkpoints' / 'last.ckpt'}"]
        for name, run in RESUMED.items()
    }
    train_processes(resumed, root, TORCH_EXTENSIONS_DIR=str(extensions))
    return {"extensions": extensions, **{name: root / name for name in [*RUNS, *RESUMED]}}


def test_zero_checkpoints_resume_and_nothing_is_jit_compiled(zero_runs, tiny_bert_nodrop):
    ckpt = zero_runs["zero3_gc"] / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and json.loads((ckpt / "embedscale.json").read_text()) == {
        "strategy": "deepspeed",
        "zero_stage": 3,
    }
    for name in RESUMED:
        assert json.loads((zero_runs[name] / "metrics.json").read_text())["train"]["optimizer_steps"] == 4
    extensions = zero_runs["extensions"]
    assert not extensions.exists() or not any(extensions.iterdir()), "DeepSpeed JIT-compiled an op"
    start = _weights_of(tiny_bert_nodrop)
    ddp = _weights(zero_runs["ddp"])
    # really trained (the export also holds the pooler, which the source had not, and training never touches)
    assert _max_diff({n: ddp[n] for n in start}, start) > 1e-3
    resumed, before = _weights(zero_runs["zero3_gc_resumed"]), _weights(zero_runs["zero3_gc"])
    assert _max_diff(resumed, before) > 1e-5  # the resumed step really moved
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(zero_runs["zero3_gc"] / "model"), device="cpu")
    assert st.encode(["a protein", "a galaxy"]).shape == (2, 32)


@pytest.mark.parametrize(("got", "want"), PAIRS, ids=[f"{g}-vs-{w}" for g, w in PAIRS])
def test_zero2_and_zero3_weights_equal_ddp(zero_runs, got, want):
    """ZeRO-2 (optimizer offloaded) and ZeRO-3 == ddp; GradCache under ZeRO-2, ZeRO-3 and ZeRO-3 with everything
    offloaded == ddp; a ZeRO-3 + GradCache checkpoint resumes one more step as ddp's does."""
    _assert_equal({got: _weights(zero_runs[got]), want: _weights(zero_runs[want])}, [(got, want)])


def _weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory) -> Path:
    from helpers import make_tiny_mistral

    return make_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"))


def test_lora_under_zero3_with_gradcache_equals_ddp_and_exports_merged(tiny_mistral, tiny_data, tmp_path):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import encode_texts, load_encoder

    lora = [
        f"model.name_or_path={tiny_mistral}",
        "model.pooling=last_token",
        "model.padding_side=left",
        "model.lora_r=4",
        "model.gradient_checkpointing=true",
        f"data.root={tiny_data}",
        *COMMON,
    ]
    extensions = tmp_path / "torch_extensions"
    runs = {"ddp": ["trainer=ddp_cpu"], "zero3_gc": ["trainer=deepspeed_zero3_cpu", "gradcache.chunk_size=2"]}
    train_processes(
        {name: [*lora, *args] for name, args in runs.items()}, tmp_path, TORCH_EXTENSIONS_DIR=str(extensions)
    )  # side by side
    weights = {name: _weights(tmp_path / name) for name in runs}
    assert not any("lora" in k or "base_layer" in k for k in weights["zero3_gc"])  # merged at export
    start = _weights_of(tiny_mistral)
    assert _max_diff(weights["zero3_gc"], {n: start[n] for n in weights["zero3_gc"]}) > 1e-4  # the adapters trained
    _assert_equal(weights, [("zero3_gc", "ddp")])
    reloaded, tok = load_encoder(ModelConfig(name_or_path=str(tmp_path / "zero3_gc" / "model")))
    assert reloaded.cfg.lora_r == 0 and encode_texts(reloaded, tok, ["galaxy"], side="query").shape == (1, 64)


def _trainer_cfg(**kw):
    from embedscale.config import TrainerConfig

    return TrainerConfig(strategy="deepspeed", accelerator="cpu", devices=2, **kw)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(zero_stage=1), "trainer.zero_stage"),
        (dict(zero_stage=2, offload_params=True), "trainer.offload_params"),
        (dict(precision="64-true"), "trainer.precision"),
    ],
)
def test_deepspeed_keys_are_checked_at_compose_time(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _trainer_cfg(**kw)


def test_deepspeed_config_setup_and_refusals(monkeypatch, tiny_bert_nodrop, tmp_path):
    import importlib.util

    from embedscale.checkpoints import check_resume_path as check_resume_strategy
    from embedscale.config import (
        EvalConfig,
        GradCacheConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        TrainerConfig,
    )
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.strategy import build_strategy
    from embedscale.strategy.deepspeed import deepspeed_config

    with pytest.raises(ValueError, match=r"trainer\.offload_optimizer=true needs trainer\.strategy=deepspeed"):
        TrainerConfig(strategy="ddp", offload_optimizer=True)
    with pytest.raises(ValueError, match="gradcache with trainer.zero_stage=2 and trainer.offload_optimizer=true"):
        TrainConfig(
            trainer=_trainer_cfg(offload_optimizer=True),
            gradcache=GradCacheConfig(chunk_size=2),
            eval=EvalConfig(beir=[]),
        )
    TrainConfig(
        trainer=_trainer_cfg(zero_stage=3, offload_optimizer=True),
        gradcache=GradCacheConfig(chunk_size=2),
        eval=EvalConfig(beir=[]),
    )
    # explicit clipping (never DeepSpeed's silent 1.0), our optimizer, precision from trainer.precision
    config = deepspeed_config(_trainer_cfg(zero_stage=3, gradient_clip_val=None, precision="bf16-mixed"))
    assert config["gradient_clipping"] == 0.0 and config["zero_allow_untested_optimizer"] is True
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and "managed_gradient_accumulation" not in config
    # GradCache: the engine's step() is the accumulation boundary (unmanaged), not a flag on the last backward
    assert deepspeed_config(_trainer_cfg(), gradcache=True)["managed_gradient_accumulation"] is False
    config = deepspeed_config(TrainerConfig(strategy="deepspeed", accelerator="gpu", offload_optimizer=True))
    assert config["gradient_clipping"] == 1.0 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in config["zero_optimization"] and "bf16" not in config
    strategy = build_strategy(_trainer_cfg(zero_stage=3))
    assert type(strategy).__name__ == "CPUDeepSpeedStrategy" and strategy.zero_stage == 3
    # resume across strategies: refused before DeepSpeed or torch.load reads the checkpoint
    one_file = tmp_path / "last.ckpt"
    one_file.write_bytes(b"")
    zero2 = tmp_path / "zero2.ckpt"
    zero2.mkdir()
    (zero2 / "embedscale.json").write_text(json.dumps({"strategy": "deepspeed", "zero_stage": 2}))
    check_resume_strategy(_trainer_cfg(zero_stage=2), str(zero2))
    check_resume_strategy(TrainerConfig(strategy="ddp"), str(one_file))
    for cfg, path, written in [
        (_trainer_cfg(zero_stage=2), one_file, "one-file checkpoint"),
        (_trainer_cfg(zero_stage=3), zero2, "zero_stage=2"),
        (TrainerConfig(strategy="ddp"), zero2, "deepspeed"),
        (TrainerConfig(strategy="fsdp2"), zero2, "deepspeed"),
    ]:
        with pytest.raises(ValueError, match=f"trainer.resume=.*written under .*{written}"):
            check_resume_strategy(cfg, str(path))
    encoder, _ = load_encoder(ModelConfig(name_or_path=str(tiny_bert_nodrop)))
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    with pytest.raises(ValueError, match="written under deepspeed ZeRO-3"):
        module.on_load_checkpoint({"embedscale_zero_stage": 3})
    # evaluation during training is refused at compose time, naming the fix
    with pytest.raises(
        ValueError, match="trainer.strategy=deepspeed does not evaluate during training yet: add eval=none"
    ):
        TrainConfig(trainer=_trainer_cfg())
    # without DeepSpeed installed, selecting it fails at compose time naming the install command
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install embedscale\[deepspeed\]"):
        _trainer_cfg()


def test_gradcache_hooks_announce_every_backward_and_mark_only_the_last(tiny_bert):
    """The driver hook DeepSpeed uses: the cache's backward, then every chunk's, each told whether it is the step's
    last (True only before the last); same gradient as the plain driver."""
    from helpers import build_module as build
    from helpers import make_batch

    from embedscale.config import GradCacheConfig
    from embedscale.contrastive.gradcache import gradcache_step
    from embedscale.strategy import StepDriver

    events = []

    class Recording(StepDriver):
        def backward(self, module, loss, *, is_last, cache=False):
            events.extend(["cache" if cache else "chunk", is_last])
            super().backward(module, loss, is_last=is_last, cache=cache)

    grads = []
    for hooked in (False, True):
        module, tokenizer = build(tiny_bert, shared=False, matryoshka=[], symmetric=0.0)
        batch = make_batch(tokenizer, module.encoder.cfg)
        torch.manual_seed(123)
        driver = Recording() if hooked else None
        gradcache_step(module, batch, plan=GradCacheConfig(chunk_size=3), driver=driver)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    kinds = events[0::2]
    assert kinds[0] == "cache" and set(kinds[1:]) == {"chunk"} and len(kinds) >= 4
    assert events[1::2] == [False] * (len(kinds) - 1) + [True]
    assert set(grads[0]) == set(grads[1]) and "temperature.log_inverse" in grads[1]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=0, atol=0)
