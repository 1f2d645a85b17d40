"""A model's shape for the memory planner (embedscale/strategy/memory.py): layers, widths, heads, vocabulary,
parameter counts, from plan.* where given, else from the model's config.json (read without loading weights).

Legend: P = parameters, L = layers, h = hidden, a = heads, i = intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedscale.config import PLAN_SHAPE_KEYS, ModelConfig, PlanConfig, Pooling

GATED_MLP_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


@dataclass
class ModelShape:
    """What the planner needs of a transformer."""

    params: float
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    """SwiGLU MLP (decoders: three h x i matrices) instead of BERT's two; for the activations also RMSNorm (fp32
    upcast) and rotary embeddings instead of LayerNorm and learned positions: the Llama family."""
    dropout: bool
    """Dropout active in training (stores 1-byte masks)."""
    source: str

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def layer_params(self) -> float:
        """One transformer layer's weights (from the shape; with a plan.params override, the non-embedding
        share of it, (P - vocab x h) / L)."""
        return (self.params - self.vocab * self.hidden) / self.layers

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank r on every layer: r x (in + out) per adapted matrix; decoders adapt
        q, k, v, o (k, v are h -> kv_dim), BERT-style encoders query, key, value (embedscale's defaults)."""
        if r == 0:
            return 0
        h, kv = self.hidden, self.kv_dim
        per_layer = 2 * r * (h + h) + 2 * r * (h + kv) if self.gated_mlp else 3 * r * (h + h)
        return per_layer * self.layers


def count_params(
    *, hidden: int, layers: int, kv_dim: int, intermediate: int, vocab: int, gated_mlp: bool, positions: int = 0
) -> int:
    """Parameters of the bare backbone (no pooler, no LM head), as embedscale loads it.

    BERT-style: (vocab + positions + 2) h + 2h + L (4h^2 + 2hi + 9h + i)   [all-MiniLM-L6-v2: 22,565,376]
    decoder:    vocab h + h + L (2h^2 + 2h kv_dim + 3hi + 2h)              [Mistral-7B: 7,110,660,096]
    """
    h, i = hidden, intermediate
    if gated_mlp:
        return vocab * h + h + layers * (2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h)
    return (vocab + positions + 2) * h + 2 * h + layers * (4 * h * h + 2 * h * i + 9 * h + i)


def resolve_shape(model: ModelConfig, plan: PlanConfig) -> ModelShape:
    """The model's shape: model.name_or_path's config.json (read offline where it is local), with every
    non-null plan.<key> of PLAN_SHAPE_KEYS on top. Without a readable config, plan.hidden, plan.layers,
    plan.heads, plan.intermediate and plan.vocab are required (then the MLP is SwiGLU and dropout off when
    model.pooling=last_token, a decoder, else BERT-style)."""
    given = {k: getattr(plan, k) for k in PLAN_SHAPE_KEYS if getattr(plan, k) is not None}
    needed = ("hidden", "layers", "heads", "intermediate", "vocab")
    if all(k in given for k in needed):
        decoder = model.pooling is Pooling.last_token
        shape = dict(gated_mlp=decoder, dropout=not decoder, positions=0 if decoder else 512, source="plan.*")
    else:
        shape = _shape_from_config(model.name_or_path, given, needed)
    heads = given.get("heads", shape.get("heads"))
    values = {k: given.get(k, shape.get(k)) for k in needed}
    kv_heads = given.get("kv_heads", shape.get("kv_heads") or heads)
    if values["hidden"] % heads or heads % kv_heads:
        raise ValueError(
            f"plan.hidden={values['hidden']}, plan.heads={heads}, plan.kv_heads={kv_heads}: "
            "hidden must divide by heads, heads by kv_heads"
        )
    kv_dim = values["hidden"] * kv_heads // heads
    counted = count_params(
        hidden=values["hidden"],
        layers=values["layers"],
        kv_dim=kv_dim,
        intermediate=values["intermediate"],
        vocab=values["vocab"],
        gated_mlp=shape["gated_mlp"],
        positions=shape["positions"],
    )
    return ModelShape(
        params=float(given.get("params", counted)),
        kv_heads=kv_heads,
        gated_mlp=shape["gated_mlp"],
        dropout=shape["dropout"],
        source=shape["source"],
        **values,
    )


def _shape_from_config(name_or_path: str, given: dict, needed: tuple[str, ...]) -> dict[str, Any]:
    from transformers import AutoConfig

    from embedscale.encoder.biencoder import resolve_model_path

    try:
        hf = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as err:
        missing = [f"plan.{k}" for k in needed if k not in given]
        raise ValueError(
            f"cannot read the config.json of model.name_or_path={name_or_path!r} ({type(err).__name__}): point it "
            f"at a local model, or give the shape: {', '.join(missing)} (and plan.params, plan.kv_heads)"
        ) from err
    hf = getattr(hf, "text_config", hf)
    dropout_keys = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout")
    return {
        "hidden": hf.hidden_size,
        "layers": hf.num_hidden_layers,
        "heads": hf.num_attention_heads,
        "kv_heads": getattr(hf, "num_key_value_heads", None),
        "intermediate": getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
        "vocab": hf.vocab_size,
        "gated_mlp": hf.model_type in GATED_MLP_TYPES,
        "dropout": any((getattr(hf, k, 0) or 0) > 0 for k in dropout_keys),
        "positions": 0
        if hf.model_type in GATED_MLP_TYPES
        else (getattr(hf, "max_position_embeddings", 0) + getattr(hf, "type_vocab_size", 2) - 2),
        "source": f"{name_or_path} config.json ({hf.model_type})",
    }
