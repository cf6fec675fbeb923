"""Linear probes on the default model's image features (connector output, 36 tokens): can shape
colour, kind (circle/square/triangle) and grid cell be read off them, for the trained tower and for
a fresh random one of the same architecture? Single-shape images from the synth generator, 800
train / 400 held out. Usage: .venv/bin/python bench/default_model/probe_vision.py [RUN/final]
(about 3 minutes on 2 cores). Results: bench/default_model/RESULTS.md."""
import random, torch, sys
from smolvlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training.synth.draw import COLOURS, SHAPES, BACKGROUNDS, place_shapes, shapes_image
torch.manual_seed(0)
RUN = sys.argv[1] if len(sys.argv) > 1 else 'runs/default-model/final'
proc = SmolVLMProcessor.from_pretrained(RUN)
cols = sorted(COLOURS); kinds = list(SHAPES)
def data(n, seed):
    rng = random.Random(seed); X=[]; yc=[]; yk=[]; yp=[]
    for i in range(n):
        side = rng.choice(range(256, 385, 32)); c = rng.choice(cols); k = rng.choice(kinds)
        s = place_shapes(rng, [(k, c)], side, sizes=[rng.uniform(0.3, 0.9)])
        img = shapes_image(s, side, rng.choice(sorted(BACKGROUNDS)))
        X.append(img); yc.append(cols.index(c)); yk.append(kinds.index(k)); yp.append(s[0].cell[0]*3+s[0].cell[1])
    return X, torch.tensor(yc), torch.tensor(yk), torch.tensor(yp)
def feats(model, imgs):
    out=[]
    with torch.inference_mode():
        for i in range(0, len(imgs), 16):
            pv = torch.cat([proc(text=["<image>"], images=[[im]])["pixel_values"] for im in imgs[i:i+16]], 0)
            f = model.get_image_features(pv)  # (n, 36, D)
            out.append(f.float())
    return torch.cat(out)
def probe(Ftr, ytr, Fte, yte, ncls):
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ftr, Fte = (Ftr-mu)/sd, (Fte-mu)/sd
    W = torch.zeros(Ftr.shape[1], ncls, requires_grad=True); b = torch.zeros(ncls, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2)
    for _ in range(300):
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(Ftr@W+b, ytr) + 1e-3*(W**2).sum(); loss.backward(); opt.step()
    return ((Fte@W+b).argmax(1) == yte).float().mean().item()
Xtr, ctr, ktr, ptr = data(800, 1); Xte, cte, kte, pte = data(400, 2)
trained = SmolVLM.from_pretrained(RUN)
rand = SmolVLM.from_config(trained.config)
for name, m in (('trained', trained), ('random init', rand)):
    Ftr, Fte = feats(m, Xtr), feats(m, Xte)
    for pool, f in (('mean', lambda F: F.mean(1)), ('flat', lambda F: F.flatten(1))):
        a, b_ = f(Ftr), f(Fte)
        print(name, pool, 'colour %.3f kind %.3f cell %.3f' % (probe(a, ctr, b_, cte, 8), probe(a, ktr, b_, kte, 3), probe(a, ptr, b_, pte, 9)), flush=True)
