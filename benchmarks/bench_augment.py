"""Augmentation speed: augmented 256x256 crops per second per method on ONE CPU core, pre-loaded synthetic samples
(targets: >= 50/s for every mix, >= 20/s GradMix; every method composes on `nucbook.augment.canvas.Canvas`, which
enforces the occlusion rule), and the standard augmentation every training crop gets (`StandardAugment`: >= 150/s
for the light default, >= 100/s for the HoVer-Net profile, >= 50/s for it with HoVer-Net's context, a larger input
warped and centre-cropped to 256)."""
import os
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ.setdefault(_v, '1')
import argparse, time
import cv2
cv2.setNumThreads(1)
import numpy as np
from nucbook.augment.mix import MixUp, CutOut, CutMix, CowOut, CowMix, CopyPaste, GradMix
from nucbook.augment.standard import StandardAugment
from nucbook.data.synth import synth_dataset

# GradMix on synthetic tiles: the rare type is large there, so the paper's 2.3 area ratio matches almost nothing and
# would measure an idle pass; 0.8 makes it replace ~10 nuclei per tile, the expensive case.
METHODS = [('MixUp', MixUp(), 50), ('CutOut', CutOut(), 50), ('CutMix', CutMix(), 50), ('CowOut', CowOut(), 50),
           ('CowMix', CowMix(), 50), ('Copy-Paste', CopyPaste(), 50), ('Copy-Paste rare', CopyPaste(types=(1,)), 50),
           ('GradMix', GradMix(area_ratio=0.8), 20)]

class Standard:
    "`StandardAugment` behind the mixes' call `aug(sample, rng, pool)` (it takes no pool)."
    def __init__(self, **kw): self.aug = StandardAugment(**kw)
    def __call__(self, s, rng, pool=None): return self.aug(s, rng)

STANDARD = [('std light', Standard(), 150, False), ('std hovernet', Standard(profile='hovernet'), 100, False),
            ('std hovernet+ctx', Standard(profile='hovernet', size=256), 50, True)]

def bench(aug, samples, seconds):
    "Crops per CPU second and per wall second over at least `seconds` (after a warm-up that fills the pool caches)."
    for i, s in enumerate(samples): aug(s, i, samples)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        aug(samples[n % len(samples)], n, samples); n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 20: return n / (time.process_time() - c0), n / dt

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--seconds', type=float, default=2.0, help='time per method')
    ap.add_argument('--n-samples', type=int, default=32, help='pre-loaded synthetic 256x256 samples (also the pool)')
    a = ap.parse_args()
    try:
        import torch; torch.set_num_threads(1)
    except ImportError: pass
    samples = synth_dataset(a.n_samples, seed=0)
    extra = {}
    # one thread, so CPU time = time on one core; wall time is shown too (it is lower on a shared, busy machine)
    print(f"{'method':16} {'crops/s':>9} {'(wall)':>8} {'target':>7} {'result':>7}  (256x256, 1 core, {a.n_samples} synthetic samples)")
    for name, aug, target in METHODS:
        rate, wall = bench(aug, samples, a.seconds)
        print(f'{name:16} {rate:9.1f} {wall:8.1f} {target:7d} {"pass" if rate >= target else "FAIL":>7}')
    wide = synth_dataset(8, seed=0, size=StandardAugment(profile='hovernet').context(256))  # the context crop: 496 x 496
    for name, aug, target, ctx in STANDARD:
        rate, wall = bench(aug, wide if ctx else samples, a.seconds)
        print(f'{name:16} {rate:9.1f} {wall:8.1f} {target:7d} {"pass" if rate >= target else "FAIL":>7}  ({1e3 / rate:.1f} ms per crop)')
    cnt = [GradMix(area_ratio=0.8)(s, i, samples).record['params']['n_replaced'] for i, s in enumerate(samples[:8])]
    print(f'GradMix replaced {np.mean(cnt):.1f} nuclei per tile on average (area_ratio 0.8)')
