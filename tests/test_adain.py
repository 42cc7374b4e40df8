"""The AdaIN generator of Gong et al.'s refine-synthesis (nucbook.models.adain): AdaIN statistics, Eq. 2 on hand-built
cases, VGG-19 key layouts against a hand-written reference, the skip decoder, the SRGAN discriminator, save/load, and
the generator benchmark's smoke run."""
import os, subprocess, sys, time, warnings
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from nucbook.models.adain import (ADAIN_PRESETS, AdaINGenerator, ImageDiscriminator, SkipDecoder, VGG19Encoder, adain,
                                  adain_losses, calc_mean_std, load_generator, save_generator, vgg19_state_dict)
from nucbook.eval.fid import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------ AdaIN
def test_calc_mean_std_on_a_hand_built_map():
    # channel 0 = [[1, 2], [3, 6]]: mean 3, squared deviations 4, 1, 0, 9 -> biased variance 14 / 4, unbiased 14 / 3
    x = torch.tensor([[[[1., 2.], [3., 6.]], [[-2., -2.], [-2., -2.]]]])
    mu, sigma = calc_mean_std(x, eps=0.)
    assert mu.shape == sigma.shape == (1, 2, 1, 1)
    assert mu.flatten().tolist() == [3., -2.]
    assert torch.equal(sigma.flatten(), torch.tensor([3.5, 0.]).sqrt())
    assert torch.equal(calc_mean_std(x, eps=0.5)[1].flatten(), torch.tensor([4.0, 0.5]).sqrt())
    assert torch.allclose(calc_mean_std(x, eps=0., unbiased=True)[1].flatten(), torch.tensor([14 / 3, 0.]).sqrt())
    assert calc_mean_std(x.bfloat16())[0].dtype == torch.float32  # statistics in fp32 under bf16


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_adain_output_has_the_styles_statistics(seed):
    """Per sample and channel, the style's mean and standard deviation. With eps = 0 both are equal up to fp32 rounding
    (relative 1e-5). With eps > 0, var(out) = var_x / (var_x + eps) * (var_y + eps), so
    sigma(out)^2 - sigma(y)^2 = eps (var_x - var_y) / (var_x + eps), at most eps in size: |sigma(out) - sigma(y)| <= eps / sigma(y)
    (the tolerance used; the means stay exact, 1e-4 absolute on values of size ~10)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(4, 16, 12, 9, generator=g) * 3 + 2
    s = torch.randn(4, 16, 7, 11, generator=g) * torch.rand(1, 16, 1, 1, generator=g) * 5 - 6
    (mo, so), (ms, ss) = calc_mean_std(adain(c, s, eps=0.), eps=0.), calc_mean_std(s, eps=0.)
    assert torch.allclose(mo, ms, atol=1e-4, rtol=0) and torch.allclose(so, ss, rtol=1e-5, atol=0)
    eps = 1e-5
    out = adain(c, s, eps)
    (mo, so), (ms, ss) = calc_mean_std(out, eps), calc_mean_std(s, eps)
    assert out.shape == c.shape
    assert torch.allclose(mo, ms, atol=1e-4, rtol=0)
    assert ((so - ss).abs() <= eps / ss + 1e-5 * ss).all()
    # and not the content's (the test can fail)
    assert not torch.allclose(mo, calc_mean_std(c)[0], atol=0.1)


def test_adain_of_identical_content_and_style_is_the_identity():
    c = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(3)) * 2 + 1
    assert torch.allclose(adain(c, c), c, atol=1e-5)


def test_adain_broadcasts_one_style_and_refuses_mismatches():
    c, s = torch.randn(3, 4, 5, 5), torch.randn(1, 4, 6, 6)
    assert torch.allclose(adain(c, s), adain(c, s.expand(3, -1, -1, -1)))
    with pytest.raises(ValueError, match='same C'): adain(c, torch.randn(3, 5, 5, 5))
    with pytest.raises(ValueError, match='same N'): adain(c, torch.randn(2, 4, 5, 5))


# ------------------------------------------------------------------------------------------------------------ Eq. 2
def _scaled(x):
    "A stand-in encoder: phi_k = k x."
    return [k * x for k in (1., 2., 3., 4.)]


def test_eq2_on_a_hand_built_case():
    """x~ = [0, 2] (mean 1, sigma 1), style = [3, 3] (mean 3, sigma 0), phi_k = k x, eps = 0: each layer adds
    (k - 3k)^2 + (k - 0)^2 = 5 k^2, L_style = 5 * 30 = 150; phi_4(x~) = [0, 8] against t = [1, 1]: L_content = 25."""
    x, t, s = torch.tensor([[[[0., 2.]]]]), torch.ones(1, 1, 1, 2), torch.full((1, 1, 1, 2), 3.)
    L = adain_losses(_scaled, x, t, s, eps=0.)
    assert (L['L_content'].item(), L['L_style'].item(), L['L_g'].item()) == (25., 150., 100.)
    assert adain_losses(_scaled, x, t, s, gamma=0.1, eps=0.)['L_g'].item() == pytest.approx(40.)
    # the style features may be given instead of the style image
    assert adain_losses(_scaled, x, t, None, eps=0., style_feats=_scaled(s))['L_g'].item() == 100.


def test_eq2_squared_norms_are_means_over_samples_and_channels():
    # two samples x two channels; only sample 0, channel 0 differs from the style: a quarter of the one-cell value
    x = torch.full((2, 2, 1, 2), 3.); x[0, 0, 0] = torch.tensor([0., 2.])
    L = adain_losses(_scaled, x, _scaled(x)[3], torch.full((2, 2, 1, 2), 3.), eps=0.)
    assert L['L_content'].item() == 0. and L['L_style'].item() == 150. / 4
    # content: one element of four differs by 2 -> mean square 1
    t = _scaled(x)[3].clone(); t[1, 1, 0, 1] += 2.
    assert adain_losses(_scaled, x, t, x, eps=0.)['L_content'].item() == 4. / 8


def test_eq2_gradient_reaches_only_the_decoder():
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder']))
    c, s = _rand(2, 3, 32, 32, seed=1), _rand(2, 3, 32, 32, seed=2)
    L = adain_losses(G.encoder, *G(c, s), s)
    L['L_g'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.decoder.parameters())
    assert all(p.grad is None for p in G.encoder.parameters())
    assert L['L_g'].item() == pytest.approx((L['L_content'] + 0.5 * L['L_style']).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------ VGG-19
# Written out here by hand (not taken from the module): the module index of conv1_1, conv1_2, conv2_1, conv2_2,
# conv3_1, ..., conv3_4, conv4_1 in torchvision's vgg19().features and in pytorch-AdaIN's net.vgg Sequential.
TV_KEYS = ['features.0', 'features.2', 'features.5', 'features.7', 'features.10', 'features.12', 'features.14',
           'features.16', 'features.19']
ADAIN_KEYS = ['2', '5', '9', '12', '16', '19', '22', '25', '29']


def reference_features(sd, layout, x):
    "relu1_1, relu2_1, relu3_1, relu4_1 by hand with F.conv2d, from the state dict's own tensors."
    if layout == 'torchvision':
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        keys, pad, pool = TV_KEYS, (lambda h: F.pad(h, (1, 1, 1, 1))), (lambda h: F.max_pool2d(h, 2))
    else:
        x = F.conv2d(x, sd['0.weight'], sd['0.bias'])
        keys, pad, pool = ADAIN_KEYS, (lambda h: F.pad(h, (1, 1, 1, 1), mode='reflect')), (lambda h: F.max_pool2d(h, 2, ceil_mode=True))
    out = []
    for j, k in enumerate(keys):
        if j in (2, 4, 8): x = pool(x)
        x = F.relu(F.conv2d(pad(x), sd[f'{k}.weight'], sd[f'{k}.bias']))
        if j in (0, 2, 4, 8): out.append(x)
    return out


@pytest.mark.parametrize('layout', ['torchvision', 'adain'])
def test_a_full_random_state_dict_in_each_layout_loads_and_matches_a_hand_computation(tmp_path, layout):
    sd = vgg19_state_dict(layout, seed=4)
    # the full layout: deeper convs, and torchvision's classifier
    assert ('features.34.weight' in sd and 'classifier.6.weight' in sd) if layout == 'torchvision' else ('51.weight' in sd)
    p = tmp_path / f'{layout}.pth'; torch.save(sd, p)
    enc = VGG19Encoder(p)  # layout 'auto'
    assert enc.layout == layout and enc.pretrained
    assert enc.name == f"vgg19 {'torchvision' if layout == 'torchvision' else 'adain-normalised'} ({file_sha256(p)[:12]})"
    x = _rand(2, 3, 45, 37, seed=5)  # odd sizes: floor vs ceil pooling differ
    got, ref = enc(x), reference_features(sd, layout, x)
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item()), (g - r).abs().max()
    assert not torch.allclose(got[3], reference_features(sd, layout, x.flip(-1))[3])  # the comparison can fail
    # the same file named with its layout
    assert torch.equal(VGG19Encoder(p, layout=layout)(x)[3], got[3])


def test_fp16_files_load_as_fp32(tmp_path):
    sd = {k: v.half() for k, v in vgg19_state_dict('torchvision', seed=1, full=False).items()}
    torch.save(sd, tmp_path / 'half.pth')
    enc = VGG19Encoder(tmp_path / 'half.pth')
    assert enc.conv1_1.weight.dtype == torch.float32
    assert torch.equal(enc.conv4_1.weight, sd['features.19.weight'].float())


def test_offline_default_is_labelled_frozen_and_seeded():
    enc = VGG19Encoder()
    assert enc.name == 'vgg19 random-init seed=0 [offline default, not pretrained]' and enc.pretrained is False
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    assert 'seed=3' in VGG19Encoder(seed=3).name
    x = _rand(1, 3, 32, 32)
    assert torch.equal(VGG19Encoder(seed=3)(x)[3], VGG19Encoder(seed=3)(x)[3])
    assert not torch.equal(VGG19Encoder(seed=3)(x)[3], enc(x)[3])
    # the default equals loading the random torchvision-layout state dict of its seed
    sd = vgg19_state_dict('torchvision', seed=0)
    for g, r in zip(enc(x), reference_features(sd, 'torchvision', x)): assert torch.allclose(g, r, atol=1e-4)
    assert [f.shape[1] for f in enc(x)] == [64, 128, 256, 512]


def test_a_file_in_neither_layout_is_refused_with_file_and_keys(tmp_path):
    p = tmp_path / 'resnet.pth'; torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.bias': torch.zeros(10)}, p)
    with pytest.raises(ValueError, match=r'resnet\.pth: not a VGG-19 state dict in a known key layout.*conv1\.weight'):
        VGG19Encoder(p)
    # the wrong layout named explicitly: the missing keys are listed
    torch.save(vgg19_state_dict('adain'), tmp_path / 'adain.pth')
    with pytest.raises(ValueError, match=r"adain\.pth: not a VGG-19 state dict in the 'torchvision' key layout: missing: features\.0\.weight"):
        VGG19Encoder(tmp_path / 'adain.pth', layout='torchvision')


def test_missing_and_mis_shaped_tensors_are_named(tmp_path):
    sd = vgg19_state_dict('torchvision'); sd.pop('features.19.weight'); sd['features.5.bias'] = torch.zeros(64)
    torch.save(sd, tmp_path / 'broken.pth')
    with pytest.raises(ValueError) as e: VGG19Encoder(tmp_path / 'broken.pth')
    msg = str(e.value)
    assert 'broken.pth' in msg and 'missing: features.19.weight' in msg and 'features.5.bias: file (64,), expected (128,)' in msg
    sd = vgg19_state_dict('adain'); sd['0.weight'] = torch.zeros(3, 3, 1, 1); sd['29.weight'] = torch.zeros(512, 256, 1, 1)
    torch.save(sd, tmp_path / 'broken_adain.pth')
    with pytest.raises(ValueError, match=r'broken_adain\.pth.*mis-shaped: 29\.weight: file \(512, 256, 1, 1\), expected \(512, 256, 3, 3\)'):
        VGG19Encoder(tmp_path / 'broken_adain.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match=r'junk\.pth: not a readable torch state dict'): VGG19Encoder(tmp_path / 'junk.pth')
    with pytest.raises(FileNotFoundError, match=r'absent\.pth.*download\.pytorch\.org'): VGG19Encoder(tmp_path / 'absent.pth')


# ------------------------------------------------------------------------------------------------------------ decoder, G
def test_decoder_output_aligns_with_its_content_and_uses_the_skips():
    torch.manual_seed(0)
    enc, dec = VGG19Encoder(), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder'])
    for hw in [(64, 64), (45, 37), (33, 70)]:
        f = enc(_rand(2, 3, *hw, seed=1))
        out = dec(f[3], f)
        assert out.shape == (2, 3, *hw) and 0 <= out.min() and out.max() <= 1
    for i in range(3):
        skips = [torch.zeros_like(s) if j == i else s for j, s in enumerate(f[:3])]
        assert (dec(f[3], skips) - out).abs().max() > 1e-3, f'skip {i} unused'


def test_skip_carries_content_geometry():
    "Two contents that differ only in one corner give outputs that differ most in that corner (through the skips)."
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder'])).eval()
    c = _rand(1, 3, 64, 64, seed=1); c2 = c.clone(); c2[..., :16, :16] = 1 - c2[..., :16, :16]
    s = _rand(1, 3, 64, 64, seed=2)
    with torch.no_grad(): d = (G(c, s)[0] - G(c2, s)[0]).abs().mean(1)[0]
    assert d[:16, :16].mean() > 3 * d[32:, 32:].mean()


def test_generator_returns_the_adain_target_and_blends_with_alpha():
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder']))
    c, s = _rand(2, 3, 48, 48, seed=1), _rand(2, 3, 40, 56, seed=2)
    x, t = G(c, s)
    fc4, fs4 = G.encoder(c)[3], G.encoder(s)[3]
    assert x.shape == c.shape and torch.allclose(t, adain(fc4, fs4), atol=1e-5)
    assert torch.allclose(G(c, s, alpha=0.)[1], fc4, atol=1e-5)
    assert torch.allclose(G(c, s, alpha=0.3)[1], 0.3 * t + 0.7 * fc4, atol=1e-5)
    with pytest.raises(ValueError, match='alpha'): G(c, s, alpha=-0.1)
    assert 'not pretrained' in G.name


def test_tiny_generator_step_is_small():
    """The tiny preset's 64x64 step (forward, Eq. 2, backward), counted in FLOPs rather than timed (a wall-clock limit
    is flaky on a shared 2-core runner; measured ~0.1 s there when idle): the VGG-19 forward at 64 px is 1.98 GFLOP
    (sum of 2 * H * W * C_out * C_in * 9 over conv1_1..conv4_1); a step is five such passes (content, style twice,
    x~, and x~'s backward to the input), four when the style's features are reused, plus the tiny decoder."""
    from torch.utils.flop_counter import FlopCounterMode
    convs = [(64, 3, 64), (64, 64, 64), (32, 64, 128), (32, 128, 128), (16, 128, 256)] + [(16, 256, 256)] * 3 + [(8, 256, 512)]
    enc_flops = sum(2 * side * side * cout * cin * 9 for side, cin, cout in convs)
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder']))
    c, s = _rand(1, 3, 64, 64, seed=1), _rand(1, 3, 64, 64, seed=2)
    with FlopCounterMode(display=False) as fc: G.encoder(c)
    assert fc.get_total_flops() == enc_flops == 1_977_090_048
    with FlopCounterMode(display=False) as fc: adain_losses(G.encoder, *G(c, s), s)['L_g'].backward()
    dec = fc.get_total_flops() - 5 * enc_flops
    assert 0 < dec < 0.05 * 5 * enc_flops  # the tiny decoder: under 5% of the step (measured 0.47 GFLOP, 4%)
    with torch.no_grad(): fs = G.encoder(s)
    with FlopCounterMode(display=False) as fc: adain_losses(G.encoder, *G(c, s, style_feats=fs), s, style_feats=fs)['L_g'].backward()
    assert fc.get_total_flops() == 3 * enc_flops + dec  # + the one style pass done before


# ------------------------------------------------------------------------------------------------------------ D
def test_discriminator_is_srgans_and_takes_any_size():
    D = ImageDiscriminator()
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.stride[0]) for m in convs] == [(64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules()) == 7  # every conv but the first
    assert [m.out_features for m in D.modules() if isinstance(m, torch.nn.Linear)] == [1024, 1]
    Dt = ImageDiscriminator(**ADAIN_PRESETS['tiny']['discriminator'])
    for hw in [(64, 64), (96, 96), (37, 81)]:
        logit = Dt.train()(_rand(2, 3, *hw))
        assert logit.shape == (2,) and torch.isfinite(logit).all()
        logit.sum().backward()
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\)'): Dt(_rand(2, 4, 32, 32))


# ------------------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    G = AdaINGenerator(VGG19Encoder(seed=2), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder'])).eval()
    with torch.no_grad():
        for p in G.decoder.parameters(): p.add_(torch.randn_like(p) * 0.01)  # not the init
    c, s = _rand(1, 3, 40, 40, seed=1), _rand(1, 3, 40, 40, seed=2)
    p = save_generator(tmp_path / 'sub' / 'G.pt', G)
    assert not list((tmp_path / 'sub').glob('*.tmp'))  # atomic: no temporary file left
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the same encoder: no warning
        G2 = load_generator(p, VGG19Encoder(seed=2))
    with torch.no_grad(): assert torch.equal(G2(c, s)[0], G(c, s)[0])
    assert G2.decoder.config == G.decoder.config and not G2.training
    with pytest.warns(UserWarning, match=r'trained with encoder .*seed=2.* now used with .*seed=0'):
        load_generator(p)  # the offline default encoder, another seed
    torch.save({'format': 'something else'}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match=r'other\.pt: not an AdaIN generator'): load_generator(tmp_path / 'other.pt')
    with pytest.raises(FileNotFoundError, match=r'missing\.pt'): load_generator(tmp_path / 'missing.pt')


# ------------------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_quick_run_prints_a_row_per_preset():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'NO_ALBUMENTATIONS_UPDATE': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_adain.py'), '--quick', '--device', 'cpu',
                        '--size', '32', '--iters', '1'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert 'not pretrained' in out  # the encoder's name
    rows = [l.split() for l in out[out.index('\ndevice'):].splitlines()[2:4]]
    assert [(c[0], c[1], c[2], c[3]) for c in rows] == [('cpu', 'tiny', 'fp32', '1'), ('cpu', 'paper', 'fp32', '1')]
    for c in rows:
        assert float(c[5]) > 0 and float(c[6]) > 0 and float(c[7]) > 0
        assert float(c[6]) == pytest.approx(1e3 / float(c[7]), rel=0.02)  # train img/s = batch / step time
