"""The language-model side of `embedscale generate`: load a causal or seq2seq LM, build the prompts, and sample
every query from its own seeded stream, in batches split over the ranks (retrieval/generate.py runs the rest).

Why each row has its own stream. transformers samples a batch with one `torch.multinomial` over the global RNG,
so a query would depend on which rows share its batch, on the batch order and on the number of ranks. Here each
row (document, query index) owns a `torch.Generator` seeded by (seed, document id, query index), and decoding is
greedy over the scores after temperature and top-p plus Gumbel noise drawn from that generator: the argmax of
log p + G, with G ~ Gumbel(0, 1) per token, is an exact sample of p (the Gumbel-max trick), and row r's noise at
step t is the t-th draw of its own stream whatever else is in the batch. So:
- the same (seed, document, index) gives the same query in any batch and on any rank, up to the floating-point
  effect of padding (another batch pads a row differently; the argmax moves only on a near tie);
- whole batches go round-robin to the ranks in the order one process runs them (as retrieval/encode.py does), so
  W ranks compute exactly the batches of one process: the same bits (tests/test_generate.py: 2 ranks vs 1).
Greedy decoding (do_sample=false) has no noise and the same properties.

The model's own generation_config.json (a chat model's sampling defaults, repetition penalties) is replaced by
one built from generate.* alone, so the manifest's settings are the settings used.

vLLM (generate.use_vllm): each request gets the same per-row seed (SamplingParams.seed); its kernels and sampler
differ from transformers', so its queries differ from the transformers path's. That path is not covered by the
tests (no vLLM nor GPU on the test machines).

Legend: B = rows in a batch, V = vocabulary, R = rows (documents x queries per document).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from embedscale.config import GenerateConfig


def row_seed(seed: int, doc_id: str, index: int) -> int:
    """The seed of one generated query: a function of (generate.seed, document id, query index) only."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def top_p_mask(scores_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens outside each row's nucleus (the smallest set holding top_p of the probability; the most
    likely token always stays in)."""
    sorted_BV, order_BV = scores_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    outside_sorted_BV = probs_BV.cumsum(dim=-1) - probs_BV > top_p  # the mass before a token already covers top_p
    return outside_sorted_BV.scatter(1, order_BV, outside_sorted_BV)


class SeededSampler(LogitsProcessor):
    """Temperature, top-p, then Gumbel noise from each row's own generator; with greedy decoding, a sample per row
    that depends only on that row's seed (module docstring)."""

    def __init__(self, seeds_B: list[int], *, temperature: float, top_p: float) -> None:
        self.seeds_B, self.temperature, self.top_p = seeds_B, temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores_BV: torch.FloatTensor) -> torch.FloatTensor:
        device = scores_BV.device
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds_B]
        scores_BV = scores_BV.float() / self.temperature
        if self.top_p < 1.0:
            scores_BV = scores_BV.masked_fill(top_p_mask(scores_BV, self.top_p), float("-inf"))
        V = scores_BV.shape[1]
        u_BV = torch.stack([torch.rand(V, generator=g, device=device) for g in self.generators])
        tiny = torch.finfo(u_BV.dtype).tiny
        gumbel_BV = -torch.log(-torch.log(u_BV.clamp(min=tiny, max=1.0 - 1e-7)))
        return scores_BV + gumbel_BV


def load_lm(c: GenerateConfig):
    """(model, tokenizer, provenance) of generate.lm: AutoModelForSeq2SeqLM when its config is an encoder-decoder,
    else AutoModelForCausalLM; on the GPU when there is one. Causal tokenizers pad on the left."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    path = str(Path(c.lm).expanduser()) if Path(c.lm).expanduser().exists() else c.lm
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"generate.lm={c.lm!r} could not be loaded ({str(err).splitlines()[0][:200]}): give a directory with a "
            "config.json, tokenizer and weights, or a hub id that can be downloaded (or is cached) here"
        ) from err
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    dtype = "auto" if c.torch_dtype == "auto" else getattr(torch, c.torch_dtype)
    try:
        model = auto.from_pretrained(path, dtype=dtype)
    except ValueError as err:  # a config no LM head class is registered for
        raise ValueError(
            f"generate.lm={c.lm!r} ({config.model_type}) is neither a causal nor a seq2seq language model that "
            f"transformers can generate with: {str(err).splitlines()[0][:200]}"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"generate.lm={c.lm!r}: its tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not seq2seq:
        tokenizer.padding_side = "left"  # generation continues every row right after its prompt
    own = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=own.bos_token_id,
        eos_token_id=own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=own.decoder_start_token_id,
        forced_bos_token_id=own.forced_bos_token_id,
        max_new_tokens=c.max_new_tokens,
        do_sample=False,  # sampling is SeededSampler's noise + argmax
        num_beams=1,
    )
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    model.eval()
    info = {
        "name_or_path": c.lm,
        "kind": "seq2seq" if seq2seq else "causal",
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "revision": getattr(config, "_commit_hash", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, info


def truncate_tokens(texts: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Each text cut after its first max_tokens tokens of `tokenizer` (at a character offset, so the kept text is
    the original's; a slow tokenizer decodes the kept tokens instead)."""
    if tokenizer.is_fast:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            t if len(offsets) <= max_tokens else t[: offsets[max_tokens - 1][1]]
            for t, offsets in zip(texts, enc["offset_mapping"], strict=True)
        ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids, strict=True)]


def build_prompts(c: GenerateConfig, tokenizer, titles: list[str], bodies: list[str]) -> list[str]:
    """generate.task's template filled per document. `{document}` is the body cut to generate.max_document_tokens;
    without `{title}` in the template the title starts it ("title body", as BEIR joins them)."""
    with_title = "{title}" in c.template
    documents = bodies if with_title else [f"{t} {b}".strip() for t, b in zip(titles, bodies, strict=True)]
    documents = truncate_tokens(documents, tokenizer, c.max_document_tokens)
    return [c.template.format(document=d, title=t) for d, t in zip(documents, titles, strict=True)]


def check_context(model, tokenizer, prompts: list[str], c: GenerateConfig) -> None:
    """A causal LM with learned positions must fit the longest prompt plus max_new_tokens (ValueError naming the
    keys); relative and rotary positions have no hard limit."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if model.config.is_encoder_decoder or not limit or not prompts:
        return
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    if longest + c.max_new_tokens > limit:
        raise ValueError(
            f"generate.lm reads {limit} positions, but the longest prompt has {longest} tokens and "
            f"generate.max_new_tokens={c.max_new_tokens} more are generated: lower generate.max_document_tokens "
            f"(now {c.max_document_tokens}) or generate.max_new_tokens"
        )


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts_B: list[str], seeds_B: list[int], c: GenerateConfig) -> list[str]:
    """The decoded continuations of one batch of prompts (the prompt itself removed for a causal LM)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts_B, return_tensors="pt", padding=True)
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    processors = LogitsProcessorList(
        [SeededSampler(seeds_B, temperature=c.temperature, top_p=c.top_p)] if c.do_sample else []
    )
    out_BL = model.generate(**inputs, logits_processor=processors, max_new_tokens=c.max_new_tokens)
    if not model.config.is_encoder_decoder:
        out_BL = out_BL[:, inputs["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
    return tokenizer.batch_decode(out_BL, skip_special_tokens=True)


def use_vllm(c: GenerateConfig) -> bool:
    """generate.use_vllm resolved: auto is vLLM only when it is installed and a GPU is present."""
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if c.use_vllm == "true" and not available:
        missing = "vLLM is not installed" if importlib.util.find_spec("vllm") is None else "no GPU is present"
        raise ValueError(
            f"generate.use_vllm=true, but {missing}: install vllm on a GPU machine, or set generate.use_vllm=auto "
            "(or false) to generate with transformers"
        )
    return c.use_vllm == "true" or (c.use_vllm == "auto" and available)


def vllm_generate(c: GenerateConfig, prompts_R: list[str], seeds_R: list[int]) -> list[str]:  # pragma: no cover
    """All of this rank's prompts through vLLM, one request per row with its row seed. Untested here (no GPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=c.lm, dtype=str(c.torch_dtype), seed=c.seed)
    params = [
        SamplingParams(
            n=1,
            temperature=c.temperature if c.do_sample else 0.0,
            top_p=c.top_p if c.do_sample else 1.0,
            max_tokens=c.max_new_tokens,
            seed=s,
        )
        for s in seeds_R
    ]
    return [o.outputs[0].text for o in llm.generate(prompts_R, params, use_tqdm=False)]


def generate_queries(
    c: GenerateConfig, doc_ids: list[str], titles: list[str], bodies: list[str]
) -> tuple[list[str], dict[str, Any]]:
    """The raw generations for every row (document d, query j), d-major, on every rank, and the LM's provenance.

    Rows are cut into batches of similar prompt length (encoder/biencoder.py length_batches); rank r runs batches
    r, r + W, ... and the texts are gathered, so every rank ends with what one process generates."""
    from tqdm.auto import tqdm

    from embedscale.distributed import gather_objects, world
    from embedscale.encoder.biencoder import length_batches

    rank, size = world()
    n = c.queries_per_document
    seeds_R = [row_seed(c.seed, doc_id, j) for doc_id in doc_ids for j in range(n)]
    vllm = use_vllm(c)
    if vllm:  # pragma: no cover - needs vLLM and a GPU
        from transformers import AutoTokenizer

        model, tokenizer, info = None, AutoTokenizer.from_pretrained(c.lm), {"name_or_path": c.lm}
    else:
        model, tokenizer, info = load_lm(c)
    prompts_D = build_prompts(c, tokenizer, titles, bodies)
    prompts_R = [p for p in prompts_D for _ in range(n)]
    batches = length_batches(prompts_R, c.batch_size)[rank::size]
    local: dict[int, str] = {}
    if vllm:  # pragma: no cover
        rows = [r for idx in batches for r in idx]
        local = dict(zip(rows, vllm_generate(c, [prompts_R[r] for r in rows], [seeds_R[r] for r in rows])))
    else:
        check_context(model, tokenizer, prompts_D, c)
        for idx in tqdm(batches, desc=f"generate {len(prompts_R)} queries", unit="batch", disable=rank != 0 or None):
            texts = generate_batch(model, tokenizer, [prompts_R[r] for r in idx], [seeds_R[r] for r in idx], c)
            local.update(zip(idx, texts, strict=True))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # room for the filter model
    merged: dict[int, str] = {}
    for part in gather_objects(local):
        merged.update(part)
    info["backend"] = "vllm" if vllm else "transformers"
    return [merged[r] for r in range(len(prompts_R))], info
