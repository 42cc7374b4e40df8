"""DiffMix's label locality (issue 16): with a (briefly) trained tiny SDM, sampling DiffMix-style from the same original
patch and noise under two label maps that differ in one nucleus changes the sample inside that nucleus (dilated 2 px)
far more than elsewhere; identical maps give identical samples.

The model: the SDM 'tiny' preset (`nucbook.models.sdm`), trained 12 steps (batch 8, 32-px patches, lr 2e-3: a CPU
shortcut, the paper trains at 1e-4 for far longer) on synthetic tiles with the 20% null-label dropout that guidance
needs. Its output layer starts at zero, so the untrained network ignores the label entirely: the locality measured here
is learned. Sampling: a 20-step respaced DDIM schedule started at step 10 (t = 549, the same noise level as DiffMix's
step 54 of 100), guidance s = 1.5 (the authors' convention, the engine's default), 48-px patches.
Measured over 3 training seeds x 4 validation tiles (removal) and x 2 tiles (retyping): inside/outside ratio 12-17 for
both, mean |difference| inside 0.086-0.15 (removal) and 0.047-0.064 (retyping) in model units; the removed nucleus
comes out brighter by 0.105-0.24. The thresholds below leave a margin of ~2x on each. Calling the model with the null
label (or a mirrored one) in `ddim_sample` makes the locality and brightness tests fail.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from nucbook.data.synth import synth_dataset
from nucbook.engine.diffusion import ddim_sample, label_channels, make_noise_scheduler, to_model_range, train_diffusion
from nucbook.models.sdm import SDMUNet, sdm_config

torch.set_num_threads(1)  # pytest -n 2 on 2 cores

N_CLASSES = 4  # synthetic nucleus types 1..4: label maps of 6 channels (background, 4 types, edge), the 'tiny' preset's
SIDE = 48  # sampled patch side (the model trains on 32-px patches; it is fully convolutional)
STEPS, START = 20, 10  # respaced schedule and start step: t = 549, as DiffMix's 54 of 100
S = 1.5  # guidance scale (DiffMix)
RATIO = 5.0  # mean |difference| inside the changed nucleus / outside it, at least
MIN_INSIDE = 0.025  # ... and inside at least this (model units, [-1, 1]: ~3 grey levels), so "no change" fails
MIN_BRIGHTER = 0.05  # a removed nucleus (dark, hematoxylin) turns into brighter background by at least this


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    torch.manual_seed(0)
    m = SDMUNet(**sdm_config('tiny'))
    run = train_diffusion(m, synth_dataset(8, 'train', seed=0, size=64), tmp_path_factory.mktemp('sdm'), steps=12,
                          batch_size=8, patch_size=32, lr=2e-3, p_uncond=0.2, ckpt_every=10**6, save_final=False, seed=0)
    assert np.isfinite(run.losses).all() and np.mean(run.losses[-3:]) < 0.5 * np.mean(run.losses[:3]), run.losses
    return run.model.eval()


@pytest.fixture(scope='module')
def case():
    "A synthetic validation patch, its label map, and its largest nucleus that does not touch the border."
    s = synth_dataset(1, 'val', seed=0, size=64)[0]
    img, inst, typ = s.image[:SIDE, :SIDE], s.inst_map[:SIDE, :SIDE], s.type_map[:SIDE, :SIDE]
    border = set(np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]])).tolist())
    ids = [i for i in np.unique(inst).tolist() if i and i not in border]
    k = max(ids, key=lambda i: int((inst == i).sum()))
    nucleus = inst == k
    assert nucleus.sum() >= 40, 'the test needs a nucleus of a few dozen pixels'
    return dict(y0=to_model_range(img), inst=inst, typ=typ, nucleus=nucleus, region=ndi.binary_dilation(nucleus, iterations=2))


def _sample(model, y0, inst, typ, seed=0):
    x = torch.from_numpy(label_channels(inst, typ, N_CLASSES))[None]
    return ddim_sample(model, make_noise_scheduler(), steps=STEPS, start_step=START, y0=y0, x=x, s=S, seed=seed)[0]


def _removed(c):
    inst, typ = c['inst'].copy(), c['typ'].copy()
    inst[c['nucleus']] = 0; typ[c['nucleus']] = 0
    return inst, typ


def _retyped(c):
    typ = c['typ'].copy(); old = int(typ[c['nucleus']][0])
    typ[c['nucleus']] = 3 if old == 2 else 2
    return c['inst'], typ


@pytest.fixture(scope='module')
def original(model, case):
    "The sample under the patch's own label map (seed 0)."
    return _sample(model, case['y0'], case['inst'], case['typ'])


@pytest.fixture(scope='module')
def removed(model, case):
    "The sample with the nucleus removed from the map (same patch, same seed)."
    return _sample(model, case['y0'], *_removed(case))


@pytest.mark.parametrize('change', ['removed', 'retyped'])
def test_a_changed_nucleus_changes_the_sample_there_far_more_than_elsewhere(model, case, original, removed, change):
    b = removed if change == 'removed' else _sample(model, case['y0'], *_retyped(case))
    d = (original - b).abs().mean(0).numpy()
    inside, outside = float(d[case['region']].mean()), float(d[~case['region']].mean())
    assert inside >= MIN_INSIDE, f'the label change barely changed the sample: {inside:.4f} inside'
    assert inside >= RATIO * outside, f'inside {inside:.4f} vs outside {outside:.4f}: ratio {inside / max(outside, 1e-12):.1f} < {RATIO}'


def test_a_removed_nucleus_becomes_background(case, original, removed):
    "What the model learned, not only where: the removed (dark) nucleus is painted as brighter background."
    n = torch.from_numpy(case['nucleus'])
    brighter = float(removed.mean(0)[n].mean() - original.mean(0)[n].mean())
    assert brighter >= MIN_BRIGHTER, f'removed nucleus brighter by {brighter:.3f} only'


def test_identical_maps_give_identical_samples(model, case, original):
    assert torch.equal(_sample(model, case['y0'], case['inst'], case['typ']), original)
    other = _sample(model, case['y0'], case['inst'], case['typ'], seed=1)
    assert (other - original).abs().mean() > 0.01  # the seed does matter (the start noise)
