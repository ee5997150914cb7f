#!/usr/bin/env bash
# Fetch Intel MKL (the PyPI wheel `mkl==2026.2.0`, 221 MB, x86-64 Linux) for lmforge's optional
# BLAS path, and print the path of its single-entry library libmkl_rt.so.3 on stdout
# (everything else goes to stderr):
#
#   export LMFORGE_BLAS=$(scripts/fetch_mkl.sh)
#   lmforge bench train            # prints "gemm: BLAS: Intel(R) oneAPI Math Kernel Library ..."
#
# Only the libraries that libmkl_rt loads for a sequential sgemm are extracted (440 MB): the
# runtime dispatcher, the core, the 32-bit-integer interface, the sequential threading layer
# and the per-CPU kernels. MKL's license is Intel's Simplified Software License (the wheel's
# LICENSE.txt, copied beside them), not lmforge's.
# Idempotent: an extracted copy is reused without touching the network.
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (default python3).
set -euo pipefail

CACHE="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
DIR="$CACHE/mkl"
VERSION="2026.2.0"
WHEEL="mkl-$VERSION-py2.py3-none-manylinux_2_28_x86_64.whl"
SHA256="eaab1875ce9f47ab3c66d5632cef06baf768c05781f2f28847bdbc4343500ed7"
LIBS="rt core intel_lp64 sequential def mc3 avx2 avx512 avx10"
PYTHON="${PYTHON:-python3}"
RT="$DIR/lib/libmkl_rt.so.3"

if [ -f "$DIR/lib/.complete-$VERSION" ]; then
    echo "$RT"
    exit 0
fi

mkdir -p "$DIR"
if ! { [ -f "$DIR/$WHEEL" ] && echo "$SHA256  $DIR/$WHEEL" | sha256sum --check --status; }; then
    echo "fetch_mkl: downloading mkl==$VERSION into $DIR" >&2
    rm -f "$DIR/$WHEEL"
    "$PYTHON" -m pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 \
        --dest "$DIR" "mkl==$VERSION" >&2
    if [ ! -f "$DIR/$WHEEL" ]; then
        echo "fetch_mkl: pip did not produce $DIR/$WHEEL (is this an x86-64 Linux machine?)" >&2
        exit 1
    fi
    if ! echo "$SHA256  $DIR/$WHEEL" | sha256sum --check --status; then
        echo "fetch_mkl: $DIR/$WHEEL: sha256 $(sha256sum "$DIR/$WHEEL" | cut -d' ' -f1), expected $SHA256" >&2
        exit 1
    fi
fi

# Extract into a temporary folder first so an interrupted run leaves no half library behind.
echo "fetch_mkl: extracting libmkl_{${LIBS// /,}}.so.3 from $WHEEL" >&2
rm -rf "$DIR/lib.partial"
"$PYTHON" - "$DIR/$WHEEL" "$DIR/lib.partial" $LIBS <<'PY'
import os, shutil, sys, zipfile
wheel, out, *libs = sys.argv[1:]
os.makedirs(out)
with zipfile.ZipFile(wheel) as z:
    names = {os.path.basename(n): n for n in z.namelist() if "/lib/" in n}
    for lib in libs:
        name = f"libmkl_{lib}.so.3"
        if name not in names:
            sys.exit(f"fetch_mkl: {wheel} has no {name}")
        with z.open(names[name]) as src, open(os.path.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(os.path.join(out, name), 0o755)
    license = next((n for n in z.namelist() if n.endswith("LICENSE.txt")), None)
    if license:
        with z.open(license) as src, open(os.path.join(out, "LICENSE.txt"), "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
touch "$DIR/lib.partial/.complete-$VERSION"
rm -rf "$DIR/lib"
mv "$DIR/lib.partial" "$DIR/lib"
echo "$RT"
