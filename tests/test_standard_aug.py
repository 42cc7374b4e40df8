"""The standard augmentation (`nucbook.augment.standard`): image and labels move together, ids stay exact, the
photometric steps leave the labels alone, `min_area` drops only cut remnants, one seed gives one result; on generated
samples (hypothesis) and on real crops."""
from dataclasses import replace
from functools import lru_cache
import cv2
import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st
from scipy import ndimage as ndi
from nucbook.augment.standard import StandardAugment, PROFILES, relabel_warped
from nucbook.data.sample import LabelError, make_sample
from datahelpers import random_sample

SETTINGS = dict(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
D4 = [(k, f) for k in range(4) for f in (False, True)]

def d4(a, k, f): return np.rot90(a[:, ::-1] if f else a, k)

def painted(s, seed=0):
    "`s` with each nucleus painted in its own colour (never 0: the fill stays recognisable), background grey 7."
    cols = np.random.default_rng(seed).integers(1, 256, (s.n_instances + 1, 3)).astype(np.uint8); cols[0] = (7, 7, 7)
    return replace(s, image=cols[s.inst_map]), cols

def check_ids(inp, out):
    "Output ids are input ids renumbered in order, with their types; return the output's map in input ids."
    kept = out.meta['standard_augment']['kept']
    assert all(1 <= k <= inp.n_instances for k in kept) and np.all(np.diff(kept) > 0)
    out.validate()
    assert out.n_instances == len(kept)
    if inp.inst_types is not None: np.testing.assert_array_equal(out.inst_types, inp.inst_types[np.array(kept, int) - 1])
    return np.array([0, *kept], np.int64)[out.inst_map]


def test_importable_as_before():
    import nucbook.augment, nucbook.augment.mix
    assert nucbook.augment.mix.StandardAugment is StandardAugment is nucbook.augment.StandardAugment
    assert set(PROFILES) >= {'light', 'hovernet'}


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(48, 48), (40, 56)]), typed=st.booleans(),
       profile=st.sampled_from(['hovernet', 'light']))
def test_image_and_labels_move_together(seed, shape, typed, profile):
    "Nearest-neighbour image: every pixel shows the colour of the nucleus its label names (fill: label 0)."
    if profile == 'light': shape = (48, 48)  # the 8 symmetries of a non-square crop change its shape
    s = random_sample(seed, shape, typed)
    ps, cols = painted(s, seed)
    out = StandardAugment(profile=profile, colour=0, blur_p=0, interpolation='nearest')(ps, seed)
    orig = check_ids(s, out)
    fill = (out.image == 0).all(-1)
    assert not out.inst_map[fill].any()
    assert fill.mean() == out.meta['standard_augment']['fill_fraction']
    np.testing.assert_array_equal(out.image[~fill], cols[orig][~fill])


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31))
def test_bilinear_image_matches_inside_nuclei(seed):
    "The default bilinear image: exact colours on pixels 2 or more from another label and from the frame."
    s = random_sample(seed, (64, 64), n_max=20)
    ps, cols = painted(s, seed)
    out = StandardAugment(profile='hovernet', colour=0, blur_p=0)(ps, seed)
    orig = check_ids(s, out)
    inner = (ndi.minimum_filter(out.inst_map, 5, mode='constant', cval=-1) == ndi.maximum_filter(out.inst_map, 5)) & (out.inst_map > 0)
    np.testing.assert_array_equal(out.image[inner], cols[orig][inner])


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31), k=st.integers(0, 3))
def test_right_angles_and_flips_are_exact(seed, k):
    "Rotation by k x 90 degrees and the random flips: image and maps equal one and the same np.rot90/flip of the input."
    s = random_sample(seed, (32, 32))
    aug = StandardAugment(profile='hovernet', rotate=(90 * k, 90 * k), scale=(1, 1), translate=0, shear=0, colour=0, blur_p=0)
    out = aug(s, seed)
    hits = [g for g in D4 if np.array_equal(out.inst_map, d4(s.inst_map, *g)) and np.array_equal(out.image, d4(s.image, *g))]
    assert hits, 'no symmetry of the square gives both the image and the map'
    np.testing.assert_array_equal(out.type_map, d4(s.type_map, *hits[0]))
    assert out.meta['standard_augment']['fill_fraction'] == 0


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31), profile=st.sampled_from(['hovernet', 'light']))
def test_photometric_steps_leave_labels_alone(seed, profile):
    s = random_sample(seed)
    full, geo = StandardAugment(profile=profile, blur_p=1.0)(s, seed), StandardAugment(profile=profile, colour=0, blur_p=0)(s, seed)
    np.testing.assert_array_equal(full.inst_map, geo.inst_map); np.testing.assert_array_equal(full.type_map, geo.type_map)
    assert full.meta['standard_augment'] == geo.meta['standard_augment']
    assert not np.array_equal(full.image, geo.image)


def test_min_area_drops_only_cut_remnants():
    "Same draw with and without min_area: dropped = the kept nuclei under min_area that touch the fill or the frame."
    n_dropped = n_small_whole = 0
    for seed in range(30):
        s = random_sample(seed, (48, 48), n_max=20); min_area = 10 + seed % 40
        ps, _ = painted(s, seed)
        kw = dict(profile='hovernet', colour=0, blur_p=0, interpolation='nearest')
        a, b = StandardAugment(**kw)(ps, seed), StandardAugment(min_area=min_area, **kw)(ps, seed)
        la = np.array([0, *a.meta['standard_augment']['kept']], np.int64)[a.inst_map]
        fill = (a.image == 0).all(-1)
        edge = cv2.dilate(np.pad(fill.astype(np.uint8), 1, constant_values=1), np.ones((3, 3), np.uint8))[1:-1, 1:-1] > 0
        area = np.bincount(la.ravel(), minlength=s.n_instances + 1)
        small = [k for k in a.meta['standard_augment']['kept'] if area[k] < min_area]
        expect = [k for k in small if (edge & (la == k)).any()]
        assert b.meta['standard_augment']['dropped_small'] == expect
        assert b.meta['standard_augment']['kept'] == [k for k in a.meta['standard_augment']['kept'] if k not in expect]
        np.testing.assert_array_equal(check_ids(s, b), np.where(np.isin(la, expect), 0, la))
        n_dropped += len(expect); n_small_whole += len(small) - len(expect)
    assert n_dropped > 0 and n_small_whole > 0, (n_dropped, n_small_whole)  # both cases were met


def test_shear_is_along_x():
    "HoVer-Net's (imgaug's) shear moves pixels along x only: every output row holds input pixels of the same row."
    h = w = 40
    img = np.zeros((h, w, 3), np.uint8); img[..., 0] = np.arange(h)[:, None] + 1; img[..., 1] = 1
    s = make_sample(img, np.zeros((h, w), np.int32))
    for phi in (5, -5, 20):
        out = StandardAugment(profile='hovernet', shear=(phi, phi), rotate=0, scale=(1, 1), translate=0, flip_p=0,
                              colour=0, blur_p=0, interpolation='nearest')(s, 0)
        shown = out.image[..., 1] == 1
        assert out.meta['standard_augment']['fill_fraction'] > 0 and shown.mean() > 0.5
        np.testing.assert_array_equal(out.image[..., 0][shown], np.broadcast_to(np.arange(h)[:, None] + 1, (h, w))[shown])


def test_context_bound_is_safe_and_tight():
    "The worst draws (smallest scale, largest shear and shift, every rotation): no fill at `context(S)`; fill 8 px less."
    S = 64
    side = StandardAugment(profile='hovernet').context(S)  # 127; the worst draw below needs 122
    def worst_fill(n):
        s = make_sample(np.full((n, n, 3), 9, np.uint8), np.zeros((n, n), np.int32))
        return max(StandardAugment(profile='hovernet', size=S, scale=(0.8, 0.8), rotate=(r, r), shear=(sh, sh), translate=(t, t),
                                   flip_p=0, colour=0, blur_p=0)(s, 0).meta['standard_augment']['fill_fraction']
                   for r in range(0, 180, 4) for sh in (-5, 5) for t in (-0.01, 0.01))
    assert worst_fill(side) == 0 and worst_fill(side - 8) > 0


def test_one_seed_one_result():
    s = random_sample(3, (64, 64))
    aug = StandardAugment(profile='hovernet')
    a, b, c = aug(s, np.random.default_rng(11)), aug(s, 11), StandardAugment(profile='hovernet')(s, 11)
    for x in (b, c):
        np.testing.assert_array_equal(a.image, x.image); np.testing.assert_array_equal(a.inst_map, x.inst_map)
    assert len({aug(s, i).inst_map.tobytes() for i in range(8)}) == 8


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31), size=st.integers(16, 64))
def test_context_leaves_no_fill(seed, size):
    aug = StandardAugment(profile='hovernet', size=size)
    s = random_sample(seed, (aug.context(size),) * 2, n_max=40)
    out = aug(s, seed)
    assert out.shape == (size, size) and out.meta['standard_augment']['fill_fraction'] == 0
    check_ids(s, out)


def test_relabel_keeps_order_and_types():
    inst = np.array([[1, 2, 3, 4]], np.int32)
    s = make_sample(np.zeros((1, 4, 3), np.uint8), inst, inst_types={1: 4, 2: 3, 3: 2, 4: 1})
    m, tm, types, kept, dropped, fill = relabel_warped(np.array([[-1, 4, 0, 2]], np.int32), s)
    np.testing.assert_array_equal(m, [[0, 2, 0, 1]]); np.testing.assert_array_equal(types, [3, 1])
    np.testing.assert_array_equal(tm, [[0, 1, 0, 3]]); assert kept.tolist() == [2, 4] and fill == 0.25


@pytest.mark.parametrize('make,message', [
    (lambda: StandardAugment(profile='heavy'), 'unknown profile'),
    (lambda: StandardAugment(profile='hovernet', rotation=90), 'unknown profile entries'),
    (lambda: StandardAugment(flip_p=1.5), 'flip_p must be in [0, 1]'),
    (lambda: StandardAugment(colour=-1), 'colour must be >= 0'),
    (lambda: StandardAugment(min_area=-1), 'min_area must be >= 0'),
    (lambda: StandardAugment(fill=300), 'fill must be a grey level'),
    (lambda: StandardAugment(size=0), 'size must be >= 1'),
    (lambda: StandardAugment(profile='hovernet', rotate=(10, -10)), 'lo <= hi'),
    (lambda: StandardAugment(profile='hovernet', translate=0.4).context(64), 'no input side avoids the fill'),
])
def test_bad_settings(make, message):
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')): make()


def test_bad_input_names_the_sample():
    s = random_sample(5, (32, 32)); assert s.n_instances > 0
    with pytest.raises(LabelError, match=r'sample \(r5\): inst_map must be int32'):
        StandardAugment()(replace(s, inst_map=s.inst_map.astype(np.int64)), 0)
    with pytest.raises(LabelError, match='type_map disagrees'):
        StandardAugment()(replace(s, type_map=np.zeros_like(s.type_map)), 0)
    with pytest.raises(ValueError, match=r'sample \(r5\): 32x32 is smaller than the output size 48x48'):
        StandardAugment(profile='hovernet', size=48)(s, 0)


@lru_cache(maxsize=None)
def consep(root:str):
    from nucbook.data.datasets import load_dataset
    return load_dataset('consep_tiles', 'train', root=root, limit=24)


@pytest.mark.realdata
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_real_typed_tiles(data_root, seed):
    "CoNSeP tiles (typed, many touching nuclei): colours follow labels exactly; types follow ids; full profile valid."
    tiles = consep(str(data_root))
    s = tiles[seed % len(tiles)]
    ps, cols = painted(s, seed)
    out = StandardAugment(profile='hovernet', colour=0, blur_p=0, interpolation='nearest')(ps, seed)
    orig = check_ids(s, out)
    fill = (out.image == 0).all(-1)
    np.testing.assert_array_equal(out.image[~fill], cols[orig][~fill])
    check_ids(s, StandardAugment(profile='hovernet', min_area=10)(s, seed))
