#!/usr/bin/env python3
"""Check that a Hugging Face directory exported by lmforge loads in `transformers`
and reproduces the logits lmforge computed.

Usage:
    python scripts/check_export.py EXPORT_DIR IDS_CSV LOGITS_SAFETENSORS [--tol 1e-4]

    EXPORT_DIR          directory with config.json + model.safetensors (HF layout)
    IDS_CSV             token ids, comma separated, e.g. "5,17,3,99" -- or the path of
                        a file containing such a list (commas and/or whitespace/newlines)
    LOGITS_SAFETENSORS  safetensors file with one float32 tensor `logits` [seq, vocab]
                        (a leading batch dim of 1 is accepted)

The model is loaded with
    AutoModelForCausalLM.from_pretrained(EXPORT_DIR, attn_implementation="eager")
in float32 on CPU and run on the ids (batch 1, no padding, no KV cache).
Prints the max absolute difference; exit status 0 if it is <= tol (default
1e-4), 1 if larger, 2 on a usage / shape error, or when config.json is not in the
layout transformers 5 writes (RoPE settings at the top level instead of in
`rope_parameters`).

Example (self-check against a fixture's own reference logits):
    ids=$(python -c "from safetensors.torch import load_file; \
print(','.join(map(str, load_file('tests/fixtures/llama_gqa/expected.safetensors')['input_ids'].tolist())))")
    python scripts/check_export.py tests/fixtures/llama_gqa "$ids" tests/fixtures/llama_gqa/expected.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from safetensors.torch import load_file


def parse_ids(arg: str) -> list[int]:
    text = open(arg).read() if os.path.isfile(arg) else arg
    toks = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    return [int(t) for t in toks]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("ids_csv")
    ap.add_argument("logits_safetensors")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    import transformers

    transformers.utils.logging.disable_progress_bar()

    ids = parse_ids(args.ids_csv)
    if not ids:
        print("error: no ids given", file=sys.stderr)
        return 2

    with open(os.path.join(args.export_dir, "config.json")) as f:
        legacy = sorted({"rope_theta", "partial_rotary_factor", "rope_scaling"} & set(json.load(f)))
    if legacy:
        print(f"error: config.json has the transformers 4.x keys {legacy}; transformers 5 writes them in "
              "`rope_parameters`", file=sys.stderr)
        return 2

    tensors = load_file(args.logits_safetensors)
    if "logits" not in tensors:
        print(f"error: no `logits` tensor in {args.logits_safetensors} (has {sorted(tensors)})", file=sys.stderr)
        return 2
    expected = tensors["logits"].to(torch.float32)
    if expected.ndim == 3 and expected.shape[0] == 1:
        expected = expected[0]

    model, info = AutoModelForCausalLM.from_pretrained(
        args.export_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    # transformers silently random-initialises missing tensors (only a log warning);
    # treat that, and shape mismatches, as hard errors.  Unexpected (extra) tensors
    # are reported but tolerated (e.g. an explicit lm_head.weight in a tied model).
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys", "error_msgs"):
        vals = sorted(str(v) for v in (info.get(kind) or []))
        if vals:
            print(f"{kind}: {vals}", file=sys.stderr)
    if info.get("missing_keys") or info.get("mismatched_keys") or info.get("error_msgs"):
        print("error: checkpoint does not match the architecture", file=sys.stderr)
        return 2
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        print(f"error: ids out of range for vocab {vocab}: {bad[:10]}", file=sys.stderr)
        return 2

    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids], dtype=torch.int64), use_cache=False).logits[0].float()

    if tuple(got.shape) != tuple(expected.shape):
        print(f"error: shape mismatch: transformers {tuple(got.shape)} vs file {tuple(expected.shape)}",
              file=sys.stderr)
        return 2

    diff = (got - expected).abs()
    max_diff = float(diff.max())
    pos, col = divmod(int(diff.argmax()), diff.shape[1])
    argmax_agree = int((got.argmax(-1) == expected.argmax(-1)).sum())
    print(f"max abs diff: {max_diff:.3e} (at position {pos}, vocab id {col}); "
          f"argmax agrees at {argmax_agree}/{len(ids)} positions; tol {args.tol:g}")
    if max_diff > args.tol:
        print("FAIL", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
