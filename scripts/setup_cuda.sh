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
# ~/.cache/lmforge), so an unchanged requirement is reused without touching the network; a
# `complete` marker is written last. First install: ~400 MB, under a minute with a fast mirror.
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (default python3), CUDA_COMPUTE_CAP.
set -euo pipefail
cd "$(dirname "$0")"
requirements=$PWD/cuda-requirements.txt
cache="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
venv="$cache/cuda-$(sha256sum "$requirements" | cut -c1-12)"

if [ ! -f "$venv/complete" ]; then
    echo "setup_cuda: installing the CUDA compiler into $venv from $requirements" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "${PYTHON:-python3}" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
    # The linker looks for the unversioned name; the wheel ships only libcudart.so.13.
    ln -sf libcudart.so.13 "$root/lib/libcudart.so"
    "$root/bin/nvcc" --version >&2
    echo "$root" > "$venv/cuda_root"
    touch "$venv/complete"
fi
root=$(cat "$venv/cuda_root")
cat <<ENV
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
ENV
