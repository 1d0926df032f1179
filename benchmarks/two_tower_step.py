"""Seconds per two_tower training step on a synthetic shop shaped like scale.py's
(Zipf item popularity, power-law user activity), with a cProfile of the steps.

    .venv/bin/python benchmarks/two_tower_step.py ITEMS USERS INTERACTIONS [STEPS] [option=value ...]
    e.g. benchmarks/two_tower_step.py 1000000 50000 1000000 8 sparse_ids=on

The clock runs from the end of the first step (warm-up) to the end of step STEPS + 1:
STEPS whole steps (batch, forward, backward, optimizer).
"""
from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time

import numpy as np
import torch

import polyrec.plugins.rank_two_tower as tt
from polyrec import TrainingData

BATCH = 2048


class _Stop(Exception):
    """Raised by the wrapped optimizer step once the steps are timed."""


def main() -> None:
    items, users, inter = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    extra = dict(a.split("=", 1) for a in sys.argv[5:])
    rng = np.random.default_rng(0)
    iw = 1.0 / np.arange(1, items + 1) ** 1.0
    iw = rng.permutation(iw / iw.sum())
    uw = 1.0 / np.arange(1, users + 1) ** 0.8
    uw = rng.permutation(uw / uw.sum())
    us, its = rng.choice(users, inter, p=uw), rng.choice(items, inter, p=iw)
    data = TrainingData(user_ids=list(range(users)), item_ids=list(range(items)),
                        users=torch.tensor(us), items=torch.tensor(its),
                        weights=torch.ones(inter), ts=torch.arange(inter, dtype=torch.float64))
    opts = {"modalities": "none", "validation": False, "refit": False, "epochs": 1,
            "batch_size": BATCH, "n_random": 1024, "device": "cpu",
            **{k: json.loads(v) if v[:1] in "-0123456789" else v for k, v in extra.items()}}
    ranker = tt.TwoTowerRanker(**opts)
    ranker._build(data)
    pairs = len(torch.unique(data.users * items + data.items))
    print("positives", pairs, "steps/epoch", -(-pairs // BATCH))

    real_step = tt._Optimizer.step
    count, start = [0], [0.0]

    def step(self: tt._Optimizer) -> None:
        real_step(self)
        count[0] += 1
        if count[0] == 1:
            start[0] = time.perf_counter()  # after the warm-up step
        elif count[0] > steps:
            raise _Stop

    tt._Optimizer.step = step  # type: ignore[method-assign]
    profile = cProfile.Profile()
    profile.enable()
    try:
        ranker._train(data, None, epochs=1)
    except _Stop:
        pass
    finally:
        profile.disable()
        tt._Optimizer.step = real_step  # type: ignore[method-assign]
    elapsed = time.perf_counter() - start[0]
    print(f"{steps} steps after the first: {elapsed:.2f} s = {elapsed / steps:.3f} s/step")
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
