#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench-resnet --epoch`: whole training epochs of a ResNet on
an image folder (torchvision ImageFolder, RandomResizedCrop + flip + normalize, DataLoader with
worker processes), forward + cross_entropy(label_smoothing=0.1) + backward + SGD with momentum.
Reports the last epoch's images/s, the seconds the loop waited for batches, and the loader's CPU
cost per image (one process, transform included).

    python3 scripts/bench_torch_epoch.py --data DIR --size 224 --batch 32 --epochs 2
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--size", type=int, default=224)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--arch", default="resnet18")
a = p.parse_args()
torch.set_num_threads(a.threads)
tf = transforms.Compose([
    transforms.RandomResizedCrop(a.size),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
ds = torchvision.datasets.ImageFolder(f"{a.data}/train", transform=tf)

# The loader's own cost: decode + transform of up to 256 images in this process.
n = min(256, len(ds))
t0 = time.perf_counter()
for i in range(n):
    ds[i]
loader_ms = 1e3 * (time.perf_counter() - t0) / n

dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                                 persistent_workers=a.workers > 0, drop_last=False)
model = getattr(torchvision.models, a.arch)(num_classes=len(ds.classes)).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
for epoch in range(a.epochs):
    t0 = time.perf_counter()
    waited, images = 0.0, 0
    it = iter(dl)
    while True:
        w0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - w0
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        images += len(y)
    secs = time.perf_counter() - t0
print(json.dumps({"impl": "torch", "arch": a.arch, "batch": a.batch, "size": a.size,
                  "threads": torch.get_num_threads(), "workers": a.workers,
                  "images_per_s": round(images / secs, 1), "data_wait_s": round(waited, 2),
                  "loader_ms_per_image": round(loader_ms, 2), "torch": torch.__version__}))
