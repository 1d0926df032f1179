"""Device choice: ``auto`` picks CUDA when present, else CPU. No hard-coded ``.cuda()``."""
from __future__ import annotations

import contextlib
import os
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


#: Set to 1 to run bf16 autocast on the CPU too (off by default: most CPUs compute bf16
#: slower than float32). The test suite sets it to check, on every CI run, the dtype
#: handling of the CUDA path (encoders, fusers, a training step and scoring).
CPU_AUTOCAST_ENV = "POLYREC_CPU_AUTOCAST"


def autocast(device: torch.device, enabled: bool = True) -> ContextManager[object]:
    """bf16 autocast on CUDA (and on the CPU when ``POLYREC_CPU_AUTOCAST=1``); a no-op
    elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and os.environ.get(CPU_AUTOCAST_ENV) == "1":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
