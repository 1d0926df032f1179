"""Ray for the heavy batch work: encoding, two-tower training and batch scoring.

Each module runs one existing local path on a Ray cluster and keeps its rules: encode.py
(the encoding pipeline's cache rules, items encoded by Ray Data actors), train.py (the
two-tower fitted by Ray Train's TorchTrainer with DDP, saved like a local training run),
batch.py (batch recommendations, users sharded over Ray tasks). Ray is the optional extra
``polyrec[ray]``; this package imports it only when a function runs.

The layer sits above the Engine facade (it drives an Engine) and below serve/cli.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from polyrec.errors import ConfigError

MISSING_RAY = "--ray needs Ray, which is not installed: pip install 'polyrec[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or one ConfigError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(MISSING_RAY) from exc
    return ray


@contextlib.contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected for the block: the cluster this process is already connected to
    (tests start one), else ``address`` ("auto" or ray://host:port), else a local cluster
    started here (``num_cpus``: default all cores) and shut down at the end."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if not address:  # a local throwaway cluster: no token to generate and store
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at '{address}': {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def workers(ray: Any, requested: int | None = None) -> int:
    """Workers to use: ``requested``, else one per CPU of the cluster (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"Ray workers must be at least 1, not {requested}")
        return requested
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
