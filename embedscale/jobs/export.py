"""Job `embedscale export`: load a model -> ONNX graphs (pooling and normalisation inside, int8 optional) -> checked
against PyTorch -> written with the tokenizer and embedscale_onnx.json (embedscale/export_onnx.py) -> with
hub.repo_id, the model folder (its onnx/ included) published to the Hub or, with hub.dry_run_dir, copied as it would
be (embedscale/hub.py).

    embedscale export model.name_or_path=runs/train/<ts>/model [onnx.quantize=int8] [onnx.output=DIR]
        [hub.repo_id=ORG/NAME hub.push=true | hub.dry_run_dir=DIR]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from embedscale.config import ExportJobConfig
from embedscale.jobs.launch import hydra_job


def output_dir(cfg: ExportJobConfig) -> Path:
    """onnx.output, else <model>/onnx for a local model."""
    if cfg.onnx.output:
        return Path(cfg.onnx.output)
    local = Path(cfg.model.name_or_path).expanduser()
    if not local.is_dir():
        raise ValueError(
            f"model.name_or_path={cfg.model.name_or_path} is not a local directory, so there is no <model>/onnx to "
            "write to: set onnx.output=DIR"
        )
    return local / "onnx"


def run(cfg: ExportJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.export_onnx import export_onnx
    from embedscale.hub import check_publishable, publish

    start = time.perf_counter()
    out = output_dir(cfg)
    if cfg.hub.repo_id:
        check_publishable(Path(cfg.model.name_or_path), cfg.hub)
    encoder, tokenizer = load_encoder(cfg.model)
    record = export_onnx(encoder, tokenizer, out, cfg.onnx, source=cfg.model.name_or_path)
    seconds = round(time.perf_counter() - start, 1)
    print(f"wrote {out} ({seconds:.0f} s): graphs {sorted(set(record['graphs'].values()))}")
    print(f"cosine to PyTorch over {cfg.onnx.check_texts} texts: {json.dumps(record['parity'])}")
    hub = publish(cfg.model.name_or_path, cfg.hub) if cfg.hub.repo_id else None
    return {**record, "output": str(out), "seconds": seconds, "hub": hub}


main = hydra_job("export", run)

if __name__ == "__main__":
    main()
