"""Diffusion speed and the FID-vs-steps curve.

Prints training iterations/s and DDIM sampling seconds per patch at 10/25/50/100 steps for the `tiny` models on CPU,
and for the `paper` (256x256) models on a GPU when one is available (with peak GPU memory), for diffusers' UNet2DModel,
the semantic UNet and guided-diffusion's ADM UNet (NucleiMix's network: hybrid loss, learned variance; `tiny` preset at
its 32 px on CPU, the 256x256 uncond preset on a GPU), with MCG inpainting at 25 steps (DDIM and ancestral samplers); then the FID of DDIM
samples against held-out real patches at each step count on one model, and whether a setting of at most 25 steps is
within 5% of the 100-step FID (the goal beyond the papers, which sample 100 or 250 steps).

    python benchmarks/bench_diffusion.py [--model runs/.../model] [--n-fid 64] [--train-steps 300] [--threads 1] [--skip-speed|--skip-fid]

Without --model a tiny unconditional model is trained first on synthetic tiles (--train-steps; minutes on CPU); FID
uses `nucbook.engine.diffusion.patch_fid_kid` (nucbook.eval.fid when present, else a random-feature stand-in).
"""
import argparse, os, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import torch
from nucbook.engine.diffusion import (ddim_sample, diffusion_loss, load_diffusion, make_noise_scheduler, make_semantic_unet,
                               make_unet, model_side, patch_fid_kid, patch_batch, train_diffusion)
from nucbook.models.adm import ADMUNet, adm_config
from nucbook.engine.inpaint import mcg_inpaint
from nucbook.data.synth import synth_dataset

STEPS = (10, 25, 50, 100)


def train_speed(model, device, batch, size, n_iter, amp):
    "Optimisation steps per second on one fixed random batch."
    sched = make_noise_scheduler(); sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    model = model.to(device).train(); opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    n_lab = getattr(getattr(model, 'config', None), 'label_channels', None)
    lab = torch.zeros(batch, n_lab, size, size, device=device) if n_lab else None
    t = torch.randint(1000, (batch,), device=device); eps = torch.randn_like(x0)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    for i in range(n_iter + 2):
        if i == 2:
            if device.type == 'cuda': torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = diffusion_loss(model, sched, x0, t, eps, lab)
        opt.zero_grad(); loss.backward(); opt.step()
    if device.type == 'cuda': torch.cuda.synchronize()
    it_s = n_iter / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    return it_s, mem


def sample_speed(model, n, steps, size, label=False):
    "Seconds per patch of DDIM sampling (batch of n), and peak GPU memory."
    model.eval(); sched = make_noise_scheduler(); device = next(model.parameters()).device
    x = torch.zeros(n, model.config.label_channels, size, size) if label else None
    if device.type == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ddim_sample(model, sched, n, steps=steps, size=size, x=x, s=1.5 if label else 1.0, batch_size=n)
    if device.type == 'cuda': torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    return (time.perf_counter() - t0) / n, mem


def speed_table(device, size_name, size, batch, n_sample, n_iter):
    amp = device.type == 'cuda'
    print(f'\n== {size_name} models, {size}x{size}, {device.type}' + (f' ({torch.cuda.get_device_name()})' if amp else ''))
    adm_preset = 'tiny' if size_name == 'tiny' else '256_uncond'
    for name, make in (('unconditional UNet2DModel', lambda: make_unet(size_name, sample_size=size)),
                       ('semantic (SPADE) UNet', lambda: make_semantic_unet(size_name, n_classes=4, sample_size=size)),
                       (f'ADM UNet ({adm_preset})', lambda: ADMUNet(**adm_config(adm_preset)))):
        torch.manual_seed(0); m = make()
        px = model_side(m) if 'ADM' in name else size  # the tiny ADM at its own 32 px (attention at 64 px is slow on CPU)
        n_par = sum(p.numel() for p in m.parameters()) / 1e6
        it_s, mem = train_speed(m, device, batch, px, n_iter, amp)
        print(f'{name:>26}: {n_par:6.2f} M params, {px} px, training {it_s:6.2f} it/s at batch {batch}' + (f', peak {mem:.1f} GiB' if amp else ''))
        label = 'semantic' in name
        for k in STEPS:
            sec, mem = sample_speed(m, n_sample, k, px, label)
            print(f'{"":>26}  DDIM {k:3d} steps{" + CFG" if label else ""}: {sec:7.3f} s/patch (batch {n_sample})' + (f', peak {mem:.1f} GiB' if amp else ''))
        if not label:
            y = torch.rand(n_sample, 3, px, px, device=device) * 2 - 1
            mask = torch.zeros(n_sample, 1, px, px, dtype=torch.bool); mask[..., px // 4: px // 2, px // 4: px // 2] = True
            for sampler in ('ddim', 'ddpm'):
                t0 = time.perf_counter(); mcg_inpaint(m, make_noise_scheduler(), y, mask.to(device), steps=25, batch_size=n_sample, sampler=sampler)
                if amp: torch.cuda.synchronize()
                print(f'{"":>26}  MCG inpainting 25 {sampler} steps: {(time.perf_counter() - t0) / n_sample:7.3f} s/patch')
        del m
        if amp: torch.cuda.empty_cache()


def fid_curve(model, sched, n_fid, seed=0):
    size = model_side(model)
    real, _ = patch_batch(synth_dataset(16, 'val', seed=seed), n_fid, size, 12345)
    print(f'\n== FID vs sampling steps ({n_fid} samples vs {n_fid} held-out real {size}x{size} patches, eta=0, same seeds)')
    other, _ = patch_batch(synth_dataset(16, 'val', seed=seed), n_fid, size, 54321)
    r = patch_fid_kid(real, other)
    print(f'real vs other real patches: FID {r["fid"]:9.4f}  KID {r["kid"]:8.5f}  (the floor)')
    fids = {}
    for solver in ('ddim', 'dpm++'):
        for k in STEPS:
            t0 = time.perf_counter()
            fake = ddim_sample(model, sched, n_fid, steps=k, seed=1000, batch_size=16, solver=solver)
            r = patch_fid_kid(real, fake); fids[solver, k] = r['fid']
            print(f'{solver:>5} {k:4d} steps: FID {r["fid"]:9.4f}  KID {r["kid"]:8.5f}  ({(time.perf_counter() - t0) / n_fid:.3f} s/patch, {r["features"]})')
    ref = fids['ddim', 100]
    ok = sorted((k, s) for (s, k), v in fids.items() if k <= 25 and v <= 1.05 * ref)
    print(f'goal (<=25 steps within 5% of the 100-step DDIM FID {ref:.4f}): ' + (f'met by {ok[0][1]} at {ok[0][0]} steps' if ok else 'MISSED'))
    print('FID relative to 100-step DDIM: ' + '; '.join(f'{s} {k}: {100 * (v / ref - 1):+.1f}%' for (s, k), v in fids.items()))

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default=None, help='save_diffusion folder of an unconditional model for the FID curve')
    ap.add_argument('--n-fid', type=int, default=64)
    ap.add_argument('--train-steps', type=int, default=300)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--skip-fid', action='store_true')
    ap.add_argument('--skip-speed', action='store_true')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f'torch {torch.__version__}, {a.threads} CPU thread(s)')
    if not a.skip_speed:
        speed_table(torch.device('cpu'), 'tiny', 64, batch=8, n_sample=8, n_iter=10)
        if torch.cuda.is_available(): speed_table(torch.device('cuda'), 'paper', 256, batch=8, n_sample=16, n_iter=20)
        else: print('\n(no GPU: paper-size figures skipped)')
    if not a.skip_fid:
        if a.model:
            model, sched = load_diffusion(a.model, 'cuda' if torch.cuda.is_available() else 'cpu')
        else:
            with tempfile.TemporaryDirectory() as d:
                print(f'\ntraining a tiny model for {a.train_steps} steps on synthetic tiles ...')
                run = train_diffusion(make_unet('tiny'), synth_dataset(16, 'train'), d, steps=a.train_steps, batch_size=8,
                                      lr=5e-4, warmup_steps=50, ema_decay=0.999, save_final=False)
                model, sched = run.ema_model(), make_noise_scheduler()
        fid_curve(model, sched, a.n_fid)
