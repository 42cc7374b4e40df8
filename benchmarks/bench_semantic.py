"""Semantic-aware augmentation speed: composed 256x256 images/s on one CPU core (goal >= 50/s; the ratio to the goal is
printed), blank and noise background, and policy evaluations/s of the greedy search (the WAE scorer: the policy applied
to n cells, padded, scored by the autoencoder) on the CPU, and on a GPU when one is available.

Usage: .venv/bin/python benchmarks/bench_semantic.py [--quick]
"""
import os, sys, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import torch
from nucbook.data.synth import synth_dataset
from nucbook.augment.cells import OPERATIONS, MAGNITUDES, collections
from nucbook.models.wae import WAE, wae_config
from nucbook.methods.semantic import count_distribution, compose, wae_scorer, greedy_search

QUICK = '--quick' in sys.argv
GOAL = 50.0


def rate(fn, min_seconds=2.0, min_calls=3, clock=time.perf_counter):
    "Calls per second of fn() over at least `min_seconds` of `clock` (after one warm-up call)."
    fn(); n, t0 = 0, clock()
    while n < min_calls or clock() - t0 < min_seconds: fn(); n += 1
    return n / (clock() - t0)


def ranked_policies(n=1000, seed=0):
    "A stand-in ranking: 110 single operations, then random 2- and 3-step policies (what a search returns)."
    rng = np.random.default_rng(seed)
    units = [(o, m) for o in OPERATIONS for m in range(MAGNITUDES)]
    out = [(u,) for u in units]
    while len(out) < n: out.append(tuple(units[i] for i in rng.integers(len(units), size=int(rng.integers(2, 4)))))
    return out


def bench_compose():
    torch.set_num_threads(1)
    train = synth_dataset(8 if QUICK else 24, 'train', seed=0, size=256)  # ~70 nuclei per 256 x 256, clustered
    col = collections(train, noise_size=32, n_noise=100, seed=0)
    cd = count_distribution(train)
    pol = ranked_policies()
    print(f'training: {len(train)} synthetic 256 px tiles, {cd.objects.mean():.1f} objects per image '
          f'({cd.single_share:.0%} single-cells); {col}; 1 CPU thread; policies drawn from the first 1000')
    k = iter(range(10 ** 9))
    out = {}
    for bg in ('blank', 'noise'):
        made = []
        make = lambda: made.append(compose(col, pol, pol, cd, size=256, background=bg, rng=next(k), top=1000))
        r = rate(make, clock=time.process_time)  # CPU time of this one-thread process: what one core gives, whatever else runs
        wall = rate(make)
        skipped = np.mean([s.meta['semantic']['skipped'] for s in made]); n = np.mean([s.n_instances for s in made])
        out[bg] = r
        print(f'  compose, {bg:5s} background  {r:7.1f} images/s per CPU second ({r / GOAL:.2f} x the goal of {GOAL:.0f}/s: '
              f'{"OK" if r >= GOAL else "BELOW GOAL"}), {wall:6.1f}/s wall clock; {n:.0f} nuclei per image, {skipped:.1f} objects skipped',
              flush=True)
    return col


def bench_search(col, device, preset, n_cells, min_seconds=3.0, min_calls=3, search=True):
    torch.manual_seed(0)
    model = WAE(**wae_config(preset)).to(device).eval()
    sf = wae_scorer(model, col.single, n_cells, seed=0)
    pol = ranked_policies(300, seed=1)
    it = iter(range(10 ** 9))
    sync = (lambda: torch.cuda.synchronize()) if device.type == 'cuda' else (lambda: None)
    def one(): sf(pol[next(it) % len(pol)]); sync()
    r = rate(one, min_seconds, min_calls)
    line = f'  {device.type:4s} WAE {preset:5s} ({model.size} px), {len(sf.cells)} cells per policy: {r:7.2f} policy evaluations/s (mixed 1-3 step policies)'
    if search:
        t0 = time.perf_counter(); res = greedy_search(sf, OPERATIONS, MAGNITUDES, max_depth=2, keep=1, max_policies=220)
        line += f'; a 2-layer search ({len(res)} policies) {len(res) / (time.perf_counter() - t0):7.1f}/s'
    print(line, flush=True)


if __name__ == '__main__':
    print('== composed images (one CPU core)', flush=True)
    col = bench_compose()
    print('== greedy search: policy evaluations', flush=True)
    cpu = torch.device('cpu')
    bench_search(col, cpu, 'tiny', 16)
    bench_search(col, cpu, 'tiny', 64)
    if not QUICK:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        bench_search(col, cpu, 'paper', 64, min_seconds=0, min_calls=2, search=False)  # the paper WAE is a GPU model
    if torch.cuda.is_available():
        bench_search(col, torch.device('cuda'), 'paper', 64, min_seconds=5.0)
    else:
        print('  (no GPU here: the CUDA figures are measured when one is available)')
