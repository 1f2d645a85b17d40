"""Pooling: pure functions from token states to one vector per text.

Each takes hidden states h_BLH and the attention mask m_BL (1 = token, 0 = padding) and is correct
under both left and right padding: positions are derived from the mask, never assumed.

Legend: B = batch, L = tokens, H = hidden size.
"""

from __future__ import annotations

import torch

from embedscale.config import Pooling


def cls_pool(h_BLH: torch.Tensor, m_BL: torch.Tensor) -> torch.Tensor:
    """State of the first real token (CLS for BERT-style tokenizers), wherever padding sits."""
    first_B = m_BL.int().argmax(dim=1)  # (B,) index of the first 1
    return h_BLH[torch.arange(h_BLH.shape[0], device=h_BLH.device), first_B]


def mean_pool(h_BLH: torch.Tensor, m_BL: torch.Tensor) -> torch.Tensor:
    w_BL1 = m_BL.unsqueeze(-1).to(h_BLH.dtype)
    return (h_BLH * w_BL1).sum(dim=1) / w_BL1.sum(dim=1).clamp(min=1e-9)  # (B, H)


def last_token_pool(h_BLH: torch.Tensor, m_BL: torch.Tensor) -> torch.Tensor:
    """State of the last real token (EOS for decoders): h[:, -1] under left padding, h[i, len_i - 1] under right."""
    L = m_BL.shape[1]
    last_B = L - 1 - m_BL.int().flip(dims=[1]).argmax(dim=1)  # (B,) index of the last 1
    return h_BLH[torch.arange(h_BLH.shape[0], device=h_BLH.device), last_B]


def weighted_mean_pool(h_BLH: torch.Tensor, m_BL: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): the i-th real token weighs i, counted from the first real token.

    Counting from the first real token (not from column 0) keeps the result the same under left
    padding; under right padding it equals sentence-transformers' `weightedmean`.
    """
    w_BL = torch.cumsum(m_BL, dim=1) * m_BL
    w_BL1 = w_BL.unsqueeze(-1).to(h_BLH.dtype)
    return (h_BLH * w_BL1).sum(dim=1) / w_BL1.sum(dim=1).clamp(min=1e-9)  # (B, H)


POOLERS = {
    Pooling.cls: cls_pool,
    Pooling.mean: mean_pool,
    Pooling.last_token: last_token_pool,
    Pooling.weighted_mean: weighted_mean_pool,
}


def pool(h_BLH: torch.Tensor, m_BL: torch.Tensor, how: Pooling) -> torch.Tensor:
    return POOLERS[how](h_BLH, m_BL)
