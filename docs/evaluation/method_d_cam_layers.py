"""Which layer and which Grad-CAM variant should method D's heat map read?

The study behind method D's localisation (``ct_ai_node/pipeline/method_d.py``): on the
validation phantoms given as seeds (their true lung labels, the shipped weights), every
candidate map is computed for the slices method D gives a map to (score >= 0.3), and on
the slices it calls positive (score >= 0.5) holding >= 20 lesion pixels the pointing game
(maximum within 5 mm of the lesion) and the share of heat on the lesion are counted,
as ``ct-ai-node evaluate`` does. Candidates: Grad-CAM (channel-mean gradient weights) and
HiResCAM (gradient x activation) on the output of backbone[k] (k = 1: first stage, 32x32
for a 128 crop; 2: 16x16; 3, 4: 8x8), Grad-CAM on the CBAM output (the map shipped
before), and two products of maps. Results: ``method_d_cam_layers.json``.

    .venv/bin/python docs/evaluation/method_d_cam_layers.py $(seq 50000 50059)
"""
import sys
import numpy as np, torch, torch.nn.functional as F
from ct_ai_node.training.data import make_case
from ct_ai_node.pipeline.method_d import ResNeXtLSTMMethod, prepare_volume, to_tensor, WEIGHTS_NAME
from ct_ai_node.models.weights import load_model
from ct_ai_node.pipeline.slice_input import paste_back, dilated_mask
from ct_ai_node.pipeline.geometry import Box2D
from ct_ai_node.training.metrics import pointing_game_hit, heat_in_lesion_fraction
torch.set_num_threads(2)
dev = torch.device("cpu")
m = ResNeXtLSTMMethod(load_model(WEIGHTS_NAME, None, dev), dev)
net, s = m.net, m.settings
bb = net.backbone  # [stem, s1, s2, s3, s4]

def cams(image, mask):
    x = to_tensor(image, mask)
    with torch.no_grad():
        h = x
        outs = []
        for i, mod in enumerate(bb):
            h = mod(h); outs.append(h)
    maps = outs[-1]
    with torch.no_grad():
        logits, alpha = net.head(maps)
    p = float(torch.softmax(logits, 1)[0, 1]); a = alpha.numpy(); rel = a / a.max()
    scores = p * rel
    sel = np.flatnonzero(scores >= 0.3)
    res = {}
    for k in (1, 2, 3, 4):   # cam on output of bb[k] (k=4: last stage; CBAM variant separate)
        if sel.size == 0: break
        f = outs[k][sel].clone().requires_grad_(True)
        h = f
        with torch.enable_grad():
            for mod in list(bb)[k+1:]:
                h = mod(h)
            full = maps.clone(); full[sel] = h
            lo, _ = net.head(full)
            out = lo[0, 1] - lo[0, 0]
            g, = torch.autograd.grad(out, f)
        w = g.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((w * f).sum(1, keepdim=True)).detach()
        res[f"s{k}"] = cam
        res[f"s{k}hires"] = F.relu((g * f).sum(1, keepdim=True)).detach()
    # cbam variant
    if sel.size:
        c = net.head.cbam
        f = maps.clone().requires_grad_(True)
        with torch.enable_grad():
            cb = c(f)
            lo, _ = net.head.sequence(cb.mean(dim=(2, 3)))
            out = lo[0, 1] - lo[0, 0]
            g, = torch.autograd.grad(out, cb)
        w = g.mean(dim=(2, 3), keepdim=True)
        res["cbam"] = F.relu((w * cb).sum(1, keepdim=True)).detach()[sel]
    return p, sel, rel, res

def up(c, size):
    pk = c.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return F.interpolate(c / pk, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()

tot = {}
seeds = [int(a) for a in sys.argv[1:]]
for seed in seeds:
    ph = make_case(seed, None)
    if ph.kind != "covid": continue
    vol = prepare_volume(ph.hu, ph.lung_labels, ph.spacing, s.input, s.chunk)
    p, sel, rel, res = cams(vol.image, vol.mask)
    if not res: continue
    size = vol.image.shape[-1]; b = vol.box
    ups = {k: up(v, size) for k, v in res.items() if v is not None}
    ups["s2xcbam"] = ups["s2"] * ups["cbam"]
    ups["s1xs2"] = np.sqrt(ups["s1"] * ups["s2"])
    tol = int(round(5 / ph.spacing[1]))
    for k, u in ups.items():
        hits = fr = n = 0
        for j, i in enumerate(sel):
            z = vol.zs[i]
            if p * rel[i] < 0.5 or ph.lesion_mask[z].sum() < 20: continue
            crop = paste_back(u[j:j+1], Box2D(0, b.height, 0, b.width), (b.height, b.width))[0]
            hm = np.zeros(ph.hu.shape[1:], np.float32); hm[b.y0:b.y1, b.x0:b.x1] = crop
            hm *= dilated_mask(ph.lung_labels[z:z+1] > 0, ph.spacing, s.input.mask_dilation_mm)[0]
            hits += pointing_game_hit(hm, ph.lesion_mask[z], tol); fr += heat_in_lesion_fraction(hm, ph.lesion_mask[z]); n += 1
        t = tot.setdefault(k, [0, 0.0, 0]); t[0] += hits; t[1] += fr; t[2] += n
    print(seed, round(p, 3), {k: (v[0], v[2]) for k, v in tot.items()}, flush=True)
for k, (h, f, n) in tot.items():
    print(f"{k:10s} pointing {h/n:.3f} heat-in-lesion {f/n:.3f} slices {n}")
