#!/usr/bin/env bash
# The GPU proof of lmforge's `cuda` build, in one run on a machine with an NVIDIA GPU (the
# device tool: `run(command="bash scripts/gpu/prove.sh", carry=["gpu-bundle"], timeout_s=540)`
# after `bash scripts/gpu/bundle.sh` here). Prints, and writes to $OUT (or ./prove-out):
#   (a) what the machine holds: GPU, driver, libcuda, cuBLAS/cuRAND, nvcc, Rust, Python, and
#       whether the host CPU has AMX;
#   (b) the tests on the GPU: every op against its CPU kernel (values and gradients), AdamW, a
#       run that resumes bit-identically on the GPU, a GPU run resumed on the CPU
#       (LMFORGE_REQUIRE_CUDA=1: a GPU that cannot be used fails them);
#   (c) GPT-2 124M in bf16: `bench train` (tokens/s, MFU against the H200's dense bf16 peak,
#       the datasheet figure `plan` uses) and a real training run on the bundled Austen text;
#   (d) that run's last checkpoint continued for 2 steps on the CPU and on the GPU, losses side
#       by side.
# Without gpu-bundle/ it builds on the machine instead, if it has cargo and nvcc.
# Env: STEPS (training steps, default 200), BATCH (default 8), BENCH_STEPS (default 10), OUT;
# DEVICE (default cuda) and no LMFORGE_REQUIRE_CUDA rehearse the script on a CPU machine:
#   DEVICE=cpu STEPS=2 BATCH=1 BENCH_STEPS=1 bash scripts/gpu/prove.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/prove-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/prove.log") 2>&1
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}
BENCH_STEPS=${BENCH_STEPS:-10}
DEVICE=${DEVICE:-cuda}
section() { echo; echo "=== $* ($(date -u +%T))"; }

section "(a) the machine"
# The host CPU too: an AMX one (Sapphire Rapids and later) is where lmforge's missing AMX-BF16
# and AMX-INT8 kernels (issue 15) could be tested.
amx=$(grep -m1 -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "host CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) threads; AMX: ${amx:-none}"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas|libcurand|libcudart' || echo "ldconfig lists no CUDA libraries"
# Python's NVIDIA wheels (PyTorch's) hold cuBLAS and cuRAND where no system toolkit does.
wheel_libs=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))' 2>/dev/null)
echo "NVIDIA wheel libraries: ${wheel_libs:-none}"
for tool in nvcc rustc cargo python3; do printf '%-8s %s\n' "$tool" "$(command -v $tool || echo absent)"; done
nvcc --version 2>/dev/null | tail -2
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1 | tail -1
bundle=${TMPDIR:-/tmp}/lmforge-gpu-bundle
export LD_LIBRARY_PATH="$bundle${wheel_libs:+:$wheel_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The binaries are unpacked outside the checkout, so that a rehearsal here leaves gpu-bundle/
# small enough to carry.
if [ -f gpu-bundle/binaries.tar.xz ]; then
    rm -rf "$bundle" && mkdir -p "$bundle"
    tar -xJf gpu-bundle/binaries.tar.xz -C "$bundle" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open("gpu-bundle/binaries.tar.xz").extractall(sys.argv[1])' "$bundle"
fi
if [ -f "$bundle/lmforge" ]; then
    # The test binaries look for the corpus and lmforge at the paths of the checkout they were
    # built in: recreate those.
    root=$(cat gpu-bundle/ROOT)
    if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"; fi
    bin=$(cat gpu-bundle/BIN)
    mkdir -p "$(dirname "$bin")" && cp "$bundle/lmforge" "$bin"
    lib_tests=$bundle/lib-tests device_tests=$bundle/device-tests
elif command -v cargo >/dev/null && command -v nvcc >/dev/null; then
    section "building (no gpu-bundle/)"
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
    cargo build --release --features cuda --bin lmforge || exit 1
    bin=$PWD/target/release/lmforge
    lib_tests="cargo test --release --features cuda --lib --" device_tests="cargo test --release --features cuda --test device --"
else
    echo "no gpu-bundle/ and no cargo + nvcc here: run scripts/gpu/bundle.sh first and carry gpu-bundle"
    exit 1
fi

section "(b) tests on the GPU"
[ "$DEVICE" = cpu ] || export LMFORGE_REQUIRE_CUDA=1
timeout 120 $lib_tests device 2>&1 | tail -25
timeout 240 $device_tests --test-threads=1 2>&1 | tail -15

section "(c) GPT-2 124M, bf16: one training step timed (bench train)"
gpt2="--layers 12 --heads 12 --d-model 768 --vocab 50257"
timeout 180 "$bin" bench train $gpt2 --seq-len 1024 --batch-size "$BATCH" --steps "$BENCH_STEPS" --warmup 3 \
    --precision bf16 --device "$DEVICE" --peak h200 2>&1 | tee "$OUT/bench.txt"

section "(c) GPT-2 124M, bf16, $STEPS steps on the bundled Austen text"
run=$OUT/gpt2
rm -rf "$run"
timeout 300 "$bin" train --arch gpt2 --device "$DEVICE" --precision bf16 --run "$run" --steps "$STEPS" \
    --batch-size "$BATCH" --seq-len 1024 --eval-every "$STEPS" --eval-batches 2 --checkpoint-every "$STEPS" \
    --sample-every 0 --no-supervisor 2>&1 | grep -v '^step .*ETA' | tail -8
flops=$("$bin" show gpt2 --json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["flops_forward_per_token"])' 2>/dev/null)
# Steady-state tokens/s: the median of the second half of the steps.
python3 - "$run/metrics.jsonl" "${flops:-0}" <<'PY' 2>&1
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"tok_per_s"' in l]
rate = statistics.median(s["tok_per_s"] for s in steps[len(steps) // 2:])
flops = float(sys.argv[2])  # forward FLOPs per token at full context (lmforge show)
print(f"steps {len(steps)}, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, median tok/s {rate:.0f}")
if flops:
    print(f"MFU {100 * 3 * flops * rate / 989.4e12:.1f}% of the H200's 989.4 TFLOP/s dense bf16")
PY

section "(d) the GPU run's checkpoint continued 2 steps on the CPU and on the GPU"
for device in cpu "$DEVICE"; do
    rm -rf "$run-$device" && cp -r "$run" "$run-$device"
    timeout 240 "$bin" train --resume "$run-$device" --device "$device" --steps $((STEPS + 2)) --no-supervisor 2>&1 | tail -2
done
python3 - "$run-cpu/metrics.jsonl" "$run-$DEVICE/metrics.jsonl" "$STEPS" <<'PY' 2>&1
import json, sys
def losses(path):
    return {s["step"]: s["loss"] for s in map(json.loads, open(path)) if "loss" in s and s["step"] > int(sys.argv[3])}
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
for step in sorted(cpu):
    print(f"step {step}: loss on the CPU {cpu[step]:.6f}, on the GPU {gpu.get(step, float('nan')):.6f}, relative difference {abs(cpu[step] - gpu.get(step, 0)) / abs(cpu[step]):.2e}")
PY
section "done"
