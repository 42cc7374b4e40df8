"""Milliseconds per 256x256 training crop: the old path (slice + `make_sample(..., type_map=...)`, exactly as the old
`random_crop` did: renumber with np.unique, re-vote the types, validate) against the new `random_crop`
(`crop_sample`: slice + lookup table, no re-vote, no second validation).

Both are timed side by side in this run, on the same crop positions (same seeds), interleaved repeat by repeat, on
synthetic 1000x1000 tiles and, when $NUCBOOK_DATA is set, on real CoNSeP 256x256 tiles (typed) and Kumar 1000x1000
tiles (untyped). Prints the median over `repeats` of the mean time per crop, and the ratio; `min_area=0` is the
trainer's default, `min_area=10` drops cut slivers (the new crop then keeps small nuclei wholly inside the crop).
Usage: python benchmarks/bench_crop.py [crops_per_repeat] [repeats]
"""
import os, statistics, sys, time
import numpy as np

def old_random_crop(sample, size, rng, min_area=0):
    "The trainer's crop before `crop_sample` (verbatim, white padding)."
    from nucbook.data.sample import make_sample
    h, w = sample.shape
    ph, pw = max(0, size - h), max(0, size - w)
    img, inst, tmap = sample.image, sample.inst_map, sample.type_map
    if ph or pw:
        pad = ((0, ph), (0, pw))
        img = np.pad(img, pad + ((0, 0),), constant_values=255); inst = np.pad(inst, pad)
        tmap = None if tmap is None else np.pad(tmap, pad)
    y = int(rng.integers(0, img.shape[0] - size + 1)); x = int(rng.integers(0, img.shape[1] - size + 1))
    sl = np.s_[y:y + size, x:x + size]
    return make_sample(img[sl], inst[sl], type_map=None if tmap is None else tmap[sl],
                       meta={**sample.meta, 'crop_box': (y, x, size, size)}, min_area=min_area)

def per_crop_ms(fn, samples, n, seed, size, min_area):
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for i in range(n): fn(samples[i % len(samples)], size, rng, min_area)
    return (time.perf_counter() - t) / n * 1000

def sources():
    from nucbook.data.synth import synth_tile
    out = [('synthetic 1000x1000 (typed)', [synth_tile(i, size=1000) for i in range(4)])]
    d = os.environ.get('NUCBOOK_DATA')
    if d and os.path.isdir(d):
        from nucbook.data.datasets import load_dataset
        out.append(('CoNSeP 256x256 tiles (typed)', load_dataset('consep_tiles', 'train', root=d, limit=32)))
        out.append(('Kumar 1000x1000 (untyped)', load_dataset('kumar', 'train', root=d, limit=4)))
    else: print('NUCBOOK_DATA not set: synthetic tiles only')
    return out

def main(n=100, repeats=5, size=256):
    from nucbook.data.crops import random_crop
    print(f'ms per {size}x{size} training crop, mean of {n} crops, median of {repeats} repeats (old and new interleaved)')
    print(f'{"data":30s} {"min_area":>8s} {"old make_sample":>16s} {"new random_crop":>16s} {"speed-up":>9s}')
    for name, samples in sources():
        for s in samples[:4]: # the same crops both ways (trainer default min_area=0)
            for seed in range(3):
                a, b = random_crop(s, size, np.random.default_rng(seed)), old_random_crop(s, size, np.random.default_rng(seed))
                assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ('image', 'inst_map', 'type_map')), name
        for min_area in (0, 10):
            old, new = [], []
            for r in range(repeats):
                old.append(per_crop_ms(old_random_crop, samples, n, r, size, min_area))
                new.append(per_crop_ms(random_crop, samples, n, r, size, min_area))
            o, k = statistics.median(old), statistics.median(new)
            print(f'{name:30s} {min_area:8d} {o:13.3f} ms {k:13.3f} ms {o / k:8.1f}x')

if __name__ == '__main__':
    main(*(int(a) for a in sys.argv[1:3]))
