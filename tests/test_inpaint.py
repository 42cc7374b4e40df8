"Diffusion inpainting: known pixels bit-identical, exact recovery with a perfect model, seeding, input checks."
import numpy as np
import pytest
import torch
from nucbook.engine.diffusion import make_noise_scheduler, make_semantic_unet, make_unet, to_model_range
from nucbook.engine.inpaint import inpaint_image, mcg_inpaint, repaint
from nucbook.data.synth import synth_tile

torch.set_num_threads(1)
S = 16


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0); return make_unet('tiny', sample_size=S).eval()


@pytest.fixture(scope='module')
def data():
    y = to_model_range(np.stack([synth_tile(i, size=S).image for i in range(3)]))
    mask = torch.zeros(3, 1, S, S, dtype=torch.bool); mask[:, :, 4:11, 3:9] = True; mask[1, :, 0, :] = True
    return y, mask


@pytest.mark.parametrize('fill,kw', [(mcg_inpaint, dict(alpha=1.0)), (mcg_inpaint, dict(alpha=0.5, squared=True, eta=0.0)),
                                     (mcg_inpaint, dict(alpha=0.0)), (repaint, dict(jump_length=2, jump_n_sample=2))])
def test_known_pixels_bit_identical(fill, kw, model, data):
    y, mask = data; sched = make_noise_scheduler()
    out = fill(model, sched, y, mask, steps=4, seed=0, batch_size=2, **kw)
    keep = ~mask.expand_as(y)
    assert out.shape == y.shape and torch.equal(out[keep], y[keep])
    assert not torch.equal(out[~keep], y[~keep]) and out.abs().max() <= 1
    assert torch.equal(out, fill(model, sched, y, mask, steps=4, seed=0, batch_size=2, **kw))  # deterministic per seed
    assert not torch.equal(out, fill(model, sched, y, mask, steps=4, seed=9, batch_size=2, **kw))


def test_mcg_gradient_changes_the_fill(model, data):
    y, mask = data; sched = make_noise_scheduler()
    a = mcg_inpaint(model, sched, y, mask, steps=4, alpha=0.0, seed=1)
    b = mcg_inpaint(model, sched, y, mask, steps=4, alpha=2.0, seed=1)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize('fill,kw', [(mcg_inpaint, dict(alpha=1.0, eta=1.0)), (mcg_inpaint, dict(alpha=1.0, eta=0.0)),
                                     (repaint, dict(jump_length=2, jump_n_sample=3))])
def test_perfect_model_recovers_the_hole(fill, kw, data, oracle):
    # a noise predictor that is exact for x0 fills the hole with x0 (Tweedie estimate = x0 at every step)
    y, mask = data; sched = make_noise_scheduler()
    x0 = torch.linspace(-0.8, 0.8, S).expand(3, 3, S, S).clone()
    measured = torch.where(mask, torch.zeros_like(x0), x0)  # the hole's content is unknown to the sampler
    out = fill(oracle(x0, sched, S), sched, measured, mask, steps=10, seed=0, **kw)
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)


def test_inpaint_image_tiles_and_keeps_pixels(model):
    img = synth_tile(3, size=(2 * S + 5, S + 3)).image
    mask = np.zeros(img.shape[:2], bool); mask[2:6, 2:7] = True; mask[2 * S + 1:2 * S + 4, S:S + 2] = True
    for method, kw in (('mcg', {}), ('repaint', dict(jump_length=2, jump_n_sample=1))):
        out = inpaint_image(model, make_noise_scheduler(), img, mask, method=method, steps=3, **kw)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.array_equal(out[~mask], img[~mask]) and (out[mask] != img[mask]).any()
    assert np.array_equal(inpaint_image(model, make_noise_scheduler(), img, np.zeros_like(mask)), img)


def test_bad_inputs(model, data):
    y, mask = data; sched = make_noise_scheduler()
    with pytest.raises(ValueError, match='bool'): mcg_inpaint(model, sched, y, mask.float())
    with pytest.raises(ValueError, match='N x 3'): repaint(model, sched, y[:, :2], mask)
    with pytest.raises(ValueError, match='unconditional'): mcg_inpaint(make_semantic_unet('tiny', 2), sched, y, mask)
    img = synth_tile(0, size=S).image
    with pytest.raises(ValueError, match='mask must be bool'): inpaint_image(model, sched, img, np.zeros((S, S), np.uint8))
    with pytest.raises(ValueError, match='unknown method'): inpaint_image(model, sched, img, np.ones((S, S), bool), method='x')
