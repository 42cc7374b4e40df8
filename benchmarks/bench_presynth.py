"""Pre-synthesis speed (Gong et al. 2021, `nucbook.augment.presynth`): pre-synthesised images per second on ONE CPU
core at 256x256 and 512x512, on pre-loaded synthetic tiles and, when NUCBOOK_DATA is set, on MoNuSeg (Kumar) training
crops, with the time of each step: M(x) (deform through the canvas), N(x) (texture, blur, H jitter), B(x) (dilate +
inpaint), E jitter + Eq. 1. `--quick` is a few-second smoke run (what tests/test_presynth.py calls)."""
import os
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ.setdefault(_v, '1')
import argparse, sys, time
import cv2
cv2.setNumThreads(1)
import numpy as np
from nucbook.augment.presynth import PreSynthConfig, presynthesize, deform_instances, foreground, background, hed_jitter, fuse
from nucbook.data.synth import synth_tile

def sources(sizes, n, quick):
    "`[(data name, size, samples)]`: synthetic tiles of each size; MoNuSeg crops when NUCBOOK_DATA is set."
    out = [('synthetic', s, [synth_tile(1000 + i, size=s) for i in range(n)]) for s in sizes]
    d = os.environ.get('NUCBOOK_DATA')
    if d and os.path.isdir(d):
        from nucbook.data.datasets import load_dataset
        from nucbook.data.crops import crop_sample
        tiles = load_dataset('kumar', 'train', root=d, limit=1 if quick else 2)
        for s in sizes:
            crops = [crop_sample(t, y, x, s, s) for t in tiles for y, x in ((0, 0), (1000 - s, 1000 - s), (250, 400))]
            out.append(('MoNuSeg', s, crops[:n]))
    else: print('NUCBOOK_DATA not set: synthetic tiles only')
    return out

def bench(samples, cfg, seconds, min_n):
    "Images per CPU second and per wall second over at least `seconds` and `min_n` images (after one warm-up)."
    presynthesize(samples[0], 0, cfg)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        presynthesize(samples[n % len(samples)], n, cfg); n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_n: return n / (time.process_time() - c0), n / dt

def steps(samples, cfg):
    "CPU milliseconds per image of each step, averaged over `samples`."
    t = np.zeros(4)
    for i, s in enumerate(samples):
        rng = np.random.default_rng(i); c = [time.process_time()]
        M, w = deform_instances(s.inst_map, rng, cfg, s.inst_types); c.append(time.process_time())
        N = foreground(s.image, s.inst_map, M, w, rng, cfg); c.append(time.process_time())
        B = background(s.image, s.inst_map, cfg.dilate, cfg.radius, cfg.inpaint); c.append(time.process_time())
        fuse(hed_jitter(B, 1, 1.1, 0.001), N, M); c.append(time.process_time())
        t += np.diff(c)
    return t / len(samples) * 1e3

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--seconds', type=float, default=2.0, help='time per row')
    ap.add_argument('--n-samples', type=int, default=8, help='pre-loaded samples per row')
    ap.add_argument('--sizes', type=int, nargs='+', default=None, help='tile sides (default 256 512; --quick: 128)')
    ap.add_argument('--quick', action='store_true', help='smoke run: 128x128, 0.2 s per row, 2 samples, at least 2 images')
    a = ap.parse_args(argv)
    seconds, n, min_n = (0.2, 2, 2) if a.quick else (a.seconds, a.n_samples, 10)
    sizes = a.sizes or ([128] if a.quick else [256, 512])
    cfg = PreSynthConfig(); rows = sources(sizes, n, a.quick)
    # one thread, so CPU time = time on one core; wall time is shown too (lower on a shared, busy machine)
    print(f"{'data':10} {'size':>5} {'nuclei':>7} {'img/s':>7} {'(wall)':>7} {'ms/img':>7}   {'M(x)':>6} {'N(x)':>6} {'B(x)':>6} {'E+Eq1':>6}  (1 core, CPU ms)")
    for name, size, samples in rows:
        rate, wall = bench(samples, cfg, seconds, min_n)
        st = steps(samples, cfg); nuc = np.mean([s.n_instances for s in samples])
        print(f'{name:10} {size:5d} {nuc:7.0f} {rate:7.2f} {wall:7.2f} {1e3 / rate:7.1f}   ' + ' '.join(f'{v:6.1f}' for v in st))
    return 0

if __name__ == '__main__':
    sys.exit(main())
