"""Job `embedscale sweep`: load a model -> encode each BEIR set once -> metrics vs Matryoshka dim and vs index
precision -> sweep.json and a table.

    embedscale sweep model.name_or_path=runs/train/<ts>/model sweep.output=runs/train/<ts>/sweep.json

A job of its own rather than flags on `embedscale evaluate`: it answers another question (what a smaller
index costs, not how good the model is), writes another artifact (rows of {set, dim, precision, metrics,
bytes}, not evaluate's flat metrics dict), reads retrieval sets only, and its knobs (dims, precisions,
rescoring depth) would otherwise sit in every evaluate config. The arithmetic lives in retrieval/quantize.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from embedscale.config import SweepJobConfig
from embedscale.jobs.launch import hydra_job


def run(cfg: SweepJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.data.records import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators
    from embedscale.retrieval.quantize import format_table, sweep_rows

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
        **sweep_rows(cfg.sweep, evaluators, encoder, tokenizer),
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


main = hydra_job("sweep", run)

if __name__ == "__main__":
    main()
