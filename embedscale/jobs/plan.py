"""Job `embedscale plan`: per-GPU memory of a training setup, term by term, and the largest GradCache chunk
that fits (the model: embedscale/strategy/memory.py; docs/plan.md).

    embedscale plan plan.gpus=8 plan.gpu_memory_gib=80 plan.global_batch_size=4096 plan.strategy=zero2
    embedscale plan model=e5_mistral +plan=e5_mistral_7b          # the 7B worked example of docs/plan.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.config import PlanJobConfig
from embedscale.jobs.launch import hydra_job


def print_report(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("term", "left"), ("formula / basis", "left"), ("GiB", "right")):
        table.add_column(col, justify=justify)
    for t in result["terms"]:
        table.add_row(t["name"], t["basis"], f"{t['gib']:.3f}")
    table.add_row("total", f"budget {result['budget_gib']:.1f} GiB", f"{result['total_gib']:.3f}", style="bold")
    console = Console()
    console.print(table)
    chunk = result["chunk"]
    if chunk is None:
        console.print(f"[bold red]no chunk fits[/]: {result['message']}")
    else:
        extra = f" (largest integer: {result['max_chunk']})" if result["max_chunk"] and chunk else ""
        console.print(f"chunk: [bold]{chunk}[/]{extra} -- {result['message']}")


def run(cfg: PlanJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.strategy.memory import plan_memory, resolve_plan, resolve_shape

    plan = resolve_plan(cfg)
    shape = resolve_shape(cfg.model, plan)
    result = {"model": cfg.model.name_or_path, **plan_memory(shape, plan, row_chunk_size=cfg.loss.row_chunk_size)}
    p = plan
    title = (
        f"{cfg.model.name_or_path}: {shape.params / 1e9:.3g}B params, "
        f"{p.strategy} on {p.gpus} x {p.gpu_memory_gib:g} GiB, "
        f"global batch {p.global_batch_size} (k={p.num_hard_negatives}), "
        f"{p.query_max_length}/{p.document_max_length} tok, "
        f"{p.torch_dtype}{' + bf16 autocast' if p.mixed_precision else ''}, LoRA r={p.lora_r}, "
        f"checkpointing={p.gradient_checkpointing}"
    )
    print_report(result, title)
    out = Path(p.output) if p.output else Path(run_dir or "runs/plan") / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


main = hydra_job("plan", run)

if __name__ == "__main__":
    main()
