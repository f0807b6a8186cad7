#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench-ddp`: data-parallel ResNet training steps on the CPU,
DistributedDataParallel over gloo, `--world` processes with `--threads` threads each, the global
batch split evenly. Each step: train-mode forward, cross_entropy(label_smoothing=0.1), backward
(DDP all-reduces the gradient buckets, 25 MiB, during it), SGD (momentum 0.9, weight decay 1e-4)
on random images. Rank 0 prints one JSON line: the median step and global images/s.

    python3 scripts/bench_torch_ddp.py --world 2 --threads 1 --batch 128 --size 32 --steps 10
    python3 scripts/bench_torch_ddp.py --world 1 --threads 2 --batch 128 --size 32 --steps 10
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, a, port):
    torch.set_num_threads(a.threads)
    ddp = a.world > 1
    if ddp:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=a.world)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.arch)(num_classes=196).train()
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    per = a.batch // a.world
    x = torch.randn(per, 3, a.size, a.size)
    y = (torch.arange(per) + rank * per) % 196
    times = []
    for step in range(a.steps + 1):
        if ddp:
            dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    if ddp:
        # The slowest rank sets the pace: take each step's maximum over the ranks.
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    if rank == 0:
        times.sort()
        med = times[len(times) // 2]
        print(json.dumps({"impl": "torch", "backend": "gloo" if ddp else "none",
                          "arch": a.arch, "batch": a.batch, "size": a.size, "ranks": a.world,
                          "threads": a.threads, "median_step_s": round(med, 4),
                          "images_per_s": round(a.batch / med, 2), "torch": torch.__version__}),
              flush=True)
    if ddp:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--arch", default="resnet18")
    a = p.parse_args()
    if a.batch % a.world:
        raise SystemExit(f"--batch {a.batch} does not split into {a.world} ranks")
    if a.world == 1:
        worker(0, a, 0)
    else:
        mp.spawn(worker, args=(a, free_port()), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
