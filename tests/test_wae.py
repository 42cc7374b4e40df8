"""WAE-MMD cell scorer: the IMQ kernel and the unbiased MMD against hand computations, the loss terms, the policy
score, save/load, and the resumable training loop (chunks == one run, changed settings refused); a tiny model trained
on blob images must rank blobs above noise and distorted blobs."""
import math
import numpy as np
import pytest
import torch
from nucbook.engine.autoencoder import cells_identity, lr_factor, score_cells, train_wae
from nucbook.engine.loop import SettingsMismatch
from nucbook.models.wae import (IMQ_SCALES, WAE, imq_kernel, load_wae, mmd_imq, normalised_error, pixel_variance,
                                policy_score, prior_sample, reconstruction_error, save_wae, wae_config, wae_loss)

torch.set_num_threads(1)  # pytest -n 2 on 2 cores
S = 32


def blobs(n: int, seed: int, size: int = S) -> np.ndarray:
    "n fluorescence-like nuclei: a bright ellipse with a soft edge on a dark background, N x 3 x size x size in [0, 1]."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
        a, b = rng.uniform(0.12 * size, 0.3 * size, 2)
        t = rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        m = np.clip(1.5 * (1 - u * u - v * v), 0, 1)
        colour = rng.uniform(0.5, 1, 3) * rng.uniform(0.6, 1)
        out[i] = 0.05 + m[None] * colour[:, None, None] + rng.normal(0, 0.01, (3, size, size))
    return np.clip(out, 0, 1).astype(np.float32)


def tiny(seed: int = 0) -> WAE:
    torch.manual_seed(seed)
    return WAE(**wae_config('tiny'))


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def mmd_by_hand(z, zp, sigma2, scales=IMQ_SCALES) -> float:
    "The unbiased MMD^2 U-statistic written out with loops, in float64."
    z, zp = np.asarray(z, np.float64), np.asarray(zp, np.float64)
    C = 2 * z.shape[1] * sigma2
    k = lambda a, b: sum(s * C / (s * C + ((a - b) ** 2).sum()) for s in scales)
    n, m = len(z), len(zp)
    zz = sum(k(z[i], z[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    pp = sum(k(zp[i], zp[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    zq = sum(k(z[i], zp[j]) for i in range(n) for j in range(m)) / (n * m)
    return zz + pp - 2 * zq


def test_imq_kernel_hand_built_pair():
    x, y = torch.tensor([[0., 0., 0.]], dtype=torch.float64), torch.tensor([[1., 2., 2.]], dtype=torch.float64)
    # d_z = 3, sigma_z^2 = 0.5: C = 3; ||x - y||^2 = 9
    assert imq_kernel(x, y, 0.5, scales=(1.,)).item() == pytest.approx(3 / 12)
    assert imq_kernel(x, y, 0.5, scales=(2.,)).item() == pytest.approx(6 / 15)
    expected = sum(3 * s / (3 * s + 9) for s in (.1, .2, .5, 1., 2., 5., 10.))
    assert imq_kernel(x, y, 0.5).item() == pytest.approx(expected, rel=1e-12)
    assert imq_kernel(y, y, 0.5).item() == pytest.approx(7.0)  # seven scales, k(x, x) = 1 each


def test_mmd_equals_the_u_statistic_by_hand():
    g = torch.Generator().manual_seed(3)
    z, zp = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.4, torch.randn(6, 3, generator=g, dtype=torch.float64)
    for sigma2 in (1.0, 2.5):
        assert mmd_imq(z, zp, sigma2).item() == pytest.approx(mmd_by_hand(z, zp, sigma2), rel=1e-10)
    # antisymmetric pieces: swapping the samples gives the same statistic
    assert mmd_imq(zp, z, 1.0).item() == pytest.approx(mmd_imq(z, zp, 1.0).item(), rel=1e-12)


def test_mmd_unbiased_near_zero_for_one_distribution_and_larger_when_shifted():
    g = torch.Generator().manual_seed(0)
    same = [mmd_imq(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), 1.0).item() for _ in range(200)]
    shifted = [mmd_imq(torch.randn(16, 8, generator=g) + 1.0, torch.randn(16, 8, generator=g), 1.0).item() for _ in range(50)]
    # the mean of 200 unbiased estimates sits at 0 within a few standard errors; a V-statistic (diagonal kept) would be
    # biased upwards by about 2 (k(z, z) - E k) / n, i.e. about 0.4 here
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * se and abs(np.mean(same)) < 0.01, (np.mean(same), se)
    assert min(same) < 0 < max(same)  # an unbiased estimate of 0 is sometimes negative
    assert np.mean(shifted) > 5 * np.std(same) and min(shifted) > 0  # one estimate has a standard deviation of ~0.08


def test_mmd_errors():
    with pytest.raises(ValueError, match='at least 2 codes and 2 prior samples, got 1 and 4'):
        mmd_imq(torch.zeros(1, 2), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match='n x d and m x d'):
        imq_kernel(torch.zeros(2, 2), torch.zeros(2, 3), 1.0)


def test_wae_loss_terms_on_a_tiny_model():
    m = tiny(1).train()
    x = torch.from_numpy(blobs(6, seed=5))
    out = wae_loss(m, x, 11, lam=7.0, sigma2=2.0)
    with torch.no_grad():
        x_hat, z = m(x)
    recon = ((x.double() - x_hat.double()) ** 2).sum().item() / 6  # summed over 3 x 32 x 32 values, mean over the batch
    zp = torch.randn(6, 8, generator=torch.Generator().manual_seed(11)) * math.sqrt(2.0)
    assert out['recon'].item() == pytest.approx(recon, rel=1e-5)
    assert out['mmd'].item() == pytest.approx(mmd_by_hand(z.numpy(), zp.numpy(), 2.0), abs=1e-5)
    assert out['loss'].item() == pytest.approx(out['recon'].item() + 7.0 * out['mmd'].item(), rel=1e-6)
    assert out['loss'].item() != pytest.approx(out['recon'].item(), rel=1e-4)  # the MMD term is really there
    out['loss'].backward()
    assert all(p.grad is not None for p in m.encoder.parameters())  # the MMD and the reconstruction reach the encoder
    assert torch.equal(prior_sample(4, 3, 1.0, 2), torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))


def test_network_shapes_range_and_presets():
    m = tiny().eval()
    x = torch.rand(3, 3, S, S)
    with torch.no_grad():
        x_hat, z = m(x)
    assert x_hat.shape == x.shape and z.shape == (3, 8)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    with torch.device('meta'):
        p = WAE(**wae_config('paper'))
    assert (p.size, p.z_dim) == (64, 64)
    assert sum(t.numel() for t in p.parameters()) == 39_742_531
    with pytest.raises(ValueError, match='N x 3 x 32 x 32'):
        m(torch.rand(3, 3, 64, 64))


def test_policy_score_hand_built():
    class Half(torch.nn.Module):  # f(y) = y / 2
        size, channels = 2, 3
        def __init__(self):
            super().__init__(); self.w = torch.nn.Parameter(torch.zeros(()))
        def forward(self, x):
            return x / 2 + 0 * self.w, x.flatten(1)[:, :2]
    y = torch.zeros(2, 3, 2, 2)
    y[0, :, 0] = 1.0  # half ones: e = mean(y^2)/4 = 1/8, variance 1/4
    y[1, :, 0] = 0.5  # half 0.5: e = 1/32, variance 1/16
    assert reconstruction_error(Half(), y).tolist() == pytest.approx([1 / 8, 1 / 32])
    assert pixel_variance(y).tolist() == pytest.approx([1 / 4, 1 / 16])
    assert normalised_error(Half(), y) == pytest.approx((1 / 8 + 1 / 32) / (1 / 4 + 1 / 16))
    assert policy_score(Half(), y) == pytest.approx(-0.5)
    assert policy_score(Half(), y, original=y) == 0.0
    assert policy_score(Half(), torch.full((1, 3, 2, 2), 0.3)) == -math.inf
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
        policy_score(Half(), y - 0.5)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny WAE trained for 200 steps on 256 blobs (a few CPU seconds)."
    out = tmp_path_factory.mktemp('wae')
    run = train_wae(tiny(), blobs(256, seed=0), out, steps=200, batch_size=32, seed=0, ckpt_every=100)
    return run


def test_training_lowers_held_out_error_and_the_score_ranks_realism(trained):
    held_out = blobs(64, seed=1)
    before = score_cells(tiny(), held_out).mean()
    after = score_cells(trained.model, held_out).mean()
    assert after < 0.15 * before, (before, after)
    assert np.mean(trained.losses[-20:]) < 0.15 * np.mean(trained.losses[:20])
    g = torch.Generator().manual_seed(2)
    x = torch.from_numpy(held_out)
    noise = torch.rand(x.shape, generator=g)
    distorted = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # strongly corrupted blobs
    scrambled = x.reshape(64, 3, 4, 8, 4, 8).permute(0, 1, 2, 4, 3, 5)  # 8 x 8 tiles moved around
    scrambled = scrambled[:, :, torch.randperm(4, generator=g)][:, :, :, torch.randperm(4, generator=g)]
    scrambled = scrambled.permute(0, 1, 2, 4, 3, 5).reshape(64, 3, S, S).contiguous()
    e = {k: score_cells(trained.model, v).mean() for k, v in
         [('blobs', x), ('noise', noise), ('distorted', distorted), ('scrambled', scrambled)]}
    assert e['blobs'] < e['distorted'] / 3 and e['blobs'] < e['noise'] / 10 and e['blobs'] < e['scrambled'] / 1.5, e
    s = {k: policy_score(trained.model, v) for k, v in
         [('blobs', x), ('noise', noise), ('distorted', distorted), ('scrambled', scrambled), ('flipped', x.flip(-1))]}
    assert s['blobs'] > max(s['noise'], s['distorted'], s['scrambled']), s
    assert -s['flipped'] < -1.25 * s['blobs'] and s['flipped'] > s['scrambled'], s  # a flipped blob is still a blob: NRE within 25 %
    assert policy_score(trained.model, x.flip(-1), original=x) == pytest.approx(s['flipped'] - s['blobs'], abs=1e-6)


def test_score_cells_is_batch_independent_in_either_mode(trained):
    x, m = blobs(20, seed=4), trained.model
    assert not m.training  # train_wae hands the model back in eval mode
    a = score_cells(m, x, batch_size=64)
    m.train()  # scoring switches to eval mode (running batch-norm statistics) and restores the mode
    try:
        b, c = score_cells(m, x, batch_size=3), score_cells(m, x[:1], batch_size=1)
        assert m.training
    finally:
        m.eval()
    assert a.shape == (20,) and a.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c, a[:1], rtol=1e-5, atol=1e-7)


def test_resume_in_chunks_equals_one_run_and_changed_settings_are_refused(tmp_path):
    cells = blobs(48, seed=7)
    kw = dict(steps=12, batch_size=8, seed=3, ckpt_every=5, lam=50.0)
    full = train_wae(tiny(), cells, tmp_path/'full', **kw)
    first = train_wae(tiny(), cells, tmp_path/'cut', chunk=5, **kw)
    assert (first.step, first.finished, first.resumed_from) == (5, False, 0)
    assert not (tmp_path/'cut'/'wae.pt').exists()  # no final model before the run is finished
    rest = train_wae(tiny(9), cells, tmp_path/'cut', **kw)  # other initial weights: the checkpoint's replace them
    assert (rest.step, rest.finished, rest.resumed_from) == (12, True, 5)
    assert same_weights(rest.model, full.model) and rest.losses == full.losses
    assert same_weights(load_wae(tmp_path/'cut'/'wae.pt'), full.model)
    again = train_wae(tiny(), cells, tmp_path/'full2', **kw)  # deterministic per seed
    assert same_weights(again.model, full.model)
    other = train_wae(tiny(), cells, tmp_path/'seed4', **{**kw, 'seed': 4})  # same start, another seed: other batches
    assert not same_weights(other.model, full.model)
    for change, key in [({'lam': 10.0}, 'lam'), ({'sigma2': 2.0}, 'sigma2'), ({'lr': 1e-4}, 'lr'), ({'seed': 4}, 'seed'),
                        ({'lr_decay': 'constant'}, 'lr_decay'), ({'steps': 10}, 'steps')]:
        with pytest.raises(SettingsMismatch, match=key):
            train_wae(tiny(), cells, tmp_path/'cut', **{**kw, **change})
    with pytest.raises(SettingsMismatch, match='data.sha1'):
        train_wae(tiny(), blobs(48, seed=8), tmp_path/'cut', **kw)
    with pytest.raises(SettingsMismatch, match='wae.z_dim'):
        train_wae(WAE(**wae_config('tiny', z_dim=4)), cells, tmp_path/'cut', **kw)


def test_lr_schedule_and_cells_identity():
    assert [lr_factor(k, 10) for k in range(10)] == [1, 1, 1, .5, .5, .1, .1, .1, .1, .1]
    c = blobs(3, seed=0)
    assert cells_identity(c) == cells_identity(torch.from_numpy(c))
    assert cells_identity(c)['sha1'] != cells_identity(c[::-1].copy())['sha1']


def test_training_input_errors(tmp_path):
    with pytest.raises(ValueError, match='cells must be crops N x 3 x 32 x 32, got \\(4, 3, 16, 16\\)'):
        train_wae(tiny(), np.zeros((4, 3, 16, 16), np.float32), tmp_path, steps=2, batch_size=2)
    with pytest.raises(ValueError, match=r'batch_size must be in 2\.\.4'):
        train_wae(tiny(), blobs(4, seed=0), tmp_path, steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
        train_wae(tiny(), blobs(4, seed=0) * 255, tmp_path, steps=2, batch_size=2)


def test_save_load_round_trip_and_bad_files(tmp_path):
    m = tiny(2).eval()
    x = torch.from_numpy(blobs(4, seed=1))
    p = save_wae(m, tmp_path/'w.pt')
    m2 = load_wae(p)
    assert same_weights(m, m2) and m2.args == m.args and not m2.training
    assert torch.equal(reconstruction_error(m2, x), reconstruction_error(m, x))
    assert [q.name for q in tmp_path.iterdir()] == ['w.pt']  # atomic write: no temporary file left
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        load_wae(tmp_path/'missing.pt')
    (tmp_path/'garbage.pt').write_text('hello')
    with pytest.raises(ValueError, match='garbage.pt is not a readable torch file'):
        load_wae(tmp_path/'garbage.pt')
    torch.save({'format': 'something else'}, tmp_path/'other.pt')
    with pytest.raises(ValueError, match='other.pt is not a WAE'):
        load_wae(tmp_path/'other.pt')
    ck = torch.load(p, weights_only=True)
    del ck['state_dict']['project.bias']
    torch.save(ck, tmp_path/'broken.pt')
    with pytest.raises(ValueError, match='broken.pt does not hold a consistent WAE'):
        load_wae(tmp_path/'broken.pt')
