"""Benchmark nucbook.eval.metrics against a straightforward per-instance implementation on real MoNuSeg tiles.

Ground truth: the 16-bit instance maps of the Kumar test tiles (`$NUCBOOK_DATA/monuseg/MoNuSegTrainingData/
Instance_Maps/`). Prediction: a perturbed copy (eroded, split, merged, shifted, dropped instances and false
positives). Both implementations compute Dice-1, AJI, AJI+ and DQ/SQ/PQ; values must agree to 1e-9.
Usage: python benchmarks/bench_metrics.py [--tiles N] [--repeat R]
"""
import argparse, os, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from nucbook.eval.metrics import instance_metrics

KUMAR_TEST = ['21-5784', '21-5786', 'B0-5698', 'B0-5710', 'CH-5767', 'E2-A14V', 'E2-A1B5', 'G9-6362',
              'AY-A8YK', 'DK-A2I6', 'G2-A2EK', 'KB-A93J', 'NH-A8F7', 'RD-A8N9']


def perturb(true, rng):
    "A prediction-like copy: erode 20%, split 10%, merge 10%, shift 20%, drop 5% of nuclei, add 20 false positives."
    pred = true.astype(np.int64).copy()
    ids = np.unique(true); ids = ids[ids > 0]
    objs = ndi.find_objects(true)
    nxt = int(ids.max()) + 1
    cents = np.array(ndi.center_of_mass(np.ones_like(true), true, ids))
    role = rng.choice(['keep', 'erode', 'split', 'merge', 'shift', 'drop'], len(ids),
                      p=[0.35, 0.2, 0.1, 0.1, 0.2, 0.05])
    for k, (i, r) in enumerate(zip(ids, role)):
        sl = objs[i - 1]
        if sl is None or r == 'keep': continue
        mask = pred[sl] == i
        if not mask.any(): continue  # already merged into a neighbour
        if r == 'erode':
            pred[sl][mask & ~ndi.binary_erosion(mask)] = 0
        elif r == 'split':
            ys, xs = np.nonzero(mask); left = xs < xs.mean()
            pred[sl][ys[left], xs[left]] = nxt; nxt += 1
        elif r == 'merge':
            d = np.hypot(*(cents - cents[k]).T); d[k] = np.inf
            pred[pred == ids[np.argmin(d)]] = i
        elif r == 'shift':
            full = pred == i; pred[full] = 0
            pred[np.roll(full, (2, 1), axis=(0, 1)) & (pred == 0)] = i
        elif r == 'drop':
            pred[sl][mask] = 0
    yy, xx = np.indices(true.shape)
    for _ in range(20):
        cy, cx = rng.integers(0, true.shape[0]), rng.integers(0, true.shape[1])
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36) & (pred == 0)
        pred[blob] = nxt; nxt += 1
    return pred


def per_instance_metrics(true, pred):
    "The per-instance loop the reference code uses: one boolean mask per instance and per overlapping pair."
    t_ids = [i for i in np.unique(true) if i]; p_ids = [j for j in np.unique(pred) if j]
    t_pos = {i: k for k, i in enumerate(t_ids)}; p_pos = {j: k for k, j in enumerate(p_ids)}
    t_masks = {i: true == i for i in t_ids}; p_masks = {j: pred == j for j in p_ids}
    inter = np.zeros((len(t_ids), len(p_ids))); union = np.zeros_like(inter)
    for i in t_ids:
        for j in np.unique(pred[t_masks[i]]):
            if j == 0: continue
            a, b = t_masks[i], p_masks[j]
            inter[t_pos[i], p_pos[j]] = (a & b).sum(); union[t_pos[i], p_pos[j]] = (a | b).sum()
    at = np.array([t_masks[i].sum() for i in t_ids], float); ap = np.array([p_masks[j].sum() for j in p_ids], float)
    out = {}
    fg_t, fg_p = true > 0, pred > 0
    out['dice1'] = 2 * (fg_t & fg_p).sum() / (fg_t.sum() + fg_p.sum())
    iou_e = inter / (union + 1e-6)
    # AJI
    best = iou_e.argmax(1); ok = iou_e[np.arange(len(t_ids)), best] > 0
    rows = np.flatnonzero(ok); cols = best[ok]
    U = union[rows, cols].sum() + at[~ok].sum() + ap[np.setdiff1d(np.arange(len(p_ids)), cols)].sum()
    out['aji'] = inter[rows, cols].sum() / U
    # AJI+
    r, c = linear_sum_assignment(-iou_e); ok = iou_e[r, c] > 0; r, c = r[ok], c[ok]
    U = union[r, c].sum() + np.delete(at, r).sum() + np.delete(ap, c).sum()
    out['aji_plus'] = inter[r, c].sum() / U
    # PQ
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    r, c = np.nonzero(iou > 0.5)
    tp, fp, fn = len(r), len(p_ids) - len(r), len(t_ids) - len(r)
    out['dq'] = tp / (tp + 0.5 * fp + 0.5 * fn); out['sq'] = iou[r, c].sum() / (tp + 1e-6)
    out['pq'] = out['dq'] * out['sq']
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiles', type=int, default=4, help='number of Kumar test tiles (max 14)')
    ap.add_argument('--repeat', type=int, default=5, help='timing repeats of the fast implementation')
    args = ap.parse_args()
    root = os.environ.get('NUCBOOK_DATA')
    if not root: print('NUCBOOK_DATA is not set: skipping the metrics benchmark'); return 0
    folder = Path(root) / 'monuseg' / 'MoNuSegTrainingData' / 'Instance_Maps'
    files = [next(folder.glob(f'TCGA-{k}-*.png')) for k in KUMAR_TEST[:args.tiles]]
    rng = np.random.default_rng(0)
    keys = ['dice1', 'aji', 'aji_plus', 'dq', 'sq', 'pq']
    tot_fast = tot_slow = 0.0; worst = 0.0
    print(f'{"tile":28s} {"n_true":>6s} {"n_pred":>6s} {"fast ms":>8s} {"loop ms":>8s} {"ratio":>6s}  max|diff|')
    for f in files:
        true = np.array(Image.open(f)).astype(np.int64)
        pred = perturb(true, rng)
        fast = []
        for _ in range(args.repeat):
            t0 = time.perf_counter(); m = instance_metrics(true, pred); fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); r = per_instance_metrics(true, pred); slow = time.perf_counter() - t0
        diff = max(abs(m[k] - r[k]) for k in keys); worst = max(worst, diff)
        tf = float(np.median(fast)); tot_fast += tf; tot_slow += slow
        print(f'{f.stem:28s} {m["n_true"]:6d} {m["n_pred"]:6d} {tf * 1e3:8.1f} {slow * 1e3:8.0f} {slow / tf:6.0f}  {diff:.1e}')
    print(f'mean per tile: fast {tot_fast / len(files) * 1e3:.1f} ms (Dice-1, Dice-2, AJI, AJI+, DQ/SQ/PQ, object F1 '
          f'together), per-instance loop {tot_slow / len(files) * 1e3:.0f} ms, speed ratio {tot_slow / tot_fast:.0f}x '
          f'(target >= 20x); max |difference| {worst:.1e}')
    if worst > 1e-9: print('VALUES DISAGREE'); return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
