"Sliding-window inference: stitching, single-pass equivalence, instance outputs."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nucbook.models.hovernet import HoVerNet
from nucbook.engine.infer import predict_maps, predict_sample, evaluate_model
from nucbook.data.crops import window_owner, window_starts
from nucbook.data.sample import Sample
from nucbook.data.synth import synth_tile


class Pointwise(torch.nn.Module):
    "No spatial context: any tiling must reproduce the whole-tile output."
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.np, self.hv, self.tp = (torch.nn.Conv2d(3, c, 1) for c in (2, 2, 3))
    def forward(self, x): return {'np': self.np(x), 'hv': self.hv(x), 'tp': self.tp(x)}


def test_windows_cover_and_own_every_pixel():
    for length, win, ov in [(1000, 256, 64), (256, 256, 64), (264, 256, 8), (100, 32, 0)]:
        starts = window_starts(length, win, ov)
        assert starts[0] == 0 and starts[-1] + win == length and (np.diff(starts) <= win - ov).all()
        own = window_owner(length, starts, win)
        assert (np.diff(own) >= 0).all() and set(own) == set(range(len(starts)))
        pos = np.arange(length)
        assert ((pos >= starts[own]) & (pos < starts[own] + win)).all()  # owned pixels lie in their window


def test_infer_uses_the_crops_windows():
    import nucbook.engine.infer as infer
    assert infer.window_starts is window_starts and infer.window_owner is window_owner  # one geometry, not a copy
    assert not hasattr(infer, '__all__') or 'window_starts' not in infer.__all__


def test_tile_smaller_than_window_or_overlap():
    img = synth_tile(seed=2, size=(40, 48)).image
    whole = predict_maps(Pointwise(), img, window=256, overlap=64)  # sides shorter than the overlap: one window
    assert whole['np'].shape == (40, 48)
    with pytest.raises(ValueError, match='overlap'): predict_maps(Pointwise(), img, window=64, overlap=64)


def test_single_window_equals_single_pass():
    torch.manual_seed(1)
    model = HoVerNet('tiny', n_types=4).eval()
    img = synth_tile(seed=4, size=(232, 256)).image
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad(): ref = model(x)
    maps = predict_maps(model, img, window=256, overlap=64, channels_last=False)  # same layout as the reference
    assert np.array_equal(maps['np'], F.softmax(ref['np'], 1)[0, 1].numpy())
    assert np.array_equal(maps['hv'], ref['hv'][0].numpy())
    assert np.array_equal(maps['tp'], F.softmax(ref['tp'], 1)[0].numpy())
    assert not model.training


def test_tiled_equals_whole_for_pointwise_model():
    img = synth_tile(seed=5, size=(203, 317)).image  # not multiples of 8: padded, then cropped back
    whole = predict_maps(Pointwise(), img, window=320)
    tiled = predict_maps(Pointwise(), img, window=48, overlap=16, batch_size=7)
    for k in ('np', 'hv', 'tp'):
        assert whole[k].shape[-2:] == (203, 317)
        np.testing.assert_allclose(tiled[k], whole[k], atol=1e-6)


def test_predict_sample_and_evaluate():
    model = HoVerNet('tiny', n_types=4)
    model.train()
    s = synth_tile(seed=6, size=96, meta={'group': 'seen'})
    p = predict_sample(model, s, window=64, overlap=16)
    assert isinstance(p, Sample) and p.shape == (96, 96) and p.has_types and p.meta['image_id'] == s.meta['image_id']
    assert model.training  # the caller's mode is restored
    preds, table = evaluate_model(model, [s, s], window=96)
    assert len(preds) == 2 and (table.kind == 'mean').any() and 'aji' in table
    with pytest.raises(ValueError, match='multiple of 8'): predict_maps(model, s.image, window=100)
