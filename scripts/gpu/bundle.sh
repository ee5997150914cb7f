#!/usr/bin/env bash
# Build what scripts/gpu/prove.sh runs on a GPU machine that has no Rust toolchain: the `cuda`
# build of lmforge, its library tests and tests/device.rs, stripped, with libcudart, into
# gpu-bundle/ (ignored by git; carry it to the GPU machine). Stripped they take about 170 MB,
# mostly candle's PTX text, so they travel xz-compressed: about 25 MB, under the device tool's
# 64 MiB. Run here, on a CPU machine:
#
#   bash scripts/gpu/bundle.sh        # then: run(command="bash scripts/gpu/prove.sh", carry=["gpu-bundle"])
#
# The test binaries hold this checkout's absolute paths (the corpus, the lmforge binary), so
# ROOT and BIN record them and prove.sh recreates them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash scripts/setup_cuda.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
cargo build --release --features cuda --bin lmforge
executables=$(cargo test --release --features cuda --no-run --lib --test device --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["kind"][0], m["executable"])')
rm -rf gpu-bundle
mkdir gpu-bundle
while read -r kind path; do
    case $kind in
        lib) cp "$path" gpu-bundle/lib-tests ;;
        test) cp "$path" gpu-bundle/device-tests ;;
    esac
done <<<"$executables"
cp "$CARGO_TARGET_DIR/release/lmforge" gpu-bundle/lmforge
strip gpu-bundle/lmforge gpu-bundle/lib-tests gpu-bundle/device-tests
cp "$CUDA_ROOT/lib/libcudart.so.13" gpu-bundle/
echo "$PWD" > gpu-bundle/ROOT
echo "$CARGO_TARGET_DIR/release/lmforge" > gpu-bundle/BIN
(cd gpu-bundle && XZ_OPT="-6 -T0" tar -cJf binaries.tar.xz lmforge lib-tests device-tests libcudart.so.13 && rm lmforge lib-tests device-tests libcudart.so.13)
du -sh gpu-bundle/* >&2
