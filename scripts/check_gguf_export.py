#!/usr/bin/env python3
"""Check that GGUF files exported by lmforge load in transformers' GGUF loader and reproduce
the logits lmforge computed.

Usage:
    python scripts/check_gguf_export.py FILE.gguf [FILE.gguf ...] [--tol 1e-4]

Each FILE.gguf comes with FILE.gguf.expected.safetensors holding `input_ids` (int64 [seq]) and
`logits` (float32 [seq, vocab]) from lmforge. Each model is loaded with
    AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)
(transformers dequantizes the file and undoes llama.cpp's q/k row permutation itself), run on
the ids in one forward pass, and compared. One line per file; exit status 0 when every max
|difference| is <= tol, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's per-tensor progress bar
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    failed = False
    for path in args.files:
        expected_path = path + ".expected.safetensors"
        if not os.path.isfile(path) or not os.path.isfile(expected_path):
            print(f"error: need {path} and {expected_path}", file=sys.stderr)
            return 2
        expected = load_file(expected_path)
        ids = expected["input_ids"].to(torch.int64)
        want = expected["logits"].to(torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)),
            gguf_file=os.path.basename(path),
            dtype=torch.float32,
            attn_implementation="eager",
        )
        model.eval()
        with torch.no_grad():
            got = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()
        if got.shape != want.shape:
            print(f"{path}: FAIL shape {tuple(got.shape)} from transformers, {tuple(want.shape)} from lmforge")
            failed = True
            continue
        diff = float((got - want).abs().max())
        agree = int((got.argmax(-1) == want.argmax(-1)).sum())
        verdict = "OK" if diff <= args.tol else "FAIL"
        print(
            f"{path}: {verdict} {type(model).__name__}, max |logit diff| {diff:.3e} (tol {args.tol:g}), "
            f"argmax agrees at {agree}/{len(ids)} positions"
        )
        failed |= diff > args.tol
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
