#!/usr/bin/env bash
# Install (once) the CUDA compiler and headers that `cargo build --features cuda` needs, from
# PyPI wheels, and print the environment to build with on stdout (everything else goes to
# stderr):
#
#   eval "$(scripts/setup_cuda.sh)"
#   cargo build --release --features cuda
#
# What the build needs, and why:
# - `nvcc` on PATH (with cicc, ptxas, fatbinary and the CUDA headers beside it): candle-kernels'
#   build script compiles its .cu files to PTX and to a static library with it, and cudarc reads
#   the CUDA version from `nvcc --version`.
# - CUDA_COMPUTE_CAP: the GPU generation to compile for; without a GPU there is no nvidia-smi
#   to ask. Default 90 (Hopper: H100, H200); set it before calling for another GPU (80 for
#   A100, 89 for L4/L40, 100 for B200).
# - libcudart: candle-kernels' static library links it (LIBRARY_PATH at link time,
#   LD_LIBRARY_PATH at run time, so binaries of this build start even without a GPU).
# The driver (libcuda), cuBLAS and cuRAND are loaded when a CUDA device is first opened, not at
# link time (vendor/README.md), so a machine without them builds and runs on the CPU.
#
# The venv lives at $LMFORGE_CACHE/cuda-<hash of scripts/cuda-requirements.txt> (default
# ~/.cache/lmforge), built and reused as scripts/cached_venv.sh says. First install: ~400 MB,
# under a minute with a fast mirror.
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (default python3), CUDA_COMPUTE_CAP.
set -euo pipefail
cd "$(dirname "$0")"
source ./cached_venv.sh

# Where the wheels put CUDA 13, and the unversioned libcudart the linker looks for (the wheel
# ships only libcudart.so.13).
find_cuda_root() {
    local root
    root=$("$1/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))') || return
    ln -sf libcudart.so.13 "$root/lib/libcudart.so" || return
    "$root/bin/nvcc" --version || return
    echo "$root" > "$1/cuda_root"
}

venv=$(cached_venv cuda "$PWD/cuda-requirements.txt" find_cuda_root)
root=$(cat "$venv/cuda_root")
cat <<ENV
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
ENV
