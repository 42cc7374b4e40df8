"""DiffMix sampling speed, and the few-step goal of issue 16 (<= 20 steps at equal FID and label fidelity).

DiffMix's synthesis (Oh & Jeong 2023, Sec. 2.4): DDIM on 100 respaced steps, started from the ORIGINAL patch noised to
step 54 (t = 549 with trailing spacing): 55 denoising steps, each a classifier-free-guided pair of network evaluations,
110 per patch. Measured side by side in ONE run, on the same patches, label maps and start noise (patch i: seed i):
  ddim    55 steps  (the reference: steps=100, start_step=54)
  dpm++   20 steps  (DPM-Solver++ 2M, solver='dpm++': the respaced schedule whose step 19 starts nearest t = 549)
  dpm++   10 steps  (the same for 10)
  ddim    20 steps  (the control: is it the solver or only the number of steps?)
Columns: NFE per patch (network evaluations, guided: 2 per step), seconds per patch (wall clock, after a warm-up; GPU
synchronised), speed-up over the reference, and quality relative to it:
  MAE ref   mean |difference| to the reference sample of the same patch and start noise, in grey levels (0-255)
  FID / KID proxies of the synthesised set against the original patches, through nucbook.eval.fid with the OFFLINE
            random-feature extractor (`RandomConvFeatures`): NOT comparable with published FIDs, and on a few patches
            mostly noise; a relative check between the rows only
  clip%     share of output pixel values at the clipping limits (+-1): a sampler that diverges shows here. DDIM clips
            its x0 estimate every step (clip_sample=True); the engine's DPM-Solver++ did not when this was written
            (thresholding=False): on weak models that, not the solver order, makes most of the difference
  lab-fid   label-fidelity PROXY: pixel Dice (nucbook.eval.metrics.dice1) of a stain threshold (hematoxylin channel of
            skimage's rgb2hed above its Otsu level) against the nuclei of the label map the patch was conditioned on.
            Not the issue's label fidelity (a segmenter trained on real data scoring the patch): that needs a trained
            HoVer-Net and belongs in the DiffMix notebook; this one is cheap and needs no model.
Each patch is conditioned on its OWN label map (the sampler is under test, not the map).
With random or barely trained weights (the CPU smoke) only the speed columns mean anything: the quality columns then
compare samplers of a network that has not learned the data.

Usage:
  .venv/bin/python benchmarks/bench_diffmix.py --smoke        # CPU: SDM 'tiny', 32 px, 2 synthetic patches (~15-25 s)
  .venv/bin/python benchmarks/bench_diffmix.py [--device cuda] [--weights FILE] [--n 64] [--dataset consep_tiles]
      # paper size: SDM 'diffmix_consep' (256 px), bf16 autocast as the engine samples; random weights unless --weights
      # names a checkpoint in the SDM/DiffMix authors' key layout (`nucbook.models.sdm.load_sdm`); without a GPU and
      # without --device this falls back to the smoke (so `make bench` runs everywhere); --device cuda then exits 2
Other options: --size, --batch, --train-steps (train the model briefly first), --threads, --s, --config, --schedules.
The smoke samples 32-px patches: at the tiny preset's nominal 64 px its attention level (32x32 tokens) makes the same
run far slower on one CPU thread (measured: ~25 s of CPU at 32 px, ~55 s at 48 px, ~150 s at 64 px; `--smoke --size 64`).
"""
import argparse, os, sys, tempfile, time, warnings
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
import numpy as np
import torch
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from nucbook.data.crops import crop_sample, pad_to
from nucbook.data.datasets import load_dataset
from nucbook.engine.diffusion import (ddim_sample, label_channels, make_noise_scheduler, patch_fid_kid, start_timestep,
                                      to_model_range, to_uint8, train_diffusion)
from nucbook.eval.fid import RandomConvFeatures
from nucbook.eval.metrics import dice1
from nucbook.models.sdm import SDMUNet, load_sdm, sdm_config

REF_STEPS, REF_START = 100, 54  # DiffMix: 100 respaced DDIM steps, start at step 54 -> 55 denoising steps
FID_TOLERANCE = 0.05  # "equal FID": within 5% of the reference's (as bench_diffusion's goal)
FIDELITY_TOLERANCE = 0.02  # "equal label fidelity": Dice within 0.02 of the reference's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--smoke', action='store_true', help="CPU smoke: SDM 'tiny', 32 px, 2 patches")
    p.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cpu with --smoke, else cuda when there is "
                   "one, else the smoke profile)")
    p.add_argument('--config', default=None, help="SDM preset (default: 'tiny' with --smoke, else 'diffmix_consep')")
    p.add_argument('--weights', default=None, help="SDM checkpoint in the authors' key layout (default: random weights)")
    p.add_argument('--dataset', default='synthetic', help="'synthetic' or a registered dataset, e.g. consep_tiles ($NUCBOOK_DATA)")
    p.add_argument('--split', default='test', help='split of --dataset (synthetic: val)')
    p.add_argument('--n', type=int, default=None, help='patches (default 2 with --smoke, else 32)')
    p.add_argument('--size', type=int, default=None, help='patch side (default 32 with --smoke, else 256)')
    p.add_argument('--batch', type=int, default=None, help='patches per forward pass (default: all)')
    p.add_argument('--s', type=float, default=1.5, help='guidance scale (authors convention, DiffMix 1.5)')
    p.add_argument('--train-steps', type=int, default=0, help='train the model this many steps first (smoke: makes the quality columns less arbitrary)')
    p.add_argument('--repeat', type=int, default=1, help='time each schedule this many times, report the fastest')
    p.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', '1')), help='CPU threads')
    p.add_argument('--schedules', default='dpm++:20,dpm++:10,ddim:20', help='solver:steps to compare with the reference')
    a = p.parse_args(argv)
    if a.device is None and not a.smoke and not torch.cuda.is_available():
        print('no GPU here: running the CPU smoke profile (--smoke)'); a.smoke = True  # `make bench` runs it so
    a.device = a.device or ('cpu' if a.smoke else 'cuda')
    a.config = a.config or ('tiny' if a.smoke else 'diffmix_consep')
    a.n = a.n or (2 if a.smoke else 32)
    a.size = a.size or (32 if a.smoke else 256)
    a.batch = a.batch or a.n
    if a.n < 2: p.error('--n must be at least 2 (FID needs two patches per set)')
    return a


def patches(dataset, split, n, size, n_classes, seed=0):
    "n label-carrying patches of side `size` (centre crops, mirror-padded when smaller): images in [-1, 1] and label maps."
    if dataset == 'synthetic': samples = load_dataset('synthetic', 'val' if split == 'test' else split, n=n, size=size, seed=seed)
    else: samples = load_dataset(dataset, split, limit=n)
    if len(samples) < n: raise SystemExit(f'{dataset} {split}: {len(samples)} images, --n asks for {n}')
    crops = []
    for s in samples[:n]:
        s = pad_to(s, size, size); H, W = s.shape
        crops.append(crop_sample(s, (H - size) // 2, (W - size) // 2, size, size))
    y0 = to_model_range(np.stack([c.image for c in crops]))
    x = torch.from_numpy(np.stack([label_channels(c.inst_map, c.type_map, n_classes) for c in crops]))
    return y0, x, [c.inst_map for c in crops]


def schedule(n_steps, noise_scheduler, ref_t):
    "(steps K, start_step) of the respaced schedule with `n_steps` denoising steps whose start timestep is nearest `ref_t`."
    best, k0 = None, round(n_steps * REF_STEPS / (REF_START + 1))  # the same start fraction
    for K in range(max(n_steps, k0 - 3), k0 + 4):
        t = start_timestep(noise_scheduler, K, n_steps - 1)
        if best is None or abs(t - ref_t) < abs(best[2] - ref_t): best = (K, n_steps - 1, t)
    return best


def stain_dice(img_u8, inst):
    "Label-fidelity proxy of one patch: Dice of (hematoxylin > Otsu) against the label map's nuclei."
    h = rgb2hed(img_u8)[..., 0]
    fg = h > threshold_otsu(h) if h.max() > h.min() else np.zeros(h.shape, bool)
    d = dice1((inst > 0).astype(np.int32), fg.astype(np.int32))
    return 0.0 if np.isnan(d) else d


def build_model(a):
    cfg = sdm_config(a.config)
    if a.weights:
        model = load_sdm(a.weights, cfg, device=a.device)
        how = f'weights {a.weights}'
    else:
        torch.manual_seed(0)
        model = SDMUNet(**cfg)
        out = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        if a.train_steps == 0 and not out.weight.any():  # SDM's output layer starts at zero: eps = 0, every sampler alike
            out.reset_parameters()
            how = "random weights (the zero-initialised output layer re-drawn as a plain conv, so the network's output varies)"
        else: how = 'random initialisation'
        model = model.to(a.device)
    return model, how


def timed_sample(model, noise_scheduler, y0, x, a, steps, start, solver):
    "(samples, fastest seconds per patch over `a.repeat` runs, peak GPU GiB); the runs are identical (seeded)."
    cuda = a.device.startswith('cuda'); best = float('inf')
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    for _ in range(max(1, a.repeat)):
        t0 = time.perf_counter()
        out = ddim_sample(model, noise_scheduler, steps=steps, start_step=start, y0=y0, x=x, s=a.s, seed=0,
                          batch_size=a.batch, solver=solver)
        if cuda: torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan')
    return out, best / len(y0), mem


def main(argv=None):
    a = parse_args(argv)
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        print('no GPU available: run the CPU smoke with --smoke (or --device cpu, slowly)', file=sys.stderr); return 2
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore', message='.*NOT comparable.*')  # said once below the table instead
    warnings.filterwarnings('ignore', message='.*Kernel Inception Distance.*will save all extracted features')
    sched = make_noise_scheduler()
    model, how = build_model(a)
    n_classes = model.label_channels - 2
    y0, x, insts = patches(a.dataset, a.split, a.n, a.size, n_classes)
    dev = torch.cuda.get_device_name() if a.device.startswith('cuda') else f'CPU, {torch.get_num_threads()} thread(s)'
    n_par = sum(p.numel() for p in model.parameters())
    print(f'== DiffMix sampling: SDM {a.config!r} ({n_par:,} params), {how}; {a.device} ({dev})')
    print(f'   {a.n} patches {a.size}x{a.size} from {a.dataset}, each conditioned on its own label map; guidance s = {a.s} '
          f"(authors' convention); batch {a.batch} patches per pass" + (', bf16 autocast' if a.device.startswith('cuda') else ''))
    if a.train_steps:
        with tempfile.TemporaryDirectory() as td:
            train = load_dataset('synthetic', 'train', n=8, size=max(a.size, 64), seed=0) if a.dataset == 'synthetic' \
                else load_dataset(a.dataset, 'train', limit=16)
            t0 = time.perf_counter()
            run = train_diffusion(model, train, td, steps=a.train_steps, batch_size=8, patch_size=min(a.size, 64), lr=2e-3,
                                  ckpt_every=10**6, save_final=False, seed=0)
        model = run.model.eval()
        print(f'   trained {a.train_steps} steps first ({time.perf_counter() - t0:.1f} s; loss {np.mean(run.losses[:3]):.3f} -> '
              f'{np.mean(run.losses[-3:]):.3f}): barely trained')
    ref_t = start_timestep(sched, REF_STEPS, REF_START)
    rows = [('ddim', REF_STEPS, REF_START, ref_t)]
    for item in a.schedules.split(','):
        solver, n = item.split(':'); K, start, t = schedule(int(n), sched, ref_t)
        rows.append((solver, K, start, t))
    model.eval()
    ddim_sample(model, sched, steps=4, start_step=1, y0=y0[:1], x=x[:1], s=a.s, batch_size=1)  # warm-up (not timed)
    feats = RandomConvFeatures()
    real_dice = np.mean([stain_dice(u, m) for u, m in zip(to_uint8(y0), insts)])
    results = []
    for solver, K, start, t in rows:
        out, sec, mem = timed_sample(model, sched, y0, x, a, K, start, solver)
        fk = patch_fid_kid(y0, out, feats)
        lab = np.mean([stain_dice(u, m) for u, m in zip(to_uint8(out), insts)])
        results.append(dict(solver=solver, K=K, start=start, t=t, steps=start + 1, nfe=2 * (start + 1), sec=sec, mem=mem,
                            out=out, fid=fk['fid'], kid=fk['kid'], lab=lab))
        print(f'   measured {solver} {start + 1} steps: {sec:.3f} s/patch', flush=True)
    ref = results[0]; ref_u8 = to_uint8(ref['out']).astype(np.int16)
    print(f'\n{"solver":>7} {"steps":>5} {"schedule":>14} {"NFE":>4} {"s/patch":>9} {"speed-up":>8} {"MAE ref":>8} '
          f'{"FID proxy":>10} {"KID proxy":>10} {"clip%":>6} {"lab-fid":>8}' + ('  peak GiB' if a.device.startswith('cuda') else ''))
    for r in results:
        mae = float(np.abs(to_uint8(r['out']).astype(np.int16) - ref_u8).mean())
        sched_s = f'{r["start"]}/{r["K"]} t={r["t"]}'; clip = 100 * float((r['out'].abs() >= 1).float().mean())
        print(f'{r["solver"]:>7} {r["steps"]:>5} {sched_s:>14} {r["nfe"]:>4} {r["sec"]:>9.3f} {ref["sec"] / r["sec"]:>7.2f}x '
              f'{mae:>8.2f} {r["fid"]:>10.4g} {r["kid"]:>10.3g} {clip:>6.1f} {r["lab"]:>8.3f}' +
              (f'  {r["mem"]:8.1f}' if a.device.startswith('cuda') else ''))
    print(f'{"(real patches: label-fidelity proxy":>67} {real_dice:.3f})')
    print('FID/KID proxies: offline random-conv features (nucbook.eval.fid.RandomConvFeatures), NOT comparable with '
          f'published values; {a.n} patches per set. lab-fid: stain-threshold Dice proxy (see the docstring).')
    ok = [r for r in results[1:] if r['steps'] <= 20 and r['fid'] <= ref['fid'] * (1 + FID_TOLERANCE)
          and r['lab'] >= ref['lab'] - FIDELITY_TOLERANCE]
    best = min(ok, key=lambda r: r['nfe']) if ok else None
    verdict = (f'MET by {best["solver"]} {best["steps"]} steps ({ref["sec"] / best["sec"]:.1f}x faster)' if best else 'NOT MET')
    if not a.weights: verdict += ' (not meaningful: untrained weights, see NOTE)'
    elif a.n < 32: verdict += f' (FID on {a.n} patches per set: indicative only)'
    print(f'GOAL (<= 20 steps at equal FID and label fidelity: FID proxy within {FID_TOLERANCE:.0%} of the 55-step '
          f"reference's, label-fidelity proxy within {FIDELITY_TOLERANCE}) on these data: {verdict}")
    if not a.weights:
        print('NOTE: random' + (' / barely trained' if a.train_steps else '') + ' weights: only the speed columns mean '
              'something; the quality columns (and the verdict) compare samplers of a network that has not learned the data.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
