#!/usr/bin/env python3
"""PyTorch reference timing for candle-xent's benchmark: F.cross_entropy(label_smoothing=0.1)
forward + backward on CPU, f32, with a fixed thread count, one shape per process so the peak RSS
(ru_maxrss) belongs to that shape alone.

    python3 scripts/bench_torch_xent.py --rows 4096 --classes 32000 --threads 2 --reps 3

Prints one JSON line like candle-xent's `xent_step` example, so `cargo xtask bench-xent --torch
PYTHON` can put both in one table.
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, default=4096)
p.add_argument("--classes", type=int, default=32000)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=3)
p.add_argument("--eps", type=float, default=0.1)
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
x = (torch.randn(a.rows, a.classes) * 2).requires_grad_(True)
y = (torch.arange(a.rows) * 7919) % a.classes
inputs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
loss = None
for _ in range(a.reps):
    x.grad = None
    t0 = time.perf_counter()
    loss = F.cross_entropy(x, y, label_smoothing=a.eps)
    loss.backward()
    times.append((time.perf_counter() - t0) * 1e3)
    x.grad = None
times.sort()
print(json.dumps({
    "mode": "torch", "rows": a.rows, "classes": a.classes, "threads": torch.get_num_threads(),
    "median_ms": round(times[len(times) // 2], 1), "min_ms": round(times[0], 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "inputs_rss_mib": round(inputs_rss), "loss": loss.item(), "torch": torch.__version__,
}))
