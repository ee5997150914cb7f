#!/usr/bin/env python3
"""Generate tiny random-weight Hugging Face checkpoints + reference outputs.

These fixtures are the ground truth for lmforge's parity tests: the Rust
implementation loads `config.json` + `model.safetensors` from each fixture
directory, runs `input_ids`, and must reproduce `logits` (to ~1e-4) and the
greedy continuation `greedy` (exactly).

Usage (see tests/fixtures/README.md for the environment):

    python -m venv /root/.cache/lmforge/venv-fixtures
    /root/.cache/lmforge/venv-fixtures/bin/pip install torch transformers safetensors numpy
    /root/.cache/lmforge/venv-fixtures/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Every fixture directory `<out>/<name>/` contains

    config.json          written by `save_pretrained`
    model.safetensors    written by `save_pretrained(..., safe_serialization=True)`,
                         always a single, non-sharded file
    expected.safetensors reference outputs:
        input_ids     int64   [T]        fixed prompt (T = 12), every id < vocab
        logits        float32 [T, V]     logits of `input_ids` (batch 1, no padding,
                                         eval mode, float32, attn_implementation="eager")
        greedy        int64   [N]        greedy continuation, N = 24 (30 for mistral),
                                         computed WITHOUT a KV cache: each step runs a
                                         full forward over the whole sequence so far,
                                         takes argmax of the last position, appends.
                                         Generation never stops early (no EOS check);
                                         the script asserts eos_token_id never appears.
        full_ids      int64   [T+N]      input_ids ++ greedy
        full_logits   float32 [T+N, V]   logits of one full forward over full_ids
                                         (handy to find the first diverging position)
        greedy_margin float32 [N]        top1 - top2 logit gap at each greedy step
                                         (all asserted > MIN_MARGIN, so argmax is robust)

Determinism: every fixture has its own fixed seed; weights are re-initialised by
`randomize()` below with a private torch.Generator, so the output does not
depend on transformers' own init code.  The script is deterministic on CPU for a
given torch/transformers version (it forces CPU and float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    MptConfig,
    MptForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

T_PROMPT = 12  # prompt length (> mistral sliding window of 6)
N_GREEDY = 24  # default number of greedy tokens
MIN_MARGIN = 2e-3  # minimum top1-top2 logit gap accepted for each greedy step
MIN_ROUTER_GAP = 1e-2  # mixtral: minimum gap between k-th and (k+1)-th router logit
MAX_ABS_LOGIT = 50.0  # sanity bound: keep logits in a sane range

# Token ids reserved in every config: bos = 0, eos = V - 1.  Greedy output is
# asserted never to contain eos, so a Rust generator that stops on EOS still
# produces exactly N tokens.


# --------------------------------------------------------------------------
# Weight initialisation
# --------------------------------------------------------------------------
def randomize(model: torch.nn.Module, seed: int, std: float = 0.2, overrides: dict | None = None) -> None:
    """Re-initialise every parameter from a private generator.

    * matrices / 3-D tensors (linear, embedding, Conv1D, fused experts): N(0, std)
    * 1-D `bias` parameters: N(0, 0.1)   (non-zero so bias bugs are caught)
    * other 1-D parameters (LayerNorm / RMSNorm weights): N(1, 0.2)
      (not all-ones so norm-weight bugs are caught)
    `overrides` maps a name substring to a std for matrices (e.g. the router).

    `named_parameters()` de-duplicates shared tensors, so tied embeddings are
    initialised once and stay tied.
    """
    g = torch.Generator().manual_seed(seed)
    overrides = overrides or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                if name.endswith("bias"):
                    p.copy_(noise * 0.1)
                else:
                    p.copy_(1.0 + noise * 0.2)
            else:
                s = std
                for key, val in overrides.items():
                    if key in name:
                        s = val
                p.copy_(noise * s)


# --------------------------------------------------------------------------
# Reference computations
# --------------------------------------------------------------------------
@torch.no_grad()
def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [len, V] for a single un-padded sequence, no KV cache."""
    out = model(input_ids=ids[None, :], use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy_no_cache(model, ids: torch.Tensor, n: int):
    """Ground-truth greedy decoding: full forward over the whole sequence at each step."""
    seq = ids.clone()
    new, margins = [], []
    for _ in range(n):
        last = forward_logits(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(last))
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt], dtype=torch.int64)])
    return torch.tensor(new, dtype=torch.int64), torch.tensor(margins, dtype=torch.float32)


def make_prompt(vocab: int, seed: int) -> torch.Tensor:
    """Fixed prompt of T_PROMPT ids in [1, vocab-2] (avoids bos=0 and eos=vocab-1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (T_PROMPT,), generator=g, dtype=torch.int64)


@torch.no_grad()
def mixtral_router_gap(model, ids: torch.Tensor) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over all
    tokens/layers of a forward over `ids` (guards against top-k ties that would
    make expert choice numerically fragile)."""
    k = model.config.num_experts_per_tok
    gaps = []

    def hook(mod, inp, out):
        h = inp[0].reshape(-1, mod.weight.shape[1])
        # top-k of softmax == top-k of the raw logits, so measure the gap there
        srt = torch.sort(h @ mod.weight.T, dim=-1, descending=True).values
        gaps.append(float((srt[:, k - 1] - srt[:, k]).min()))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    forward_logits(model, ids)
    for h in handles:
        h.remove()
    return min(gaps)


# --------------------------------------------------------------------------
# Fixture definitions
# --------------------------------------------------------------------------
def rope(theta: float, **extra) -> dict:
    d = {"rope_type": "default", "rope_theta": float(theta)}
    d.update(extra)
    return d


def fixture_specs():
    """(name, model_class, config, seed, n_greedy, randomize-overrides)."""
    common_ids = dict(bos_token_id=0, pad_token_id=None)
    specs = []

    # GPT-2: tied wte/lm_head, learned absolute positions (wpe), gelu_new,
    # Conv1D weights stored [in, out], fused c_attn = [q | k | v].
    specs.append(("gpt2", GPT2LMHeadModel, GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=128,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, eos_token_id=95, **common_ids), 1001, N_GREEDY, {}))

    # Llama MHA: heads 4, kv heads 4, head_dim 12 (not a power of two), untied.
    specs.append(("llama_mha", LlamaForCausalLM, LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters=rope(10000.0), hidden_act="silu",
        tie_word_embeddings=False, eos_token_id=127, **common_ids), 1002, N_GREEDY, {}))

    # Llama GQA: heads 4, kv heads 2, rope_theta 10000, TIED embeddings.
    specs.append(("llama_gqa", LlamaForCausalLM, LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters=rope(10000.0), hidden_act="silu",
        tie_word_embeddings=True, eos_token_id=127, **common_ids), 1003, N_GREEDY, {}))

    # Llama MQA: heads 4, kv heads 1, rope_theta 500000, untied.
    specs.append(("llama_mqa", LlamaForCausalLM, LlamaConfig(
        vocab_size=112, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters=rope(500000.0), hidden_act="silu",
        tie_word_embeddings=False, eos_token_id=111, **common_ids), 1004, N_GREEDY, {}))

    # Mistral: heads 4, kv heads 2, sliding_window 6 < T=12, 30 greedy tokens.
    # Window semantics in this transformers version (masking_utils.py):
    #     sliding_window_overlay:  `return kv_idx > q_idx - sliding_window`
    #     causal_mask_function:    `return kv_idx <= q_idx`
    # i.e. query i attends to key j iff  i - W < j <= i  (i - j < W): itself
    # plus the W-1 previous tokens, W keys in total.  verify_sliding_window()
    # below re-checks this at run time.
    specs.append(("mistral", MistralForCausalLM, MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters=rope(10000.0), hidden_act="silu",
        sliding_window=6, tie_word_embeddings=False, eos_token_id=127, **common_ids),
        1005, 30, {}))

    # Mixtral: 4 experts, top-2, heads 4, kv 2, no sliding window.
    # Router std is larger so the top-2 choice is never a near-tie.
    specs.append(("mixtral", MixtralForCausalLM, MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters=rope(10000.0), hidden_act="silu",
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        router_jitter_noise=0.0, tie_word_embeddings=False, eos_token_id=127, **common_ids),
        1006, N_GREEDY, {"mlp.gate.weight": 0.6}))

    # Phi (Phi-2 architecture): partial rotary 0.5 (head_dim 16 -> 8 rotary dims),
    # parallel attention+MLP off one shared input_layernorm, biases everywhere
    # incl. lm_head, gelu_new, LayerNorm, final_layernorm, untied.
    specs.append(("phi", PhiForCausalLM, PhiConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        layer_norm_eps=1e-5, rope_parameters=rope(10000.0, partial_rotary_factor=0.5),
        hidden_act="gelu_new", qk_layernorm=False, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, eos_token_id=127, **common_ids),
        1007, N_GREEDY, {}))

    # MPT: ALiBi (alibi_bias_max 8), no_bias=True, tied embeddings, exact-erf GELU,
    # MLP width is always 4*d_model in transformers (expansion_ratio ignored).
    def mpt_cfg(d_model, n_heads, vocab):
        return MptConfig(
            d_model=d_model, n_heads=n_heads, n_layers=2, expansion_ratio=4, max_seq_len=64,
            vocab_size=vocab, layer_norm_epsilon=1e-5, no_bias=True, learned_pos_emb=False,
            attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0,
                         "clip_qkv": None, "softmax_scale": None, "qk_ln": False},
            resid_pdrop=0.0, emb_pdrop=0.0, tie_word_embeddings=True,
            eos_token_id=vocab - 1, bos_token_id=0, pad_token_id=None)

    specs.append(("mpt", MptForCausalLM, mpt_cfg(32, 4, 128), 1008, N_GREEDY, {}))
    # 6 heads: not a power of two -> exercises the interleaved-slope rule.
    specs.append(("mpt_heads6", MptForCausalLM, mpt_cfg(48, 6, 96), 1009, N_GREEDY, {}))
    return specs


# --------------------------------------------------------------------------
# Self-checks of semantics that the README documents
# --------------------------------------------------------------------------
def verify_sliding_window(model) -> None:
    """Assert that the eager sliding-window mask lets query i see key j iff 0 <= i-j < W."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    w = model.config.sliding_window
    n = 2 * w + 3
    emb = torch.zeros(1, n, model.config.hidden_size)
    mask = create_sliding_window_causal_mask(
        config=model.config, inputs_embeds=emb, attention_mask=None, cache=None,
        position_ids=torch.arange(n)[None])
    allowed = mask[0, 0] == 0  # eager masks are additive: 0 = attend, finfo.min = masked
    for i in range(n):
        for j in range(n):
            assert bool(allowed[i, j]) == (0 <= i - j < w), (i, j)


def expected_mpt_slopes(n_heads: int, alibi_bias_max: int = 8) -> list[float]:
    """Closed form of transformers' build_mpt_alibi_tensor slopes (documented in the README):
    n2 = next power of two >= n_heads; slope_k = 2^-(k * alibi_bias_max / n2), k = 1..n2;
    if n2 != n_heads: take the odd-indexed (1,3,5,...) then even-indexed (0,2,4,...)
    entries of that list and keep the first n_heads."""
    import math

    n2 = 2 ** math.ceil(math.log2(n_heads))
    s = [2.0 ** -(k * alibi_bias_max / n2) for k in range(1, n2 + 1)]
    if n2 != n_heads:
        s = (s[1::2] + s[0::2])[:n_heads]
    return s


def verify_alibi(model) -> list[float]:
    """Check the installed build_mpt_alibi_tensor against expected_mpt_slopes()."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    h = model.config.n_heads
    L = 5
    alibi = build_mpt_alibi_tensor(h, L, alibi_bias_max=8)  # [H, 1, L]
    assert tuple(alibi.shape) == (h, 1, L)
    slopes = expected_mpt_slopes(h)
    for k in range(h):
        for j in range(L):
            # bias for key column j = (j - (L-1)) * slope  (i.e. -(distance) * slope)
            assert abs(float(alibi[k, 0, j]) - (j - (L - 1)) * slopes[k]) < 1e-7
    return slopes


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
class Retry(Exception):
    """A robustness check failed for this seed; try the next candidate seed."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Retry(msg)


def build_one(out_dir: str, name, cls, cfg, base_seed, n_greedy, overrides) -> dict:
    """Try seeds base_seed, base_seed+1000, ... until all robustness checks pass
    (no greedy near-ties, no router near-ties, eos never generated, sane logits)."""
    for attempt in range(50):
        seed = base_seed + 1000 * attempt
        try:
            return build_seed(out_dir, name, cls, cfg, seed, n_greedy, overrides)
        except Retry as e:
            print(f"{name}: seed {seed} rejected ({e}); trying next", file=sys.stderr)
    raise RuntimeError(f"{name}: no acceptable seed found")


def build_seed(out_dir: str, name, cls, cfg, seed, n_greedy, overrides) -> dict:
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    randomize(model, seed, overrides=overrides)
    vocab = cfg.vocab_size
    eos = cfg.eos_token_id

    ids = make_prompt(vocab, seed)
    logits = forward_logits(model, ids)
    greedy, margins = greedy_no_cache(model, ids, n_greedy)
    full_ids = torch.cat([ids, greedy])
    full_logits = forward_logits(model, full_ids)

    # ---- sanity checks -------------------------------------------------
    check(float(logits.abs().max()) < MAX_ABS_LOGIT, "logits too large")
    check(float(logits.std()) > 0.3, "logits too flat")
    check(float(margins.min()) > MIN_MARGIN, f"greedy near-tie {float(margins.min()):.2e}")
    check(eos not in greedy.tolist(), f"greedy emitted eos {eos}")
    # A continuation stuck on one token tests little; require some variety.
    check(len(set(greedy.tolist())) >= 4, "greedy output too repetitive")
    # The full forward must agree with the step-by-step greedy decode.
    assert torch.equal(full_logits[T_PROMPT - 1 : -1].argmax(-1), greedy), f"{name}: full vs step"
    assert torch.allclose(full_logits[:T_PROMPT], logits, atol=1e-5), f"{name}: prefix logits"
    if name == "mistral":
        verify_sliding_window(model)
        # Sliding window must actually matter for this fixture.
        model.config.sliding_window = None
        no_win = forward_logits(model, full_ids)
        model.config.sliding_window = cfg_sw = 6
        assert (no_win - full_logits).abs().max() > 1e-2, "sliding window has no effect"
        assert torch.allclose(no_win[:cfg_sw], full_logits[:cfg_sw], atol=1e-5)
    if name.startswith("mpt"):
        verify_alibi(model)
    router_gap = None
    if name == "mixtral":
        router_gap = mixtral_router_gap(model, full_ids)
        check(router_gap > MIN_ROUTER_GAP, f"router near-tie {router_gap:.2e}")

    # ---- write checkpoint ------------------------------------------------
    d = os.path.join(out_dir, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    # Keep only config.json + model.safetensors (eos/bos are in config.json).
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"], os.listdir(d)

    save_file(
        {
            "input_ids": ids.contiguous(),
            "logits": logits.contiguous(),
            "greedy": greedy.contiguous(),
            "full_ids": full_ids.contiguous(),
            "full_logits": full_logits.contiguous(),
            "greedy_margin": margins.contiguous(),
        },
        os.path.join(d, "expected.safetensors"),
        # No metadata: safetensors writes a metadata map in hash order, which would
        # make the file bytes differ between runs.  Versions live in the README.
    )

    # ---- round trip: reload exactly as a user would and re-check ----------
    re = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    re_logits = forward_logits(re, ids)
    diff = float((re_logits - logits).abs().max())
    assert diff < 1e-5, f"{name}: reload diff {diff}"

    return {
        "name": name,
        "class": cls.__name__,
        "seed": seed,
        "T": T_PROMPT,
        "N": n_greedy,
        "vocab": vocab,
        "max_abs_logit": float(logits.abs().max()),
        "logit_std": float(logits.std()),
        "min_greedy_margin": float(margins.min()),
        "router_gap": router_gap,
        "reload_diff": diff,
        "input_ids": ids.tolist(),
        "greedy": greedy.tolist(),
        "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)]
                    for k, v in load_file(os.path.join(d, "model.safetensors")).items()},
        "config": json.load(open(os.path.join(d, "config.json"))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", help="only build these fixture names")
    ap.add_argument("--summary", help="write a JSON summary (configs, tensor listings) here")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # maximal determinism
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}", file=sys.stderr)

    summary = []
    for name, cls, cfg, seed, n, ov in fixture_specs():
        if args.only and name not in args.only:
            continue
        info = build_one(args.out, name, cls, cfg, seed, n, ov)
        summary.append(info)
        print(f"{name:12s} max|logit|={info['max_abs_logit']:.2f} std={info['logit_std']:.2f} "
              f"min_margin={info['min_greedy_margin']:.4f} router_gap={info['router_gap']} "
              f"reload_diff={info['reload_diff']:.1e}", file=sys.stderr)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
