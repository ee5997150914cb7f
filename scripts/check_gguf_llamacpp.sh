#!/usr/bin/env bash
# Export a model to GGUF at every --quant and check that llama.cpp's greedy continuation is
# lmforge's, token for token (compared as text: llama-simple prints text, not ids).
# Developer-run: building llama.cpp takes ~5 minutes on 2 cores, once.
#
#   scripts/check_gguf_llamacpp.sh [MODEL] [PROMPT] [N]
#     MODEL   default runs/quickstart (train it with `lmforge train`)
#     PROMPT  default "It is a truth"
#     N       new tokens, default 64
#   LLAMA_CPP_BIN: llama.cpp's bin directory (default: built by /work/shared/bench/build_llamacpp.sh)
#
# Both sides run the same GGUF file, so quantized files compare like for like: lmforge
# dequantizes the weights to f32, llama.cpp multiplies the quantized blocks directly.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-runs/quickstart}
prompt=${2:-It is a truth}
n=${3:-64}
bin=${LLAMA_CPP_BIN:-$(bash /work/shared/bench/build_llamacpp.sh | tail -n 1)}
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

status=0
for quant in f32 f16 q8_0 q4_0; do
  file=$out/model-$quant.gguf
  target/release/lmforge export --model "$model" --to gguf --out "$file" --quant "$quant" 2>/dev/null
  ours=$(target/release/lmforge generate --model "$file" --prompt "$prompt" --greedy --max-new-tokens "$n" 2>/dev/null)
  theirs=$("$bin/llama-simple" -m "$file" -n "$n" "$prompt" 2>/dev/null)
  theirs=${theirs#"$prompt"}
  # Trailing newlines differ between the two printers.
  if [ "$(printf '%s' "$ours" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}')" = \
       "$(printf '%s' "$theirs" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}')" ]; then
    echo "$quant: same greedy text ($(du -h "$file" | cut -f1)): $(printf '%s' "$ours" | head -c 60 | tr '\n' ' ')..."
  else
    echo "$quant: DIFFERENT"
    printf 'lmforge:   %s\nllama.cpp: %s\n' "$ours" "$theirs"
    status=1
  fi
done
exit $status
