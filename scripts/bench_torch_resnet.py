#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench-resnet`: one ResNet training step (train-mode forward,
cross_entropy(label_smoothing=0.1), backward, SGD update) on random images, CPU, fixed threads.

    python3 scripts/bench_torch_resnet.py --batch 32 --size 224 --steps 3 --threads 2
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=32)
p.add_argument("--size", type=int, default=224)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--arch", default="resnet18")
a = p.parse_args()
torch.set_num_threads(a.threads)
model = getattr(torchvision.models, a.arch)(num_classes=196).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(a.batch, 3, a.size, a.size)
y = torch.arange(a.batch)
times = []
for step in range(a.steps + 1):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    opt.step()
    if step > 0:
        times.append(time.perf_counter() - t0)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"impl": "torch", "arch": a.arch, "batch": a.batch, "size": a.size,
                  "threads": torch.get_num_threads(), "median_step_s": round(med, 3),
                  "images_per_s": round(a.batch / med, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "torch": torch.__version__}))
