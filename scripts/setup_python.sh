#!/usr/bin/env bash
# Build (once) the Python venv that lmforge's cross-checks against reference implementations run
# in, and print its python on stdout (everything else goes to stderr):
#
#   PYTHON=$(scripts/setup_python.sh)
#   "$PYTHON" scripts/check_export.py ...
#
# The venv lives at $LMFORGE_CACHE/venv-<hash of scripts/python-requirements.txt> (default
# ~/.cache/lmforge), so a changed requirement builds a new one and an unchanged one is reused
# without touching the network. A `complete` marker is written last: an interrupted install is
# never mistaken for a finished one. First build: ~5.6 GB (torch pulls its CUDA wheels even
# for CPU use), about 3 minutes on 2 cores with a fast mirror.
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (the interpreter to build from,
# default python3).
set -euo pipefail
cd "$(dirname "$0")"
requirements=$PWD/python-requirements.txt
cache="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
venv="$cache/venv-$(sha256sum "$requirements" | cut -c1-12)"

if [ ! -f "$venv/complete" ]; then
    echo "setup_python: building $venv from $requirements" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "${PYTHON:-python3}" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    "$venv/bin/python" -c "import torch, transformers, safetensors, numpy, gguf, sacrebleu" >&2
    touch "$venv/complete"
fi
echo "$venv/bin/python"
