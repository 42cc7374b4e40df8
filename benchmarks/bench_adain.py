"""AdaIN generator speed (Gong et al.'s refine-synthesis, `nucbook.models.adain`): generator images/s, CPU and GPU side by side.

The generator G(x1, x2) = G_d(AdaIN(G_e(ID(x1)), G_e(x2))) with skips from the content: the VGG-19 encoder up to
relu4_1 (two passes, content and style) and the `SkipDecoder` of a preset ('tiny' for CPU smoke runs, 'paper' =
AdaIN's decoder widths). Per device and preset, at --size x --size:
  infer img/s   G(content, style) without gradients: what synthesising a training image costs
  train img/s   one generator step: forward (the style encoded once, its features reused by Eq. 2), Eq. 2
                (`adain_losses`: an encoder pass on x_tilde, with backward), backward, Adam on the decoder (the
                discriminator step of the method is not included; gpu_check's adain-256 has it)
  ms/step       wall time of one training step of the batch
  peak GiB      peak GPU memory of the timed training steps (GPU rows)
CPU rows run in fp32; GPU rows (when CUDA is there, or --device cuda) under bf16 autocast, as the method trains. Each
number is the fastest of --iters timed calls after one warm-up call. The encoder's weights do not change the speed:
the offline random VGG-19 is used unless --weights names a file (its name is printed either way).

Usage:
  .venv/bin/python benchmarks/bench_adain.py --quick          # CPU (and GPU if any): batch 1, 2 iterations, 256 px
  .venv/bin/python benchmarks/bench_adain.py [--device cpu|cuda|all] [--batch 4] [--iters 3] [--size 256] [--presets tiny,paper]
"""
import argparse, contextlib, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
import torch
from nucbook.models.adain import ADAIN_PRESETS, AdaINGenerator, SkipDecoder, VGG19Encoder, adain_losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='batch 1 on the CPU (8 on a GPU), 2 timed iterations')
    p.add_argument('--device', default='all', help="'cpu', 'cuda' or 'all' (the CPU, and the GPU when there is one)")
    p.add_argument('--presets', default='tiny,paper', help=f'decoder presets, of {sorted(ADAIN_PRESETS)}')
    p.add_argument('--size', type=int, default=256, help='image side (default 256, the paper\'s crops)')
    p.add_argument('--batch', type=int, default=None, help='images per step (default: CPU 4, GPU 8; --quick: CPU 1)')
    p.add_argument('--iters', type=int, default=None, help='timed calls per number (default 3; --quick 2)')
    p.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', '0')) or None, help='CPU threads')
    p.add_argument('--weights', default=None, help='VGG-19 weights file (torchvision or AdaIN layout); default: offline random')
    a = p.parse_args(argv)
    a.presets = a.presets.split(',')
    unknown = set(a.presets) - set(ADAIN_PRESETS)
    if unknown: p.error(f'unknown presets {sorted(unknown)}; choose from {sorted(ADAIN_PRESETS)}')
    if a.device not in ('cpu', 'cuda', 'all'): p.error(f"--device must be 'cpu', 'cuda' or 'all', got {a.device!r}")
    a.iters = a.iters or (2 if a.quick else 3)
    return a


def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def _fastest(fn, iters, dev):
    "Seconds of the fastest of `iters` calls of fn, after one warm-up call."
    fn(); _sync(dev); best = float('inf')
    for _ in range(iters):
        t0 = time.perf_counter(); fn(); _sync(dev); best = min(best, time.perf_counter() - t0)
    return best


def measure(preset, dev, batch, size, iters, weights=None):
    "One row: infer and train images/s of the generator of `preset` on `dev`."
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(weights), SkipDecoder(**ADAIN_PRESETS[preset]['decoder'])).to(dev)
    g = torch.Generator().manual_seed(0)
    content, style = (torch.rand(batch, 3, size, size, generator=g).to(dev) for _ in range(2))
    opt = torch.optim.Adam(G.decoder.parameters(), lr=1e-4)
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if dev.type == 'cuda' else contextlib.nullcontext

    def infer():
        with torch.no_grad(), amp(): return G(content, style)[0]

    def train():
        G.decoder.train()
        with amp():
            with torch.no_grad(): fs = G.encoder(style)  # the style's features, once for G and Eq. 2
            L = adain_losses(G.encoder, *G(content, style, style_feats=fs), style, style_feats=fs)['L_g']
        opt.zero_grad(set_to_none=True); L.backward(); opt.step()

    t_inf = _fastest(infer, iters, dev)
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(dev)
    t_tr = _fastest(train, iters, dev)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else None
    n_dec = sum(p.numel() for p in G.decoder.parameters())
    return dict(device=dev.type, preset=preset, batch=batch, px=size, dec_params=n_dec, infer=batch / t_inf,
                train=batch / t_tr, ms=1e3 * t_tr, mem=mem, precision='bf16' if dev.type == 'cuda' else 'fp32',
                encoder=G.encoder.name)


def main(argv=None):
    a = parse_args(argv)
    if a.device == 'cuda' and not torch.cuda.is_available():
        print('no GPU available: run with --device cpu (or all)', file=sys.stderr); return 2
    if a.threads: torch.set_num_threads(a.threads)
    devs = ([torch.device('cpu')] if a.device in ('cpu', 'all') else []) + \
           ([torch.device('cuda')] if a.device == 'cuda' or (a.device == 'all' and torch.cuda.is_available()) else [])
    rows = []
    for dev in devs:
        batch = a.batch or (8 if dev.type == 'cuda' else 1 if a.quick else 4)
        for preset in a.presets:
            rows.append(measure(preset, dev, batch, a.size, a.iters, a.weights))
            r = rows[-1]; print(f'   measured {r["device"]} {preset}: {r["infer"]:.2f} / {r["train"]:.2f} img/s', flush=True)
    names = {'cpu': f'CPU ({torch.get_num_threads()} thread(s))'}
    if torch.cuda.is_available(): names['cuda'] = torch.cuda.get_device_name()
    print(f'\n== AdaIN generator (VGG-19 to relu4_1 + SkipDecoder), {a.size}x{a.size}; encoder: {rows[0]["encoder"]}')
    print(f'{"device":<8} {"preset":<7} {"prec":<5} {"batch":>5} {"dec params":>11} {"infer img/s":>12} {"train img/s":>12} '
          f'{"ms/step":>9} {"peak GiB":>9}')
    for r in rows:
        print(f'{r["device"]:<8} {r["preset"]:<7} {r["precision"]:<5} {r["batch"]:>5} {r["dec_params"]:>11,} {r["infer"]:>12.2f} '
              f'{r["train"]:>12.2f} {r["ms"]:>9.1f} ' + (f'{r["mem"]:>9.2f}' if r['mem'] is not None else f'{"n/a":>9}'))
    if len(devs) > 1:
        for preset in a.presets:
            c, g = (next(r for r in rows if r['device'] == d and r['preset'] == preset) for d in ('cpu', 'cuda'))
            print(f'GPU / CPU, {preset}: infer {g["infer"] / c["infer"]:.0f}x, train {g["train"] / c["train"]:.0f}x')
    print('devices: ' + '; '.join(f'{d.type} = {names[d.type]}' for d in devs) +
          '. infer: G forward without gradients; train: G forward + Eq. 2 + backward + Adam (no discriminator step).')
    return 0


if __name__ == '__main__':
    sys.exit(main())
