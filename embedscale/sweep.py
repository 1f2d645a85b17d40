"""Job `embedscale sweep`: load a model -> encode each BEIR set once -> metrics vs Matryoshka dim and vs index
precision -> sweep.json and a table.

    embedscale sweep model.name_or_path=runs/train/<ts>/model sweep.output=runs/train/<ts>/sweep.json

A job of its own rather than flags on `embedscale evaluate`: it answers another question (what a smaller
index costs, not how good the model is), writes another artifact (rows of {set, dim, precision, metrics,
bytes}, not evaluate's flat metrics dict), reads retrieval sets only, and its knobs (dims, precisions,
rescoring depth) would otherwise sit in every evaluate config. The arithmetic lives in
retrieval/quantize.py; this file only wires config, evaluators and output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job
from embedscale.config import SweepJobConfig

COLUMNS = ("set", "dim", "precision", "ndcg@10", "recall@100", "bytes_per_doc", "rescore_bytes_per_doc")


def format_table(rows: list[dict]) -> str:
    """Plain-text table of sweep rows (also what bench/sweeps.py prints)."""
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def sweep_rows(cfg: SweepJobConfig, evaluators: list, encoder, tokenizer) -> dict[str, list[dict]]:
    """{"matryoshka": rows, "quantization": rows} over every evaluator, each encoded once."""
    from embedscale.retrieval.quantize import matryoshka_sweep, quantization_sweep

    out: dict[str, list[dict]] = {"matryoshka": [], "quantization": []}
    for ev in evaluators:
        embeddings = ev.embeddings(encoder, tokenizer)
        out["matryoshka"] += matryoshka_sweep(ev, encoder, tokenizer, cfg.sweep.dims, embeddings=embeddings)
        if cfg.sweep.precisions:
            out["quantization"] += quantization_sweep(
                ev,
                encoder,
                tokenizer,
                cfg.sweep.precisions,
                dims=cfg.sweep.quantization_dims,
                rescore_multiplier=cfg.sweep.rescore_multiplier,
                embeddings=embeddings,
            )
    return out


def run(cfg: SweepJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    import time

    from embedscale.data.readers import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators

    start = time.perf_counter()
    run_dir = Path(run_dir or "runs/sweep").resolve()
    encoder, tokenizer = load_encoder(cfg.model)
    evaluators = build_evaluators(
        cfg.eval, root=resolve_data_root(cfg.data_root), default_max_length=encoder.cfg.document_max_length
    )
    if not evaluators:
        raise ValueError("nothing to sweep: add a BEIR set to eval.beir (e.g. eval=scifact)")
    result = {
        "model": cfg.model.name_or_path,
        "rescore_multiplier": cfg.sweep.rescore_multiplier,
        **sweep_rows(cfg, evaluators, encoder, tokenizer),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(cfg.sweep.output) if cfg.sweep.output else run_dir / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for kind in ("matryoshka", "quantization"):
        if result[kind]:
            print(f"\n{kind} ({cfg.model.name_or_path})\n{format_table(result[kind])}")
    print(f"\nwrote {out}  ({result['seconds']:.0f} s)")
    return result


main = hydra_job("sweep", SweepJobConfig, run)

if __name__ == "__main__":
    main()
