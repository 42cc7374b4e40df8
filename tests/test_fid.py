"""Tests of nucbook.eval.fid: the Inception-v3 architecture with random weights (saved and loaded back, hash checks),
the offline random features, and FID/KID through torchmetrics."""
import warnings
import numpy as np
import pytest
import torch

from nucbook.eval import fid as FM
from nucbook.eval.fid import (FIDInceptionV3, RandomConvFeatures, load_fid_inception, file_sha256, resize_bilinear_tf1,
                         default_extractor, image_batches, fid, kid)
from nucbook.data.sample import Sample


def test_tf1_resize_by_hand():
    x = torch.tensor([[[[0., 8.], [0., 8.]]]])
    assert resize_bilinear_tf1(x, 4)[0, 0, 0].tolist() == [0., 4., 8., 8.]  # src = i * in/out, clamped
    y = torch.arange(16.).reshape(1, 1, 4, 4)
    assert resize_bilinear_tf1(y, 2)[0, 0].tolist() == [[0., 2.], [8., 10.]]  # downsampling picks rows/cols 0, 2


@pytest.fixture(scope='module')
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    path = tmp_path_factory.mktemp('w') / 'random_inception.pth'
    torch.save(net.state_dict(), path)
    return net, path


def test_inception_architecture(random_weights):
    net, _ = random_weights
    # torchvision's Inception-v3 has 27,161,264 parameters; minus its aux classifier (3,326,696), plus 8 classes
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    shapes = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n in ['Conv2d_4a_3x3', 'Mixed_5d', 'Mixed_6e', 'Mixed_7c']]
    with torch.no_grad(): out = net(torch.randint(0, 256, (1, 3, 100, 120), dtype=torch.uint8))
    for h in hooks: h.remove()
    assert shapes == {'Conv2d_4a_3x3': (192, 71, 71), 'Mixed_5d': (288, 35, 35), 'Mixed_6e': (768, 17, 17),
                      'Mixed_7c': (2048, 8, 8)}
    assert out.shape == (1, 2048) and torch.isfinite(out).all() and (out >= 0).all()
    with pytest.raises(ValueError, match='mode'): FIDInceptionV3(mode='keras')


def test_load_weights_and_hash_checks(random_weights, tmp_path):
    net, path = random_weights
    with pytest.raises(ValueError, match=r'sha256 is [0-9a-f]{64}, expected 6726825d'): load_fid_inception(path)
    digest = file_sha256(path)
    loaded = load_fid_inception(path, sha256=digest)  # the full digest of this very file passes
    assert loaded.weights_sha256 == digest and loaded.comparable is False and 'unofficial' in loaded.name
    sd0, sd1 = net.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with pytest.raises(ValueError, match='expected 00'): load_fid_inception(path, sha256='00')
    with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05'): load_fid_inception(tmp_path / 'nope.pth')
    torch.save({'fc.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not FID Inception-v3 weights'): load_fid_inception(tmp_path / 'other.pth', None)
    torch.save([1, 2], tmp_path / 'list.pth')
    with pytest.raises(ValueError, match='expected a state_dict'): load_fid_inception(tmp_path / 'list.pth', None)
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='not a torch state_dict'): load_fid_inception(tmp_path / 'junk.pth', None)


def test_env_var_selects_the_inception(random_weights, monkeypatch):
    _, path = random_weights
    monkeypatch.delenv(FM.WEIGHTS_ENV, raising=False)
    assert isinstance(default_extractor(), RandomConvFeatures)
    monkeypatch.setenv(FM.WEIGHTS_ENV, str(path))
    with pytest.raises(ValueError, match='expected 6726825d'): default_extractor()  # random weights: refused


def test_random_features_are_fixed_by_seed():
    imgs = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    a, b, c = RandomConvFeatures(1), RandomConvFeatures(1), RandomConvFeatures(2)
    assert torch.equal(a(imgs), b(imgs)) and not torch.equal(a(imgs), c(imgs))
    assert a(imgs).shape == (3, 64) and RandomConvFeatures(num_features=16)(imgs).shape == (3, 16)
    assert a.comparable is False


def _tiles(n=40, seed=0, size=48):
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (n, 1, 1, 3))
    noise = rng.normal(0, 25, (n, size, size, 3))
    return list(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_fid_self_is_zero_and_shift_is_positive():
    tiles = _tiles()
    shifted = [np.clip(t.astype(int) + 50, 0, 255).astype(np.uint8) for t in tiles]
    with pytest.warns(UserWarning, match='NOT comparable'): same = fid(tiles, tiles)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        far = fid(tiles, shifted)
        other = fid(tiles, _tiles(seed=1))
    assert abs(same.value) < 1e-6 and far.value > 0.05 and far.value > other.value
    assert (same.n_real, same.n_fake, same.metric, same.comparable) == (40, 40, 'FID', False)
    assert 'NOT comparable' in str(same) and float(far) == far.value


def test_kid_self_near_zero_shift_positive_and_seeded():
    tiles = _tiles()
    shifted = [np.clip(t.astype(int) + 50, 0, 255).astype(np.uint8) for t in tiles]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        same = kid(tiles, tiles, subsets=20, subset_size=30)
        far = kid(tiles, shifted, subsets=20, subset_size=30)
        again = kid(tiles, shifted, subsets=20, subset_size=30)
        big = kid(tiles, shifted, subsets=5)  # subset_size capped at the set size
    assert far.value > 0 and abs(same.value) < far.value / 10
    assert (far.value, far.std) == (again.value, again.std) and far.std is not None
    assert big.n_real == 40


def test_input_formats_and_errors():
    tiles = _tiles(6)
    arr = np.stack(tiles)
    assert [b.shape for b in image_batches(arr, 4)] == [(4, 3, 48, 48), (2, 3, 48, 48)]
    ten = torch.as_tensor(arr).permute(0, 3, 1, 2)
    assert torch.equal(next(iter(image_batches(ten, 6))), next(iter(image_batches(arr, 6))))
    mixed = tiles[:2] + [np.zeros((30, 20, 3), np.uint8)] + tiles[2:3]
    assert [tuple(b.shape) for b in image_batches(mixed, 8)] == [(2, 3, 48, 48), (1, 3, 30, 20), (1, 3, 48, 48)]
    samples = [Sample(t, np.zeros(t.shape[:2], np.int32)) for t in tiles]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert fid(samples, tiles).value == pytest.approx(0, abs=1e-6)
        with pytest.raises(ValueError, match='at least 2 images'): fid(tiles[:1], tiles)
        with pytest.raises(ValueError, match='uint8'): fid([t.astype(np.float32) for t in tiles], tiles)
        with pytest.raises(ValueError, match='H x W x 3'): fid([t[..., 0] for t in tiles], tiles)
