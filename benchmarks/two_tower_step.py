"""Seconds per two_tower training step on a synthetic shop shaped like scale.py's
(Zipf item popularity, power-law user activity), with a cProfile of the steps.

    .venv/bin/python benchmarks/two_tower_step.py ITEMS USERS INTERACTIONS [STEPS] [option=value ...]
    e.g. benchmarks/two_tower_step.py 1000000 50000 1000000 8 sparse_ids=on
"""
import sys, time, cProfile, pstats
import numpy as np, torch
from polyrec import TrainingData
from polyrec.plugins.rank_two_tower import TwoTowerRanker

items, users, inter = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
extra = dict(a.split("=") for a in sys.argv[5:])
rng = np.random.default_rng(0)
iw = 1.0 / np.arange(1, items + 1) ** 1.0; iw = rng.permutation(iw / iw.sum())
uw = 1.0 / np.arange(1, users + 1) ** 0.8; uw = rng.permutation(uw / uw.sum())
us = rng.choice(users, inter, p=uw); its = rng.choice(items, inter, p=iw)
data = TrainingData(user_ids=list(range(users)), item_ids=list(range(items)),
                    users=torch.tensor(us), items=torch.tensor(its),
                    weights=torch.ones(inter), ts=torch.arange(inter, dtype=torch.float64))
bs = 2048
opts = {"modalities": "none", "validation": False, "refit": False, "epochs": 1,
        "batch_size": bs, "n_random": 1024, "device": "cpu", **{k: __import__("json").loads(v) if v[0] in "0123456789" else v for k, v in extra.items()}}
# limit to `steps` steps: keep only steps*bs positives' worth of pairs by subsampling? no: time per step
r = TwoTowerRanker(**opts)
r._build(data)
orig = r._train
pairs = len(torch.unique(data.users * items + data.items))
print("positives", pairs, "steps/epoch", -(-pairs // bs))
# run a truncated epoch by patching randperm length via a smaller data? simpler: time N steps through a hook
import polyrec.plugins.rank_two_tower as m
count = {"n": 0}
import polyrec.plugins.rank_two_tower as M; real_step = M._Optimizer.step
class Stop(Exception): pass
t = {}
def step(self, *a, **k):
    count["n"] += 1
    if count["n"] == 2: t["start"] = time.perf_counter()
    out = real_step(self, *a, **k)
    if count["n"] >= steps + 1: raise Stop
    return out
M._Optimizer.step = step
pr = cProfile.Profile()
pr.enable()
try:
    r._train(data, None, epochs=1)
except Stop:
    pass
pr.disable()
el = time.perf_counter() - t["start"]
print(f"{steps} steps after the first: {el:.2f} s = {el/steps:.3f} s/step")
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
