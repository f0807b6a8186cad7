#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench-resnet`: one ResNet training step (train-mode forward,
cross_entropy(label_smoothing=0.1), backward, SGD update: momentum 0.9, weight decay 1e-4 by
default, as train-cars) on random images, CPU, fixed threads.

    python3 scripts/bench_torch_resnet.py --batch 32 --size 224 --steps 3 --threads 2
    python3 scripts/bench_torch_resnet.py --device cuda --dtype bf16 --batch 128   # cuDNN

On CUDA: cudnn.benchmark on, each step synchronised before it is timed, bf16 / f16 as the
parameters' dtype (like the candle side), peak allocated device memory reported.
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
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
# Mixed precision: f32 parameters, the step under torch.autocast in this dtype.
p.add_argument("--amp", default=None, choices=["bf16", "f16"])
p.add_argument("--lr", type=float, default=0.01)
p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--weight-decay", type=float, default=1e-4)
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
cuda = dev.type == "cuda"
if cuda:
    torch.backends.cudnn.benchmark = True
dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
model = getattr(torchvision.models, a.arch)(num_classes=196).train().to(dev, dt)
opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum,
                      weight_decay=a.weight_decay)
x = torch.randn(a.batch, 3, a.size, a.size, device=dev, dtype=dt)
y = torch.arange(a.batch, device=dev) % 196
times = []
for step in range(a.steps + 1):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if a.amp:
        with torch.autocast(dev.type, dtype={"bf16": torch.bfloat16, "f16": torch.float16}[a.amp]):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    else:
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    if step > 0:
        times.append(time.perf_counter() - t0)
times.sort()
med = times[len(times) // 2]
out = {"impl": "torch", "arch": a.arch, "device": a.device, "dtype": a.dtype, "amp": a.amp, "batch": a.batch,
       "size": a.size, "threads": torch.get_num_threads(), "median_step_s": round(med, 4),
       "images_per_s": round(a.batch / med, 2),
       "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
       "last_loss": float(loss.detach()), "torch": torch.__version__}
if cuda:
    out["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    out["cudnn"] = torch.backends.cudnn.version()
print(json.dumps(out))
