"""Experiment: can the recipe's vision tower learn shape kind/colour per grid cell from a direct
(auxiliary) objective on CPU, quickly? Labels come from the synth generator; no language model.
A fresh tower + connector (the recipe architecture, read from RUN/final/config.json) and two
linear heads per cell, trained for 5 minutes (batch 32, bf16 autocast, AdamW 1e-3) on 3,000
scenes of 1-5 shapes; accuracy per cell (empty cells included) on 300 held-out scenes.
Usage: .venv/bin/python bench/default_model/aux_vision.py [RUN/final]. Results: RESULTS.md here."""
import sys
import random, time, torch, torch.nn.functional as F
from smolvlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.synth.draw import COLOURS, SHAPES, BACKGROUNDS, place_shapes, shapes_image
torch.manual_seed(0); torch.set_num_threads(2)
RUN = sys.argv[1] if len(sys.argv) > 1 else 'runs/default-model/final'
proc = SmolVLMProcessor.from_pretrained(RUN)
cols = sorted(COLOURS); kinds = list(SHAPES)
def data(n, seed):
    rng = random.Random(seed); P=[]; K=[]; C=[]
    for i in range(n):
        side = rng.choice(range(256, 385, 32)); m = rng.randint(1, 5)
        specs = [(rng.choice(kinds), rng.choice(cols)) for _ in range(m)]
        s = place_shapes(rng, specs, side, sizes=[rng.uniform(0.3, 0.9) for _ in range(m)])
        img = shapes_image(s, side, rng.choice(sorted(BACKGROUNDS)))
        k = torch.zeros(9, dtype=torch.long); c = torch.zeros(9, dtype=torch.long)
        for sh in s:
            j = sh.cell[0]*3 + sh.cell[1]; k[j] = kinds.index(sh.kind)+1; c[j] = cols.index(sh.colour)+1
        P.append(proc(text=["<image>"], images=[[img]])["pixel_values"][0]); K.append(k); C.append(c)
    return torch.stack(P), torch.stack(K), torch.stack(C)
t=time.time(); Ptr, Ktr, Ctr = data(3000, 1); Pte, Kte, Cte = data(300, 2); print('data', time.time()-t, flush=True)
cfg = SmolVLM.from_pretrained(RUN).config
m = SmolVLM.from_config(cfg)
vis, con = m.model.vision_model, m.model.connector
D = cfg.text_config.hidden_size
head_k, head_c = torch.nn.Linear(D, 4), torch.nn.Linear(D, 9)
def cells(f):  # (n, 36, D) 6x6 tokens -> (n, 9, D) mean of each cell's 2x2 tokens
    f = f.view(-1, 3, 2, 3, 2, D).mean((2, 4))
    return f.reshape(-1, 9, D)
params = list(vis.parameters()) + list(con.parameters()) + list(head_k.parameters()) + list(head_c.parameters())
opt = torch.optim.AdamW(params, lr=1e-3)
def fwd(pv):
    return cells(con(vis(pv.flatten(0, 1) if pv.dim() == 5 else pv, None)))
def acc():
    with torch.no_grad():
        f = fwd(Pte); return (head_k(f).argmax(-1) == Kte).float().mean().item(), (head_c(f).argmax(-1) == Cte).float().mean().item()
t0 = time.time(); step = 0
while time.time() - t0 < 300:
    idx = torch.randint(0, len(Ptr), (32,))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        f = fwd(Ptr[idx])
    f = f.float()
    loss = F.cross_entropy(head_k(f).flatten(0, 1), Ktr[idx].flatten()) + F.cross_entropy(head_c(f).flatten(0, 1), Ctr[idx].flatten())
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 50 == 0:
        print(f'step {step} {time.time()-t0:.0f}s imgs {step*32} loss {loss.item():.3f} held-out cell acc kind/colour %.3f %.3f' % acc(), flush=True)
print('final', step, acc())
