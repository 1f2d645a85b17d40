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
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from embedscale.config import ModelConfig, Pooling
from embedscale.encoder.biencoder import EXPORT_META, POOLER_FOR_EXPORT, SIDES, BiEncoder

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


def export_tokenizer(tokenizer, cfg: ModelConfig):
    """The tokenizer as exported. Where embedscale appends EOS (model.append_eos), a copy whose post-processor
    appends it, so that sentence-transformers and a plain tokenizer call end texts with EOS as training did
    (truncation then keeps room for it). Slow tokenizers are exported unchanged (the appended EOS is then
    embedscale's alone). The new post-processor is [BOS] $A EOS; it is checked to give the old ids plus EOS, else
    the tokenizer is exported unchanged (with a warning)."""
    import copy
    import logging

    from embedscale.encoder.tokenize import eos_to_append

    eos = eos_to_append(tokenizer, cfg)
    if eos is None or getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    from tokenizers import processors

    probes = ["a b", "Query: what is it?", "x"]
    before = [tokenizer(p)["input_ids"] for p in probes]
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and before[0][0] == tokenizer.bos_token_id else None
    head, specials = (f"{bos}:0 ", [(bos, tokenizer.bos_token_id)]) if bos else ("", [])
    name = tokenizer.eos_token
    exported = copy.deepcopy(tokenizer)
    exported.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0 {name}:0",
        pair=f"{head}$A:0 {name}:0 $B:1 {name}:1",
        special_tokens=[*specials, (name, eos)],
    )
    if [exported(p)["input_ids"] for p in probes] != [ids + [eos] for ids in before]:
        logging.getLogger(__name__).warning(
            "model.append_eos: could not make the exported tokenizer append EOS itself (its post-processor is not "
            "[BOS] $A); sentence-transformers and plain transformers will not append it"
        )
        return tokenizer
    return exported


@contextmanager
def pooler_attached(backbone):
    """The backbone with the pooler it was loaded with (POOLER_FOR_EXPORT) back in place, for saving: the export
    then holds every weight its config.json builds, and loads without a report of missing keys."""
    pooler = backbone.__dict__.get(POOLER_FOR_EXPORT)
    if pooler is None or getattr(backbone, "pooler", None) is not None:
        yield backbone
        return
    backbone.pooler = pooler
    try:
        yield backbone
    finally:
        backbone.pooler = None


def _write_sentence_transformers_tree(out: Path, backbone, tokenizer, cfg: ModelConfig, side: str | None) -> None:
    with pooler_attached(backbone):
        backbone.save_pretrained(out, safe_serialization=True)
    export_tokenizer(tokenizer, cfg).save_pretrained(out)
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
    if cfg.pool_exclude_prefix:
        pooling["include_prompt"] = False  # sentence-transformers then pools without the prompt's tokens
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
    return "\n".join(lines + card_sections(metrics, config))


def card_sections(metrics: dict | None, config) -> list[str]:
    """A model card's metrics table and training config (the single- and multi-vector exports' cards share them)."""
    lines = []
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
        lines.append("")
    if config:
        lines += ["## Training config", "", "```json", json.dumps(to_jsonable(config), indent=2), "```", ""]
    return lines


def export_model(
    encoder: BiEncoder, tokenizer, out_dir: str | Path, *, metrics: dict | None = None, config: Any = None
) -> Path:
    """Write the encoder to `out_dir` for sentence-transformers and HF; returns the directory.

    LoRA adapters (model.lora_r) are merged into the encoder's weights first, in place: the export is a
    plain model that needs no peft, and the encoder computes the same embeddings as before. A model.multivector
    encoder is written for sentence-transformers' MultiVectorEncoder instead (embedscale/export_multivector.py)."""
    if encoder.cfg.multivector:
        from embedscale.export_multivector import export_multivector

        return export_multivector(encoder, tokenizer, out_dir, metrics=metrics, config=config)
    out = Path(out_dir)
    encoder.merge_adapters()
    refuse_nonfinite(encoder, out)
    cfg = encoder.cfg
    with atomic_directory(out) as tmp:
        if encoder.shared:
            _write_sentence_transformers_tree(tmp, encoder.query_backbone, tokenizer, cfg, None)
        else:
            for side in SIDES:
                _write_sentence_transformers_tree(tmp / side, encoder.backbone(side), tokenizer, cfg, side)
        _write_json(tmp / EXPORT_META, {"model": cfg, "metrics": metrics or {}})
        (tmp / "README.md").write_text(_model_card(cfg, metrics, config))
    return out


def refuse_nonfinite(encoder: BiEncoder, out: Path) -> None:
    """Nothing non-finite is ever exported, in any format."""
    bad = [name for name, p in encoder.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise ValueError(
            f"refusing to export {out}: {len(bad)} parameter tensor(s) hold NaN or inf (e.g. {bad[0]}); the training "
            "diverged -- nothing non-finite is ever exported: lower optim.lr or optim.weight_decay, keep "
            "trainer.gradient_clip_val > 0 (docs/reliability.md)"
        )


@contextmanager
def atomic_directory(out: Path):
    """Write a directory under a temporary name beside `out`, then rename it into place: `out` is either the
    previous complete directory or the new complete one, never a mix of two exports nor a half-written one (a full
    disk or a kill mid-export leaves only `<out>.tmp-<pid>`, which nothing loads). A previous `out` is replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def resolve_init_from(init_from: str) -> tuple[str, dict]:
    """(export directory, parent record) of `init_from`: a run directory holding model/, or an export."""
    path = Path(init_from).expanduser().resolve()
    for candidate in (path / "model", path):
        if (candidate / EXPORT_META).is_file():
            break
    else:
        raise ValueError(
            f"init_from={init_from!r}: neither {path / 'model'} nor {path} is an embedscale export (no {EXPORT_META}); "
            "give a training run directory whose export succeeded (export=true) or its model/ directory"
        )
    parent: dict = {"path": str(candidate)}
    run_metrics = candidate.parent / "metrics.json"
    if candidate.name == "model" and run_metrics.is_file():
        done = json.loads(run_metrics.read_text())
        parent.update(run_dir=str(candidate.parent), model=done.get("model"), eval=done.get("eval", {}).get("after"))
    return str(candidate), parent
