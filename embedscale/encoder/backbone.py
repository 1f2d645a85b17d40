"""What is done to a loaded HF backbone before training: bidirectional attention, gradient checkpointing,
LoRA -- in that order, and undone (LoRA merged) at export.

The order matters: attention flags and checkpointing are set on the plain HF model, whose methods peft's
wrapper would otherwise hide; LoRA comes last so that only its adapters are trainable.

- Bidirectional attention uses transformers' own switch: `config.is_causal = False` makes
  `masking_utils.create_causal_mask` build a padding-only mask, and transformers 5.x also passes it to
  the attention functions (so an export, whose config.json carries it, loads bidirectional). Without
  padding no mask is built and attention kernels may fall back to each attention module's `is_causal`
  flag (flash attention does), so those flags are cleared too. Architectures that do not build their
  mask through `masking_utils` have no such switch: they fail here, naming the key, instead of
  training a silently causal model.
- Gradient checkpointing is non-reentrant (`use_reentrant=False`): it needs no input that requires
  grad, so it composes with LoRA's frozen embeddings without `enable_input_require_grads`.
- LoRA (peft) freezes every base weight; the adapters live in the module's state_dict, so Lightning
  checkpoints and resume carry them. `merge_lora` folds them into the weights for export, so that an
  export loads in sentence-transformers and `AutoModel` without peft.
"""

from __future__ import annotations

import logging
import sys

from torch import nn

from embedscale.config import ModelConfig

log = logging.getLogger(__name__)

DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ENCODER_LORA_TARGETS = ["query", "key", "value"]


def adapt_backbone(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply model.bidirectional, model.gradient_checkpointing and model.lora_* to a loaded backbone."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # an embedding forward never decodes: no KV cache per forward
    if cfg.bidirectional:
        make_bidirectional(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora_r:
        return add_lora(model, cfg)
    if cfg.lora_target_modules:
        log.warning("model.lora_target_modules has no effect with model.lora_r=0 (LoRA off)")
    return model


def make_bidirectional(model: nn.Module) -> None:
    """Non-causal attention for a decoder whose transformers implementation builds its mask with masking_utils."""
    modeling = sys.modules.get(type(model).__module__)
    uses_masking = any(hasattr(modeling, f) for f in ("create_causal_mask", "create_sliding_window_causal_mask"))
    causal = [m for m in model.modules() if getattr(m, "is_causal", None) is True]
    arch = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')})"
    if uses_masking and not causal and not getattr(model.config, "is_decoder", False):
        log.warning("model.bidirectional=true has no effect: %s attends bidirectionally already", arch)
        return
    if not uses_masking or not causal:
        raise ValueError(
            f"model.bidirectional=true is not supported for {arch}: its transformers implementation has no "
            "switch to non-causal attention (masking_utils.create_causal_mask and is_causal attention modules); "
            "set model.bidirectional=false"
        )
    model.config.is_causal = False  # masks: padding only (saved in config.json)
    for module in causal:
        module.is_causal = False  # SDPA / flash attention read this when no mask is passed (no padding)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing=true: {type(model).__name__} does not support gradient checkpointing; "
            "set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def default_lora_targets(model: nn.Module) -> list[str] | None:
    """q/k/v/o projections of decoders, query/key/value of BERT-style encoders; None: peft's default."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for targets in (DECODER_LORA_TARGETS, ENCODER_LORA_TARGETS):
        if set(targets) <= names:
            return list(targets)
    return None


def add_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap the backbone in peft LoRA adapters (model.lora_*); only the adapters stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ValueError("model.lora_r > 0 needs peft: pip install peft (or set model.lora_r=0)") from err
    targets = list(cfg.lora_target_modules) or default_lora_targets(model)
    dims = [
        min(m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets or [])
    ]
    if dims and cfg.lora_r > min(dims):
        raise ValueError(
            f"model.lora_r={cfg.lora_r} is above the rank of the smallest adapted layer (min(in, out) = {min(dims)}): "
            f"set model.lora_r <= {min(dims)} (LoRA ranks of 8 to 64 are usual)"
        )
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    try:
        wrapped = get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(f"model.lora_target_modules={targets}: {err} -- name the Linear modules to adapt") from err
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    where = targets or "peft's default modules"
    log.info("LoRA r=%d on %s: %d of %d parameters trainable", cfg.lora_r, where, trainable, total)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain HF model with LoRA folded into its weights (in place); any other model unchanged."""
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
