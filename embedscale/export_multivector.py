"""Export a multi-vector (model.multivector) BiEncoder as a sentence-transformers `MultiVectorEncoder` folder.

Layout of `<dir>`, shared towers -- what `MultiVectorEncoder(modules=[Transformer, Dense, MultiVectorMask,
Normalize]).save(dir)` writes (sentence-transformers 6.3), so `MultiVectorEncoder(dir)` loads it:
  config.json, model.safetensors, tokenizer files  -> the backbone (also `AutoModel.from_pretrained(dir)`)
  sentence_bert_config.json                        -> Transformer: query_length / document_length / query_expansion
  1_Dense/config.json, 1_Dense/model.safetensors   -> the projection (`linear.weight`, no bias, identity activation)
  2_MultiVectorMask/config.json                    -> skiplist_words: document tokens encoded but not scored
  3_Normalize/config.json                          -> L2 normalisation of every token vector
  modules.json, config_sentence_transformers.json  -> model_type MultiVectorEncoder, prompts, similarity maxsim
  embedscale.json                                  -> model.* settings and, per side, the projection's file
  README.md                                        -> model card
Separate towers (model.shared_towers=false): module 0 is a Router (router_config.json) sending task "query" through
query/ + query_1_Dense/ and "document" through document/ + document_1_Dense/, then 1_MultiVectorMask/ and
2_Normalize/. query/ and document/ are the backbones (with the Transformer's config), as `load_encoder` reads them.

Why: one folder that both sentence-transformers (`encode_query` / `encode_document` / `similarity`) and embedscale
(`load_encoder`, which restores the model.* settings from embedscale.json and the projections from the files it
names) load, with the same token matrices. The files are written directly, as export.py does (no re-load of the
backbone); the round trip is tested (tests/test_multivector_export.py).

How embedscale's settings map to sentence-transformers' knobs:
  query_prefix / document_prefix -> prompts {"query": ..., "document": ...} (prepended as text, as tokenize does)
  query_augment_length = A       -> Transformer.query_expansion {"strategy": "fixed", "length": A,
                                    "attend": attend_to_expansion_tokens, "token": the tokenizer's mask token, else
                                    its pad token (embedscale's fill; sentence-transformers would fall back to EOS)}
  query_augment_length = null    -> no query_expansion, Transformer.query_length = query_max_length
  document_max_length            -> Transformer.document_length
  skip_punctuation               -> MultiVectorMask.skiplist_words = the vocabulary's punctuation-only tokens
                                    (`punctuation_ids`, as token strings; skiplist_tasks ["document"]); [] when off
  multivector_dim + projections  -> Dense(hidden, multivector_dim, bias=False, Identity) on token_embeddings
  shared_towers=false            -> Router.for_query_document
Refused (ValueError naming the setting), because sentence-transformers cannot reproduce them:
  query_max_length < query_augment_length: with query_expansion, sentence-transformers truncates queries at the
    expansion length itself, where embedscale truncates at query_max_length and pads the rest with expansion tokens;
  an appended EOS (model.append_eos) that the exported tokenizer cannot append itself (export.export_tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedscale.config import ModelConfig
from embedscale.encoder.biencoder import EXPORT_META, SIDES, BiEncoder
from embedscale.encoder.tokenize import eos_to_append, punctuation_ids, tokenizer_ends_with_eos
from embedscale.export import (
    _write_json,
    atomic_directory,
    export_tokenizer,
    pooler_attached,
    refuse_nonfinite,
)

ST = "sentence_transformers"
TRANSFORMER = f"{ST}.base.modules.transformer.Transformer"
DENSE = f"{ST}.base.modules.dense.Dense"
MASK = f"{ST}.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask"
NORMALIZE = f"{ST}.base.modules.normalize.Normalize"
ROUTER = f"{ST}.base.modules.router.Router"
PROJECTION_KEY = "linear.weight"  # the Dense module's state dict
"""embedscale.json's "projection" maps each side to the safetensors file (relative to the export) holding its
projection weight under this key; `load_encoder` reads it from there."""


def check_exportable(tokenizer, cfg: ModelConfig) -> Any:
    """The tokenizer to export; ValueError naming the setting that sentence-transformers cannot reproduce."""
    if cfg.query_augment_length is not None and cfg.query_max_length != cfg.query_augment_length:
        raise ValueError(
            f"model.query_max_length={cfg.query_max_length} is below model.query_augment_length="
            f"{cfg.query_augment_length}: sentence-transformers' query expansion truncates queries at the expansion "
            "length, not before it, so a multi-vector export would encode long queries differently. Train with "
            "model.query_max_length equal to model.query_augment_length (ColBERT: both 32)"
        )
    exported = export_tokenizer(tokenizer, cfg)
    if eos_to_append(tokenizer, cfg) is not None and not tokenizer_ends_with_eos(exported):
        raise ValueError(
            f"model.append_eos: the tokenizer of {cfg.name_or_path} cannot be made to append EOS itself (a slow "
            "tokenizer, or a post-processor other than [BOS] $A), so sentence-transformers would encode texts "
            "without the EOS embedscale appends: set model.append_eos=false, or use a fast tokenizer"
        )
    return exported


def transformer_config(cfg: ModelConfig, tokenizer) -> dict[str, Any]:
    """sentence_bert_config.json of the Transformer module (lengths and query expansion as embedscale's tokenize)."""
    config: dict[str, Any] = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "document_length": cfg.document_max_length,
    }
    if cfg.query_augment_length is None:
        config["query_length"] = cfg.query_max_length
    else:
        fill = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.pad_token_id
        config["query_expansion"] = {
            "strategy": "fixed",
            "attend": cfg.attend_to_expansion_tokens,
            "token": tokenizer.convert_ids_to_tokens(fill),
            "length": cfg.query_augment_length,
        }
    return config


def _write_tower(out: Path, dense_dir: Path, backbone, projection, tokenizer, cfg: ModelConfig) -> None:
    """One tower: the backbone with its tokenizer and Transformer config in `out`, the projection in `dense_dir`."""
    from safetensors.torch import save_file

    with pooler_attached(backbone):
        backbone.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_json(out / "sentence_bert_config.json", transformer_config(cfg, tokenizer))
    dense = {
        "in_features": projection.in_features,
        "out_features": projection.out_features,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
        "module_input_name": "token_embeddings",
        "module_output_name": "token_embeddings",
    }
    _write_json(dense_dir / "config.json", dense)
    save_file({PROJECTION_KEY: projection.weight.detach().cpu().contiguous()}, dense_dir / "model.safetensors")


def _model_card(cfg: ModelConfig, metrics: dict | None, config: Any) -> str:
    augment = f"queries expanded to {cfg.query_augment_length} tokens" if cfg.query_augment_length else "no expansion"
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, embedscale, multi-vector, colbert, late-interaction]",
        "---",
        "",
        f"# Multi-vector (ColBERT-style) model fine-tuned with embedscale from `{cfg.name_or_path}`",
        "",
        f"{cfg.multivector_dim}-dim token vectors scored by MaxSim; {augment}; query prefix {cfg.query_prefix!r}, "
        f"document prefix {cfg.document_prefix!r}, max length {cfg.query_max_length}/{cfg.document_max_length}.",
        "",
        "```python",
        "from sentence_transformers import MultiVectorEncoder",
        'model = MultiVectorEncoder("PATH")',
        'scores = model.similarity(model.encode_query(["a query"]), model.encode_document(["a document"]))',
        "```",
        "",
    ]
    from embedscale.export import card_sections

    return "\n".join(lines + card_sections(metrics, config))


def export_multivector(
    encoder: BiEncoder, tokenizer, out_dir: str | Path, *, metrics: dict | None = None, config: Any = None
) -> Path:
    """Write a model.multivector encoder to `out_dir` in the layout of the module docstring; returns the directory.

    ValueError (before anything is written or merged) for a setting sentence-transformers cannot reproduce. LoRA
    adapters are merged into the weights first, in place, as export_model does."""
    cfg = encoder.cfg
    if not cfg.multivector:
        raise ValueError("export_multivector needs a model.multivector=true encoder (export_model exports the others)")
    exported = check_exportable(tokenizer, cfg)
    out = Path(out_dir)
    encoder.merge_adapters()
    refuse_nonfinite(encoder, out)
    skiplist = tokenizer.convert_ids_to_tokens(punctuation_ids(tokenizer).tolist()) if cfg.skip_punctuation else []
    mask = {"skiplist_words": skiplist, "skiplist_tasks": ["document"], "keep_only_token_ids": None}
    # Per side, (backbone folder, projection folder); shared towers have one of each.
    folders = {side: ("", "1_Dense") if encoder.shared else (side, f"{side}_1_Dense") for side in SIDES}
    with atomic_directory(out) as tmp:
        for side in SIDES[:1] if encoder.shared else SIDES:
            backbone_dir, dense_dir = folders[side]
            projection = getattr(encoder, f"{side}_projection")
            _write_tower(tmp / backbone_dir, tmp / dense_dir, encoder.backbone(side), projection, exported, cfg)
        if encoder.shared:
            modules = [("", TRANSFORMER), ("1_Dense", DENSE), ("2_MultiVectorMask", MASK), ("3_Normalize", NORMALIZE)]
        else:
            router = {
                "types": {name: kind for b, d in folders.values() for name, kind in ((b, TRANSFORMER), (d, DENSE))},
                "structure": {side: list(folders[side]) for side in SIDES},
                "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
            }
            _write_json(tmp / "router_config.json", router)
            modules = [("", ROUTER), ("1_MultiVectorMask", MASK), ("2_Normalize", NORMALIZE)]
        _write_json(tmp / "modules.json", [
            {"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)
        ])  # fmt: skip
        (mask_dir, _), (normalize_dir, _) = modules[-2:]
        _write_json(tmp / mask_dir / "config.json", mask)
        _write_json(tmp / normalize_dir / "config.json", {"module_input_name": "token_embeddings"})
        _write_json(
            tmp / "config_sentence_transformers.json",
            {
                "model_type": "MultiVectorEncoder",
                "prompts": {"query": cfg.query_prefix, "document": cfg.document_prefix},
                "default_prompt_name": None,
                "similarity_fn_name": "maxsim",
            },
        )
        projections = {side: f"{folders[side][1]}/model.safetensors" for side in SIDES}
        _write_json(tmp / EXPORT_META, {"model": cfg, "metrics": metrics or {}, "projection": projections})
        (tmp / "README.md").write_text(_model_card(cfg, metrics, config))
    return out
