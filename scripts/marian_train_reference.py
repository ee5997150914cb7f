"""Independent reference for encoder-decoder training: a transformers MarianMTModel of
tiny-transformer's shape (post-LN, sinusoids, scaled tied embeddings, d 256, 3 + 3 layers,
ReLU FFN 1024, dropout 0.1) trained on the same TSV columns with an lmforge run's tokenizer,
the same length-bucketed batches of at most --bt tokens per side, label smoothing 0.1, Adam
beta2 0.98, clip 1 and the inverse-sqrt schedule. Prints the training loss every 20 steps, to
set beside an lmforge run's metrics.jsonl (batch order differs, so compare curves, not steps).

  PY=$(scripts/setup_python.sh)
  $PY scripts/marian_train_reference.py --tsv data/parallel/bible.tsv.gz --src kjv --tgt web \
      --tok runs/kjv-web/tokenizer.json --steps 300
"""
import sys, gzip, math, random, time, json, argparse
import torch
from tokenizers import Tokenizer
from transformers import MarianConfig, MarianMTModel
p = argparse.ArgumentParser()
p.add_argument('--tsv'); p.add_argument('--src'); p.add_argument('--tgt'); p.add_argument('--tok')
p.add_argument('--steps', type=int, default=300); p.add_argument('--lr', type=float, default=1.5e-3)
p.add_argument('--warmup', type=int, default=200); p.add_argument('--bt', type=int, default=2048)
p.add_argument('--d', type=int, default=256); p.add_argument('--layers', type=int, default=3)
p.add_argument('--pre', action='store_true'); p.add_argument('--dropout', type=float, default=0.1)
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
tok = Tokenizer.from_file(a.tok)
V = tok.get_vocab_size(); pad = tok.token_to_id('<pad>'); bos = tok.token_to_id('<s>'); eos = tok.token_to_id('</s>')
op = gzip.open if a.tsv.endswith('.gz') else open
rows = [l.rstrip('\n').split('\t') for l in op(a.tsv, 'rt')]
h = rows[0]; si, ti = h.index(a.src), h.index(a.tgt)
test = {'Ruth', 'Jonah', 'Philemon', 'Jude'}
pairs = []
for r in rows[1:]:
    if r[0] in test: continue
    s = tok.encode(r[si], add_special_tokens=False).ids + [eos]
    t = tok.encode(r[ti], add_special_tokens=False).ids
    pairs.append((s, t))
pairs.sort(key=lambda p: max(len(p[0]), len(p[1]) + 1))
batches, cur, longest = [], [], 0
for p_ in pairs:
    L = max(len(p_[0]), len(p_[1]) + 1)
    if cur and (len(cur) + 1) * max(longest, L) > a.bt:
        batches.append(cur); cur, longest = [], 0
    cur.append(p_); longest = max(longest, L)
batches.append(cur)
cfg = MarianConfig(vocab_size=V, d_model=a.d, encoder_layers=a.layers, decoder_layers=a.layers,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4*a.d, decoder_ffn_dim=4*a.d,
    activation_function='relu', dropout=a.dropout, attention_dropout=a.dropout, activation_dropout=0.0,
    max_position_embeddings=256, scale_embedding=True, pad_token_id=pad, eos_token_id=eos,
    decoder_start_token_id=bos, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
m = MarianMTModel(cfg); m.train()
opt = torch.optim.Adam(m.parameters(), lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
sched = lambda s: a.lr * min((s + 1) / a.warmup, math.sqrt(a.warmup / (s + 1)))
step = 0; t0 = time.process_time(); ema = None
while step < a.steps:
    random.shuffle(batches)
    for b in batches:
        if step >= a.steps: break
        S = max(len(x[0]) for x in b); T = max(len(x[1]) + 1 for x in b)
        src = torch.full((len(b), S), pad); di = torch.full((len(b), T), pad); lab = torch.full((len(b), T), -100)
        for i, (s, t) in enumerate(b):
            src[i, :len(s)] = torch.tensor(s); di[i, :len(t) + 1] = torch.tensor([bos] + t); lab[i, :len(t) + 1] = torch.tensor(t + [eos])
        out = m(input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=di)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), lab.reshape(-1), ignore_index=-100, label_smoothing=0.1)
        for g in opt.param_groups: g['lr'] = sched(step)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
        step += 1
        if step % 20 == 0:
            print(json.dumps({'step': step, 'loss': round(loss.item(), 4), 'cpu_s': round(time.process_time() - t0, 1)}), flush=True)
