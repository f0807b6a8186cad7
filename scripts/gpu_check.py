#!/usr/bin/env python3
"""GPU check of candle-xent's CUDA kernels, the PyTorch half (run by `run.sh` of the bundle that
`cargo xtask gpu-check` prepares; see that command's docs).

1. Parity: every fixture case (crates/candle-xent/tests/fixtures) evaluated by PyTorch on CUDA in
   float64, against the committed CPU reference and against candle-xent's CUDA loss and gradient
   (dumped by the Rust test binary with XENT_CUDA_DUMP).
2. Speed and memory: forward + backward of label-smoothed cross-entropy (eps 0.1, mean) for each
   shape and dtype with torch.nn.functional.cross_entropy, Liger Kernel's LigerCrossEntropyLoss
   (when importable), and candle-xent (the Rust bench binary, JSON lines). The HBM bound is the
   logits read twice and the gradient written once at the copy bandwidth measured here.

Writes results.json and results.md into --out. Needs torch with CUDA and safetensors.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

RTOL = {"f64": 1e-12, "f32": 1e-5, "f16": 1e-3, "bf16": 8e-3}
EPS = {"f64": 2.2e-16, "f32": 1.19e-7, "f16": 9.77e-4, "bf16": 7.8e-3}


def reference(case, t, dev):
    """PyTorch's loss and gradient of sum(loss * upstream) in float64 on `dev`."""
    from xent_reference import extended

    name = case["name"]
    x = t[f"{name}.input"].to(dev, torch.float64).requires_grad_(True)
    target = t[f"{name}.target"].to(dev)
    target = target.to(torch.float64) if case["soft"] else target.to(torch.int64)
    w = t.get(f"{name}.weight")
    w = None if w is None else w.to(dev, torch.float64)
    if case.get("z_loss") or case.get("softcap"):
        loss = extended(x, target, w, case["eps"], case["ignore_index"], case["reduction"],
                        case["soft"], case.get("z_loss") or 0.0, case.get("softcap"))
    else:
        kw = dict(weight=w, label_smoothing=case["eps"], reduction=case["reduction"])
        if not case["soft"]:
            kw["ignore_index"] = case["ignore_index"]
        loss = F.cross_entropy(x, target, **kw)
    up = t[f"{name}.upstream"].to(dev, torch.float64)
    (loss * up).sum().backward()
    return loss.detach(), x.grad.detach()


def max_violation(got, want, rtol, atol):
    """Largest |got - want| / (rtol |want| + atol); NaN/inf must match exactly."""
    got, want = got.double().flatten().cpu(), want.double().flatten().cpu()
    same_nonfinite = torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(
        torch.where(torch.isinf(want), want, 0), torch.where(torch.isinf(want), got, 0))
    fin = torch.isfinite(want)
    if not fin.any():
        return 0.0 if same_nonfinite else float("inf")
    v = ((got[fin] - want[fin]).abs() / (rtol * want[fin].abs() + atol)).max().item()
    return v if same_nonfinite else float("inf")


TDT = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TINY = {"f64": 4.9e-324, "f32": 1.4e-45, "f16": 5.96e-8, "bf16": 9.2e-41}


def precision_violation(got, want, dt, scale):
    """The precision set's bound (crates/candle-xent/tests/common/precision.rs): half an ulp of
    the dtype plus 8 units of the accumulation type (f64 counted twice) times `scale` (a tensor
    like `want`); infinities the rounding to `dt` creates must match exactly."""
    got, want = got.double().flatten().cpu(), want.double().flatten().cpu()
    scale = scale.double().flatten().cpu()
    wr = want.to(TDT[dt]).double()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    inf = torch.isinf(wr)
    if not torch.equal(got[inf], wr[inf]):
        return float("inf")
    fin = torch.isfinite(wr)
    if not fin.any():
        return 0.0
    acc = 2 * 2.2204e-16 if dt == "f64" else 1.1921e-7
    ulp = torch.clamp(EPS[dt] * want[fin].abs(), min=TINY[dt])
    tol = 0.5 * ulp + 8 * acc * scale[fin]
    return ((got[fin] - want[fin]).abs() / tol).max().item()


def parity(fixtures, dump_path):
    meta = json.load(open(os.path.join(fixtures, "xent.json")))
    t = load_file(os.path.join(fixtures, "xent.safetensors"))
    ours = load_file(dump_path) if dump_path and os.path.exists(dump_path) else None
    rows, worst_torch, worst_ours = [], 0.0, 0.0
    for case in meta["cases"]:
        name, dt = case["name"], case["dtype"]
        loss, grad = reference(case, t, "cuda")
        xmax = t[f"{name}.input"].double().abs().max().item()
        acc = 2.2e-16 if dt == "f64" else 1.19e-7
        atol = min(1e-7, EPS[dt]) + 4 * xmax * acc
        # PyTorch CUDA f64 vs the committed PyTorch CPU f64 reference.
        vt = max(max_violation(loss, t[f"{name}.loss"], 1e-12, 1e-12),
                 max_violation(grad, t[f"{name}.grad"], 1e-12, 1e-12))
        rec = dict(case=name, dtype=dt, torch_cuda_vs_cpu=vt)
        worst_torch = max(worst_torch, vt)
        if ours is not None and case.get("precision"):
            x = t[f"{name}.input"]
            rows = 1 if x.dim() == 1 else x.numel() // x.shape[1]
            extra = rows if case["reduction"] == "sum" else 1
            gfin = grad[torch.isfinite(grad)]
            gmax = gfin.abs().max().item() if gfin.numel() else 0.0
            vo = max(precision_violation(ours[f"{name}.loss"], loss, dt, loss.abs() + extra),
                     precision_violation(ours[f"{name}.grad"], grad, dt,
                                         torch.full_like(grad, gmax)))
            rec["candle_cuda_vs_torch_cuda"] = vo
            worst_ours = max(worst_ours, vo)
        elif ours is not None:
            vo = max(max_violation(ours[f"{name}.loss"], loss, RTOL[dt], atol),
                     max_violation(ours[f"{name}.grad"], grad, RTOL[dt], atol))
            rec["candle_cuda_vs_torch_cuda"] = vo
            worst_ours = max(worst_ours, vo)
        rows.append(rec)
    return dict(cases=len(rows), worst_torch_cuda_vs_cpu=worst_torch,
                worst_candle_vs_torch_cuda=worst_ours if ours is not None else None,
                passed=(ours is not None and worst_ours <= 1.0), per_case=rows)


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda")  # 4 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    secs = s.elapsed_time(e) / 1e3 / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 32) / secs  # bytes read + written per second


def bench_torch(kind, rows, classes, dtype, iters):
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (2 * torch.randn(rows, classes, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    y = torch.randint(0, classes, (rows,), device="cuda", generator=g)
    if kind == "torch":
        def step():
            loss = F.cross_entropy(x, y, label_smoothing=0.1)
            loss.backward()
            x.grad = None
            return loss
    else:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        lce = LigerCrossEntropyLoss(label_smoothing=0.1)

        def step():
            loss = lce(x, y)
            loss.backward()
            x.grad = None
            return loss
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        loss = step()
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / iters
    out = dict(impl="torch" if kind == "torch" else "liger", mode="autograd", rows=rows,
               classes=classes, dtype=str(dtype).replace("torch.", ""), ms=ms,
               extra_peak_bytes=peak, logits_bytes=x.numel() * x.element_size(),
               loss=float(loss))
    del x, y
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--dump", help="safetensors written by the Rust test (XENT_CUDA_DUMP)")
    ap.add_argument("--bench-bin", help="candle-xent's xent_cuda_bench binary")
    ap.add_argument("--shapes", default="16384x32768,16384x131072")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, a.fixtures)
    os.makedirs(a.out, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    res["parity"] = parity(a.fixtures, a.dump)
    print(f"parity: {res['parity']['cases']} cases, worst candle-vs-torch-cuda "
          f"{res['parity']['worst_candle_vs_torch_cuda']} (<= 1 passes), torch cuda vs cpu "
          f"{res['parity']['worst_torch_cuda_vs_cpu']}", flush=True)
    bw = copy_bandwidth()
    res["copy_bandwidth_bytes_per_s"] = bw
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    dts = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    runs = []
    try:
        import liger_kernel  # noqa: F401
        kinds = ["torch", "liger"]
    except Exception as e:  # not carried, or no triton
        print(f"liger not available: {e}", flush=True)
        kinds = ["torch"]
    for rows, classes in shapes:
        for dn in a.dtypes.split(","):
            for kind in kinds:
                try:
                    r = bench_torch(kind, rows, classes, dts[dn], a.iters)
                except Exception as e:
                    r = dict(impl=kind, rows=rows, classes=classes, dtype=dn, error=str(e))
                print(json.dumps(r), flush=True)
                runs.append(r)
    if a.bench_bin:
        p = subprocess.run([a.bench_bin, a.shapes, a.dtypes, str(a.iters)], capture_output=True,
                           text=True)
        sys.stderr.write(p.stderr[-4000:])
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                r["dtype"] = r["dtype"].lower().replace("bf16", "bfloat16").replace("f32", "float32")
                print(json.dumps(r), flush=True)
                runs.append(r)
    for r in runs:
        if "ms" in r:
            r["hbm_bound_ms"] = 3 * r["logits_bytes"] / bw * 1e3
            r["x_of_bound"] = r["ms"] / r["hbm_bound_ms"]
            r["extra_over_grad"] = r["extra_peak_bytes"] / r["logits_bytes"]
    res["bench"] = runs
    json.dump(res, open(os.path.join(a.out, "results.json"), "w"), indent=1)
    md = [f"# candle-xent GPU check on {res['device']} (torch {res['torch']})", "",
          f"Parity: {res['parity']['cases']} fixture cases; worst candle-xent CUDA vs PyTorch CUDA "
          f"= {res['parity']['worst_candle_vs_torch_cuda']} of the tolerance; PyTorch CUDA vs "
          f"CPU reference = {res['parity']['worst_torch_cuda_vs_cpu']}.", "",
          f"Copy bandwidth {bw / 1e12:.2f} TB/s; bound = logits read twice + gradient written once.",
          "", "| shape | dtype | impl | mode | ms | x bound | extra peak / logits |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "ms" in r:
            md.append(f"| {r['rows']}x{r['classes']} | {r['dtype']} | {r['impl']} | {r['mode']} | "
                      f"{r['ms']:.2f} | {r['x_of_bound']:.2f} | {r['extra_over_grad']:.2f} |")
        else:
            md.append(f"| {r['rows']}x{r['classes']} | {r['dtype']} | {r['impl']} | error: "
                      f"{r['error'][:80]} | | | |")
    open(os.path.join(a.out, "results.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if res["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
