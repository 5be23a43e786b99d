#!/bin/bash
# One prepared check of physai's CUDA path on a GPU machine (H100/H200, sm_90), under 8 minutes: build, the GPU
# tests, a memcheck of the smallest calls, the CUDA benchmarks, and an ensemble edge-of-stability run on the GPU
# against the CPU one. Prints one table at the end; exits 1 if any step failed. Each step has its own time limit
# (500 s in all; a typical run takes about 4 minutes).
#
# The GPU machine has python 3.12, torch (CUDA 13), pybind11, scikit-build-core, cmake, ninja and nvcc, but no
# package index. Bring the wheels physai and its tests need, in an ignored folder of the checkout:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl scipy-openblas32 tqdm hypothesis attrs sortedcontainers \
#     pytest-benchmark py-cpuinfo
# and run from the repository root with .whl carried:  bash benchmarks/gpu_check.sh  ($OUT: where logs go).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
declare -a ROWS
failed=0

# step NAME TIMEOUT COMMAND...: runs COMMAND with its output in $OUT/NAME.log (the tail shown), records a table row.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$name.log"
  ROWS+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - start)) s |")
  [ $rc -eq 0 ] || failed=1
  return $rc
}

# --- environment: the carried wheels into a private site directory --------------------------------------------------
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# --- build: the CPU and CUDA modules, for sm_90 only --------------------------------------------------------------
step build 180 python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 || { echo "build failed: see $OUT/build.log"; exit 1; }
step info 20 python3 -c "import json, physai; from physai import _native; \
print(json.dumps({**physai.native_info(), 'cuda_build': _native._cuda.build_info()}))"

# --- correctness ----------------------------------------------------------------------------------------------------
# The smallest calls of every function, with blocking launches, then under compute-sanitizer (every access checked).
# Sandboxed machines may refuse the sanitizer the device; its log then says so, and that failure says nothing about
# physai.
cat >"$OUT/smoke.py" <<'EOF'
import torch
import physai.cuda as pc
for dtype in (torch.float32, torch.float64):
    for bias, per_member in ((True, False), (False, True)):
        g = torch.Generator().manual_seed(0)
        E, n, d, m, k = 2, 33, 4, 16, 3
        t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).cuda()
        X, Y = t(*((E,) if per_member else ()), n, d), t(n, k)
        W, b, a = t(E, m, d), t(E, m) if bias else None, t(E, k, m)
        pc.forward(X, W, b, a, activation="gelu")
        pc.loss_and_grad(X, Y, W, b, a, activation="gelu", loss="cross_entropy")
        pc.hvp(X, Y, W, b, a, W, b, a, activation="gelu", loss="logistic")
        pc.sharpness(X, Y, W, b, a, activation="tanh", max_matvecs=5)
torch.cuda.synchronize()
print("smoke ok")
EOF
step smoke 30 env CUDA_LAUNCH_BLOCKING=1 python3 "$OUT/smoke.py"  # blocking launches: a fault names its call
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 "$OUT/smoke.py"
step gpu-tests 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_cuda.py tests/test_cuda_math.py

# --- speed: the CUDA benchmarks' ratios against torch.func ------------------------------------------------------------
step cuda-benchmarks 60 python3 benchmarks/report.py -k cuda

# --- an ensemble edge-of-stability run on the GPU, against the CPU experiment --------------------------------------
cat >"$OUT/eos_gpu.py" <<'EOF'
"""The EoS experiment's default configuration trained on the GPU (full-batch GD through physai.cuda, sharpness by
GPU power iteration every track_every steps) and on the CPU (physai.experiments.eos). Early losses must agree to
float64 rounding (the dynamics amplify differences of summation order only later, at the edge of stability); both
runs must show the edge: sharpness over the last quarter near 2/lr."""
import sys
import time

import numpy as np
import torch

import physai.cuda as pc
from physai.experiments import eos
from physai.twolayer import TwoLayer

config = eos.EosConfig()
start = time.perf_counter()
cpu = eos.run(config)
cpu_seconds = time.perf_counter() - start

X, Y = eos.make_task(config)
L = len(config.learning_rates)
net = TwoLayer(config.d, config.width, 1, "tanh", "standard", ensemble=L, dtype=config.dtype, seed=config.seed,
               same_init=True)
s = net.scaling
kw = dict(activation="tanh", loss="mse", input_scale=s.input_scale, output_scale=s.output_scale)
X, Y = torch.from_numpy(X).cuda(), torch.from_numpy(Y).cuda()
W, b, a = (torch.from_numpy(p.copy()).cuda() for p in (net.W, net.b, net.a))
lr = torch.tensor(config.learning_rates, dtype=W.dtype, device="cuda")
losses, sharpness = [], []
torch.cuda.synchronize()
start = time.perf_counter()
for step in range(config.steps):
    if step % config.track_every == 0:
        sharpness.append(pc.sharpness(X, Y, W, b, a, tol=1e-3, max_matvecs=1000, seed=step, **kw))
    value, (dW, db, da) = pc.loss_and_grad(X, Y, W, b, a, **kw)
    losses.append(value)
    W -= (lr * s.lr_W)[:, None, None] * dW
    b -= (lr * s.lr_b)[:, None] * db
    a -= (lr * s.lr_a)[:, None, None] * da
torch.cuda.synchronize()
gpu_seconds = time.perf_counter() - start
losses = torch.stack(losses).cpu().numpy()
sharpness = torch.stack(sharpness).cpu().numpy()

early = slice(0, 100)
early_gap = float(np.abs(losses[early] - cpu.losses[early]).max() / np.abs(cpu.losses[early]).max())
quarter = len(sharpness) * 3 // 4
print(f"CPU {cpu_seconds:.2f} s, GPU {gpu_seconds:.2f} s; largest relative loss gap over the first 100 steps "
      f"{early_gap:.2e}")
print("| lr | 2/lr | CPU sharpness, last quarter | GPU sharpness, last quarter | CPU loss end | GPU loss end |")
print("|---:|---:|---:|---:|---:|---:|")
ok = early_gap <= 1e-9
for i, rate in enumerate(config.learning_rates):
    cpu_edge, gpu_edge = np.mean(cpu.sharpness[quarter:, i]), np.mean(sharpness[quarter:, i])
    print(f"| {rate:g} | {2 / rate:.3f} | {cpu_edge:.3f} | {gpu_edge:.3f} | {cpu.losses[-1, i]:.3g} | "
          f"{losses[-1, i]:.3g} |")
    ok &= abs(gpu_edge - 2 / rate) <= 0.15 * (2 / rate) and abs(cpu_edge - 2 / rate) <= 0.15 * (2 / rate)
sys.exit(0 if ok else 1)
EOF
step eos-gpu 60 python3 "$OUT/eos_gpu.py"

# --- the table --------------------------------------------------------------------------------------------------------
echo
echo "| step | result | time |"
echo "|---|---|---:|"
printf '%s\n' "${ROWS[@]}"
echo "logs: $OUT"
exit $failed
