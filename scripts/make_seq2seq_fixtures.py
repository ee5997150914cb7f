#!/usr/bin/env python3
"""Generate tiny random-weight encoder-decoder (Marian) checkpoints + reference outputs.

The seq2seq sibling of make_fixtures.py, with its conventions (private-generator weights,
seeds retried until the greedy steps have clear margins, checkpoint reloaded and re-checked,
byte-reproducible output). Usage, with the venv of scripts/setup_python.sh:

    PYTHON=$(scripts/setup_python.sh)
    $PYTHON scripts/make_seq2seq_fixtures.py [--out tests/fixtures] [--only marian]

Every fixture directory `<out>/<name>/` contains `config.json` and `model.safetensors`
(`save_pretrained`) and `expected.safetensors`:

    source_ids          int64   [S]        source, S = 10, ids in [3, V-1) (no special ids)
    decoder_input_ids   int64   [T]        decoder_start_token_id, then T-1 = 11 random ids
    logits              float32 [T, V]     model(input_ids=source, decoder_input_ids=...).logits,
                                           batch 1, no padding, eval, float32, eager attention
    greedy              int64   [N]        N = 24 greedy tokens from decoder_start_token_id,
                                           each step a full forward of the decoder input so far
                                           (no cache); eos never appears (asserted)
    greedy_margin       float32 [N]        top-1 minus top-2 logit at each greedy step
    batch_source_ids    int64   [2, S]     row 0 = source_ids, row 1 = a shorter source right-
                                           padded with pad_token_id
    batch_source_lengths int64  [2]        real source tokens per row
    batch_decoder_input_ids int64 [2, T]   row 0 = decoder_input_ids, row 1 another input
    batch_logits        float32 [2, T, V]  logits of the padded batch, the source padding hidden
                                           by attention_mask (tests key-padding masks)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForSeq2SeqLM, MarianConfig, MarianMTModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import MAX_ABS_LOGIT, MIN_MARGIN, Retry, check, randomize  # noqa: E402

S_SOURCE = 10
S_SHORT = 7
T_DECODER = 12
N_GREEDY = 24


def fixture_specs():
    """(name, config, seed). Every field with a default gets another value, except
    is_encoder_decoder and the two that lmforge requires true: share_encoder_decoder_embeddings
    and tie_word_embeddings (false unties everything in transformers 5, giving the encoder and
    the decoder separate embedding matrices)."""
    specs = []
    # Marian as Helsinki-NLP ships it: swish, scaled embeddings, tied head, pad = decoder start.
    # Encoder and decoder depths differ so a mix-up of the two stacks cannot pass.
    specs.append(("marian", MarianConfig(
        vocab_size=96, decoder_vocab_size=96, max_position_embeddings=40,
        encoder_layers=2, encoder_ffn_dim=48, encoder_attention_heads=4,
        decoder_layers=3, decoder_ffn_dim=48, decoder_attention_heads=4,
        encoder_layerdrop=0.1, decoder_layerdrop=0.1, use_cache=False,
        activation_function="swish", d_model=32, dropout=0.2, attention_dropout=0.15,
        activation_dropout=0.05, init_std=0.03, decoder_start_token_id=95, scale_embedding=True,
        pad_token_id=95, eos_token_id=1, bos_token_id=2, forced_eos_token_id=1,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True), 3001))
    # Unscaled embeddings, ReLU, head_dim 12, one encoder layer, pad/start 0, eos at the end.
    specs.append(("marian_unscaled", MarianConfig(
        vocab_size=100, decoder_vocab_size=100, max_position_embeddings=48,
        encoder_layers=1, encoder_ffn_dim=40, encoder_attention_heads=2,
        decoder_layers=2, decoder_ffn_dim=40, decoder_attention_heads=2,
        encoder_layerdrop=0.05, decoder_layerdrop=0.05, use_cache=False,
        activation_function="relu", d_model=24, dropout=0.3, attention_dropout=0.1,
        activation_dropout=0.1, init_std=0.05, decoder_start_token_id=0, scale_embedding=False,
        pad_token_id=0, eos_token_id=99, bos_token_id=1, forced_eos_token_id=99,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True), 3002))
    return specs


@torch.no_grad()
def logits_of(model, source, decoder_input, attention_mask=None):
    out = model(input_ids=source, attention_mask=attention_mask, decoder_input_ids=decoder_input, use_cache=False)
    return out.logits.float()


@torch.no_grad()
def greedy_no_cache(model, source, start, n):
    seq = torch.tensor([[start]], dtype=torch.int64)
    new, margins = [], []
    for _ in range(n):
        last = logits_of(model, source[None], seq)[0, -1]
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(last))
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return torch.tensor(new, dtype=torch.int64), torch.tensor(margins, dtype=torch.float32)


def build_seed(out_dir, name, cfg, seed):
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = MarianMTModel(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        # The sinusoid tables are (frozen) parameters that randomize() overwrote; they are not
        # saved but rebuilt at load, so restore them.
        for table in (model.model.encoder.embed_positions, model.model.decoder.embed_positions):
            table.weight.copy_(table.create_weight())
        # The output bias is a buffer, not a parameter: give it values too, so its mapping is tested.
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g) * 0.1)

    vocab, start, pad, eos = cfg.vocab_size, cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab - 1, (n,), generator=g, dtype=torch.int64)  # noqa: E731
    while True:
        source, short, tail, tail2 = draw(S_SOURCE), draw(S_SHORT), draw(T_DECODER - 1), draw(T_DECODER - 1)
        if not ({pad, eos, start} & set(torch.cat([source, short, tail, tail2]).tolist())):
            break
    decoder_input = torch.cat([torch.tensor([start]), tail])
    logits = logits_of(model, source[None], decoder_input[None])[0]
    greedy, margins = greedy_no_cache(model, source, start, N_GREEDY)

    batch_source = torch.full((2, S_SOURCE), pad, dtype=torch.int64)
    batch_source[0] = source
    batch_source[1, :S_SHORT] = short
    lengths = torch.tensor([S_SOURCE, S_SHORT], dtype=torch.int64)
    mask = (torch.arange(S_SOURCE)[None] < lengths[:, None]).long()
    batch_decoder = torch.stack([decoder_input, torch.cat([torch.tensor([start]), tail2])])
    batch_logits = logits_of(model, batch_source, batch_decoder, mask)

    check(float(logits.abs().max()) < MAX_ABS_LOGIT, "logits too large")
    check(float(logits.std()) > 0.3, "logits too flat")
    check(float(margins.min()) > MIN_MARGIN, f"greedy near-tie {float(margins.min()):.2e}")
    check(eos not in greedy.tolist(), f"greedy emitted eos {eos}")
    check(len(set(greedy.tolist())) >= 4, "greedy output too repetitive")
    # The padded batch's first row is the unpadded example; the padding must matter for row 1.
    assert torch.allclose(batch_logits[0], logits, atol=1e-5), f"{name}: batch row 0"
    unmasked = logits_of(model, batch_source[1:], batch_decoder[1:])[0]
    assert (unmasked - batch_logits[1]).abs().max() > 1e-2, f"{name}: padding has no effect"
    short_alone = logits_of(model, short[None], batch_decoder[1:])[0]
    assert torch.allclose(short_alone, batch_logits[1], atol=1e-5), f"{name}: masked padding != no padding"

    d = os.path.join(out_dir, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))
    save_file(
        {
            "source_ids": source.contiguous(),
            "decoder_input_ids": decoder_input.contiguous(),
            "logits": logits.contiguous(),
            "greedy": greedy.contiguous(),
            "greedy_margin": margins.contiguous(),
            "batch_source_ids": batch_source.contiguous(),
            "batch_source_lengths": lengths.contiguous(),
            "batch_decoder_input_ids": batch_decoder.contiguous(),
            "batch_logits": batch_logits.contiguous(),
        },
        os.path.join(d, "expected.safetensors"),
    )

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    diff = float((logits_of(reloaded, source[None], decoder_input[None])[0] - logits).abs().max())
    assert diff < 1e-5, f"{name}: reload diff {diff}"
    from safetensors.torch import load_file

    return {
        "name": name, "seed": seed, "vocab": vocab, "min_greedy_margin": float(margins.min()),
        "max_abs_logit": float(logits.abs().max()), "reload_diff": diff,
        "source_ids": source.tolist(), "decoder_input_ids": decoder_input.tolist(), "greedy": greedy.tolist(),
        "tensors": {k: list(v.shape) for k, v in load_file(os.path.join(d, "model.safetensors")).items()},
        "config": json.load(open(os.path.join(d, "config.json"))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", help="only build these fixture names")
    ap.add_argument("--summary", help="write a JSON summary (configs, tensor listings) here")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}", file=sys.stderr)
    summary = []
    for name, cfg, base_seed in fixture_specs():
        if args.only and name not in args.only:
            continue
        for attempt in range(50):
            seed = base_seed + 1000 * attempt
            try:
                info = build_seed(args.out, name, cfg, seed)
                break
            except Retry as e:
                print(f"{name}: seed {seed} rejected ({e}); trying next", file=sys.stderr)
        else:
            raise RuntimeError(f"{name}: no acceptable seed found")
        summary.append(info)
        print(f"{name:14s} seed {info['seed']} min_margin={info['min_greedy_margin']:.4f} "
              f"max|logit|={info['max_abs_logit']:.2f} reload_diff={info['reload_diff']:.1e}", file=sys.stderr)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
