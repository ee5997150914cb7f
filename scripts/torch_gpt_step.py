"""PyTorch eager reference for `lmforge bench train`: one nanoGPT-style training step (pre-LN
GPT-2: learned positions, tied head, GELU, AdamW with weight decay 0.1, clip 1.0) on the CPU,
in fp32, or with `AMP=bf16` its forward under `torch.autocast("cpu", dtype=torch.bfloat16)`
(the products in bf16, their gradients with them; master weights and AdamW stay fp32), timed
after 5 warm-up steps. The same model and step as ../shared/bench/torch_gpt_step.py.

Usage: [AMP=bf16] python torch_gpt_step.py LAYERS HEADS D_MODEL SEQ BATCH VOCAB STEPS
Prints one line: `torch <version> amp=... threads=N params=P step_ms=... tok_per_s=...`.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

L, H, C, T, B, V, S = (int(x) for x in sys.argv[1:8])
AMP = os.environ.get("AMP") == "bf16"
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).view(-1, V), targets.view(-1))


model = GPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
params = sum(p.numel() for p in model.parameters())
x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))


def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AMP):
        loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


for _ in range(5):
    step()
start = time.perf_counter()
for _ in range(S):
    step()
dt = (time.perf_counter() - start) / S
print(f"torch {torch.__version__} amp={'bf16' if AMP else 'off'} threads={torch.get_num_threads()} params={params} step_ms={dt * 1e3:.2f} tok_per_s={B * T / dt:.0f}")
