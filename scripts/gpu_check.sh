#!/usr/bin/env bash
# GPU check of candle-xent's CUDA kernels and of the CUDA training path: the `run.sh` of the
# bundle `cargo xtask gpu-check` builds. Runs on a CUDA 13 machine with PyTorch and torchvision
# (no Rust needed):
#     bash target/gpu-check/run.sh OUT_DIR
# Writes into OUT_DIR: nvidia-smi.txt, cuda-tests.log, nccl-tests.log, cuda_dump.safetensors, gpu_check.log,
# gpu_train_check.log, train-check.log, results.json, results.md. Exit status: non-zero if the
# Rust CUDA or NCCL tests, the parity, the smoke-loss comparisons or the memory check fail.
# GPU_CHECK_ARGS / GPU_TRAIN_ARGS pass extra flags to gpu_check.py / gpu_train_check.py.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${OUT:-$here/out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
cat "$here/BUILD_INFO" >> "$out/nvidia-smi.txt" 2>/dev/null || true

# The CUDA libraries candle links (cudart, nvrtc, cublas, cublasLt, curand; nccl) from PyTorch's
# nvidia wheels; the driver's libcuda.so.1 comes from the system.
libdirs=$("$py" - <<'EOF'
import glob, os, site, sys
want = ("libcudart.so.13", "libnvrtc.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
        "libnccl.so.2")
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
dirs = []
for r in roots:
    for w in want:
        for f in glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$out/nvidia-smi.txt"

if [ -d "$here/wheels" ] && ls "$here"/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site \
    "$here"/wheels/*.whl && export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The binaries travel stripped and gzipped.
for b in cuda-tests xent_cuda_bench xtask nccl-tests; do
  if [ -f "$here/$b.gz" ]; then
    gzip -dc "$here/$b.gz" > "$here/$b" && chmod +x "$here/$b"
  fi
done

status=0
echo "== Rust CUDA tests (parity vs the CPU op and the PyTorch fixtures)"
XENT_FIXTURES_DIR="$here/fixtures" XENT_CUDA_DUMP="$out/cuda_dump.safetensors" \
  "$here/cuda-tests" --test-threads=1 2>&1 | tee "$out/cuda-tests.log" || status=1

echo "== PyTorch CUDA parity and benchmark"
PYTHONUNBUFFERED=1 "$py" "$here/gpu_check.py" --fixtures "$here/fixtures" \
  --dump "$out/cuda_dump.safetensors" --bench-bin "$here/xent_cuda_bench" --out "$out" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_check.log" || status=1

echo "== candle-ddp over NCCL: a one-rank world on the device (two ranks where there are two GPUs)"
"$here/nccl-tests" --test-threads=1 2>&1 | tee "$out/nccl-tests.log" || status=1

echo "== CUDA training: train-cars --smoke vs the CPU, a ResNet-18 step vs cuDNN, memory, NCCL"
PYTHONUNBUFFERED=1 "$py" "$here/gpu_train_check.py" --xtask "$here/xtask" \
  --torch-bench "$here/bench_torch_resnet.py" --out "$out" \
  ${GPU_TRAIN_ARGS:-} 2>&1 | tee "$out/gpu_train_check.log" || status=1
exit $status
