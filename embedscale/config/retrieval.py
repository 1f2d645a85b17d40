"""`index.*`, `mine.*`, `generate.*`, `sweep.*` and `onnx.*`: searching a corpus, mining hard negatives from it,
generating synthetic queries for it, sweeping index settings, and exporting the encoder for inference runtimes."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from embedscale.config.choices import (
    IndexKind,
    MineFormat,
    MineMethod,
    MineSample,
    OnnxQuantize,
    SweepPrecision,
    TorchDtype,
    TriState,
)
from embedscale.config.fields import bounded, check_fields


@dataclass
class IndexConfig:
    """The faiss index used for dense mining (and its scale benchmark). See retrieval/index.py."""

    kind: IndexKind = IndexKind.flat
    """flat (exact inner product), ivf, hnsw or ivfpq (approximate; for millions of documents)."""
    nlist: int = bounded(0, ge=0)
    """IVF cells; 0: about 4 x sqrt(N), at most N // 39 (faiss wants >= 39 training points per cell)."""
    nprobe: int = bounded(32, ge=1)
    """IVF cells searched per query (recall vs speed)."""
    hnsw_m: int = bounded(32, ge=2)
    """HNSW: links per node (recall and memory vs speed)."""
    ef_search: int = bounded(128, ge=1)
    """HNSW: candidates kept during a search (recall vs speed)."""
    pq_m: int = bounded(0, ge=0)
    """PQ sub-vectors (must divide the dim); 0: dim // 8."""
    gpu: str = field(default="auto", metadata={"choices": TriState})
    """auto: a GPU index when faiss-gpu and CUDA are present; true: require one; false: CPU."""
    train_size: int = bounded(262_144, ge=1)
    """At most this many vectors (a seeded sample) train IVF/PQ."""

    def __post_init__(self) -> None:
        check_fields(self, "index")


@dataclass
class MineConfig:
    """`embedscale mine`: hard negatives for (query, positive) data, written as training shards (docs/mining.md)."""

    input: str = "scifact"
    """The (query, positive) data: a BEIR directory, a JSONL/TSV/CSV file, an HF save_to_disk directory or a
    directory written by `embedscale shard`; relative to data_root unless absolute."""
    format: MineFormat = MineFormat.beir
    """beir, jsonl, tsv, csv, hf or shards."""
    split: str = "train"
    """qrels split (beir) or DatasetDict split (hf)."""
    query_field: str = "query"
    """Field (jsonl, hf) or column (tsv, csv) holding the query."""
    positive_field: str = "positive"
    """Field or column holding the positive."""
    negatives_field: str = "negatives"
    """Field or column prefix holding existing negatives (kept out of the mined ones' places)."""
    corpus: str | None = None
    """Documents to mine from besides the data's positives: a BEIR directory (its corpus.jsonl) or a JSONL file
    with a `text` field (optional `_id`, `title`). A BEIR input mines from its own corpus."""
    method: MineMethod = MineMethod.dense
    """dense (the model + a faiss index), bm25 (bm25s) or hybrid (reciprocal-rank fusion of both)."""
    depth: int = bounded(0, ge=0)
    """Candidates retrieved per query; 0: window_end + 50 (room for fill and filters)."""
    num_negatives: int = bounded(7, ge=1)
    """Negatives written per sample."""
    window_start: int = bounded(0, ge=0)
    """First candidate rank (0-based, positives included in the count) that may become a negative."""
    window_end: int = bounded(50, ge=1)
    """One past the last rank of the window."""
    sample: MineSample = MineSample.top
    """top: the best-ranked eligible candidates of the window; random: a seeded sample of them."""
    margin: float | None = bounded(None, ge=0)
    """Drop candidates scoring >= positive's score - margin (retriever scores). None: off."""
    relative_margin: float | None = bounded(None, ge=0, le=1)
    """Drop candidates scoring >= (1 - relative_margin) x positive's score (0.05: NV-Retriever's 95%). None: off."""
    cross_encoder: str | None = None
    """A cross-encoder (`embedscale reranker` output or HF model) scoring the window's candidates. None: off."""
    ce_threshold: float | None = bounded(None, gt=0, le=1)
    """With cross_encoder: drop candidates with sigmoid(logit) >= this."""
    ce_margin: float | None = None
    """With cross_encoder: drop candidates whose logit >= the positive's logit - ce_margin."""
    ce_batch_size: int = bounded(64, ge=1)
    """With cross_encoder: (query, document) pairs per forward."""
    ce_max_length: int = bounded(256, ge=1)
    """With cross_encoder: token budget of a pair."""
    fill: bool = True
    """Fewer eligible negatives than num_negatives in the window: continue past it (counted in the manifest);
    then random_fill; a sample that still has too few is an error naming it, unless allow_fewer."""
    random_fill: bool = True
    """Still too few after fill: add uniformly random corpus documents (never a positive; rank -1, counted in
    the manifest). Random documents are almost never relevant: the safe fallback when margins leave a
    query (typically one the mining model ranks badly) without candidates."""
    allow_fewer: bool = False
    """Keep samples with fewer than num_negatives negatives (counted); training then needs a lower
    data.num_hard_negatives or data.on_error=skip."""
    checkpoint: str | None = None
    """A Lightning checkpoint (.ckpt of `embedscale train`) whose weights replace model.name_or_path's."""
    output: str | None = None
    """Output directory; None: shards/<name>."""
    name: str | None = None
    """Dataset name of the output (shard prefix, the samples' `source`). Default: <input stem>-<method>."""
    overwrite: bool = False
    """Replace an existing output dataset (its manifest's files); otherwise an existing manifest is an error."""
    batch_size: int = bounded(64, ge=1)
    """Texts per encoding batch."""
    max_length: int | None = bounded(None, ge=1)
    """Token budget of documents at encoding; None: model.document_max_length."""
    cache_dir: str | None = None
    """Corpus embedding cache; None: $EMBEDSCALE_CACHE or ~/.cache/embedscale."""
    target_mb: float = bounded(64.0, gt=0)
    """Close an output shard before it exceeds this size (MB = 2**20 bytes)."""
    seed: int = 0
    """Seeds random window sampling and random fill (per sample, from its key)."""

    def __post_init__(self) -> None:
        check_fields(self, "mine")
        if not 0 <= self.window_start < self.window_end:
            raise ValueError(
                f"mine.window_start={self.window_start} and mine.window_end={self.window_end}: need 0 <= start < end"
            )
        if self.depth and self.depth < self.window_end:
            raise ValueError(f"mine.depth={self.depth} < mine.window_end={self.window_end}: raise mine.depth or use 0")
        if (self.ce_threshold is not None or self.ce_margin is not None) and not self.cross_encoder:
            raise ValueError("mine.ce_threshold/mine.ce_margin need mine.cross_encoder (a model path)")

    @property
    def candidates(self) -> int:
        return self.depth or self.window_end + 50


DEFAULT_PROMPTS = {
    "retrieval": "Write a question that this passage answers.\nPassage: {document}\nQuestion:",
    "claim": "Write a scientific claim that this passage supports or refutes.\nPassage: {document}\nClaim:",
    "title": "Write a search query for this article.\nTitle: {title}\nArticle: {document}\nQuery:",
}
"""generate.prompts' defaults: `{document}` is the passage (truncated to generate.max_document_tokens), `{title}` its
title; without `{title}` in a template, the title is the start of `{document}` (as BEIR joins them)."""


@dataclass
class GenerateConfig:
    """`embedscale generate`: synthetic queries for a corpus from a causal or seq2seq LM, kept when a round-trip
    filter retrieves their document, written as training shards with provenance (docs/generate.md)."""

    corpus: str = "scifact"
    """The documents: a BEIR directory (its corpus.jsonl[.gz]) or a JSONL[.gz] file with generate.text_field
    (optional generate.title_field and `_id`/`id`); relative to data_root unless absolute."""
    text_field: str = "text"
    """JSONL corpus: the field holding a document's text (a BEIR corpus uses `text`)."""
    title_field: str = "title"
    """JSONL corpus: the field holding a document's title, if any (a BEIR corpus uses `title`)."""
    max_documents: int | None = bounded(None, ge=1)
    """Generate for the first max_documents documents of the corpus (file order); None: all. The round-trip
    filter still searches the whole corpus."""
    lm: str | None = None
    """The language model: a local directory or a hub id (required). Causal (AutoModelForCausalLM) or
    encoder-decoder (AutoModelForSeq2SeqLM), told apart by its config's `is_encoder_decoder`. The prompt is
    given as plain text (no chat template)."""
    torch_dtype: TorchDtype = TorchDtype.auto
    """Parameter dtype of the LM: auto (the checkpoint's), float32, bfloat16 or float16."""
    task: str = "retrieval"
    """The key of generate.prompts whose template is used."""
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """Prompt templates by task: each holds `{document}` and may hold `{title}` (literal braces as `{{ }}`); add
    one with `+generate.prompts.my_task='...'` and select it with generate.task=my_task."""
    queries_per_document: int = bounded(3, ge=1)
    """Queries generated per document (each its own sampled sequence, seeded by (seed, document id, index))."""
    max_document_tokens: int = bounded(256, ge=1)
    """The passage put into the prompt is cut to this many tokens of the LM's tokenizer (the written positive is
    the whole document)."""
    max_new_tokens: int = bounded(48, ge=1)
    """Tokens generated per query at most; the query is then the first non-empty line of the output."""
    do_sample: bool = True
    """Sample (temperature, top_p); false: greedy decoding (then every query of a document is the same, and all
    but one are removed as duplicates: use queries_per_document=1)."""
    temperature: float = bounded(0.8, gt=0)
    """Sampling temperature (do_sample=true)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens with this much probability (do_sample=true; 1: off)."""
    batch_size: int = bounded(16, ge=1)
    """Prompts per generate call (transformers), rows of similar length batched together."""
    seed: int = bounded(0, ge=0, le=2**63 - 1)
    """Seeds each query's sampling from (seed, document id, query index): the same queries whatever the batch
    composition, the number of ranks or the documents around it."""
    use_vllm: str = field(default="auto", metadata={"choices": TriState})
    """auto: vLLM when it is installed and a GPU is present, else transformers; true: require vLLM; false:
    transformers. vLLM seeds each request the same way, but its numbers differ from transformers'."""
    filter_top_k: int = bounded(1, ge=0)
    """Round-trip filter: keep a (query, document) pair only when the filter model (model.*) ranks that document
    within the top filter_top_k of the whole corpus for the query (1: Promptagator's consistency filter); 0: off."""
    filter_batch_size: int = bounded(64, ge=1)
    """Texts per encoding batch of the filter model."""
    cache_dir: str | None = None
    """The filter's corpus embedding cache; None: $EMBEDSCALE_CACHE or ~/.cache/embedscale."""
    output: str | None = None
    """Output directory of the shards; None: shards/<name>."""
    name: str | None = None
    """Dataset name (shard prefix, the samples' `source`). Default: <corpus stem>-generated."""
    overwrite: bool = False
    """Replace an existing output dataset (only the files its manifest lists); otherwise an existing manifest is an
    error."""
    target_mb: float = bounded(64.0, gt=0)
    """Close an output shard before it exceeds this size (MB = 2**20 bytes)."""

    def __post_init__(self) -> None:
        check_fields(self, "generate")
        if self.task not in self.prompts:
            raise ValueError(
                f"generate.task={self.task!r} has no template in generate.prompts (it has {sorted(self.prompts)}): "
                f"choose one of them or add '+generate.prompts.{self.task}=\"...{{document}}...\"'"
            )
        for task, template in self.prompts.items():
            check_template(template, f"generate.prompts.{task}")
        if self.name is not None and (not self.name or any(c in self.name for c in "./\\")):
            raise ValueError(f"generate.name={self.name!r} must be non-empty, without '.', '/' or '\\' (shard keys)")

    def validate(self) -> None:
        """Checks of values the user must give (see RerankerConfig.validate); `to_config` calls it."""
        if not self.lm:
            raise ValueError(
                "generate.lm is not set: pass a causal or seq2seq language model, a local directory or a hub id, "
                "e.g. generate.lm=google/flan-t5-base or generate.lm=Qwen/Qwen2.5-0.5B-Instruct"
            )

    @property
    def template(self) -> str:
        return self.prompts[self.task]


def check_template(template: str, key: str) -> None:
    """A prompt template holds `{document}`, optionally `{title}`, nothing else between braces (ValueError naming
    `key`)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{key}: {err} in {template!r}: write literal braces as '{{{{' and '}}}}'") from err
    unknown = sorted(set(fields) - {"document", "title"})
    if "document" not in fields or unknown:
        raise ValueError(
            f"{key}={template!r} must hold {{document}} (the passage), may hold {{title}}, and nothing else in "
            f"braces (found {unknown or 'no {document}'}); write literal braces as '{{{{' and '}}}}'"
        )


@dataclass
class SweepConfig:
    """`embedscale sweep`: retrieval metrics vs Matryoshka dim and vs index precision, from one encoding."""

    dims: list[int] = field(default_factory=list)
    """Matryoshka dims measured at fp32; empty: powers of two from 32 below the model's dim, plus the full dim."""
    precisions: list[SweepPrecision] = field(default_factory=lambda: list(SweepPrecision))
    """Index precisions (docs/evaluation.md): fp32, int8, binary, binary_rescore, binary_rescore_int8; [] skips them."""
    quantization_dims: list[int] = field(default_factory=list)
    """Dims at which every precision is measured; empty: the model's full dim only."""
    rescore_multiplier: int = bounded(4, ge=1)
    """binary_rescore*: candidates re-scored per query = rescore_multiplier x 100 (the depth of recall@100)."""
    output: str | None = None
    """sweep.json path; None: <run dir>/sweep.json. RUN_DIR/sweep.json adds the sweep to `embedscale report RUN_DIR`."""

    def __post_init__(self) -> None:
        check_fields(self, "sweep")
        for key in ("dims", "quantization_dims"):
            if any(d < 1 for d in getattr(self, key)):
                raise ValueError(f"sweep.{key} must be positive dims, got {list(getattr(self, key))}")


@dataclass
class OnnxConfig:
    """`embedscale export`: the model as ONNX graphs (tokens in, the model's embeddings out), checked against
    PyTorch before they are kept (embedscale/export_onnx.py, docs/export.md)."""

    output: str | None = None
    """Directory written; None: <model.name_or_path>/onnx for a local model (a hub model needs a path)."""
    overwrite: bool = False
    """Replace an existing ONNX export in `output` (only the files its embedscale_onnx.json lists)."""
    quantize: OnnxQuantize = OnnxQuantize.none
    """int8: also write <tower>.int8.onnx, onnxruntime's dynamic quantisation (int8 weights per output channel,
    activations quantised per batch at run time); its cosine to PyTorch is reported, not required."""
    opset: int = bounded(18, ge=18, le=23)
    """ONNX opset of the graphs (torch.onnx's exporter writes 18 or newer)."""
    check_texts: int = bounded(16, ge=1, le=10_000)
    """Texts of different lengths encoded by PyTorch and by onnxruntime before the export is kept."""
    min_cosine: float = bounded(0.9999, gt=0, le=1)
    """The fp32 graph's smallest cosine to PyTorch over those texts; below it the export is removed and refused."""

    def __post_init__(self) -> None:
        check_fields(self, "onnx")


@dataclass
class HubConfig:
    """`embedscale export`: publishing the export folder (the model and its onnx/) to the Hugging Face Hub. Nothing
    is uploaded unless hub.push=true; hub.dry_run_dir writes what would be uploaded to a local folder instead."""

    repo_id: str | None = None
    """The Hub repository, "<user or org>/<name>"; None: nothing is published."""
    push: bool = False
    """Upload for real (needs network and a token: `huggingface-cli login` or HF_TOKEN). False: a dry run or nothing."""
    dry_run_dir: str | None = None
    """Copy exactly the files that would be uploaded to <dry_run_dir>/<name>/, with upload_plan.json; no network."""
    private: bool = True
    """Create the repository as private (when it does not exist yet)."""

    def __post_init__(self) -> None:
        if self.repo_id is not None and (self.repo_id.count("/") != 1 or not all(self.repo_id.split("/"))):
            raise ValueError(f"hub.repo_id={self.repo_id!r} must be '<user or org>/<name>'")
        if self.push and self.dry_run_dir:
            raise ValueError("hub.push=true and hub.dry_run_dir are both set: choose the upload or the dry run")
        if (self.push or self.dry_run_dir) and self.repo_id is None:
            raise ValueError("hub.push or hub.dry_run_dir is set without hub.repo_id: name the repository")
