"""Export a trained BiEncoder in the layout that sentence-transformers and HF `AutoModel` both load.

Layout of `<dir>` (shared towers; separate towers write one such tree in `query/` and `document/`):
  config.json, model.safetensors, tokenizer files   -> `AutoModel.from_pretrained(dir)`
  modules.json, sentence_bert_config.json,
  1_Pooling/config.json, [2_Normalize/]             -> `SentenceTransformer(dir)`
  config_sentence_transformers.json                 -> prompts {"query": prefix, "document": prefix}
  embedscale.json                                   -> embedscale's own settings (pooling, prefixes, ...)
  README.md                                         -> model card with the config and the metrics

The files are written directly (a documented, stable format) rather than through a
SentenceTransformer object, so that export never re-loads the backbone; the round trip is tested.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from embedscale.config import ModelConfig, Pooling
from embedscale.encoder.biencoder import EXPORT_META, SIDES, BiEncoder

ST_POOLING_FLAG = {
    Pooling.cls: "pooling_mode_cls_token",
    Pooling.mean: "pooling_mode_mean_tokens",
    Pooling.last_token: "pooling_mode_lasttoken",
    Pooling.weighted_mean: "pooling_mode_weightedmean_tokens",
}


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj.value if isinstance(obj, enum.Enum) else obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")


def _write_sentence_transformers_tree(out: Path, backbone, tokenizer, cfg: ModelConfig, side: str | None) -> None:
    backbone.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    dim = backbone.config.hidden_size
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(out / "modules.json", modules)
    max_len = cfg.query_max_length if side == "query" else cfg.document_max_length
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    pooling = {"word_embedding_dimension": dim, **{flag: False for flag in ST_POOLING_FLAG.values()}}
    pooling[ST_POOLING_FLAG[cfg.pooling]] = True
    _write_json(out / "1_Pooling" / "config.json", pooling)
    prompts = {"query": cfg.query_prefix, "document": cfg.document_prefix}
    _write_json(
        out / "config_sentence_transformers.json",
        {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine" if cfg.normalize else "dot"},
    )


def _model_card(cfg: ModelConfig, metrics: dict | None, config: dict | None) -> str:
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, embedscale, feature-extraction, sentence-similarity]",
        "---",
        "",
        f"# Embedding model fine-tuned with embedscale from `{cfg.name_or_path}`",
        "",
        f"Pooling `{cfg.pooling.value}`, normalised: {cfg.normalize}, query prefix {cfg.query_prefix!r}, "
        f"document prefix {cfg.document_prefix!r}, max length {cfg.query_max_length}/{cfg.document_max_length} "
        "(query/document).",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("PATH")',
        'q = model.encode(["a query"], prompt_name="query")',
        'd = model.encode(["a document"], prompt_name="document")',
        "```",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
        lines.append("")
    if config:
        lines += ["## Training config", "", "```json", json.dumps(to_jsonable(config), indent=2), "```", ""]
    return "\n".join(lines)


def export_model(
    encoder: BiEncoder, tokenizer, out_dir: str | Path, *, metrics: dict | None = None, config: Any = None
) -> Path:
    """Write the encoder to `out_dir` for sentence-transformers and HF; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = encoder.cfg
    if encoder.shared:
        _write_sentence_transformers_tree(out, encoder.query_backbone, tokenizer, cfg, None)
    else:
        for side in SIDES:
            _write_sentence_transformers_tree(out / side, encoder.backbone(side), tokenizer, cfg, side)
    _write_json(out / EXPORT_META, {"model": cfg, "metrics": metrics or {}})
    (out / "README.md").write_text(_model_card(cfg, metrics, config))
    return out
