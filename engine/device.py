"""Device choice: ``auto`` picks CUDA when present, else CPU. No hard-coded ``.cuda()``."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from polyrec.errors import ConfigError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' | torch.device into a torch.device."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' was asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device '{spec}' (use auto, cpu, cuda or cuda:N)") from exc


def autocast(device: torch.device, enabled: bool = True) -> ContextManager[object]:
    """bf16 autocast on CUDA; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
