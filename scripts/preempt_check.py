#!/usr/bin/env python3
"""Preemption check of `cargo xtask train` (no dependencies beyond Python 3).

Runs the given training once uninterrupted, then again under `kill -9` at random moments (each
followed by `--resume`) until it completes, and compares the two: the chosen model
(`model.safetensors`) and the final weights in `checkpoint-last.safetensors` must be identical
byte for byte. Prints, per kill, the checkpointed step before and after the killed process and
the work lost (seconds since its last checkpoint, and that in steps at the uninterrupted run's
rate).

    python3 scripts/preempt_check.py --xtask target/release/xtask --out /tmp/preempt \
        --kills 12 --min-s 2 --max-s 20 -- --data-dir DIR --weights-file W.safetensors \
        --epochs 6 --image-size 32 --batch-size 128 --checkpoint-every-steps 10
"""

import argparse
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time


def checkpoint(path):
    """(meta, sha256 of the model.* tensors) of a checkpoint, or None."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            base = 8 + n
            meta_off = header["meta"]["data_offsets"]
            f.seek(base + meta_off[0])
            meta = json.loads(f.read(meta_off[1] - meta_off[0]))
            h = hashlib.sha256()
            for name in sorted(k for k in header if k.startswith("model.")):
                a, b = header[name]["data_offsets"]
                f.seek(base + a)
                h.update(name.encode())
                h.update(f.read(b - a))
            return meta, h.hexdigest()
    except (OSError, KeyError, ValueError, struct.error):
        return None


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xtask", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--min-s", type=float, default=2.0)
    ap.add_argument("--max-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    extra = [x for x in a.train_args if x != "--"]
    ref, run = os.path.join(a.out, "reference"), os.path.join(a.out, "preempted")
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "train.log"), "w")

    t0 = time.time()
    subprocess.run([a.xtask, "train", *extra, "--out", ref], check=True, stdout=log, stderr=log)
    ref_s = time.time() - t0
    ref_meta, ref_weights = checkpoint(os.path.join(ref, "checkpoint-last.safetensors"))
    steps = ref_meta["step"]
    rate = steps / ref_s
    print(f"uninterrupted: {steps} steps in {ref_s:.1f} s ({rate:.2f} steps/s incl. start-up)")

    rng = random.Random(a.seed)
    kills = []
    last = os.path.join(run, "checkpoint-last.safetensors")
    while True:
        before = checkpoint(last)
        before_step = before[0]["step"] if before else 0
        p = subprocess.Popen([a.xtask, "train", *extra, "--out", run, "--resume"],
                             stdout=log, stderr=log)
        if len(kills) < a.kills:
            delay = rng.uniform(a.min_s, a.max_s)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                after = checkpoint(last)
                after_step = after[0]["step"] if after else 0
                since = time.time() - os.path.getmtime(last) if after else delay
                kills.append((delay, before_step, after_step, since))
                print(f"kill {len(kills):2d} after {delay:5.1f} s: checkpointed step "
                      f"{before_step} -> {after_step}; lost {since:4.1f} s "
                      f"(~{since * rate:.0f} steps) since its last checkpoint")
                continue
        else:
            p.wait()
        if p.returncode != 0:
            sys.exit(f"a resumed run failed ({p.returncode}); see {a.out}/train.log")
        if os.path.exists(os.path.join(run, "eval.json")):
            break
    meta, weights = checkpoint(last)
    same_model = sha256(os.path.join(ref, "model.safetensors")) == sha256(
        os.path.join(run, "model.safetensors"))
    print(f"final step {meta['step']} (reference {steps}); final weights identical: "
          f"{weights == ref_weights}; chosen model identical: {same_model}")
    lost = [k[3] for k in kills]
    if lost:
        print(f"work lost per kill: mean {sum(lost) / len(lost):.1f} s, max {max(lost):.1f} s")
    sys.exit(0 if weights == ref_weights and same_model and meta["step"] == steps else 1)


if __name__ == "__main__":
    main()
