"""Helpers shared by several test modules: environments for subprocess jobs, tiny-run overrides, configs composed
as the CLI composes them, the tiny decoder, and the GradCache test module and batch. (Fixtures live in conftest.py;
these are plain functions.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from embedscale.config import LossConfig, ModelConfig, OptimConfig, TrainConfig, register_configs, to_config
from embedscale.data.batch import PairExample
from embedscale.data.collate import PairCollator
from embedscale.jobs.launch import conf_dir


def clean_env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return env


def tiny_overrides(tiny_bert, tiny_data, tmp_path):
    return [
        f"model.name_or_path={tiny_bert}",
        "model.document_max_length=32",
        "model.query_max_length=16",
        f"data.root={tiny_data}",
        "data.path=tiny",
        "data.batch_size_per_rank=4",
        "eval.beir.0.path=tiny",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
    ]


def compose_train(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_config(compose(config_name="train", overrides=overrides), TrainConfig)


def as_list(items: list[str]) -> str:  # Hydra's grammar: list items holding '=' are quoted
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def tiny_pipeline_overrides(tiny_bert, tiny_data, tmp_path) -> list[str]:
    common = [o for o in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not o.startswith("trainer.")]
    common += ["trainer.max_steps=2", "logger.loggers=[csv]", "trainer.progress=off"]
    mine = [
        f"data_root={tiny_data}",
        "mine.input=tiny",
        "mine.num_negatives=2",
        "mine.window_end=10",
        f"mine.cache_dir={tmp_path / 'cache'}",
    ]

    round2 = [c for c in common if not c.startswith(("data.path", "model.name_or_path"))]
    round2 += ["model.name_or_path={round1}/model", "data.format=shards", "data.path={mine1}/shards"]
    return [
        f"pipeline.output={tmp_path / 'pipe'}",
        "pipeline.stages.0.overrides=" + as_list(common),
        "pipeline.stages.1.overrides="
        + as_list([*mine, "model.name_or_path={round1}/model", "mine.relative_margin=0.05"]),
        "pipeline.stages.2.overrides=" + as_list([*round2, "data.num_hard_negatives=1"]),
    ]


def build_module(tiny_bert, *, shared, matryoshka, symmetric, distill=0.0, extras=False):
    """extras: the q->q and d->d terms, the margin guard (0.1) and a guide model (a frozen copy of the starting
    encoder, GISTEmbed's usual choice; guide margin 0.05) on."""
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder

    torch.manual_seed(0)
    mcfg = ModelConfig(
        name_or_path=str(tiny_bert),
        shared_towers=shared,
        matryoshka_dims=matryoshka,
        query_max_length=16,
        document_max_length=24,
    )
    encoder, tokenizer = load_encoder(mcfg)
    loss_cfg = LossConfig(
        symmetric_weight=symmetric,
        learnable_temperature=True,
        distill_weight=distill,
        query_query=extras,
        document_document=extras,
        margin_guard=0.1 if extras else None,
        guide_margin=0.05,
    )
    module = ContrastiveModule(encoder, loss_cfg=loss_cfg, optim_cfg=OptimConfig()).double().train()
    if extras:
        import copy

        module.set_guide(copy.deepcopy(module.encoder))
    return module, tokenizer


def make_batch(tokenizer, cfg, n=6, k=2):
    rows = [
        PairExample(f"question {i} " + "word " * i, f"answer {i} " + "text " * (2 * i), [f"neg {i} a", f"neg {i} b"])
        for i in range(n)
    ]
    rows[4].positive = rows[1].positive  # duplicates must be masked identically in both paths
    return PairCollator(tokenizer, model_cfg=cfg, num_hard_negatives=k)(rows)


TASK = "Given a web search query, retrieve relevant passages that answer the query"
QUERY_PREFIX = f"Instruct: {TASK}\nQuery: "
TEXTS = [
    "what is a protein",
    "galaxy",
    "how do rivers carve deep valleys in soft rock over long time",
    "violin strings and a bow",
    "engine",
]
FILLER = "forest vaccine crystal engine forest vaccine crystal engine river"


def _words() -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    return sorted({w for text in [QUERY_PREFIX, FILLER, *TEXTS] for w, _ in split(text)})


def make_tiny_mistral(path: Path, *, seed: int = 0, sliding_window: int | None = 4096) -> Path:
    """A 2-layer, 64-dim random Mistral and a word-level tokenizer that, like Mistral's, adds BOS and no EOS.
    sliding_window 4096 as Mistral-7B-v0.1 (e5-mistral); None as v0.2+ (transformers then builds other masks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(_words())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        path
    )
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
        sliding_window=sliding_window,
    )
    MistralModel(cfg).save_pretrained(path)
    return path


def make_tiny_lm(path: Path, words: list[str], *, kind: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-dim random language model with a word-level tokenizer over `words` (plus <pad>, </s>, <unk>,
    <s>), saved like a hub model: kind "llama" (causal; the tokenizer adds BOS) or "t5" (seq2seq; it adds EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    single, special = ("<s> $A", ("<s>", 3)) if kind == "llama" else ("$A </s>", ("</s>", 1))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[special])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(path)
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=1024,
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
        )
        LlamaForCausalLM(cfg).save_pretrained(path)
    else:
        cfg = T5Config(
            vocab_size=len(vocab),
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def train_in_process(tiny_bert, tiny_data, tmp_path, name: str, steps: int, *extra: str) -> dict:
    """One in-process tiny `embedscale train` for the resume tests: `steps` optimizer steps, a checkpoint every step,
    a constant lr without warmup (the schedule must not depend on max_steps: an interrupted run's is shorter), no
    evaluation, run_dir tmp_path/name; `extra` overrides last. Returns what metrics.json holds."""
    from embedscale.jobs.train import run

    base = [a for a in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not a.startswith(("trainer.max", "eval."))]
    overrides = base + [
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=10",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.progress=off",
        "optim.scheduler=constant",
        "optim.warmup_steps=0",
        "eval=none",
        f"run_dir={tmp_path / name}",
        *extra,
    ]
    return run(compose_train(overrides))


def exported_weights(result: dict) -> dict:
    """The exported weights of a train result (its export_dir)."""
    from safetensors.torch import load_file

    return load_file(str(Path(result["export_dir"]) / "model.safetensors"))


def train_processes(runs: dict[str, list[str]], root: Path, *, workers: int = 2, **env: str) -> dict:
    """`python -m embedscale.jobs.train` for each {name: overrides} in root/name, `workers` at a time: {name: the
    finished process}; fails on the first non-zero exit, with that run's stderr. A tiny 2-rank run is mostly two
    interpreters importing Lightning one after the other (one core busy), so two runs side by side take little more
    than one on 2 cores. The environment: clean_env() (no launcher variables: each run finds its own free
    rendezvous port), W&B off, one thread per rank, then env."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    env = {**clean_env(), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env}

    def one(item: tuple[str, list[str]]) -> subprocess.CompletedProcess:
        name, args = item
        run_dir = root / name
        cmd = [sys.executable, "-m", "embedscale.jobs.train", *args, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        procs = dict(zip(runs, pool.map(one, runs.items()), strict=True))
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    return procs
