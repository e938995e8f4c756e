"""Cost of zeroing dropped samples' rows in the per-sample weighted sums (``nonfinite="drop_sample"``
exactness), measured against plain row scaling, interleaved in rounds on a small CharGPT.

    python benchmarks/drop_rows_cost.py
"""
import statistics
import time

import torch

import robustclip as rc
import robustclip.per_sample.rules._terms as T
from robustclip.experiments.models import CharGPT

torch.manual_seed(0); torch.set_num_threads(2)
m = CharGPT(vocab=64, d=128, layers=4, heads=4, block_size=64)
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
cl = rc.Clipper(m, opt, rc.per_sample_clip(1.0))
x = torch.randint(0, 64, (32, 64)); y = torch.randint(0, 64, (32, 64))
import torch.nn.functional as F


def step():
    out = m(x); l = F.cross_entropy(out.reshape(-1, 64), y.reshape(-1), reduction="none").view(32, -1).mean(1)
    cl.backward(l); cl.step()
orig_z, orig_s = T.zero_dropped, T.scale_rows
def ident(x, w): return x
def plain(x, w): return x * w.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
for _ in range(3): step()
res = {"on": [], "off": []}
for r in range(8):
    for k in ("on", "off"):
        T.zero_dropped, T.scale_rows = (orig_z, orig_s) if k == "on" else (ident, plain)
        t = time.perf_counter()
        for _ in range(3): step()
        res[k].append((time.perf_counter() - t) / 3)
print({k: round(statistics.median(v) * 1e3, 1) for k, v in res.items()}, "ratio", round(statistics.median([a / b for a, b in zip(res["on"], res["off"])]), 3))
