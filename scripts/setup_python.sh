#!/usr/bin/env bash
# Build (once) the Python venv that lmforge's cross-checks against reference implementations run
# in, and print its python on stdout (everything else goes to stderr):
#
#   PYTHON=$(scripts/setup_python.sh)
#   "$PYTHON" scripts/check_export.py ...
#
# The venv lives at $LMFORGE_CACHE/venv-<hash of scripts/python-requirements.txt> (default
# ~/.cache/lmforge), built and reused as scripts/cached_venv.sh says. First build: ~5.6 GB
# (torch pulls its CUDA wheels even for CPU use), about 3 minutes on 2 cores with a fast mirror.
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (the interpreter to build from,
# default python3).
set -euo pipefail
cd "$(dirname "$0")"
source ./cached_venv.sh

check_imports() {
    "$1/bin/python" -c "import torch, transformers, safetensors, numpy, gguf, sacrebleu"
}

venv=$(cached_venv venv "$PWD/python-requirements.txt" check_imports)
echo "$venv/bin/python"
