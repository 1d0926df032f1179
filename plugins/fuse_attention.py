"""Fusers: attention across modality tokens ("attention") and a masked mean ("mean").

Both project every modality's vector to a common width first. The attention fuser adds a
learned modality embedding to each token and lets a learned query ([CLS]-like) attend
over the tokens with multi-head attention; missing modalities are masked out. The
returned weights [n, M] (averaged over heads) are what explanations show.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from polyrec import Fuser, autocast, hookimpl


class _Projector(nn.Module):
    """One LayerNorm + Linear per modality, mapping its vectors to ``out_dim``."""

    def __init__(self, dims: dict[str, int], out_dim: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, out_dim)) for m, d in dims.items()})
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: dict[str, torch.Tensor], order: list[str]) -> torch.Tensor:
        """Stack the projected tokens: [n, M, out_dim] in ``order``."""
        return self.dropout(torch.stack([self.proj[m](tokens[m]) for m in order], dim=1))


def _check(fuser: Fuser, tokens: dict[str, torch.Tensor], present: torch.Tensor) -> None:
    missing = [m for m in fuser.modalities if m not in tokens]
    if missing:
        raise ValueError(f"fuser '{fuser.name}' needs tokens for modalities {missing}")
    if present.shape[-1] != len(fuser.modalities):
        raise ValueError(f"present has {present.shape[-1]} columns for "
                         f"{len(fuser.modalities)} modalities")


class AttentionFuser(Fuser):
    """Multi-head attention from a learned query over modality tokens, masks for the absent.

    Options: ``heads`` (default 4; must divide ``out_dim``), ``dropout`` (0.1).
    An item with no modality present gets a zero vector and zero weights (never NaN).
    """

    name = "attention"

    def __init__(self, dims: dict[str, int], out_dim: int, heads: int = 4,
                 dropout: float = 0.1, **options: Any) -> None:
        super().__init__(dims, out_dim, **options)
        if out_dim % heads:
            raise ValueError(f"out_dim {out_dim} is not divisible by heads {heads}")
        self.project = _Projector(self.dims, out_dim, dropout)
        self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), out_dim) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, out_dim) * 0.02)
        self.attention = nn.MultiheadAttention(out_dim, heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: dict[str, torch.Tensor],
                present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(self, tokens, present)
        present = present.bool()
        with autocast(present.device):
            x = self.project(tokens, self.modalities) + self.modality_embedding  # [n, M, D]
            any_present = present.any(dim=1)
            # A row with nothing present would softmax over -inf only (NaN): let it attend
            # to everything, then zero its output and weights below.
            mask = ~(present | ~any_present[:, None])
            query = self.query.expand(x.shape[0], 1, -1).to(x.dtype)
            # no mask when nothing is masked: the same attention, without torch's mask check
            # (its first call imports torch.fx's symbolic shapes: ~0.7 s of a fresh process)
            out, weights = self.attention(query, x, x,
                                          key_padding_mask=mask if bool(mask.any()) else None,
                                          need_weights=True, average_attn_weights=True)
            fused = self.norm(out.squeeze(1).float())
        keep = any_present[:, None].to(fused.dtype)
        return fused * keep, weights.squeeze(1).float() * keep


class MeanFuser(Fuser):
    """The baseline: project each modality, average the present ones (equal weights)."""

    name = "mean"

    def __init__(self, dims: dict[str, int], out_dim: int, dropout: float = 0.1,
                 **options: Any) -> None:
        super().__init__(dims, out_dim, **options)
        self.project = _Projector(self.dims, out_dim, dropout)

    def forward(self, tokens: dict[str, torch.Tensor],
                present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(self, tokens, present)
        with autocast(present.device):
            x = self.project(tokens, self.modalities).float()  # [n, M, D]
        w = present.float()
        weights = w / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (x * weights[..., None]).sum(dim=1), weights


FUSERS: dict[str, type[Fuser]] = {AttentionFuser.name: AttentionFuser, MeanFuser.name: MeanFuser}


@hookimpl
def register_fusers(register: Callable[[type], None]) -> None:
    register(AttentionFuser)
    register(MeanFuser)
