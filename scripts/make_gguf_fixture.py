#!/usr/bin/env python3
"""Make tests/fixtures/mixtral_gguf: the tiny Mixtral parity fixture converted to GGUF by
llama.cpp's own converter, an independent producer of the file lmforge must read (and of the
file lmforge's exporter must write).

    PYTHON=$(scripts/setup_python.sh)
    $PYTHON scripts/make_gguf_fixture.py [--llama-cpp DIR]

DIR is the llama.cpp source tree (default: the one /work/shared/bench/build_llamacpp.sh unpacks
from PyPI's llama-cpp-python 0.3.36 sdist, ~/.cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp;
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` and untar it to get one).
Its `convert_hf_to_gguf.py` runs with its own `gguf-py`; `llama-quantize` is taken from BIN
(`--llama-cpp-bin`, default ~/.cache/llamacpp/build/bin, where build_llamacpp.sh builds it).

What goes into tests/fixtures/mixtral_gguf/:
- hf/: the converter's input, so the fixture stands alone even if tests/fixtures/mixtral is
  regenerated: config.json and model.safetensors copied from tests/fixtures/mixtral, plus a
  tiny GPT-2-style byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a chat
  template) trained here on bundled Austen text, 128 tokens to fit the model's vocabulary;
- model.gguf: `convert_hf_to_gguf.py hf --outtype f32` (llama architecture, experts stacked
  into ffn_{gate,up,down}_exps, router as ffn_gate_inp, q/k rows permuted);
- model.{f16,q8_0,q4_0}.gguf: model.gguf requantized by llama.cpp's `llama-quantize` (F16,
  Q8_0, Q4_0), the reference for lmforge's `--quant` exports, byte for byte;
- model.bf16.gguf: model.gguf rewritten by the `gguf` Python package (0.19, the venv's, run in
  a process of its own so that the converter's copy of gguf-py is not the one imported) with
  every tensor of two or more dims (matrices, router, stacked experts) in BF16, rounded to
  nearest even, and the 1-D norms in F32, as `convert_hf_to_gguf.py --outtype bf16` lays a
  file out: a file whose own matrices lmforge must hold as bf16, not widen;
- expected.safetensors: transformers' logits and greedy ids for the same weights (copied from
  tests/fixtures/mixtral, where scripts/make_fixtures.py computed them).

Two things are patched around the converter. It imports `sentencepiece` before looking for a
`tokenizer.model` (there is none, and the venv has no sentencepiece): the patch looks first.
And it names a byte-level BPE's pre-tokenizer by hashing the
ids it gives for a test string, against a table of published tokenizers, and refuses any other
(a 128-token fixture tokenizer is in no table). The patch answers "gpt-2", which is what the
tokenizer is (a plain ByteLevel pre-tokenizer). Everything else is the converter's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests/fixtures/mixtral"
OUT = ROOT / "tests/fixtures/mixtral_gguf"
DEFAULT_LLAMA_CPP = Path.home() / ".cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
DEFAULT_LLAMA_CPP_BIN = Path.home() / ".cache/llamacpp/build/bin"
QUANTS = ["F16", "Q8_0", "Q4_0"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}"
)


def train_tokenizer(vocab_size: int, out: Path) -> None:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) with `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        limit_alphabet=vocab_size - 32,  # room for some merges
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    text = (ROOT / "data/austen/persuasion.txt").read_text(encoding="utf-8").splitlines()[:4000]
    tokenizer.train_from_iterator(text, trainer)
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert(llama_cpp: Path, hf_dir: Path, outfile: Path) -> None:
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import convert_hf_to_gguf  # noqa: E402  (llama.cpp's converter)
    from conversion.base import TextModel  # noqa: E402

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    # The Llama converter tries a SentencePiece `tokenizer.model` first, importing the
    # `sentencepiece` package before it looks for the file; there is no such file here (it then
    # falls back to the byte-level BPE), so look first and skip the import.
    sentencepiece_vocab = TextModel._create_vocab_sentencepiece

    def no_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return sentencepiece_vocab(self)

    TextModel._create_vocab_sentencepiece = no_sentencepiece
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f32", "--outfile", str(outfile)]
    convert_hf_to_gguf.main()


def write_bf16(f32_file: Path, outfile: Path) -> None:
    """`f32_file` with its tensors of 2+ dims in BF16: metadata and tensor order as they are."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(f32_file)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(outfile, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, (tensor.name, tensor.tensor_type)
        values = np.asarray(tensor.data, dtype=np.float32)
        if values.ndim == 1:
            writer.add_tensor(tensor.name, values)
        else:
            bf16 = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(tensor.name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, default=DEFAULT_LLAMA_CPP)
    ap.add_argument("--llama-cpp-bin", type=Path, default=DEFAULT_LLAMA_CPP_BIN)
    ap.add_argument("--bf16", nargs=2, type=Path, metavar=("F32_GGUF", "OUT"), help="only write OUT (see above)")
    args = ap.parse_args()
    if args.bf16:
        write_bf16(*args.bf16)
        return 0
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        print(f"error: no convert_hf_to_gguf.py in {args.llama_cpp} (see --help)", file=sys.stderr)
        return 2
    quantize = args.llama_cpp_bin / "llama-quantize"
    if not quantize.is_file():
        print(f"error: no llama-quantize in {args.llama_cpp_bin} (see --help)", file=sys.stderr)
        return 2

    config = json.loads((SOURCE / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "mixtral_gguf"
        hf = staging / "hf"
        hf.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(SOURCE / name, hf / name)
        train_tokenizer(config["vocab_size"], hf)
        convert(args.llama_cpp, hf, staging / "model.gguf")
        for quant in QUANTS:
            out = staging / f"model.{quant.lower()}.gguf"
            subprocess.run([str(quantize), str(staging / "model.gguf"), str(out), quant], check=True, capture_output=True)
        bf16 = [sys.executable, __file__, "--bf16", str(staging / "model.gguf"), str(staging / "model.bf16.gguf")]
        subprocess.run(bf16, check=True)
        shutil.copy(SOURCE / "expected.safetensors", staging / "expected.safetensors")
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(staging, OUT)
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
