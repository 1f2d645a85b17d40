"""GradCache: the contrastive gradient of a batch larger than activation memory, exactly.

Per step (Gao et al., 2021):
1. Encode the batch in chunks *without* grad (inference mode), recording each chunk's RNG state
   (CPU and the chunk's device) so that dropout can be replayed. The most expensive chunk is the
   exception: it is encoded with grad and keeps its graph, so it is never encoded twice (peak
   activation memory is one chunk's either way; the step saves that chunk's no-grad forward).
2. Treat the embeddings as leaves, gather and compute the loss (contrastive/module.py), and backward
   to the embeddings only: their gradients are the cache; the temperature's gradient lands here once.
3. Backward the kept chunk's surrogate sum(embeddings * cached_grad) in fp32 (or wider), freeing
   its graph; then re-encode every other chunk *with* grad under its recorded RNG state (same
   dropout masks) and backward its surrogate. Gradients only accumulate
   locally here; the caller reduces them once per step. Under Lightning DDP the module switches
   DDP's reducer off for the step and averages the gradients in one explicit all-reduce
   (embedscale/strategy/): DDP's reducer expects exactly one backward per forward and a fixed set
   of used parameters, which GradCache's passes (the cache backward touches only the temperature,
   a chunk only one tower) do not give it. Every backward goes through the strategy's step driver, which
   knows how (under DeepSpeed ZeRO the engine runs each, a micro-step of its gradient accumulation) and
   which pass is the step's last.

Peak activation memory is one chunk's; the score matrix stays (local x global).
Chunks are rows of the tokenised batch, by count or by a token budget, optionally grouped by length
(longest first), each trimmed to its own longest text: less padding than fixed mini-batches.

Legend: B = queries, k = hard negatives per query, c = rows in a chunk, D = dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from embedscale.config import GradCacheConfig
from embedscale.data.batch import PairBatch
from embedscale.strategy.base import StepDriver


@dataclass
class RngState:
    """CPU RNG state plus the CUDA RNG state of the device a chunk runs on (None on CPU)."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run a block with this RNG state, leaving the surrounding RNG streams untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class Chunk:
    """Rows of a tokenised batch encoded together: their indices in the batch and their trimmed tokens."""

    rows_c: torch.Tensor
    tokens: dict[str, torch.Tensor]
    cols_l: torch.Tensor | None = None
    """The batch's columns the trimmed tokens kept (a multi-vector encoder's token matrices go back there)."""


def in_batch_order(parts: list[torch.Tensor], chunks: list[Chunk], width: int | None = None) -> torch.Tensor:
    """The chunks' outputs back in batch order: embeddings (c, D) -> (R, D); token matrices (c, l, D) -> (R, width,
    D), each row's vectors back in the batch's columns (zeros in the columns a chunk trimmed away: padding).
    A normal tensor, also from inference-mode parts."""
    order_R = torch.cat([c.rows_c for c in chunks])
    if parts[0].dim() == 2:
        return torch.cat(parts)[torch.argsort(order_R)]
    R, D = int(order_R.numel()), parts[0].shape[-1]
    out_RLD = parts[0].new_zeros((R, width, D))
    for part, chunk in zip(parts, chunks, strict=True):
        out_RLD[chunk.rows_c[:, None], chunk.cols_l[None, :]] = part
    return out_RLD


def chunk_of(grad_R: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """A chunk's slice of a batch-order tensor (the cached gradient): its rows, and for token matrices its columns."""
    part = grad_R[chunk.rows_c]
    return part if part.dim() == 2 else part[:, chunk.cols_l]


def split_tokens(
    tokens: dict[str, torch.Tensor],
    chunk_size: int = 0,
    *,
    token_budget: int = 0,
    sort_by_length: bool = False,
) -> list[Chunk]:
    """Row chunks of a tokenised batch, each trimmed to its own longest sequence (padding-side aware).

    Args:
        chunk_size: at most this many rows per chunk (0: no row cap; then token_budget must be set).
        token_budget: at most this many padded tokens (rows x the chunk's longest text) per chunk; a
            text longer than the budget gets a chunk of its own. 0: chunks by row count only.
        sort_by_length: group texts of similar length (longest first) so chunks carry little padding;
            always on with a token budget. GradCache may compose chunks freely: the loss sees every
            embedding back in batch order.
    """
    if chunk_size <= 0 and token_budget <= 0:
        raise ValueError("split_tokens needs chunk_size > 0 or token_budget > 0")
    mask_RL = tokens["attention_mask"]
    if "token_mask" in tokens:  # multi-vector: expansion tokens are scored but not attended to
        mask_RL = mask_RL.bool() | tokens["token_mask"].bool()
    lengths_R = mask_RL.sum(dim=1)
    if sort_by_length or token_budget:
        order_R = torch.argsort(lengths_R, descending=True, stable=True)
    else:
        order_R = torch.arange(mask_RL.shape[0], device=mask_RL.device)
    groups: list[list[int]] = []
    width = 0
    for row, length in zip(order_R.tolist(), lengths_R[order_R].tolist(), strict=True):
        if groups:
            rows, new_width = len(groups[-1]) + 1, max(width, length)
            if (not chunk_size or rows <= chunk_size) and (not token_budget or rows * new_width <= token_budget):
                groups[-1].append(row)
                width = new_width
                continue
        groups.append([row])
        width = length
    chunks = []
    for group in groups:
        rows_c = torch.tensor(group, device=mask_RL.device)
        part = {k: v[rows_c] for k, v in tokens.items()}
        keep_L = mask_RL[rows_c].any(dim=0)  # columns holding at least one real (or scored) token
        chunks.append(Chunk(rows_c, {k: v[:, keep_L] for k, v in part.items()}, keep_L.nonzero().view(-1)))
    return chunks


def gradcache_step(
    module, batch: PairBatch, *, plan: GradCacheConfig, driver: StepDriver | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the exact gradient of `module.loss_from_embeddings` over `batch` into the parameters.

    Args:
        module: a ContrastiveModule (its `encoder` and `loss_from_embeddings` are used).
        batch: the rank's batch.
        plan: how texts are grouped into chunks (gradcache.chunk_size / token_budget / sort_by_length,
            `split_tokens`); queries and documents are chunked separately.
        driver: the strategy's step driver (embedscale/strategy/): it runs each backward pass (the cache's, then
            one per chunk, learning which is the step's last) and says whether parameters stay gathered between
            passes (then pass 1 runs under no_grad instead of inference_mode). None: plain autograd.
            A loss-scaling plugin (fp16 GradScaler) would scale the surrogates but not the temperature's
            gradient, so the config rejects GradCache with 16-mixed; 32-true and bf16-mixed are exact.
    Returns:
        (loss, metrics) detached, as the uncached path returns them.
    """
    driver = driver if driver is not None else StepDriver()
    encoder = module.encoder
    B, k = batch.batch_size, batch.num_negatives_per_query
    device = batch.queries["input_ids"].device
    chunking = dict(token_budget=plan.token_budget, sort_by_length=plan.sort_by_length)
    jobs = [("query", c) for c in split_tokens(batch.queries, plan.chunk_size, **chunking)]
    num_q = len(jobs)
    jobs += [("document", c) for c in split_tokens(batch.documents, plan.chunk_size, **chunking)]

    # The most expensive chunk keeps its graph from pass 1 and is not re-encoded: peak memory is one
    # chunk's activations either way, and the step saves that chunk's no-grad forward.
    cost = [c.tokens["input_ids"].numel() for _, c in jobs]
    kept = max(range(len(jobs)), key=cost.__getitem__)
    states, embeddings, kept_cD = [], [], None
    no_grad = torch.no_grad if driver.keeps_params_across_passes else torch.inference_mode
    for i, (side, chunk) in enumerate(jobs):  # pass 1: no activations kept, except the kept chunk's
        if i == kept:
            states.append(None)
            kept_cD = encoder.encode(chunk.tokens, side=side)
            embeddings.append(kept_cD.detach())
            continue
        states.append(RngState.capture(device))
        with no_grad():
            embeddings.append(encoder.encode(chunk.tokens, side=side))

    q_chunks = [c for _, c in jobs[:num_q]]
    d_chunks = [c for _, c in jobs[num_q:]]
    widths = batch.queries["input_ids"].shape[1], batch.documents["input_ids"].shape[1]
    q_BD = in_batch_order(embeddings[:num_q], q_chunks, widths[0]).requires_grad_(True)  # (B, D) or (B, L, D)
    docs_XD = in_batch_order(embeddings[num_q:], d_chunks, widths[1]).requires_grad_(True)  # (B * (1 + k), ...)
    neg_BkD = docs_XD[B:].view(B, k, *docs_XD.shape[1:]) if k else None
    guide = module.guide_embeddings(batch)  # once per step, no gradient
    loss, metrics = module.loss_from_embeddings(
        q_BD,
        docs_XD[:B],
        neg_BkD,
        batch.ids,
        batch.in_batch_negatives,
        teacher_BG=batch.teacher_BG,
        guide=guide,
        objective=batch.objective,
        token_masks=batch.token_masks,
    )
    # the cache's backward: fills q_BD.grad, docs_XD.grad (the cache) and the temperature's gradient; unscaled
    driver.backward(module, loss, is_last=False, cache=True)

    def surrogate(e_cD: torch.Tensor, grad_cD: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(e_cD.dtype, torch.float32)  # fp32 at least (bf16 autocast), fp64 kept
        return (e_cD.to(dtype) * grad_cD.to(dtype)).sum()

    cache = [chunk_of(q_BD.grad, c) for c in q_chunks] + [chunk_of(docs_XD.grad, c) for c in d_chunks]
    last = len(jobs) - 1 if kept != len(jobs) - 1 else len(jobs) - 2  # the last chunk re-encoded below
    driver.backward(module, surrogate(kept_cD, cache[kept]), is_last=len(jobs) == 1)  # frees the kept graph first
    del kept_cD
    for i, ((side, chunk), state, grad_cD) in enumerate(zip(jobs, states, cache, strict=True)):
        if i == kept:
            continue
        with state.replay():  # pass 2: same dropout masks
            e_cD = encoder.encode(chunk.tokens, side=side)
            driver.backward(module, surrogate(e_cD, grad_cD), is_last=i == last)
    return loss.detach(), metrics
