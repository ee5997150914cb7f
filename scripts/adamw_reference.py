#!/usr/bin/env python3
"""Reference trajectory of torch.optim.AdamW + clip_grad_norm_ for lmforge's optimizer test.

lmforge writes its own AdamW (src/train/optim.rs) so that the moments can be checkpointed and a
run resumed bit for bit. This script pins down the semantics it must reproduce: PyTorch's
decoupled weight decay (p -= lr*wd*p before the Adam update), bias correction, a per-parameter
step count (a parameter without a gradient is skipped entirely, its count does not advance),
weight decay on matrices only, and clip_grad_norm_ (coefficient max_norm/(norm+1e-6), applied
only when < 1).

Usage (environment as in scripts/make_fixtures.py):

    /root/.cache/lmforge/venv-fixtures/bin/python scripts/adamw_reference.py \
        [--out tests/fixtures/adamw_reference.safetensors]

The output (a few KiB) holds, for STEPS steps:

    hparams          float64 [6]   lr-independent settings: beta1, beta2, eps, weight_decay,
                                   max_norm, steps
    lr               float64 [S]   learning rate used at step k (it changes, like a schedule)
    norm             float32 [S]   total gradient norm returned by clip_grad_norm_ at step k
    init.<name>      float32       parameter values before the first step
    grad.<k>.<name>  float32       the gradient fed at step k (absent: no gradient that step)
    param.<k>.<name> float32       parameter values after step k
    exp_avg.<name>, exp_avg_sq.<name>  float32  optimizer moments after the last step
    decay.<name>     float32 [1]   1.0 when the parameter is in the weight-decay group

Deterministic: a private torch.Generator with a fixed seed, CPU, float32, the single-tensor
(for-loop) AdamW implementation.
"""

import argparse

import torch
from safetensors.torch import save_file

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MAX_NORM = 1.0
LRS = [1e-2, 3e-2, 3e-2, 2e-2, 5e-3]
# Gradient scale per step: steps 0 and 3 stay under max_norm (no clipping), the others clip.
GRAD_SCALE = [0.05, 2.0, 10.0, 0.02, 1.0]
# (step, parameter) pairs that get no gradient: AdamW must skip them entirely.
NO_GRAD = {(2, "layers.0.attn.q.bias"), (3, "tok_embeddings.weight")}

# Names follow lmforge's canonical parameter names; the decay flag is what
# ParamKind::Weight decides (matrices decay, embeddings / biases / norm gains do not).
PARAMS = [
    ("tok_embeddings.weight", (6, 4), False),
    ("layers.0.attn_norm.weight", (4,), False),
    ("layers.0.attn.q.weight", (5, 4), True),
    ("layers.0.attn.q.bias", (5,), False),
    ("lm_head.weight", (6, 4), True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/adamw_reference.safetensors")
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20240611)
    params = {}
    for name, shape, _ in PARAMS:
        init = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen)
        params[name] = torch.nn.Parameter(init.float())

    decay = [params[n] for n, _, d in PARAMS if d]
    no_decay = [params[n] for n, _, d in PARAMS if not d]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LRS[0],
        betas=BETAS,
        eps=EPS,
        foreach=False,
        fused=False,
    )

    out = {
        "hparams": torch.tensor([BETAS[0], BETAS[1], EPS, WEIGHT_DECAY, MAX_NORM, len(LRS)], dtype=torch.float64),
        "lr": torch.tensor(LRS, dtype=torch.float64),
    }
    for name, _, d in PARAMS:
        out[f"init.{name}"] = params[name].detach().clone()
        out[f"decay.{name}"] = torch.tensor([1.0 if d else 0.0])

    norms = []
    for step, (lr, scale) in enumerate(zip(LRS, GRAD_SCALE)):
        for name, shape, _ in PARAMS:
            if (step, name) in NO_GRAD:
                params[name].grad = None
                continue
            grad = (torch.randn(shape, generator=gen) * scale).float()
            out[f"grad.{step}.{name}"] = grad.clone()
            params[name].grad = grad
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
        norms.append(float(norm))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for name, _, _ in PARAMS:
            out[f"param.{step}.{name}"] = params[name].detach().clone()

    out["norm"] = torch.tensor(norms, dtype=torch.float32)
    for name, _, _ in PARAMS:
        state = opt.state[params[name]]
        out[f"exp_avg.{name}"] = state["exp_avg"].clone()
        out[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].clone()
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    print(f"wrote {args.out}: {len(out)} tensors, norms {[round(n, 4) for n in norms]}")


if __name__ == "__main__":
    main()
