"""Segmenter speed: training throughput (256x256 images/s) and sliding-window inference time per 1000x1000 tile.

CPU: every model size asked for, fp32, channels-first vs channels-last side by side, plus the whole trainer (data
pipeline included) and the size and time of one checkpoint of the resumable loop (weights + Adam state, atomic
write) for the first size. GPU (when CUDA is available): fp32 vs bf16 autocast + channels-last, optionally
torch.compile, with achieved FLOP/s (FLOPs counted by torch.utils.flop_counter) against the device's peak and the peak
memory. Usage: python benchmarks/bench_segmenter.py [--sizes tiny small] [--steps 3] [--threads 2] [--compile]
"""
import argparse, os, tempfile, time
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from nucbook.models.hovernet import HoVerNet, hovernet_loss, hovernet_targets
from nucbook.engine.infer import predict_maps
from nucbook.data.synth import synth_dataset, synth_tile
from nucbook.engine.train import Trainer, TrainConfig, make_optimizer
from nucbook.engine.loop import ResumableLoop

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of common GPUs, for the utilisation figure
PEAK_BF16_TFLOPS = {'H100 SXM': 989, 'H100 PCIe': 756, 'H100': 989, 'H200': 989, 'A100': 312, 'L40S': 362, 'A10': 125,
                    'RTX 4090': 165, 'V100': 125}


def batch(n, size, n_types, device):
    "A training batch of `n` synthetic crops with HoVer-Net targets, on `device`."
    tiles = synth_dataset(n, 'train', seed=0, size=size)
    t = [hovernet_targets(s.inst_map, s.type_map) for s in tiles]
    x = torch.from_numpy(np.stack([s.image for s in tiles])).permute(0, 3, 1, 2).float().div(255)
    tgt = {k: torch.from_numpy(np.stack([d[k] for d in t])) for k in ('np', 'hv', 'tp')}
    return x.to(device), {k: v.to(device) for k, v in tgt.items()}


def train_speed(size, device, bs, steps, channels_last=False, amp=None, compile_model=False, img=256):
    "(images/s, FLOPs per step, peak memory GiB) of full optimiser steps of a `size` HoVer-Net."
    model = HoVerNet(size, n_types=4).to(device)
    x, tgt = batch(bs, img, 4, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    net = torch.compile(model) if compile_model else model
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == 'bf16'):
            out = net(x)
        loss, _ = hovernet_loss(out, tgt); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(2 if compile_model else 1): step()  # warm-up (and compilation)
    with FlopCounterMode(display=False) as fc: step()
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    sync(); t0 = time.perf_counter()
    for _ in range(steps): step()
    sync(); dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    return bs / dt, fc.get_total_flops(), mem, dt


def trainer_speed(size, bs, steps, threads):
    "Images/s of `Trainer` (random crops, augmentation, targets, step) on CPU, in its second epoch (after warm-up)."
    train = synth_dataset(max(2, bs * steps // 4), 'train', seed=0, size=512)
    cfg = TrainConfig(epochs=2, batch_size=bs, crop_size=256, crops_per_image=4, progress=False, threads=threads)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(HoVerNet(size, n_types=4), train, None, cfg, d, device='cpu').fit(resume=False)
    return tr.history[-1]['images_per_s']


def checkpoint_cost(size):
    "(MB, seconds) of one `ResumableLoop` checkpoint of a `size` HoVer-Net with its Adam and scheduler state."
    model = HoVerNet(size, n_types=4); cfg = TrainConfig()
    opt, sched = make_optimizer(model, cfg, 1)
    for p in model.parameters(): p.grad = torch.zeros_like(p)
    opt.step()  # creates Adam's moment buffers
    with tempfile.TemporaryDirectory() as d:
        loop = ResumableLoop(os.path.join(d, 'last.pt'), {'model': model, 'optimizer': opt, 'scheduler': sched},
                             {'size': size}, 1, lambda step: {}, progress=False)
        t0 = time.perf_counter(); loop.save(); dt = time.perf_counter() - t0
        return os.path.getsize(os.path.join(d, 'last.pt')) / 2**20, dt


def infer_time(size, device, channels_last, amp, bs=8, repeats=1):
    "Seconds per 1000x1000 tile (256 windows overlapping by 64)."
    model = HoVerNet(size, n_types=4).to(device).eval()
    tile = synth_tile(seed=0, size=1000).image
    predict_maps(model, tile[:256, :256], device=device, channels_last=channels_last, amp=amp)  # warm-up
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync(); t0 = time.perf_counter()
    for _ in range(repeats): predict_maps(model, tile, window=256, overlap=64, batch_size=bs, device=device,
                                          channels_last=channels_last, amp=amp)
    sync(); return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', nargs='+', default=None, help="model sizes (default: tiny on CPU; small, paper on GPU)")
    ap.add_argument('--steps', type=int, default=3, help='timed optimiser steps per setting')
    ap.add_argument('--batch', type=int, default=8, help='batch size (images of 256x256)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: as is)')
    ap.add_argument('--compile', action='store_true', help='also time torch.compile (GPU)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    cpu = torch.device('cpu')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    print('== CPU, fp32 (training: images/s of 256x256; inference: s per 1000x1000 tile)')
    for size in a.sizes or ['tiny']:
        r = {cl: train_speed(size, cpu, a.batch, a.steps, channels_last=cl) for cl in (False, True)}
        ti = {cl: infer_time(size, cpu, cl, 'off') for cl in (False, True)}
        print(f'{size:6s} train {r[False][0]:6.2f} img/s (channels-first) {r[True][0]:6.2f} img/s (channels-last, '
              f'x{r[True][0] / r[False][0]:.2f}); {r[True][1] / a.batch / 1e9:.1f} GFLOP per image per step, '
              f'{r[True][1] / r[True][3] / 1e9:.1f} GFLOP/s')
        print(f'{"":6s} infer {ti[False]:6.2f} s/tile (channels-first) {ti[True]:6.2f} s/tile (channels-last)')
    size0 = (a.sizes or ['tiny'])[0]
    print(f'{size0:6s} whole trainer (crops, augmentation, targets, step; channels-last): '
          f'{trainer_speed(size0, a.batch, a.steps, a.threads):.2f} img/s')
    mb, sec = checkpoint_cost(size0)
    print(f'{size0:6s} one checkpoint (weights + Adam state, fsync + rename): {mb:.1f} MB in {sec:.2f} s')
    if not torch.cuda.is_available():
        print('== GPU: none available (CUDA not found); GPU figures skipped'); return
    gpu = torch.device('cuda'); name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f'== GPU: {name} (bf16 dense peak {peak or "unknown"} TFLOP/s)')
    for size in a.sizes or ['small', 'paper']:
        settings = [('fp32', False, None, False), ('bf16 + channels-last', True, 'bf16', False)]
        if a.compile: settings.append(('bf16 + channels-last + compile', True, 'bf16', True))
        base = None
        for label, cl, amp, comp in settings:
            ips, flops, mem, dt = train_speed(size, gpu, a.batch, a.steps, cl, amp, comp)
            base = base or ips
            util = f', {flops / dt / 1e12 / peak:.0%} of peak' if peak else ''
            print(f'{size:6s} train {label:32s} {ips:8.1f} img/s (x{ips / base:.2f}), {flops / dt / 1e12:6.1f} TFLOP/s'
                  f'{util}, peak memory {mem:.1f} GiB')
        for label, cl, amp in [('fp32', False, 'off'), ('bf16 + channels-last', True, 'bf16')]:
            print(f'{size:6s} infer {label:32s} {infer_time(size, gpu, cl, amp, bs=16, repeats=3):8.3f} s/tile')


if __name__ == '__main__':
    main()
