"""The memory planner (embedscale/plan.py): term formulas on hand-computed cases, the chunk picker, the config
checks and the `embedscale plan` CLI end to end; and the activation formula against the bytes autograd saves in
tiny random models (a few seconds). No model weights are loaded."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedscale.config import ModelConfig, PlanConfig, Pooling
from embedscale.strategy.memory import (
    GIB,
    ModelShape,
    attention_fused,
    count_params,
    estimate,
    fits,
    gradients_term,
    layer_activation_bytes,
    layer_activation_terms,
    optimizer_term,
    pick_chunk,
    plan_memory,
    rank_texts,
    resolve_shape,
    weights_term,
)

REPO = Path(__file__).resolve().parents[1]
MISTRAL = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000)


def shape(params: float = 1e9, **kw) -> ModelShape:
    gated = kw.pop("gated_mlp", False)
    base = dict(params=params, hidden=1024, layers=16, heads=16, kv_heads=16, intermediate=4096, vocab=32000)
    base.update(kw)
    return ModelShape(**base, gated_mlp=gated, dropout=True, source="test")


def mistral(**plan_kw) -> tuple[ModelShape, PlanConfig]:
    plan = PlanConfig(params=7.11e9, **MISTRAL, **plan_kw)
    return resolve_shape(ModelConfig(name_or_path="/nonexistent", pooling=Pooling.last_token), plan), plan


def plan(**kw) -> PlanConfig:
    base = dict(
        query_max_length=128, document_max_length=128, lora_r=0, torch_dtype="bfloat16", gradient_checkpointing=False
    )
    base.update(kw)
    return PlanConfig(**base)


@pytest.mark.parametrize(
    "strategy, weights, grads, optim",
    [("ddp", 2, 2, 12), ("zero1", 2, 2, 12 / 8), ("zero2", 2, 2 / 8, 12 / 8), ("zero3", 2 / 8, 2 / 8, 12 / 8)],
)
def test_zero_stages_shard_16_bytes_per_param(strategy, weights, grads, optim):
    s, p = shape(1e9), plan(strategy=strategy, gpus=8, mixed_precision=True)
    got = [t(s, p).bytes / 1e9 for t in (weights_term, gradients_term, optimizer_term)]
    assert got == pytest.approx([weights, grads, optim])
    assert sum(got) == pytest.approx({"ddp": 16, "zero1": 5.5, "zero2": 3.75, "zero3": 2}[strategy])
    fsdp = plan(strategy="fsdp", gpus=8, mixed_precision=True)
    assert [t(s, fsdp).bytes for t in (weights_term, gradients_term, optimizer_term)] == pytest.approx(
        [
            t(s, plan(strategy="zero3", gpus=8, mixed_precision=True)).bytes
            for t in (weights_term, gradients_term, optimizer_term)
        ]
    )


def test_bytes_per_param_by_precision_and_offload():
    s = shape(1e9)
    fp32 = plan(torch_dtype="float32")
    assert [t(s, fp32).bytes / 1e9 for t in (weights_term, gradients_term, optimizer_term)] == [4, 4, 8]
    pure_bf16 = plan(torch_dtype="bfloat16", mixed_precision=False)
    assert [t(s, pure_bf16).bytes / 1e9 for t in (weights_term, gradients_term, optimizer_term)] == [2, 2, 4]
    off = plan(strategy="zero3", gpus=8, offload_optimizer=True, offload_params=True, mixed_precision=True)
    assert optimizer_term(s, off).bytes == 0 and weights_term(s, off).bytes == 0


def test_lora_shrinks_gradients_and_optimizer_state():
    s = shape(1e9)
    full, lora = plan(mixed_precision=True), plan(mixed_precision=True, lora_r=16)
    adapters = 16 * 3 * (1024 + 1024) * 16  # BERT-style: query, key, value on 16 layers
    assert s.lora_params(16) == adapters
    assert optimizer_term(s, lora).bytes == adapters * 8  # fp32 adapters: Adam m, v, no master copy
    assert gradients_term(s, lora).bytes == adapters * 4
    assert optimizer_term(s, lora).bytes < optimizer_term(s, full).bytes / 500
    decoder = shape(1e9, kv_heads=4, gated_mlp=True)  # q, k, v, o with grouped k/v: 2 r (h+h) + 2 r (h+kv)
    assert decoder.lora_params(8) == 16 * (2 * 8 * 2048 + 2 * 8 * (1024 + 256))


def test_param_counts_of_known_models():
    minilm = count_params(
        hidden=384, layers=6, kv_dim=384, intermediate=1536, vocab=30522, gated_mlp=False, positions=512
    )
    assert minilm == 22_565_376  # all-MiniLM-L6-v2 without its pooler (22,713,216 with it)
    assert (
        count_params(hidden=4096, layers=32, kv_dim=1024, intermediate=14336, vocab=32000, gated_mlp=True)
        == 7_110_660_096
    )


def test_layer_activations_match_korthikanti():
    # BERT-style layer (i = 4h, kv = h, dropout, 1-byte masks, 16-bit): Korthikanti's s b h (34 + 5 a s / h) plus what
    # the measurement (bench/activation_bytes.py) added: LayerNorm's fp32 mean and rstd (2 norms x 2 x 4 s b bytes);
    # fused attention its log-sum-exp (4 a s b) and, with padding, SDPA's float copy of the mask (b s^2 x 2 bytes).
    s, b, h, a = 512, 4, 1024, 16
    got = layer_activation_bytes(shape(), rows=b, seq=s, act_bytes=2, fused=False)
    assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h) + 16 * s * b)
    fused = layer_activation_bytes(shape(), rows=b, seq=s, act_bytes=2, fused=True, padded=False)
    assert fused == pytest.approx(s * b * h * 34 + 4 * a * s * b + 16 * s * b)
    padded = layer_activation_bytes(shape(), rows=b, seq=s, act_bytes=2, fused=True)
    assert padded - fused == pytest.approx(b * s * s * 2)
    fp32 = layer_activation_bytes(shape(), rows=b, seq=s, act_bytes=4, fused=True, padded=False)
    assert fp32 == pytest.approx(s * b * h * 66 + 4 * a * s * b + 16 * s * b)


def test_decoder_layer_terms_by_hand():
    # Llama/Mistral layer in bf16, eager: RMSNorm keeps an fp32 copy of its input (4 B) besides the bf16 normalised
    # value; eager attention keeps q and k, v repeated to all heads; the softmax output in fp32 and its bf16 copy;
    # SwiGLU four s x b x i tensors. (The old Korthikanti-style formula missed the fp32 norms, the fp32 softmax
    # and the repeated k, v: bench/results/gpu_plan_check.json, Llama-1.1B measured 1.49x its plan.)
    d = dataclasses.replace(shape(gated_mlp=True, kv_heads=4), dropout=False)
    s, b, h, a, i = 256, 2, 1024, 16, 4096
    terms = layer_activation_terms(d, rows=b, seq=s, act_bytes=2, fused=False)
    assert terms["norms"] == 2 * (s * b * h * 6 + 4 * s * b)
    assert terms["attention"] == 5 * s * b * h * 2
    assert terms["scores"] == a * s * s * b * 6
    assert terms["mlp"] == s * b * h * 2 + 4 * s * b * i * 2
    assert terms["dropout masks"] == 0  # Llama/Mistral configs have no dropout
    unpadded = layer_activation_terms(d, rows=b, seq=s, act_bytes=2, fused=True, padded=False)
    assert unpadded["scores"] == 0 and unpadded["attention"] == (3 * h + 2 * 256) * s * b * 2 + 4 * a * s * b


def test_fp32_grouped_query_attention_is_not_fused():
    # PyTorch's fused CUDA kernels take no GQA in fp32: SDPA falls back to its math kernel, which keeps the scores
    s, p = mistral(torch_dtype="float32", flash_attention=True, lora_r=0)
    assert not attention_fused(s, p)
    assert attention_fused(s, dataclasses.replace(p, torch_dtype="bfloat16"))
    assert not attention_fused(s, dataclasses.replace(p, torch_dtype="bfloat16", flash_attention=False))


@pytest.mark.parametrize(
    "case",
    [
        ("llama", 32, 2, False, "eager", "float32", False),
        ("mistral", 32, 2, True, "sdpa", "bfloat16", True),
        ("bert", 32, 2, False, "eager", "float32", False),
        ("bert", 16, 1, True, "sdpa", "float32", False),
    ],
)
def test_planned_activations_match_saved_bytes(case, tmp_path):
    # the bytes autograd saves for backward in one forward of tiny random models (bench/activation_bytes.py counts
    # them with saved_tensors_hooks), against the planner's formula: within 5% (the full grid: within 0.5%)
    sys.path.insert(0, str(REPO / "bench"))
    from activation_bytes import measure_case

    row = measure_case(case, tmp_path)
    assert 0.95 <= row["ratio"] <= 1.05, row


def test_picks_the_largest_chunk_that_fits():
    s, p = mistral(
        strategy="zero3",
        gpus=8,
        gpu_memory_gib=80,
        global_batch_size=2048,
        num_hard_negatives=1,
        query_max_length=256,
        document_max_length=512,
        torch_dtype="bfloat16",
        mixed_precision=True,
        lora_r=16,
        gradient_checkpointing=True,
    )
    chunk, largest = pick_chunk(s, p, row_chunk_size=1024)
    assert 0 < chunk <= largest < 2 * chunk and chunk & (chunk - 1) == 0
    assert fits(s, p, chunk=largest, row_chunk_size=1024)
    assert not fits(s, p, chunk=largest + 1, row_chunk_size=1024)


def _rows_per_pass(s, p) -> int:
    chunk, largest = pick_chunk(s, p, row_chunk_size=1024)
    return -1 if chunk is None else largest


def test_chunk_grows_with_memory_and_with_gpus_under_zero3():
    s, p = mistral(
        strategy="zero3",
        gpus=8,
        global_batch_size=4096,
        num_hard_negatives=1,
        query_max_length=512,
        document_max_length=512,
        torch_dtype="bfloat16",
        mixed_precision=True,
        lora_r=0,
        gradient_checkpointing=False,
    )
    by_memory = [_rows_per_pass(s, dataclasses.replace(p, gpu_memory_gib=g)) for g in (24, 40, 80, 141)]
    assert by_memory == sorted(by_memory) and by_memory[-1] > by_memory[0]
    by_gpus = [_rows_per_pass(s, dataclasses.replace(p, gpus=w)) for w in (4, 8, 16)]
    assert by_gpus == sorted(by_gpus) and by_gpus[-1] > by_gpus[0]


def test_nothing_fits_says_what_to_change():
    s, p = mistral(
        strategy="ddp",
        gpus=8,
        gpu_memory_gib=80,
        global_batch_size=1024,
        query_max_length=512,
        document_max_length=512,
        torch_dtype="bfloat16",
        mixed_precision=True,
        lora_r=0,
        gradient_checkpointing=False,
    )
    result = plan_memory(s, p, row_chunk_size=1024)
    assert result["chunk"] is None and not result["fits"]
    assert "plan.strategy=zero3" in result["message"] and "plan.lora_r=16" in result["message"]


def test_whole_batch_fitting_turns_gradcache_off():
    s, p = mistral(
        strategy="zero3",
        gpus=8,
        gpu_memory_gib=141,
        global_batch_size=64,
        query_max_length=64,
        document_max_length=64,
        torch_dtype="bfloat16",
        mixed_precision=True,
        lora_r=16,
        gradient_checkpointing=True,
    )
    assert pick_chunk(s, p, row_chunk_size=1024) == (0, rank_texts(p))
    terms = {t.name: t.bytes for t in estimate(s, p, chunk=0, row_chunk_size=1024)}
    assert terms["gathered embeddings"] == 64 * 2 * 4096 * 4 * 2 and terms["cuda context"] == 0.75 * GIB


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(strategy="zero4"), "plan.strategy"),
        (dict(gpus=3, global_batch_size=8), "plan.global_batch_size"),
        (dict(headroom=1.0), "plan.headroom"),
        (dict(offload_params=True), "plan.offload_params"),
        (dict(offload_optimizer=True), "plan.offload_optimizer"),
        (dict(torch_dtype="int8"), "plan.torch_dtype"),
        (dict(hidden=0), "plan.hidden"),
        (dict(chunk=-1), "plan.chunk"),
    ],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        PlanConfig(**kw)


def test_unreadable_model_names_the_missing_shape_keys():
    with pytest.raises(ValueError, match="plan.hidden"):
        resolve_shape(ModelConfig(name_or_path="/nonexistent/model"), PlanConfig(layers=2))


def test_e5_mistral_preset_composes():
    from hydra import compose, initialize_config_dir

    from embedscale.config import PlanJobConfig, register_configs, to_config
    from embedscale.jobs.launch import conf_dir
    from embedscale.strategy.memory import resolve_plan

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = compose("plan", overrides=["model=e5_mistral", "+plan=e5_mistral_7b"])
    cfg = to_config(raw, PlanJobConfig)
    p = resolve_plan(cfg)
    s = resolve_shape(cfg.model, p)
    assert s.params == 7.11e9 and s.gated_mlp and not s.dropout and s.kv_heads == 8
    result = plan_memory(s, p, row_chunk_size=cfg.loss.row_chunk_size)
    assert result["fits"] and result["chunk"] >= 64


@pytest.mark.slow  # a CLI process
def test_cli_plans_the_packaged_minilm(tmp_path):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["HF_HUB_OFFLINE"] = "1"
    args = [
        "plan.gpus=2",
        "plan.global_batch_size=512",
        "plan.gpu_memory_gib=8",
        f"plan.output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "embedscale.cli", "plan", *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["shape"]["params"] == 22_565_376 and result["shape"]["layers"] == 6
    assert result["fits"] and result["chunk"] > 0 and "gradcache.chunk_size" in result["message"]
    assert {t["name"] for t in result["terms"]} >= {"weights", "optimizer states", "activations", "loss"}
    assert "chunk:" in proc.stdout
