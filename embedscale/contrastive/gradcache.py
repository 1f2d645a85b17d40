"""GradCache: the contrastive gradient of a batch larger than activation memory, exactly.

Per step (Gao et al., 2021):
1. Encode the batch in chunks *without* grad, recording each chunk's RNG state (CPU and the
   chunk's device) so that dropout can be replayed.
2. Treat the embeddings as leaves, gather and compute the loss (contrastive/module.py), and backward
   to the embeddings only: their gradients are the cache; the temperature's gradient lands here once.
3. Re-encode each chunk *with* grad under its recorded RNG state (same dropout masks) and backward
   the surrogate sum(embeddings * cached_grad) in fp32 (or wider). Gradients only accumulate
   locally here; the caller reduces them once per step. Under Lightning DDP the module switches
   DDP's reducer off for the step and averages the gradients in one explicit all-reduce
   (contrastive/module.py): DDP's reducer expects exactly one backward per forward and a fixed set
   of used parameters, which GradCache's passes (the cache backward touches only the temperature,
   a chunk only one tower) do not give it.

Peak activation memory is one chunk's; the score matrix stays (local x global).
Chunks are rows of the tokenised batch, trimmed to their own longest text (less padding).

Legend: B = queries, k = hard negatives per query, c = rows in a chunk, D = dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from embedscale.data.batch import PairBatch


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


def split_tokens(tokens: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Row chunks of a tokenised batch, each trimmed to its longest sequence (padding-side aware)."""
    chunks = []
    for start in range(0, tokens["input_ids"].shape[0], chunk_size):
        part = {k: v[start : start + chunk_size] for k, v in tokens.items()}
        keep_L = part["attention_mask"].any(dim=0)  # columns holding at least one real token
        chunks.append({k: v[:, keep_L] for k, v in part.items()})
    return chunks


def gradcache_step(
    module,
    batch: PairBatch,
    *,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the exact gradient of `module.loss_from_embeddings` over `batch` into the parameters.

    Args:
        module: a ContrastiveModule (its `encoder` and `loss_from_embeddings` are used).
        batch: the rank's batch.
        chunk_size: rows encoded at once (queries and documents are chunked separately).
        backward: how to backpropagate a surrogate (Lightning's `manual_backward` for precision plugins).
            A loss-scaling plugin (fp16 GradScaler) would scale the surrogates but not the temperature's
            gradient, so the config rejects GradCache with 16-mixed; 32-true and bf16-mixed are exact.
    Returns:
        (loss, metrics) detached, as the uncached path returns them.
    """
    encoder = module.encoder
    B, k = batch.batch_size, batch.num_negatives_per_query
    device = batch.queries["input_ids"].device
    jobs = [("query", t) for t in split_tokens(batch.queries, chunk_size)]
    jobs += [("document", t) for t in split_tokens(batch.documents, chunk_size)]

    states, embeddings = [], []
    with torch.no_grad():
        for side, tokens in jobs:  # pass 1: no activations kept
            states.append(RngState.capture(device))
            embeddings.append(encoder.encode(tokens, side=side))
    num_q = sum(1 for side, _ in jobs if side == "query")
    q_BD = torch.cat(embeddings[:num_q]).detach().requires_grad_(True)
    docs_XD = torch.cat(embeddings[num_q:]).detach().requires_grad_(True)  # (B * (1 + k), D)
    neg_BkD = docs_XD[B:].view(B, k, -1) if k else None
    loss, metrics = module.loss_from_embeddings(q_BD, docs_XD[:B], neg_BkD, batch.ids)
    loss.backward()  # fills q_BD.grad, docs_XD.grad (the cache) and the temperature's gradient; unscaled

    cache = list(q_BD.grad.split([len(t["input_ids"]) for _, t in jobs[:num_q]]))
    cache += list(docs_XD.grad.split([len(t["input_ids"]) for _, t in jobs[num_q:]]))
    for (side, tokens), state, grad_cD in zip(jobs, states, cache, strict=True):
        with state.replay():  # pass 2: same dropout masks
            e_cD = encoder.encode(tokens, side=side)
            dtype = torch.promote_types(e_cD.dtype, torch.float32)  # fp32 at least (bf16 autocast), fp64 kept
            backward((e_cD.to(dtype) * grad_cD.to(dtype)).sum())
    return loss.detach(), metrics
