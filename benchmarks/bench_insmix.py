"""InsMix speed: copy-paste + background perturbation crops/s on one CPU core (target >= 50 augmented 256x256 crops/s),
smooth-GAN training iterations/s and inference crops/s on CPU, and on a GPU when one is available.

Usage: .venv/bin/python benchmarks/bench_insmix.py [--quick]
"""
import os, sys, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import torch
from nucbook.data.synth import synth_dataset
from nucbook.augment.canvas import InstanceBank
from nucbook.methods.insmix import (InsMix, SmoothGenerator, PatchDiscriminator, ssd_copy_paste,
                            background_perturbation, gan_batch, composite, triplet_loss_D, generator_loss, pasted_mask)

QUICK = '--quick' in sys.argv
TARGET = 50.0


def rate(fn, min_seconds=2.0, min_calls=3):
    "Calls per second of fn() over at least `min_seconds` (after one warm-up call)."
    fn(); n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < min_seconds: fn(); n += 1
    return n / (time.perf_counter() - t0)


def bench_copy_paste():
    torch.set_num_threads(1)
    train = synth_dataset(4 if QUICK else 16, 'train', seed=0, size=512)
    bank = InstanceBank.from_samples(train)
    crops = synth_dataset(16, 'val', seed=0, size=256)
    rng = np.random.default_rng(0)
    it = iter(range(10 ** 9))
    nxt = lambda: crops[next(it) % len(crops)]
    nuclei = np.mean([c.n_instances for c in crops])
    print(f'bank: {len(bank)} templates; crops 256x256 with {nuclei:.0f} nuclei on average; 1 CPU thread')
    r_cp = rate(lambda: ssd_copy_paste(nxt(), bank, rng))
    r_bg = rate(lambda: background_perturbation(nxt(), rng))
    aug = InsMix(bank, bgp=True)
    r_all = rate(lambda: aug(nxt(), rng))
    print(f'  SSD copy-paste              {r_cp:8.1f} crops/s')
    print(f'  background perturbation     {r_bg:8.1f} crops/s')
    print(f'  copy-paste + BgP (InsMix)   {r_all:8.1f} crops/s   target >= {TARGET:.0f}: {"OK" if r_all >= TARGET else "BELOW TARGET"}')
    return bank, train


def bench_gan(bank, train, device, cnum, crop, batch, threads, min_seconds=3.0, min_calls=3):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G, D = SmoothGenerator(cnum).to(device), PatchDiscriminator(64 if cnum >= 32 else 16).to(device)
    oG, oD = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    rng = np.random.default_rng(0)
    batches = [{k: v.to(device) for k, v in gan_batch(train, bank, rng, batch, crop).items()} for _ in range(4)]
    k = iter(range(10 ** 9))
    sync = (lambda: torch.cuda.synchronize()) if device.type == 'cuda' else (lambda: None)

    def step():  # the optimisation step of `train_smooth_gan`, on pre-made batches (data time excluded)
        b = batches[next(k) % 4]; u, M, Mo = b['u'], b['M'], b['M_o']
        with torch.no_grad(): S = composite(G(u, M, Mo), u, M)
        L_D = triplet_loss_D(D(b['x_a']), D(b['x_p']), D(S)); oD.zero_grad(); L_D.backward(); oD.step()
        Gu = G(u, M, Mo); S = composite(Gu, u, M)
        with torch.no_grad(): Da, Dp = D(b['x_a']), D(b['x_p'])
        L_G = generator_loss(Da, Dp, D(S), u, Gu)[0]; oG.zero_grad(); L_G.backward(); oG.step(); sync()

    data_rate = rate(lambda: gan_batch(train, bank, rng, batch, crop), min_seconds=1.0)
    train_rate = rate(step, min_seconds, min_calls)
    G.eval()
    b = batches[0]

    @torch.no_grad()
    def infer():
        G(b['u'], b['M'], b['M_o']); sync()
    infer_rate = rate(infer, min_seconds, min_calls) * batch
    print(f'  {device.type:4s} cnum={cnum:2d} crop={crop} batch={batch} threads={threads}: '
          f'train {train_rate:6.2f} it/s ({train_rate * batch:6.1f} crops/s), inference {infer_rate:7.1f} crops/s, '
          f'batch making {data_rate * batch:6.1f} crops/s (CPU)')


if __name__ == '__main__':
    print('== InsMix copy-paste + background perturbation (one CPU core)')
    bank, train = bench_copy_paste()
    print('== smooth-GAN (G and D steps of Eqs. 3-5; inference = G forward)')
    cpu = torch.device('cpu')
    bench_gan(bank, train, cpu, cnum=8, crop=64, batch=4, threads=1)
    if not QUICK:
        # the paper-size generator: ~1 TFLOP per step, far too slow to train on a CPU; one timed call each
        bench_gan(bank, train, cpu, cnum=48, crop=256, batch=2, threads=min(2, os.cpu_count() or 1), min_seconds=0, min_calls=1)
    if torch.cuda.is_available():
        bench_gan(bank, train, torch.device('cuda'), cnum=48, crop=256, batch=4, threads=1, min_seconds=5.0, min_calls=10)
    else:
        print('  (no GPU here: the CUDA figures are measured when one is available)')
