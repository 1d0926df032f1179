"""``polyrec train --ray``: a data-parallel ranker (the two-tower) fitted by Ray Train.

The core's training run (polyrec.rank.train) is unchanged: the same data, holdout, gate
and artifact; only the ``fit`` step moves. Ray Train's TorchTrainer starts ``n_workers``
processes with a torch.distributed process group (gloo on CPU, NCCL on GPUs); each builds
the ranker from its plugin registry with the same options, is told its rank
(``Ranker.set_data_parallel``) and fits the same data, which reaches it once through
Ray's object store: every step each worker takes its slice of the batch and DDP averages
the gradients. Rank 0 hands back ``state()`` as a Ray Train checkpoint; the driver loads
it into its ranker, which the core then gates and stores like any other.

On several machines Ray Train needs a storage path every machine reaches
(``storage``: a shared folder or a cloud URI); the default is a temporary local folder.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from polyrec.cluster import connected, workers
from polyrec.contracts import Ranker
from polyrec.errors import ConfigError
from polyrec.training_data import TrainingData

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

_STATE_FILE = "ranker_state.bin"
#: Options the engine injects into a ranker (rebuilt in each worker, never shipped).
_INJECTED = ("device", "fusers", "progress", "factory")


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the ranker, fit it data-parallel, rank 0 reports its state."""
    import ray
    import ray.train
    import torch.distributed as dist

    from polyrec.plugin_host import PluginHost
    from polyrec.store.artifacts import to_bytes

    host = PluginHost()
    cls = host.registry("rankers").get(config["ranker"])
    options = dict(config["options"])
    schema = cls.option_schema()
    if "device" in schema:
        options["device"] = config["device"]
    if "progress" in schema:
        options["progress"] = False
    if "fuser" in schema:
        options["fusers"] = host.registry("fusers")
    ranker = cls(**options)
    data = ray.get(config["data"][0])
    rank, world = dist.get_rank(), dist.get_world_size()
    ranker.set_data_parallel(rank, world)
    ranker.fit(data)
    if rank == 0:  # report() copies the checkpoint into the run's storage before returning
        with tempfile.TemporaryDirectory(prefix="polyrec-ray-train-") as folder:
            Path(folder, _STATE_FILE).write_bytes(to_bytes(ranker.state()))
            ray.train.report({"rank": rank},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report({"rank": rank})


def ray_fitter(address: str | None = None, *, n_workers: int | None = None,
               storage: str | None = None, device: str = "cpu"
               ) -> Callable[[Ranker, TrainingData], None]:
    """A ``fit`` for polyrec.rank.train.train that fits the ranker on Ray Train with
    ``n_workers`` data-parallel workers (default: one per CPU of the cluster, at most 2
    on a machine of 2)."""

    def fit(model: Ranker, data: TrainingData) -> None:
        if not getattr(model, "data_parallel", False):
            raise ConfigError(f"ranker '{model.name}' does not train data-parallel, so it has no "
                              f"--ray training (two_tower does; train it without --ray)")
        with connected(address) as ray:
            _fit_on_ray(ray, model, data, workers(ray, n_workers), storage, device)

    return fit


def _fit_on_ray(ray: Any, model: Ranker, data: TrainingData, n_workers: int,
                storage: str | None, device: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from polyrec.store.artifacts import from_bytes

    options = {k: v for k, v in model.options.items() if k not in _INJECTED}
    config = {"ranker": model.name, "options": options, "device": device,
              "data": [ray.put(data)]}  # in a list: Ray passes the reference, not the value
    own = storage is None
    folder = storage or tempfile.mkdtemp(prefix="polyrec-ray-train-")
    try:
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=device.startswith("cuda")),
            run_config=RunConfig(storage_path=folder, name=f"polyrec-{model.name}"))
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - one line for the CLI
            raise ConfigError(f"Ray training of '{model.name}' failed: "
                              f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}") from exc
        if result.checkpoint is None:
            raise ConfigError(f"Ray training of '{model.name}' returned no model")
        with result.checkpoint.as_directory() as path:
            state = from_bytes(Path(path, _STATE_FILE).read_bytes())
        model.load_state(state)
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def train(engine: "Engine", ranker: str = "two_tower", *, address: str | None = None,
          n_workers: int | None = None, storage: str | None = None,
          options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``Engine.train`` with the fit on Ray Train (same arguments, same artifact, same
    gate); ``ranker`` must train data-parallel (``data_parallel``: two_tower)."""
    if kwargs.get("warm_start") is not None:
        raise ConfigError("training on Ray does not warm-start: train without --ray")
    device = "cuda" if engine.device.type == "cuda" else "cpu"
    fit = ray_fitter(address, n_workers=n_workers, storage=storage, device=device)
    return engine.train(ranker, options=options, fit=fit, **kwargs)
