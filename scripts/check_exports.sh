#!/usr/bin/env bash
# Export every parity fixture with `lmforge export --to hf`, score it with lmforge, and check
# that Hugging Face `transformers` loads the export and reproduces the logits (max |diff| <= 1e-4).
# Developer-run (needs Python with torch + transformers):
#   PYTHON=/path/to/venv/bin/python scripts/check_exports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ids=5,17,91,3,44,2,60,7,8,9
for dir in tests/fixtures/*/; do
  name=$(basename "$dir")
  [ -f "$dir/model.safetensors" ] || continue
  target/release/lmforge export --model "$dir" --to hf --out "$out/$name"
  # Encoder-decoder exports are scored on a source, with the decoder input after its start token.
  source=()
  if grep -q '"is_encoder_decoder": true' "$dir/config.json"; then
    source=(--source-ids "$ids")
    decoder_ids="$(sed -n 's/.*"decoder_start_token_id": \([0-9]*\).*/\1/p' "$out/$name/config.json"),$ids"
  else
    decoder_ids=$ids
  fi
  target/release/lmforge score --model "$out/$name" "${source[@]}" --ids "$decoder_ids" --out "$out/$name.logits.safetensors"
  echo -n "$name: "
  "$PYTHON" scripts/check_export.py "$out/$name" "$decoder_ids" "$out/$name.logits.safetensors" "${source[@]}" | tail -n 2 | tr '\n' ' '
  echo
done
