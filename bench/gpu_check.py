"""One GPU check, ready to run: in one command on one H100/H200 (under 10 minutes), three parts, each row in its own
process with a timeout so that one failing row loses none of the others:

  doctor  `embedscale doctor --json` under `torchrun --standalone --nproc_per_node=1` on NCCL; its JSON report kept.
  bert    BERT-base (random init, BertConfig defaults: hidden 768, 12 layers) at a global batch of 65,536 pairs
          (one query + one positive each; on one GPU that is the rank batch), 128 tokens per text, GradCache, bf16
          mixed precision, single-device strategy: pairs/s, tokens/s, MFU, peak memory next to the plan.
  llama   DeepSpeed ZeRO-3 + LoRA r=16 + GradCache on a TinyLlama-1.1B-shaped random decoder (chunks 16 and 64):
          peak memory and samples/s next to the plan.

    bash bench/gpu_check.sh                 # one H100/H200: checks the dependencies, then this script (~6-8 min)
    python bench/gpu_check.py               # the same without the dependency check
    python bench/gpu_check.py --dry-run     # CPU: tiny BERT at 256 pairs, tiny Llama, doctor on gloo (~2 min)

Every training row goes through embedscale's own path: `TrainerConfig` -> `embedscale.strategy.build_strategy` ->
Lightning `Trainer.fit` on a `ContrastiveModule` with GradCache (the step of contrastive/module.py), on random token
ids of exactly `seq` tokens (no padding), no hard negatives. No download: the GPU machine is offline.

bert: `trainer.strategy=auto` on one device (Lightning's single-device strategy, what `embedscale train` uses on one
GPU), `trainer.precision=bf16-mixed` (fp32 weights, AdamW), SDPA attention, no gradient checkpointing, mean pooling.
The GradCache chunk is the planner's pick for the detected GPU's memory (`pick_chunk` of embedscale/strategy/memory.py
with its default headroom and CUDA context: 1024 texts on an 80 GiB H100 at 128 tokens, 2048 on an H200), unless
`--bert-chunk` fixes it. 1 untimed step, then `--bert-steps` (2) timed optimizer steps. FLOPs per optimizer step:

    tokens = 2 x pairs x seq                        (queries and documents)
    dense  = 8 x P x tokens                         (GradCache: a forward without graph, 2PT, then forward 2PT and
                                                     backward 4PT per chunk; P = parameters of the 12 encoder layers,
                                                     the matmuls: the embedding tables are lookups)
    attn   = 16 x L x seq x h x tokens              (QK^T and AV: 4 L s h per token and forward, the same four passes)
    mfu    = (dense + attn) x steps / seconds / peak dense bf16 FLOPs of the GPU (by torch.cuda.get_device_name:
             H100 SXM/HBM3 989 TFLOPs, H100 NVL 835, H100 PCIe 756, H200 989, A100 312; unknown: no MFU)
    mfu_6x = the same with 6 instead of 8 and 12 instead of 16: the FLOPs a step without GradCache's second forward
             needs (the usual "model FLOPs"); the loss (2 x N^2 x d per pass, ~0.2% here) is left out of both.
At 65,536 pairs x 128 tokens that is 16.8M tokens and 11.7 PFLOPs per step: ~30 s at 40% MFU of 989 TFLOPs.

llama: `TrainerConfig(strategy="deepspeed", zero_stage=3)` (every backward an engine micro-step, the last the
boundary); hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000; LoRA r=16 on
q/k/v/o, gradient checkpointing, SDPA, DeepSpeed bf16 (bf16 weights, fp32 master copies of the adapters); 128 queries
and 128 documents of 256 tokens; `--warmup` (1) untimed + `--steps` (3) timed steps.

doctor: embedscale's `init_from_env` makes no process group for a world of one (`torchrun --nproc_per_node=1 -m
embedscale.jobs.doctor` reports backend "none"), so the torchrun worker here first makes a one-rank group on the
backend under test (NCCL on the GPU, gloo in the dry run), runs one all-reduce on it (NCCL creates its communicator
at the first collective), then calls the doctor job's `main(["--json"])` unchanged; the doctor adopts that group.
At one rank the gather collectives short-circuit and the all-gather bandwidth is 0 by definition: the report proves
the doctor's gradient checks pass on this GPU and that NCCL initialises, not multi-GPU bandwidth.

Measured per training row: `torch.cuda.max_memory_allocated()` over the whole fit (`peak_fit`: the first step
allocates the optimizer states) and over the timed steps (`peak_steady`). Planned: `embedscale plan`'s terms for the
same strategy, chunk, LoRA, dtype, checkpointing and fused attention, without the CUDA context (allocated memory does
not include it); ratio = measured / planned. The dry run measures peak RSS instead (not comparable with the plan: it
includes Python, torch and DeepSpeed themselves), runs 32-bit on CPU, and has no MFU (no peak FLOPs for a CPU).

Time budget: rows run in order doctor, bert, llama x 2; a row that would start after `--budget` seconds (540, counted
from $GPU_CHECK_START, which bench/gpu_check.sh sets, else from this script's start) is skipped and recorded as
skipped; each row's timeout is at most what is left of the budget. Exit code 2 when any row failed or was skipped.

The llama rows need deepspeed (`pip install embedscale[deepspeed]`); without it they record the planner's estimates
and "deepspeed not installed". The planner's functions need neither Hydra nor a GPU.
Writes bench/results/gpu_check.json (gpu_check_dryrun.json for --dry-run; $EMBEDSCALE_BENCH_RESULTS replaces
bench/results/) and, when $OUT is set, $OUT/<same name>.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS  # noqa: E402

MIB, GIB = 2**20, 2**30
TINYLLAMA = dict(
    hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4
)
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, vocab_size=1000)
GPU_ROWS = [  # seq, chunk, rank batch (queries; as many documents)
    dict(seq=256, chunk=16, batch=128),
    dict(seq=256, chunk=64, batch=128),
]
DRY_ROWS = [dict(seq=32, chunk=4, batch=16)]
BERT_GPU = dict(seq=128, batch=65536)
BERT_DRY = dict(seq=32, batch=256, chunk=64)
LORA_R = 16
ROW_CHUNK = 1024
"""loss.row_chunk_size (its default): score rows per loss block, in the plan."""
TIMEOUTS = dict(doctor=150, bert=330, llama=240)
"""Seconds per row process, before the budget caps them (bert: 3 steps of ~30 s at 40% MFU, or ~80 s at 15%)."""
MIN_ROW_S = 30
"""A row starts only with at least this many seconds of the budget left."""
FLOPS_FORMULA = (
    "per optimizer step: 8 x P x tokens + 16 x L x seq x h x tokens, tokens = 2 x pairs x seq, P = parameters of the "
    "encoder layers (GradCache: a forward without graph, then forward and backward); mfu_6x: 6 and 12 (no second "
    "forward); the loss is left out; peak = dense bf16 FLOPs/s of the GPU by name"
)
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))
"""Dense bf16 FLOPs/s by device name (spec sheets; first match wins)."""


# --- parent: shapes, plans, rows ------------------------------------------------------------------------------------


def model_dirs(tmp: Path, dry_run: bool) -> dict[str, Path]:
    """config.json of each backbone (what the planner reads, and what the row process builds)."""
    from transformers import BertConfig, LlamaConfig

    llama = tmp / ("tiny-llama" if dry_run else "llama-1.1b")
    LlamaConfig(vocab_size=1000 if dry_run else 32000, **(TINY if dry_run else TINYLLAMA)).save_pretrained(llama)
    bert = tmp / ("tiny-bert" if dry_run else "bert-base")
    BertConfig(**(TINY_BERT if dry_run else {})).save_pretrained(bert)
    return {"llama": llama, "bert": bert}


def plan_config(row: dict, dry_run: bool, **overrides):
    """The PlanConfig of a training row: the same strategy, batch, lengths, LoRA, dtype and chunk as the row."""
    from embedscale.config import PlanConfig

    llama = row["check"] == "llama"
    return PlanConfig(
        strategy="zero3" if llama else "ddp",
        gpus=1,
        global_batch_size=row["batch"],
        query_max_length=row["seq"],
        document_max_length=row["seq"],
        lora_r=LORA_R if llama else 0,
        torch_dtype="bfloat16" if llama and not dry_run else "float32",
        mixed_precision=not dry_run,
        gradient_checkpointing=llama,
        flash_attention=True,
        **overrides,
    )


def shape_of(path: Path, row: dict, plan):
    from embedscale.config import ModelConfig, Pooling
    from embedscale.strategy.memory import resolve_shape

    pooling = Pooling.last_token if row["check"] == "llama" else Pooling.mean
    return resolve_shape(ModelConfig(name_or_path=str(path), pooling=pooling), plan)


def planned(path: Path, row: dict, dry_run: bool) -> dict:
    """The planner's total for the row's chunk, without headroom or CUDA context (allocated memory has neither)."""
    from embedscale.strategy.memory import estimate

    plan = plan_config(row, dry_run, gpu_memory_gib=1000.0, chunk=row["chunk"], headroom=0.0, cuda_context_gib=0.0)
    shape = shape_of(path, row, plan)
    mask_bytes = 4 if dry_run else 1  # saved dropout masks: bool on CUDA, 4 bytes on CPU (plan_vs_measured.py)
    terms = estimate(shape, plan, chunk=row["chunk"], row_chunk_size=ROW_CHUNK, mask_bytes=mask_bytes)
    return {"plan_total_MiB": round(sum(t.bytes for t in terms) / MIB, 1)}


def planner_chunk(path: Path, row: dict, gpu_gib: float) -> dict:
    """The planner's GradCache chunk for this GPU (plan.chunk=0: the largest power of two that fits, with the
    planner's default headroom and CUDA context), as `embedscale plan` would print it."""
    from embedscale.strategy.memory import pick_chunk

    plan = plan_config(row, False, gpu_memory_gib=round(gpu_gib, 1), chunk=0)
    chunk, largest = pick_chunk(shape_of(path, row, plan), plan, row_chunk_size=ROW_CHUNK)
    source = f"planner: pick_chunk at {plan.gpu_memory_gib} GiB, headroom {plan.headroom}, context "
    return {"chunk": chunk, "chunk_source": source + f"{plan.cuda_context_gib} GiB (largest fitting: {largest})"}


def peak_flops(device: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16 if name in device), None)


def rows_to_run(args) -> list[dict]:
    bert = dict(check="bert", **(BERT_DRY if args.dry_run else BERT_GPU), warmup=args.warmup, steps=args.bert_steps)
    if args.bert_chunk:
        bert.update(chunk=args.bert_chunk, chunk_source="--bert-chunk")
    elif args.dry_run:
        bert["chunk_source"] = "fixed (dry run: no GPU memory to plan for)"
    llama = [
        dict(check="llama", **r, warmup=args.warmup, steps=args.steps) for r in (DRY_ROWS if args.dry_run else GPU_ROWS)
    ]
    return [dict(check="doctor"), bert, *llama]


def run_row(row: dict, args, timeout: float) -> dict:
    """One row in a fresh process (clean CUDA peak; one DeepSpeed engine per process; the doctor under torchrun);
    its JSON comes back on the last line of stdout. A timeout kills the row's whole process group."""
    cmd = [sys.executable, __file__, "--row", json.dumps(row)] + (["--dry-run"] if args.dry_run else [])
    if row["check"] == "doctor":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *cmd[1:]]
    launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, even on a GPU machine (doctor: gloo)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s; stderr: {err[-2000:]}", "row_seconds": round(timeout)}
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}; stderr: {err[-3000:]}", "row_seconds": seconds}
    return {**json.loads(out.strip().splitlines()[-1]), "row_seconds": seconds}


def with_rates(record: dict, peak: float | None) -> dict:
    """pairs/s, tokens/s, TFLOPs/s and MFU of a finished bert row (formulas in the module docstring)."""
    if "seconds_timed" not in record:
        return record
    seconds, steps = record["seconds_timed"], record["timed_steps"]
    tokens = 2 * record["batch"] * record["seq"]
    dense = 8 * record["layer_params"] * tokens
    attention = 16 * record["layers"] * record["seq"] * record["hidden"] * tokens
    flops = dense + attention
    record.update(
        tokens_per_step=tokens,
        flops_per_step=flops,
        tokens_per_s=round(tokens * steps / seconds),
        TFLOPs_per_s=float(f"{flops * steps / seconds / 1e12:.4g}"),
    )
    if peak:
        record.update(
            peak_bf16_TFLOPs=peak / 1e12,
            mfu=round(flops * steps / seconds / peak, 4),
            mfu_6x=round(0.75 * flops * steps / seconds / peak, 4),
        )
    return record


# --- child: one row -------------------------------------------------------------------------------------------------


def random_batches(b: int, seq: int, vocab: int, n: int) -> list:
    """n PairBatches of b queries and b positives, random ids of exactly seq tokens, distinct text ids."""
    import torch

    from embedscale.data.batch import PairBatch, TextIds

    gen = torch.Generator().manual_seed(1)

    def tokens() -> dict:
        ids = torch.randint(5, vocab, (b, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return [
        PairBatch(
            tokens(),
            tokens(),
            TextIds(torch.arange(b) + 2 * b * i, torch.arange(b) + 2 * b * i + b, None),
            0,
            [f"{i}:{j}" for j in range(b)],
        )
        for i in range(n)
    ]


def build_module(path: Path, row: dict, dry_run: bool):
    """(ContrastiveModule, TrainerConfig, facts) as the train job builds them: llama with LoRA under ZeRO-3, bert
    whole under the single-device strategy; the step driver reads clipping from the trainer config."""
    import torch
    from transformers import AutoConfig, AutoModel

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig, Pooling, TrainerConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.backbone import adapt_backbone
    from embedscale.encoder.biencoder import BiEncoder

    llama = row["check"] == "llama"
    model_cfg = ModelConfig(
        name_or_path=str(path),
        pooling=Pooling.last_token if llama else Pooling.mean,
        padding_side="left" if llama else None,
        query_max_length=row["seq"],
        document_max_length=row["seq"],
        gradient_checkpointing=llama,
        lora_r=LORA_R if llama else 0,
    )
    hf_cfg = AutoConfig.from_pretrained(path)
    dtype = torch.bfloat16 if llama and not dry_run else torch.float32
    backbone = adapt_backbone(AutoModel.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype), model_cfg)
    trainer_cfg = TrainerConfig(
        strategy="deepspeed" if llama else "auto",
        zero_stage=3,
        accelerator="cpu" if dry_run else "gpu",
        devices=1,
        precision="32-true" if dry_run else "bf16-mixed",
        gradient_clip_val=1.0,
    )
    module = ContrastiveModule(
        BiEncoder(backbone, None, model_cfg),
        loss_cfg=LossConfig(),
        optim_cfg=OptimConfig(lr=1e-4, warmup_steps=0),
        gradcache=GradCacheConfig(chunk_size=row["chunk"]),
        trainer_cfg=trainer_cfg,
    )
    facts = {"params": sum(p.numel() for p in backbone.parameters())}
    if not llama:  # what the FLOPs formula needs: the encoder layers' parameters, layers, hidden size
        facts.update(
            layer_params=sum(p.numel() for p in backbone.encoder.layer.parameters()),
            layers=hf_cfg.num_hidden_layers,
            hidden=hf_cfg.hidden_size,
        )
    return module, trainer_cfg, facts, hf_cfg.vocab_size


def measure(path: Path, row: dict, *, dry_run: bool) -> dict:
    """One training row, in this process: Trainer.fit on `warmup + steps` batches; peak memory and rates."""
    import lightning as L
    import torch

    from embedscale.strategy import build_strategy

    torch.manual_seed(0)
    cuda = not dry_run
    if dry_run:
        torch.set_num_threads(1)  # small ops: more threads only contend (2-core CI machines)
    warmup, steps = row["warmup"], row["steps"]
    module, trainer_cfg, facts, vocab = build_module(path, row, dry_run)
    b = row["batch"]
    loader = torch.utils.data.DataLoader(
        random_batches(b, row["seq"], vocab, warmup + steps), batch_size=None, collate_fn=lambda x: x
    )

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    self.peak_warmup = torch.cuda.max_memory_allocated()  # the first step allocates the states
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=1,
        strategy=build_strategy(trainer_cfg, gradcache=True),  # as the train job passes it
        precision=trainer_cfg.precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    result = {
        **facts,
        "lightning_strategy": type(trainer.strategy).__name__,
        "optimizer_steps": trainer.global_step,
        "timed_steps": steps,
        "seconds_timed": round(clock.seconds, 3),
        "samples_per_s": round(b * steps / clock.seconds, 2),
        "fit_seconds": round(time.perf_counter() - fit_start, 1),
    }
    if cuda:
        steady = torch.cuda.max_memory_allocated()
        result["peak_steady_MiB"] = round(steady / MIB, 1)
        result["peak_fit_MiB"] = round(max(steady, clock.peak_warmup) / MIB, 1)
    else:
        import resource

        result["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def doctor(dry_run: bool) -> dict:
    """`embedscale doctor --json` on a one-rank group of the backend under test (this process is torchrun's worker;
    why the group is made here: the module docstring)."""
    import contextlib
    import io

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401  (before the group exists, as init_from_env does)
    import torch.distributed.fsdp  # noqa: F401

    cuda = torch.cuda.is_available() and not dry_run
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    probe = torch.ones(1, device="cuda" if cuda else "cpu")
    dist.all_reduce(probe)  # NCCL makes its communicator at the first collective
    from embedscale.jobs.doctor import main as doctor_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = doctor_main(["--json"])
    text = printed.getvalue()
    report = json.loads(text[text.index("{") :])
    result = {
        "backend": report["backend"],
        "world_size": report["world_size"],
        "device": report["device"],
        "ok": report["ok"],
        "max_rel_diff": max(c["max_rel_diff"] for c in report["checks"]),
        "doctor_exit_code": code,
        "note": "one rank: the gather collectives short-circuit and the all-gather bandwidth is 0 by definition",
        "allreduce_probe": probe.item(),
        "report": report,
    }
    if cuda:
        version = torch.cuda.nccl.version()  # a tuple, or an int on older torch
        result["nccl_version"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    if code != 0:
        result["error"] = "embedscale doctor: gradients differ (exit code 1)"
    return result


# --- report ---------------------------------------------------------------------------------------------------------


def machine(dry_run: bool) -> str:
    import torch

    if not dry_run and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / GIB:.1f} GiB)"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    versions = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for name in ("deepspeed", "lightning", "transformers", "peft"):
        if importlib.util.find_spec(name) is not None:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
    return f"{device}; " + ", ".join(versions)


COLUMNS = [
    "check", "model", "seq", "chunk", "batch", "plan_total_MiB", "peak_steady_MiB", "peak_fit_MiB", "peak_rss_MiB",
    "ratio_steady", "samples_per_s", "tokens_per_s", "TFLOPs_per_s", "mfu", "mfu_6x", "backend", "ok",
    "max_rel_diff", "row_seconds", "skipped", "error",
]  # fmt: skip


def print_table(rows: list[dict]) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            value = r.get(c, "-")
            if c == "error" and value != "-":
                value = str(value).strip().splitlines()[-1][:80]
            elif c == "max_rel_diff" and value != "-":
                value = f"{value:.1e}"
            cells.append(str(value))
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny BERT and Llama, 32-bit; doctor on gloo")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per training row")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per llama row")
    parser.add_argument("--bert-steps", type=int, default=2, help="timed optimizer steps of the bert row")
    parser.add_argument("--bert-chunk", type=int, default=0, help="GradCache chunk of the bert row (0: planner's)")
    parser.add_argument("--budget", type=float, default=540, help="seconds: rows that would start later are skipped")
    parser.add_argument("--row-timeout", type=float, help="seconds per row process (default: 150/330/240 by check)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # child process: one row
        row = json.loads(args.row)
        out = (
            doctor(args.dry_run) if row["check"] == "doctor" else measure(Path(row["path"]), row, dry_run=args.dry_run)
        )
        print(json.dumps(out), flush=True)
        return
    start = float(os.environ.get("GPU_CHECK_START") or time.time())
    import torch

    command = " ".join(["python bench/gpu_check.py", *sys.argv[1:]])
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU; use --dry-run on CPU")
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    where = machine(args.dry_run)
    print(f"command: {command}")
    print(f"machine: {where}")
    if not have_deepspeed:
        print(
            "deepspeed is NOT installed: the ZeRO-3 rows cannot run. Install it (pip install embedscale[deepspeed], "
            "or offline: WHEELS=<dir with its wheels> bash bench/gpu_check.sh); writing the planner's estimates only."
        )
    peak = None if args.dry_run else peak_flops(torch.cuda.get_device_name(0))
    gpu_gib = None if args.dry_run else torch.cuda.get_device_properties(0).total_memory / GIB
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = model_dirs(Path(tmp), args.dry_run)
        for row in rows_to_run(args):
            check = row["check"]
            record = dict(row)
            if check != "doctor":
                row["path"] = str(paths[check])
                record["model"] = paths[check].name
                if "chunk" not in row:
                    row.update(planner_chunk(paths[check], row, gpu_gib))
                    record.update(chunk=row["chunk"], chunk_source=row["chunk_source"])
                record["strategy"] = (
                    "zero3 + LoRA r=16" if check == "llama" else "single device (trainer.strategy=auto)"
                )
                record["precision"] = "32-true" if args.dry_run else "bf16-mixed"
                if row["chunk"]:
                    record.update(planned(paths[check], row, args.dry_run))
            elapsed = time.time() - start
            left = args.budget - elapsed
            if left < MIN_ROW_S:
                record["skipped"] = (
                    f"time budget: {elapsed:.0f} s of --budget {args.budget:.0f} s spent before this row"
                )
            elif check == "llama" and not have_deepspeed:
                record["error"] = "deepspeed not installed"
            elif not row.get("chunk", 1):
                record["error"] = "the planner finds no GradCache chunk that fits (or none needed): pass --bert-chunk"
            else:
                record.update(run_row(row, args, min(args.row_timeout or TIMEOUTS[check], left)))
            if "peak_steady_MiB" in record and "plan_total_MiB" in record:
                record["ratio_steady"] = round(record["peak_steady_MiB"] / record["plan_total_MiB"], 3)
            if check == "bert":
                with_rates(record, peak)
            rows.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "report"}), flush=True)
    print_table(rows)
    elapsed = round(time.time() - start, 1)
    print(f"elapsed: {elapsed} s of the {args.budget:.0f} s budget")
    record = {
        "command": command,
        "machine": where,
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "elapsed_s": elapsed,
        "bert_flops": FLOPS_FORMULA,
        "rows": rows,
    }
    name = "gpu_check_dryrun.json" if args.dry_run else "gpu_check.json"
    targets = [RESULTS / name]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / name)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {target}")
    if any("error" in r or "skipped" in r for r in rows):
        sys.exit(2)


if __name__ == "__main__":
    main()
