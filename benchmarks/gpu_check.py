"""GPU check (`make gpu-check`): the paper-size training step of every model in the library, and the samplers, on one GPU.

For each entry of `REGISTRY` it prints images/s (patches/s for the samplers), the peak GPU memory of the timed part
(`torch.cuda.max_memory_allocated`, reset per model), the FLOPs of one step (forward + backward, counted by
`torch.utils.flop_counter.FlopCounterMode`), the achieved TFLOP/s and its share of the GPU's dense bf16 peak
(`PEAK_BF16_TFLOPS`, datasheet figures; n/a for other GPUs), and two equality checks on the same weights and inputs:
the forward in fp32 on the GPU (TF32 off) against the CPU (max abs diff, pass when <= `FP32_RTOL` x max|ref|), and bf16
autocast against fp32 (relative L2 error, pass when <= `BF16_TOL`). Ends with a table and a one-line summary
(`SUMMARY: PASS ...` or `SUMMARY: FAIL ...`); the exit code is 0 on PASS, 1 when any model failed or any check failed, 2
when there is no GPU. A model whose import or step fails gives a FAILED row; the script goes on with the others.

The whole run is sized to stay well under 8 minutes on one H100/H200: per-entry step counts, a cap on each timed loop
and a total budget (`--budget`, seconds) after which the remaining entries are SKIPPED (which counts as a failure).

`--cpu-smoke` runs the same code paths on the CPU with tiny models at 64 px, one step each, fp32 (no TFLOP/s): that is
what CI runs (tests/test_gpu_check.py). To add a model, write a `build_*(ctx) -> Job` function and append an `Entry` to
`REGISTRY`.

Usage: python benchmarks/gpu_check.py [--cpu-smoke] [--only NAME ...] [--budget 360] [--threads N]
"""
from __future__ import annotations
import argparse, contextlib, copy, gc, importlib, math, os, sys, time, traceback, warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import torch

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s. Matched on torch.cuda.get_device_name():
# (substrings that must all occur, label, peak). 'NVIDIA H100 80GB HBM3' is the SXM part; NVL parts are not listed (n/a).
PEAK_BF16_TFLOPS = [
    (('H200',), 'H200', 989.0),
    (('H100', 'PCIe'), 'H100 PCIe', 756.0),
    (('H100', 'SXM'), 'H100 SXM', 989.0),
    (('H100', 'HBM3'), 'H100 SXM', 989.0),
]
FP32_RTOL = 1e-3  # fp32 GPU vs CPU: max |gpu - cpu| must be <= FP32_RTOL * max |cpu|
BF16_TOL = 0.1  # bf16 autocast vs fp32: ||bf16 - fp32|| / ||fp32|| must be <= BF16_TOL


def peak_bf16_tflops(device_name:str) -> tuple:
    "(label, dense bf16 peak TFLOP/s) of a GPU from its name; (None, None) when it is not in `PEAK_BF16_TFLOPS`."
    if 'NVL' in device_name: return None, None
    for parts, label, peak in PEAK_BF16_TFLOPS:
        if all(p.lower() in device_name.lower() for p in parts): return label, peak
    return None, None


def achieved_tflops(flops:float, seconds:float) -> float:
    "FLOPs done in `seconds`, in TFLOP/s."
    return flops / seconds / 1e12


def utilisation(tflops:float|None, peak:float|None) -> float|None:
    "Achieved over peak TFLOP/s, in percent (None when either is unknown)."
    return None if tflops is None or not peak else 100.0 * tflops / peak


class _GlobalOnly:
    "Stands in for FlopCounterMode's per-module tracker, whose backward hooks break `torch.autograd.grad` (MCG)."
    parents = {'Global'}
    def __enter__(self): return self
    def __exit__(self, *args): return None


def count_flops(fn:Callable) -> int:
    "FLOPs of one call of `fn` (matrix products, convolutions, attention; forward and backward), by FlopCounterMode."
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc: fn()
        return fc.get_total_flops()
    except RuntimeError as e:
        # torch's module tracker cannot follow autograd.grad() on a leaf; count again with totals only
        if 'autograd.grad' not in str(e): raise
    fc = FlopCounterMode(display=False)
    if not hasattr(fc, 'mod_tracker'): raise RuntimeError('FlopCounterMode cannot count this step (autograd.grad)')
    fc.mod_tracker = _GlobalOnly()
    with fc: fn()
    return fc.get_total_flops()


def need(attr:str, *modules:str):
    "`attr` from the first of `modules` that has it; an ImportError naming everything tried otherwise (mid-refactor)."
    tried = []
    for mod in modules:
        try: m = importlib.import_module(mod)
        except Exception as e: tried.append(f'{mod}: {type(e).__name__}: {e}'); continue
        if hasattr(m, attr): return getattr(m, attr)
        tried.append(f'{mod} has no {attr}')
    raise ImportError(f'cannot import {attr} (tried ' + '; '.join(tried) + ')')


# --------------------------------------------------------------------------------------------------- the registry
@dataclass
class Ctx:
    "Where and how big: the device, and whether this is the tiny CPU smoke run."
    device: torch.device
    smoke: bool

    def pick(self, paper, smoke): return smoke if self.smoke else paper

    def autocast(self, enabled:bool=True):
        "bf16 autocast on the GPU run (the smoke run trains in fp32)."
        if self.smoke or not enabled: return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def gen(self, seed:int=0) -> torch.Generator: return torch.Generator().manual_seed(seed)


@dataclass
class Job:
    "A built model: its timed unit and its equality probe."
    step: Callable[[], object]  # one timed unit: a full training step (forward, backward, optimiser) or one sampler call
    items: int  # images (or patches) per step
    batch: int
    px: int  # image side
    precision: str  # what the step runs in: 'bf16' (autocast), 'fp32'
    models: dict = field(default_factory=dict)  # name -> module on ctx.device, for the probe
    # probe(models, device, bf16) -> fp32 tensor: a forward on fixed inputs, with bf16 autocast when `bf16`
    probe: Callable|None = None
    probe_fp32_on_device: bool = True  # False: the code autocasts by itself on CUDA, so bf16 is compared with CPU fp32
    note: str = ''


@dataclass
class Entry:
    "One row of the check: `build(ctx) -> Job`, and how many steps to run."
    name: str
    build: Callable[[Ctx], Job]
    steps: int = 20  # timed steps on the GPU (at most: the time cap may stop the loop earlier); 1 in the smoke run
    warmup: int = 3  # untimed steps first (the FLOP-counting step comes on top); 0 in the smoke run
    max_seconds: float = 20.0  # cap of the timed loop on the GPU


def _discs(rng:np.random.Generator, size:int, n:int) -> np.ndarray:
    "An int32 instance map with `n` random discs (nuclei) of radius size/20..size/10, later ones on top."
    yy, xx = np.mgrid[:size, :size]; m = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        r = rng.uniform(size / 20, size / 10); cy, cx = rng.uniform(r, size - r, 2)
        m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return m


def build_hovernet(ctx:Ctx) -> Job:
    "HoVer-Net (ResNet-50 encoder), bf16 autocast + channels-last, hovernet_loss, Adam with grad clipping (as Trainer)."
    HoVerNet = need('HoVerNet', 'nucbook.models.hovernet')
    hovernet_loss = need('hovernet_loss', 'nucbook.models.hovernet')
    hovernet_targets = need('hovernet_targets', 'nucbook.models.hovernet')
    bs, px, n_types = ctx.pick(8, 2), ctx.pick(256, 64), 4
    torch.manual_seed(0)
    model = HoVerNet(ctx.pick('paper', 'tiny'), n_types=n_types).to(ctx.device).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    insts = [_discs(rng, px, 12) for _ in range(bs)]
    tgts = [hovernet_targets(m, np.where(m > 0, m % n_types + 1, 0)) for m in insts]
    tgt = {k: torch.from_numpy(np.stack([t[k] for t in tgts])).to(ctx.device) for k in ('np', 'hv', 'tp')}
    x = torch.rand(bs, 3, px, px, generator=ctx.gen(1)).to(ctx.device).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step():
        model.train()
        with ctx.autocast(): out = model(x)
        loss, _ = hovernet_loss(out, tgt)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()

    def probe(models, device, bf16):
        xp = torch.rand(1, 3, px, px, generator=ctx.gen(2)).to(device)
        if device.type == 'cuda': xp = xp.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            out = models['model'](xp)
        return torch.cat([out[k].float().flatten() for k in sorted(out)])
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'model': model}, probe, note='channels-last, Adam')


def _gan_inputs(ctx, bs, px, seed=0):
    "Copy-paste-like smooth-GAN inputs u, M (pasted nuclei), M_o (original nuclei) and real crops x_a, x_p."
    rng = np.random.default_rng(seed); Ms, Mos = [], []
    for _ in range(bs):
        orig, pasted = _discs(rng, px, 8) > 0, _discs(rng, px, 4) > 0
        Ms.append(pasted); Mos.append(orig & ~pasted)
    m = lambda a: torch.from_numpy(np.stack(a)[:, None].astype(np.float32)).to(ctx.device)
    img = lambda s: (torch.rand(bs, 3, px, px, generator=ctx.gen(s)) * 2 - 1).to(ctx.device)
    return img(seed + 10), m(Ms), m(Mos), img(seed + 11), img(seed + 12)


def build_smooth_gan(ctx:Ctx) -> Job:
    "InsMix smooth-GAN: one D step and one G step as in `train_smooth_gan` (fp32 there, so fp32 here), Adam."
    mod = 'nucbook.methods.insmix'
    SmoothGenerator, PatchDiscriminator = need('SmoothGenerator', mod), need('PatchDiscriminator', mod)
    composite, triplet_loss_D, generator_loss = need('composite', mod), need('triplet_loss_D', mod), need('generator_loss', mod)
    bs, px = ctx.pick(4, 2), ctx.pick(256, 64)
    torch.manual_seed(0)
    G = SmoothGenerator(cnum=ctx.pick(48, 8)).to(ctx.device); D = PatchDiscriminator(ndf=ctx.pick(64, 8)).to(ctx.device)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    u, M, M_o, x_a, x_p = _gan_inputs(ctx, bs, px)

    def step():
        G.train(); D.train()
        with torch.no_grad(): S_u = composite(G(u, M, M_o), u, M)
        D_xa, D_xp = D(x_a), D(x_p)
        L_D = triplet_loss_D(D_xa, D_xp, D(S_u), 1.0)
        opt_D.zero_grad(set_to_none=True); L_D.backward(); opt_D.step()
        G_u = G(u, M, M_o); S_u = composite(G_u, u, M)
        with torch.no_grad(): D_xa, D_xp = D(x_a), D(x_p)
        L_G, _, _ = generator_loss(D_xa, D_xp, D(S_u), u, G_u, 10.0)
        opt_G.zero_grad(set_to_none=True); L_G.backward(); opt_G.step()

    def probe(models, device, bf16):
        pu, pM, pMo, pxa, _ = (t[:1].to(device) for t in _gan_inputs(Ctx(device, ctx.smoke), 1, px, seed=5))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            g, d = models['G'](pu, pM, pMo), models['D'](pxa)
        return torch.cat([g.float().flatten(), d.float().flatten()])
    return Job(step, bs, bs, px, 'fp32', {'G': G, 'D': D}, probe, note='1 D step + 1 G step (fp32, as train_smooth_gan)')


def _diffusion_api():
    mods = ('nucbook.models.unet', 'nucbook.engine.diffusion')
    return (need('make_unet', *mods), need('make_semantic_unet', *mods),
            need('diffusion_loss', 'nucbook.engine.diffusion'), need('make_noise_scheduler', 'nucbook.engine.diffusion'))


def _label_maps(bs, px, n_classes, gen):
    "Random label maps: one-hot classes (background first) on a coarse grid, plus an edge channel."
    cls = torch.randint(n_classes + 1, (bs, 1, max(1, px // 16), max(1, px // 16)), generator=gen)
    cls = torch.nn.functional.interpolate(cls.float(), size=(px, px), mode='nearest').long()[:, 0]
    onehot = torch.nn.functional.one_hot(cls, n_classes + 1).permute(0, 3, 1, 2).float()
    return torch.cat([onehot, (torch.rand(bs, 1, px, px, generator=gen) < 0.1).float()], 1)


def _build_unet(ctx:Ctx, semantic:bool) -> Job:
    "One `train_diffusion` step: diffusion_loss under bf16 autocast, AdamW, grad clip 1.0, EMA update."
    make_unet, make_semantic_unet, diffusion_loss, make_noise_scheduler = _diffusion_api()
    from diffusers.training_utils import EMAModel
    bs, px, n_classes = ctx.pick(8, 2), ctx.pick(256, 64), 4
    size = ctx.pick('paper', 'tiny')
    torch.manual_seed(0)
    model = (make_semantic_unet(size, n_classes=n_classes) if semantic else make_unet(size)).to(ctx.device)
    sched = make_noise_scheduler(); sched.alphas_cumprod = sched.alphas_cumprod.to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999)
    g = ctx.gen(3)
    y0 = (torch.rand(bs, 3, px, px, generator=g) * 2 - 1).to(ctx.device)
    t = torch.randint(sched.config.num_train_timesteps, (bs,), generator=g).to(ctx.device)
    eps = torch.randn(bs, 3, px, px, generator=g).to(ctx.device)
    x = _label_maps(bs, px, n_classes, g).to(ctx.device) if semantic else None

    def step():
        model.train()
        with ctx.autocast(): loss = diffusion_loss(model, sched, y0, t, eps, x)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); ema.step(model.parameters())

    def probe(models, device, bf16):
        gp = ctx.gen(4)
        yp = torch.randn(1, 3, px, px, generator=gp).to(device); tp = torch.tensor([500], device=device)
        args = (yp, tp) + ((_label_maps(1, px, n_classes, gp).to(device),) if semantic else ())
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return models['unet'](*args).sample.float().flatten()
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'unet': model}, probe, note='AdamW + EMA')


def build_unet(ctx): return _build_unet(ctx, semantic=False)
def build_semantic_unet(ctx): return _build_unet(ctx, semantic=True)


def _sampler_setup(ctx):
    "An (untrained) unconditional UNet, the noise schedule, patch count, side, and the side of the probe patches."
    make_unet, _, _, make_noise_scheduler = _diffusion_api()
    torch.manual_seed(0)
    model = make_unet(ctx.pick('paper', 'tiny')).to(ctx.device).eval()
    # probes run on the CPU too: a smaller patch keeps the CPU reference short (the UNet takes multiples of 32)
    return model, make_noise_scheduler(), ctx.pick(8, 2), ctx.pick(256, 64), ctx.pick(128, 64)


def _inpaint_inputs(n, px, gen):
    "Patches in [-1, 1] with a central square to fill."
    y = torch.rand(n, 3, px, px, generator=gen) * 2 - 1
    mask = torch.zeros(n, 1, px, px, dtype=torch.bool); mask[..., px // 4:3 * px // 4, px // 4:3 * px // 4] = True
    return y, mask


def build_ddim(ctx:Ctx) -> Job:
    "`ddim_sample`: 10 DDIM steps from noise (2 in the smoke run); it autocasts to bf16 by itself on CUDA."
    ddim_sample = need('ddim_sample', 'nucbook.engine.diffusion')
    model, sched, n, px, ppx = _sampler_setup(ctx)
    steps = ctx.pick(10, 2)
    step = lambda: ddim_sample(model, sched, n=n, steps=steps, size=px, seed=0, batch_size=n)
    probe = lambda models, device, bf16: ddim_sample(models['unet'], sched, n=1, steps=2, size=ppx, seed=1).float().flatten()
    return Job(step, n, n, px, ctx.pick('bf16', 'fp32'), {'unet': model}, probe, probe_fp32_on_device=False,
               note=f'{steps} DDIM steps per call; patches/s')


def build_repaint(ctx:Ctx) -> Job:
    "`repaint` briefly: 10 steps, jumps of 5 resampled twice (fp32, as the library runs it)."
    repaint = need('repaint', 'nucbook.engine.inpaint')
    model, sched, n, px, ppx = _sampler_setup(ctx)
    kw = ctx.pick(dict(steps=10, jump_length=5, jump_n_sample=2), dict(steps=2, jump_length=1, jump_n_sample=1))
    y, mask = (t.to(ctx.device) for t in _inpaint_inputs(n, px, ctx.gen(6)))
    step = lambda: repaint(model, sched, y, mask, seed=0, batch_size=n, **kw)

    def probe(models, device, bf16):
        yp, mp = _inpaint_inputs(1, ppx, ctx.gen(7))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return repaint(models['unet'], sched, yp.to(device), mp.to(device), steps=2, jump_length=1,
                           jump_n_sample=1, seed=1).float().flatten()
    return Job(step, n, n, px, 'fp32', {'unet': model}, probe, note='steps={steps} j={jump_length} r={jump_n_sample}; patches/s'.format(**kw))


def build_mcg(ctx:Ctx) -> Job:
    "`mcg_inpaint` briefly: 10 DDIM steps with the manifold-constrained gradient (a backward per step; fp32)."
    mcg_inpaint = need('mcg_inpaint', 'nucbook.engine.inpaint')
    model, sched, n, px, ppx = _sampler_setup(ctx)
    steps = ctx.pick(10, 2)
    y, mask = (t.to(ctx.device) for t in _inpaint_inputs(n, px, ctx.gen(8)))
    step = lambda: mcg_inpaint(model, sched, y, mask, steps=steps, seed=0, batch_size=n)

    def probe(models, device, bf16):
        yp, mp = _inpaint_inputs(1, ppx, ctx.gen(9))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return mcg_inpaint(models['unet'], sched, yp.to(device), mp.to(device), steps=2, seed=1).float().flatten()
    return Job(step, n, n, px, 'fp32', {'unet': model}, probe, note=f'{steps} steps per call; patches/s')


ADM_PRESETS = ('256_uncond', 'tiny')  # ADM preset of the GPU run, of the smoke run


def _adm_setup(ctx:Ctx):
    """guided-diffusion's ADM UNet: preset '256_uncond' (NucleiMix's network, 552,814,086 parameters) on the GPU, 'tiny'
    in the smoke run. Built on the device directly (no 2 GB CPU init), then every zero-initialised conv (each ResBlock's
    last conv, attention projections, the output conv) gets a default init: a fresh ADM outputs zeros, which would make
    the equality probes pass vacuously."""
    ADMUNet, adm_config = need('ADMUNet', 'nucbook.models.adm'), need('adm_config', 'nucbook.models.adm')
    torch.manual_seed(0)
    with torch.device(ctx.device): model = ADMUNet(**adm_config(ctx.pick(*ADM_PRESETS)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.any(): m.reset_parameters()
    return model


def build_adm(ctx:Ctx) -> Job:
    "ADM UNet, one `train_diffusion` step: hybrid loss (L_simple + L_vlb, learned variance) under bf16 autocast, AdamW, clip, EMA."
    diffusion_loss, make_noise_scheduler = need('diffusion_loss', 'nucbook.engine.diffusion'), need('make_noise_scheduler', 'nucbook.engine.diffusion')
    from diffusers.training_utils import EMAModel
    bs, px, ppx = ctx.pick(8, 1), ctx.pick(256, 64), ctx.pick(64, 32)  # small probes: the CPU reference stays short
    model = _adm_setup(ctx)
    n_par = sum(p.numel() for p in model.parameters())
    sched = make_noise_scheduler(); sched.alphas_cumprod = sched.alphas_cumprod.to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999)
    g = ctx.gen(3)
    y0 = (torch.rand(bs, 3, px, px, generator=g) * 2 - 1).to(ctx.device)
    t = torch.randint(sched.config.num_train_timesteps, (bs,), generator=g); t[0] = 0  # the decoder-NLL branch too
    t = t.to(ctx.device)
    eps = torch.randn(bs, 3, px, px, generator=g).to(ctx.device)

    def step():
        model.train()
        with ctx.autocast(): loss = diffusion_loss(model, sched, y0, t, eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); ema.step(model.parameters())

    def probe(models, device, bf16):
        gp = ctx.gen(4)
        yp = torch.randn(1, 3, ppx, ppx, generator=gp).to(device); tp = torch.tensor([500], device=device)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return models['adm'](yp, tp).float().flatten()  # eps and the variance values
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'adm': model}, probe,
               note=f'{n_par:,} params, hybrid loss, AdamW + EMA; probes at {ppx} px')


def build_adm_mcg(ctx:Ctx) -> Job:
    "`mcg_inpaint` with the ADM: NucleiMix's ancestral sampler (learned variance) + MCG, a few steps, batch 4 (fp32)."
    mcg_inpaint = need('mcg_inpaint', 'nucbook.engine.inpaint')
    make_noise_scheduler = need('make_noise_scheduler', 'nucbook.engine.diffusion')
    model = _adm_setup(ctx).eval(); sched = make_noise_scheduler()
    n, px, steps, ppx = ctx.pick(4, 1), ctx.pick(256, 64), ctx.pick(5, 2), ctx.pick(64, 32)
    y, mask = (t.to(ctx.device) for t in _inpaint_inputs(n, px, ctx.gen(10)))
    step = lambda: mcg_inpaint(model, sched, y, mask, steps=steps, seed=0, batch_size=n, sampler='ddpm')

    def probe(models, device, bf16):
        yp, mp = _inpaint_inputs(1, ppx, ctx.gen(11))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return mcg_inpaint(models['adm'], sched, yp.to(device), mp.to(device), steps=2, seed=1, sampler='ddpm').float().flatten()
    return Job(step, n, n, px, 'fp32', {'adm': model}, probe,
               note=f"{steps} ddpm steps per call (of NucleiMix's 250); patches/s; probes at {ppx} px")


SDM_PRESETS_GC = ('diffmix_consep', 'tiny')  # SDM preset of the GPU run, of the smoke run


def _sdm_setup(ctx:Ctx):
    """The authors' SDM UNet (DiffMix's network, `nucbook.models.sdm`): preset 'diffmix_consep' (652,256,518 parameters,
    6 label channels) on the GPU, 'tiny' in the smoke run. Built on the device directly, then every zero-initialised conv
    gets a default init (as `_adm_setup`), so the equality probes compare non-zero eps, v."""
    SDMUNet, sdm_config = need('SDMUNet', 'nucbook.models.sdm'), need('sdm_config', 'nucbook.models.sdm')
    torch.manual_seed(0)
    with torch.device(ctx.device): model = SDMUNet(**sdm_config(ctx.pick(*SDM_PRESETS_GC)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.any(): m.reset_parameters()
    return model


def build_sdm(ctx:Ctx) -> Job:
    """SDM UNet, one `train_diffusion` step: label maps through SPADE (one of them the null map), hybrid loss (learned
    variance) under bf16 autocast, AdamW, clip, EMA. Batch 8 like adm-256 (the authors: 16, with fp16 and gradient
    checkpointing)."""
    diffusion_loss, make_noise_scheduler = need('diffusion_loss', 'nucbook.engine.diffusion'), need('make_noise_scheduler', 'nucbook.engine.diffusion')
    from diffusers.training_utils import EMAModel
    bs, px, ppx, n_classes = ctx.pick(8, 2), ctx.pick(256, 64), ctx.pick(64, 32), 4
    model = _sdm_setup(ctx)
    n_par = sum(p.numel() for p in model.parameters())
    sched = make_noise_scheduler(); sched.alphas_cumprod = sched.alphas_cumprod.to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999)
    g = ctx.gen(3)
    y0 = (torch.rand(bs, 3, px, px, generator=g) * 2 - 1).to(ctx.device)
    t = torch.randint(sched.config.num_train_timesteps, (bs,), generator=g); t[0] = 0  # the decoder-NLL branch too
    t = t.to(ctx.device)
    eps = torch.randn(bs, 3, px, px, generator=g).to(ctx.device)
    x = _label_maps(bs, px, n_classes, g); x[-1] = 0  # a null label, as classifier-free guidance training drops them
    x = x.to(ctx.device)

    def step():
        model.train()
        with ctx.autocast(): loss = diffusion_loss(model, sched, y0, t, eps, x)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); ema.step(model.parameters())

    def probe(models, device, bf16):
        gp = ctx.gen(4)
        yp = torch.randn(1, 3, ppx, ppx, generator=gp).to(device); tp = torch.tensor([500], device=device)
        lab = _label_maps(1, ppx, n_classes, gp).to(device)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return models['sdm'](yp, tp, lab).float().flatten()  # eps and the variance values
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'sdm': model}, probe,
               note=f'{n_par:,} params, label maps via SPADE, hybrid loss, AdamW + EMA; probes at {ppx} px')


def build_sdm_ddim(ctx:Ctx) -> Job:
    """DiffMix's sampler with the SDM: real patches noised to step 54 of 100 (the authors' leading timesteps, t = 540),
    DDIM under classifier-free guidance s = 1.5 (two network evaluations per step, one batched pass); a few of the 55
    steps per call. `ddim_sample` autocasts to bf16 by itself on CUDA."""
    ddim_sample = need('ddim_sample', 'nucbook.engine.diffusion')
    make_noise_scheduler = need('make_noise_scheduler', 'nucbook.engine.diffusion')
    model = _sdm_setup(ctx).eval(); sched = make_noise_scheduler()
    n, px, ppx, n_classes = ctx.pick(8, 1), ctx.pick(256, 64), ctx.pick(64, 32), 4
    steps_run = ctx.pick(5, 2)  # the last `steps_run` of the 55: start_step = steps_run - 1
    g = ctx.gen(12)
    y0 = (torch.rand(n, 3, px, px, generator=g) * 2 - 1).to(ctx.device)
    lab = _label_maps(n, px, n_classes, g).to(ctx.device)
    kw = dict(steps=100, s=1.5, spacing='leading', batch_size=n)
    step = lambda: ddim_sample(model, sched, y0=y0, start_step=steps_run - 1, x=lab, seed=0, **kw)

    def probe(models, device, bf16):
        gp = ctx.gen(13)
        yp = (torch.rand(1, 3, ppx, ppx, generator=gp) * 2 - 1).to(device); lp = _label_maps(1, ppx, n_classes, gp).to(device)
        return ddim_sample(models['sdm'], sched, y0=yp, start_step=1, x=lp, seed=1, **{**kw, 'batch_size': 1}).float().flatten()
    return Job(step, n, n, px, ctx.pick('bf16', 'fp32'), {'sdm': model}, probe, probe_fp32_on_device=False,
               note=f"{steps_run} guided DDIM steps per call ({2 * steps_run} network evaluations; DiffMix runs 55); patches/s; probes at {ppx} px")


ADAIN_PRESETS_GC = ('paper', 'tiny')  # nucbook.models.adain preset (decoder, discriminator) of the GPU run, of the smoke run


def _adain_setup(ctx:Ctx):
    """Gong et al.'s refine-synthesis generator (`nucbook.models.adain`): the VGG-19 encoder to relu4_1 (the offline
    random weights: the speed does not depend on them), the SkipDecoder and the SRGAN image discriminator of the preset."""
    mod = 'nucbook.models.adain'
    VGG19Encoder, SkipDecoder, AdaINGenerator = need('VGG19Encoder', mod), need('SkipDecoder', mod), need('AdaINGenerator', mod)
    ImageDiscriminator, ADAIN_PRESETS = need('ImageDiscriminator', mod), need('ADAIN_PRESETS', mod)
    preset = ADAIN_PRESETS[ctx.pick(*ADAIN_PRESETS_GC)]
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(), SkipDecoder(**preset['decoder'])).to(ctx.device)
    D = ImageDiscriminator(**preset['discriminator']).to(ctx.device)
    return G, D


def build_adain(ctx:Ctx) -> Job:
    """AdaIN generator + image discriminator at paper size, one step of Gong et al.'s (G, D) pre-training (Eq. 4): a G
    step on BCE(D(x~), real) + lambda * L_g (Eq. 2, gamma 0.5, lambda 10; the gradient goes through the frozen VGG-19 to
    the decoder), then a D step on real x2 and the detached x~; Adam 1e-4 on the decoder and on D; bf16 autocast."""
    adain_losses = need('adain_losses', 'nucbook.models.adain')
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    G, D = _adain_setup(ctx)
    bs, px, ppx = ctx.pick(8, 2), ctx.pick(256, 64), ctx.pick(64, 32)  # small probes: bf16 convs are slow on the CPU
    n_par = sum(p.numel() for p in G.decoder.parameters()), sum(p.numel() for p in D.parameters())
    opt_G, opt_D = torch.optim.Adam(G.decoder.parameters(), lr=1e-4), torch.optim.Adam(D.parameters(), lr=1e-4)
    g = ctx.gen(20)
    content, style = (torch.rand(bs, 3, px, px, generator=g).to(ctx.device) for _ in range(2))
    real, fake = torch.ones(bs, device=ctx.device), torch.zeros(bs, device=ctx.device)

    def step():
        G.train(); D.train()
        with ctx.autocast():
            with torch.no_grad(): fs = G.encoder(style)  # the style's features, once for G and Eq. 2
            x_t, t = G(content, style, style_feats=fs)
            L_g = adain_losses(G.encoder, x_t, t, style, gamma=0.5, style_feats=fs)['L_g']
            logit = D(x_t)
        loss_G = bce(logit.float(), real) + 10.0 * L_g
        opt_G.zero_grad(set_to_none=True); loss_G.backward(); opt_G.step()
        with ctx.autocast(): loss_D = bce(D(style).float(), real) + bce(D(x_t.detach()).float(), fake)
        opt_D.zero_grad(set_to_none=True); loss_D.backward(); opt_D.step()

    def probe(models, device, bf16):
        gp = ctx.gen(21)
        c, s = (torch.rand(1, 3, ppx, ppx, generator=gp).to(device) for _ in range(2))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            x_t, t = models['G'](c, s); d = models['D'](x_t)
        return torch.cat([t.float().flatten(), x_t.float().flatten(), d.float().flatten()])  # AdaIN target, image, logit
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'G': G, 'D': D}, probe,
               note=f'decoder {n_par[0]:,} + D {n_par[1]:,} params (VGG-19 frozen); G step (Eq. 2 + adversarial) + D step; '
                    f'probes at {ppx} px')


def build_vgg19_enc(ctx:Ctx) -> Job:
    "The VGG-19 encoder alone (to relu4_1, the four AdaIN features), forward without gradients under bf16 autocast: images/s."
    G, _ = _adain_setup(ctx)
    enc = G.encoder
    bs, px, ppx = ctx.pick(32, 2), ctx.pick(256, 64), ctx.pick(64, 32)
    x = torch.rand(bs, 3, px, px, generator=ctx.gen(22)).to(ctx.device)

    def step():
        with torch.no_grad(), ctx.autocast(): enc(x)

    def probe(models, device, bf16):
        xp = torch.rand(1, 3, ppx, ppx, generator=ctx.gen(23)).to(device)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            return torch.cat([f.float().flatten() for f in models['enc'](xp)])
    return Job(step, bs, bs, px, ctx.pick('bf16', 'fp32'), {'enc': enc}, probe,
               note=f'forward only (no grad), relu1_1..relu4_1; probes at {ppx} px')


# Append an Entry here to add a model to `make gpu-check`.
REGISTRY = [
    Entry('hovernet', build_hovernet),
    Entry('smooth-gan', build_smooth_gan),
    Entry('unet', build_unet),
    Entry('semantic-unet', build_semantic_unet),
    Entry('ddim-sample', build_ddim, steps=5, warmup=1),
    Entry('repaint', build_repaint, steps=3, warmup=1),
    Entry('mcg-inpaint', build_mcg, steps=3, warmup=1),
    Entry('adm-256', build_adm, steps=10, warmup=2),
    Entry('adm-mcg', build_adm_mcg, steps=3, warmup=1),
    Entry('sdm-256', build_sdm, steps=10, warmup=2),
    Entry('sdm-ddim', build_sdm_ddim, steps=3, warmup=1),
    Entry('adain-256', build_adain, steps=10, warmup=2),
    Entry('vgg19-enc', build_vgg19_enc, steps=10, warmup=2),
]


# ------------------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def no_tf32():
    "True fp32 matrix products and convolutions on CUDA (TF32 off) inside the block."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try: yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_l2(a:torch.Tensor, ref:torch.Tensor) -> float:
    "||a - ref|| / ||ref|| (inf when either has a NaN or inf)."
    a, ref = a.double().cpu(), ref.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(ref).all()): return math.inf
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def equality(job:Job, ctx:Ctx) -> dict:
    "The two checks: fp32 on the device vs the CPU (max abs diff), and bf16 autocast vs fp32 (relative L2 error)."
    if job.probe is None: return {}
    dev, cpu = ctx.device, torch.device('cpu')
    training = {k: m.training for k, m in job.models.items()}
    cpu_models = {k: copy.deepcopy(m).to(cpu, memory_format=torch.contiguous_format).eval() for k, m in job.models.items()}
    for m in job.models.values(): m.eval()
    res = {}
    try:
        with torch.no_grad():
            ref = job.probe(cpu_models, cpu, False)
            fp32 = None
            if job.probe_fp32_on_device:
                with no_tf32(): fp32 = job.probe(job.models, dev, False)
                fp32 = fp32.cpu()
                diff = float((fp32.double() - ref.double()).abs().max()) if torch.isfinite(fp32).all() else math.inf
                tol = FP32_RTOL * max(float(ref.abs().max()), 1e-6)
                res.update(fp32_maxabs=diff, fp32_tol=tol, fp32_ok=bool(diff <= tol and torch.isfinite(ref).all()))
            bf16 = job.probe(job.models, dev, True)
            err = rel_l2(bf16, fp32 if fp32 is not None else ref)
            res.update(bf16_rel=err, bf16_ok=bool(err <= BF16_TOL),
                       bf16_vs='GPU fp32' if fp32 is not None else 'CPU fp32')
    finally:
        for k, m in job.models.items(): m.train(training[k])
        del cpu_models
    return res


def _sync(ctx):
    if ctx.device.type == 'cuda': torch.cuda.synchronize(ctx.device)


def run_entry(entry:Entry, ctx:Ctx, peak:float|None, time_cap:float) -> dict:
    "Build, check, warm up, count FLOPs, time: one row (status FAILED with the stage and error on any exception)."
    row = dict(name=entry.name, status='FAILED', error='')
    stage = 'build'; job = None
    try:
        job = entry.build(ctx)
        row.update(batch=job.batch, px=job.px, precision=job.precision, note=job.note)
        stage = 'equality check'
        row.update(equality(job, ctx))
        stage = 'warm-up'
        if ctx.device.type == 'cuda': torch.cuda.reset_peak_memory_stats(ctx.device)
        for _ in range(0 if ctx.smoke else entry.warmup): job.step()
        _sync(ctx)
        stage = 'FLOP count'
        flops = count_flops(job.step); _sync(ctx)
        row['gflop'] = flops / 1e9
        stage = 'timing'
        n, steps, t0 = 0, 1 if ctx.smoke else entry.steps, time.perf_counter()
        while n < steps:
            job.step(); _sync(ctx); n += 1
            if time.perf_counter() - t0 > time_cap: break
        dt = (time.perf_counter() - t0) / n
        row.update(steps=n, ms=1e3 * dt, ips=job.items / dt)
        if ctx.device.type == 'cuda':
            row['mem_gib'] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            row['tflops'] = achieved_tflops(flops, dt)
            row['util'] = utilisation(row['tflops'], peak)
        checks_ok = all(row.get(k, True) for k in ('fp32_ok', 'bf16_ok'))
        row['status'] = 'ok' if checks_ok else 'CHECK FAILED'
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        row['error'] = f'{stage}: {type(e).__name__}: {msg}'[:300]
        print(f'--- {entry.name} FAILED at {stage}:', file=sys.stderr); traceback.print_exc(file=sys.stderr)
    finally:
        del job; gc.collect()
        if ctx.device.type == 'cuda': torch.cuda.empty_cache()
    return row


COLUMNS = [  # (header, key, format)
    ('model', 'name', '{}'), ('status', 'status', '{}'), ('batch', 'batch', '{}'), ('px', 'px', '{}'),
    ('prec', 'precision', '{}'), ('steps', 'steps', '{}'), ('ms/step', 'ms', '{:.1f}'), ('img/s', 'ips', '{:.2f}'),
    ('peak GiB', 'mem_gib', '{:.2f}'), ('GFLOP/step', 'gflop', '{:.1f}'), ('TFLOP/s', 'tflops', '{:.1f}'),
    ('%peak', 'util', '{:.1f}'), ('fp32 maxabs', 'fp32_maxabs', '{:.2e}'), ('tol', 'fp32_tol', '{:.1e}'),
    ('fp32', 'fp32_ok', None), ('bf16 relL2', 'bf16_rel', '{:.2e}'), ('bf16', 'bf16_ok', None),
]


def _cell(row, key, fmt):
    v = row.get(key)
    if v is None: return 'n/a'
    if fmt is None: return 'pass' if v else 'FAIL'
    return fmt.format(v)


def format_table(rows:list) -> str:
    "A fixed-width table of the rows, and each row's note or error underneath."
    cells = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ['  '.join(c[i].ljust(w[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, '-' * len(lines[0]))
    for r in rows:
        extra = r.get('error') or r.get('note')
        if extra: lines.append(f'  {r["name"]}: {extra}')
    return '\n'.join(lines)


def summary(rows:list, seconds:float, device_name:str) -> tuple:
    "(passed, the one-line summary)."
    bad = [r['name'] + ('' if r['status'] == 'ok' else f' ({r["status"]})') for r in rows if r['status'] != 'ok']
    ok = not bad and bool(rows)
    what = f'{len(rows) - len(bad)}/{len(rows)} models ok, equality checks ' + ('all passed' if ok else 'or runs failed: ' + ', '.join(bad))
    return ok, f'SUMMARY: {"PASS" if ok else "FAIL"} - {what} [{device_name}, {seconds:.0f} s]'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--cpu-smoke', action='store_true', help='run the same code paths on CPU with tiny models (for CI)')
    ap.add_argument('--only', nargs='+', metavar='NAME', help=f'run only these entries of {[e.name for e in REGISTRY]}')
    ap.add_argument('--budget', type=float, default=360.0, help='seconds for the whole run; later entries are SKIPPED (default 360)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: leave as is)')
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f'gpu_check: no GPU available (torch {torch.__version__}, CUDA build {torch.version.cuda}, '
              'torch.cuda.is_available() is False). This check needs an NVIDIA GPU; '
              'run with --cpu-smoke to exercise the code paths on the CPU with tiny models.', file=sys.stderr)
        return 2
    if args.threads: torch.set_num_threads(args.threads)
    entries = REGISTRY
    if args.only:
        unknown = set(args.only) - {e.name for e in REGISTRY}
        if unknown: ap.error(f'unknown entries {sorted(unknown)}; choose from {[e.name for e in REGISTRY]}')
        entries = [e for e in REGISTRY if e.name in args.only]
    t_start = time.perf_counter()
    if args.cpu_smoke:
        ctx, device_name, peak = Ctx(torch.device('cpu'), True), 'CPU smoke run (tiny models, fp32)', None
        print(f'gpu_check --cpu-smoke: torch {torch.__version__}, {torch.get_num_threads()} threads; no TFLOP/s on CPU')
    else:
        ctx = Ctx(torch.device('cuda'), False)
        device_name = torch.cuda.get_device_name(ctx.device)
        label, peak = peak_bf16_tflops(device_name)
        cap = torch.cuda.get_device_capability(ctx.device)
        print(f'gpu_check: {device_name} (sm_{cap[0]}{cap[1]}, {torch.cuda.get_device_properties(ctx.device).total_memory / 2**30:.0f} GiB), '
              f'torch {torch.__version__}, CUDA {torch.version.cuda}; dense bf16 peak: '
              + (f'{peak:.0f} TFLOP/s ({label}, datasheet)' if peak else 'n/a (GPU not in the table)'))
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels during warm-up
    print(f'fp32 check: GPU (TF32 off) vs CPU, max abs diff <= {FP32_RTOL:g} x max|CPU|; '
          f'bf16 check: ||bf16 - fp32|| / ||fp32|| <= {BF16_TOL:g}', flush=True)
    rows = []
    for i, e in enumerate(entries):
        left = args.budget - (time.perf_counter() - t_start)
        if not args.cpu_smoke and left < 30:
            rows.append(dict(name=e.name, status='SKIPPED', error=f'time budget ({args.budget:.0f} s) spent'))
            print(f'{e.name}: SKIPPED (time budget spent)', flush=True); continue
        # each timed loop gets its cap, and never more than a fair share of what is left
        cap = min(e.max_seconds, left / (2 * (len(entries) - i)))
        t0 = time.perf_counter(); row = run_entry(e, ctx, peak, cap)
        rows.append(row)
        print(f'{e.name}: {row["status"]} in {time.perf_counter() - t0:.1f} s '
              + (row['error'] or ', '.join(f'{h}={_cell(row, k, f)}' for h, k, f in COLUMNS[5:])), flush=True)
    ok, line = summary(rows, time.perf_counter() - t_start, device_name)
    print('\n' + format_table(rows))
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
