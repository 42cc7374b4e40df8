"""NucleiMix speed: phase-1 context features/s (the offline extractor, and CTransPath with random weights at 224 px),
insertions/s without inpainting, and seconds per inpainted insertion (progressive: two MCG stages) at 10/25/50/250
sampler steps. CPU: the 'tiny' ADM on 64-px windows; on a GPU (when one is available) the paper-size ADM
('256_uncond', 552,814,086 parameters) on the paper's 256-px windows. All figures are measured in this one run.

Usage: .venv/bin/python benchmarks/bench_nucleimix.py [--quick]   (--quick: 10 and 25 steps only, fewer images)
"""
import os, sys, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import torch
from nucbook.data.synth import synth_dataset
from nucbook.models.adm import ADMUNet, adm_config
import tempfile
from nucbook.models.ctranspath import CTransPath, ctranspath_released_state
from nucbook.engine.diffusion import make_noise_scheduler
from nucbook.methods.nucleimix import NucleiMix, OfflineFeatures, CTransPathFeatures

QUICK = '--quick' in sys.argv
STEPS = (10, 25) if QUICK else (10, 25, 50, 250)


def features_rate(extractor, n=16, size=224):
    "Context patches per second through `extractor` (one warm-up call)."
    rng = np.random.default_rng(0)
    P = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    extractor(P[:2]); t0 = time.perf_counter(); extractor(P)
    return n / (time.perf_counter() - t0)


def random_ctranspath(device, folder):
    "CTransPathFeatures from a randomly initialised checkpoint saved in the released key layout (speed only)."
    path = os.path.join(folder, 'ctranspath_random.pth')
    if not os.path.exists(path):
        torch.manual_seed(0); torch.save({'model': ctranspath_released_state(CTransPath())}, path)
    return CTransPathFeatures(path, device=device, batch_size=16)


def main():
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    cuda = torch.cuda.is_available()
    print(f'== phase 1: context features ({torch.get_num_threads()} CPU thread(s))')
    print(f'  offline (colour + GLCM)          {features_rate(OfflineFeatures()):8.1f} patches/s (CPU)')
    with tempfile.TemporaryDirectory() as td:
        print(f'  CTransPath + GLCM (random weights) {features_rate(random_ctranspath("cpu", td), n=4):6.1f} patches/s (CPU)')
        if cuda: print(f'  CTransPath + GLCM (random weights) {features_rate(random_ctranspath("cuda", td), n=64):6.1f} patches/s (GPU)')
    train = synth_dataset(4 if QUICK else 12, 'train', seed=0, size=256, rare_share=0.15)
    nm = NucleiMix(rare=[1], major=[2, 3, 4], margin=16, exclusion=2.0).fit(train, seed=0)  # synthetic nuclei: ~20 px (as the smoke profile)
    print(f"  NucleiMix.fit on {len(train)} synthetic 256-px tiles: {nm.timing_['locations']} locations, "
          f"{nm.timing_['features_per_s']:.1f} locations/s end to end")
    print('== phase 2: insertions without inpainting')
    k = 20 if QUICK else 60
    t0 = time.perf_counter(); res = nm.augment(train, k, seed=0); dt = time.perf_counter() - t0
    print(f"  {res.report['inserted']} insertions ({res.report['replaced']} replace, {res.report['pasted']} paste) in "
          f"{dt:.2f} s: {res.report['inserted'] / dt:8.1f} insertions/s")
    sched = make_noise_scheduler()
    configs = [('cpu', 'tiny', 64)] + ([('cuda', '256_uncond', 256)] if cuda else [])
    for device, preset, tile in configs:
        torch.manual_seed(0)
        model = ADMUNet(**adm_config(preset)).to(device).eval()
        print(f'== progressive inpainting, ADM {preset} ({sum(p.numel() for p in model.parameters()):,} params) on {device}, '
              f'{tile}-px windows, MCG ddpm sampler')
        for steps in STEPS:
            if device == 'cpu' and steps == 250 and QUICK: continue
            r = nm.augment(train, 2, seed=1, inpaint=dict(model=model, noise_scheduler=sched, steps=steps, tile=tile, sampler='ddpm'))
            n = max(1, r.report['inserted'])
            print(f"  {steps:4d} steps: {r.report['inpaint_seconds'] / n:8.2f} s per inpainted insertion "
                  f"({r.report['inserted']} insertions, {r.report['inpaint_seconds']:.1f} s)")
    if not cuda: print('  (no GPU here: the paper-size figures are measured when one is available)')


if __name__ == '__main__':
    main()
