"""loss.queue_size: a bounded FIFO of earlier steps' gathered documents, as extra negatives (MoCo / ContAccum).

What the queue holds is computed from the gathered embeddings, which are the same on every rank, so every rank
keeps the same queue without communicating; it is pushed once per training step (after the step's loss: GradCache
computes that loss once, on the cached embeddings), and it travels in the checkpoint so a resumed run continues
with the queue it had. A step whose documents are not finite is not pushed (the non-finite guard would skip that
step; its NaNs must not poison the steps after it).

Legend: Q = queued documents (at most loss.queue_size), X = documents pushed by one step, D = dim.
"""

from __future__ import annotations

import torch


class NegativeQueue:
    def __init__(self, size: int) -> None:
        self.size = size
        self.embeddings_QD: torch.Tensor | None = None
        self.ids_Q: torch.Tensor | None = None
        self.skipped_nonfinite = 0

    def __len__(self) -> int:
        return 0 if self.embeddings_QD is None else int(self.embeddings_QD.shape[0])

    def view(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(embeddings (Q, D), ids (Q,) or None) for the loss; None while empty."""
        return None if self.embeddings_QD is None else (self.embeddings_QD, self.ids_Q)

    @torch.no_grad()
    def push(self, docs_XD: torch.Tensor, ids_X: torch.Tensor | None) -> None:
        """Append a step's documents (detached) and keep the newest `size`."""
        docs_XD = docs_XD.detach()
        if not torch.isfinite(docs_XD).all():
            self.skipped_nonfinite += 1
            return
        if self.embeddings_QD is not None and self.embeddings_QD.shape[1:] != docs_XD.shape[1:]:
            raise ValueError(
                f"loss.queue_size: the queued embeddings are {tuple(self.embeddings_QD.shape[1:])}, this step's "
                f"{tuple(docs_XD.shape[1:])}: a queue needs one embedding size for the whole run"
            )
        first = self.embeddings_QD is None
        self.embeddings_QD = docs_XD[-self.size :] if first else torch.cat([self.embeddings_QD, docs_XD])[-self.size :]
        if ids_X is None or (not first and self.ids_Q is None):
            self.ids_Q = None  # no duplicate masking (loss.mask_duplicates=false)
        else:
            self.ids_Q = ids_X[-self.size :] if first else torch.cat([self.ids_Q, ids_X])[-self.size :]

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings_QD, "ids": self.ids_Q, "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings_QD, self.ids_Q = state.get("embeddings"), state.get("ids")
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
