#!/usr/bin/env bash
# The exports checked by the reference implementation: for every parity fixture in
# tests/fixtures, `lmforge export --to hf`, and check with scripts/check_export.py that Hugging
# Face `transformers` loads the export (every tensor present, the transformers 5 config layout)
# and gives the logits lmforge gives for the model it exported, within 1e-4. (lmforge scores
# the source, not the export: an export that misstates the model, say Phi's partial rotary
# factor, would read back the same wrong way in both.) One line per fixture; exits non-zero
# when any fixture fails or none is found. Run by .ci/run:
#
#   PYTHON=$(scripts/setup_python.sh) scripts/check_exports.sh
#
# Env: PYTHON (an interpreter with torch + transformers; default python3), LMFORGE (the binary;
# default: build target/release/lmforge).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${LMFORGE:-}" ]; then
  cargo build --release --quiet || exit 1
  LMFORGE=target/release/lmforge
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 40 positions: past every fixture's sliding window and YaRN/llama3 original context, inside
# every vocabulary (the smallest is 96) and context length (64).
ids=$(seq -s, 1 2 79)
checked=0
failed=()
for dir in tests/fixtures/*/; do
  name=$(basename "$dir")
  [ -f "$dir/config.json" ] || continue
  checked=$((checked + 1))
  log="$out/$name.log"
  if "$LMFORGE" export --model "$dir" --to hf --out "$out/$name" >"$log" 2>&1 &&
    "$LMFORGE" score --model "$dir" --ids "$ids" --out "$out/$name.logits.safetensors" >>"$log" 2>&1 &&
    "$PYTHON" scripts/check_export.py "$out/$name" "$ids" "$out/$name.logits.safetensors" >>"$log" 2>&1; then
    echo "$name: $(grep '^max abs diff' "$log")"
  else
    echo "$name: FAILED"
    sed 's/^/    /' "$log"
    failed+=("$name")
  fi
done

if [ "$checked" -eq 0 ]; then
  echo "check_exports: no fixtures found under tests/fixtures" >&2
  exit 1
fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "check_exports: ${#failed[@]} of $checked exports failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_exports: all $checked exports load in transformers with lmforge's logits"
