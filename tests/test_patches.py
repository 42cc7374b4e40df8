"Tests of nucbook.data.crops: cheap crops (exactly the old make_sample path), mirror padding, windows, random patches."
import importlib.util
from pathlib import Path
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nucbook.data import crops
from nucbook.data.crops import (crop_sample, pad_sample, pad_to, random_crop, random_patches, sliding_window_patches,
                                window_owner, window_starts)
from nucbook.data.sample import LabelError, Sample, make_sample, type_map_from_types
from nucbook.data.synth import synth_tile


def hand_sample():
    inst = np.zeros((10, 10), np.int32); inst[0:3, 0:3] = 1; inst[4:9, 4:9] = 2; inst[8:10, 0:1] = 3
    t = np.array([2, 3, 1], np.int32)
    img = np.arange(300, dtype=np.uint8).reshape(10, 10, 3)
    return Sample(img, inst, type_map_from_types(inst, t), t, {'image_id': 'h'}).validate()


# ---------------------------------------------------------------- references: the old path and the documented rule
def old_crop(s, y, x, h, w, min_area=0):
    "The trainer's crop before `crop_sample`: slice + `make_sample(..., type_map=...)` (renumber, re-vote, validate)."
    sl = np.s_[y:y + h, x:x + w]
    return make_sample(s.image[sl], s.inst_map[sl], type_map=None if s.type_map is None else s.type_map[sl],
                       meta={**s.meta, 'crop_box': (y, x, h, w)}, min_area=min_area)

# the old `random_crop`, verbatim: one copy, in the benchmark that times it against the new one
_spec = importlib.util.spec_from_file_location('bench_crop', Path(__file__).resolve().parents[1]/'benchmarks'/'bench_crop.py')
_bench = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_bench)
old_random_crop = _bench.old_random_crop

def cut_ids(s, y, x, h, w):
    "Ids crossing the window border (a pixel inside 8-adjacent to one of theirs outside), by 2-D shifts of the map."
    H, W = s.shape
    P = np.zeros((H + 2, W + 2), np.int64); P[1:-1, 1:-1] = s.inst_map # 0 beyond the image
    I = np.zeros((H + 2, W + 2), bool); I[1 + y:1 + y + h, 1 + x:1 + x + w] = True
    P, I = P[y:y + h + 2, x:x + w + 2], I[y:y + h + 2, x:x + w + 2] # the window and a 1-px ring
    out = set()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            Q, J = np.roll(P, (dy, dx), (0, 1)), np.roll(I, (dy, dx), (0, 1))
            out |= set(P[I & ~J & (P == Q) & (P > 0)].tolist())
    return out

def rule_crop(s, y, x, h, w, min_area):
    "The documented rule through the old path: zero the cut pieces smaller than `min_area`, then `make_sample`."
    win = s.inst_map[y:y + h, x:x + w]
    area = np.bincount(win.ravel())
    small = [k for k in cut_ids(s, y, x, h, w) if area[k] < min_area]
    inst = np.where(np.isin(win, small), 0, win)
    sl = np.s_[y:y + h, x:x + w]
    return make_sample(s.image[sl], inst, type_map=None if s.type_map is None else s.type_map[sl], meta=s.meta)

def assert_same_arrays(a, b):
    for k in ('image', 'inst_map', 'type_map', 'inst_types'):
        u, v = getattr(a, k), getattr(b, k)
        assert (u is None) == (v is None), k
        if u is not None: assert u.dtype == v.dtype and np.array_equal(u, v), k

def check_crop(c, parent):
    "Invariants of any crop: valid, ids contiguous, types and pixels those of the parent, own memory."
    c.validate()
    ids = np.unique(c.inst_map); ids = ids[ids > 0]; assert ids.tolist() == list(range(1, len(ids) + 1))
    y, x, h, w = c.meta['crop']; win = parent.inst_map[y:y + h, x:x + w]
    assert np.array_equal(c.image, parent.image[y:y + h, x:x + w]) and not np.shares_memory(c.image, parent.image)
    assert np.array_equal(c.inst_map > 0, (win > 0) & (c.inst_map > 0)) # labels only removed, never added
    old = np.zeros(c.n_instances + 1, np.int64); old[c.inst_map.ravel()] = win.ravel() # new id -> parent id
    fg = c.inst_map > 0; assert np.array_equal(old[c.inst_map][fg], win[fg]) # one parent nucleus per new id
    assert (np.diff(old[1:]) > 0).all() # renumbered in the order of the parent ids
    if parent.inst_types is not None: assert np.array_equal(c.inst_types, parent.inst_types[old[1:] - 1])


# ---------------------------------------------------------------- crop_sample
def test_crop_exact_values():
    s = hand_sample()
    c = crop_sample(s, 2, 2, 6, 8, min_area=4)
    assert c.n_instances == 1 and c.inst_types.tolist() == [3] and (c.inst_map == 1).sum() == 20
    assert np.array_equal(c.image, s.image[2:8, 2:10]) and c.meta['crop'] == (2, 2, 6, 8) and c.meta['parent'] == 'h'
    c = crop_sample(s, 2, 2, 6, 8, min_area=1) # the 1-px fragment of nucleus 1 is kept when min_area allows
    assert c.inst_types.tolist() == [2, 3]
    c = crop_sample(s, 0, 0, 10, 1, min_area=4) # nucleus 3 (2 px) lies wholly inside: kept; nucleus 1 cut to 3 px: dropped
    assert c.inst_types.tolist() == [1] and c.inst_map[8:10, 0].tolist() == [1, 1]
    c = crop_sample(s, 1, 1, 2, 2, min_area=5) # a crop inside nucleus 1: cut on every side, 4 px < 5
    assert c.n_instances == 0 and c.inst_types.tolist() == [] and not c.type_map.any()
    diag = Sample(s.image, np.eye(10, dtype=np.int32), np.eye(10, dtype=np.int32), np.array([1], np.int32)).validate()
    assert crop_sample(diag, 0, 0, 3, 3, min_area=4).n_instances == 0 # cut only diagonally at the corner: still cut

def test_crop_bad_input_names_the_image():
    s = hand_sample()
    for y, x, h, w in [(-1, 0, 4, 4), (0, -2, 4, 4), (5, 5, 6, 6), (0, 0, 11, 2), (0, 0, 0, 3)]:
        with pytest.raises(ValueError, match=rf'crop {h}x{w} at \(y={y}, x={x}\) does not fit in the 10x10 image h'):
            crop_sample(s, y, x, h, w)
    with pytest.raises(ValueError, match='image train_7'):
        random_crop(Sample(s.image[:1], s.inst_map[:1], meta={'image_id': 'train_7'}), 4, 0) # 1-px side: cannot mirror
    with pytest.raises(TypeError, match='takes a Sample'): crop_sample(s.image, 0, 0, 2, 2)

tiles = [synth_tile(i, size=80) for i in range(2)]
untyped = Sample(tiles[1].image, tiles[1].inst_map, meta={'image_id': 'u'})

@settings(max_examples=60, deadline=None)
@given(i=st.integers(0, 2), y=st.integers(0, 79), x=st.integers(0, 79), h=st.integers(1, 80), w=st.integers(1, 80),
       m=st.integers(0, 40))
def test_crop_equals_old_path_and_rule(i, y, x, h, w, m):
    s = [tiles[0], tiles[1], untyped][i]
    h, w = min(h, 80 - y), min(w, 80 - x)
    for ma in (0, 1): assert_same_arrays(crop_sample(s, y, x, h, w, min_area=ma), old_crop(s, y, x, h, w, ma))
    c = crop_sample(s, y, x, h, w, min_area=m)
    assert_same_arrays(c, rule_crop(s, y, x, h, w, m)); check_crop(c, s)
    win = s.inst_map[y:y + h, x:x + w]; area = np.bincount(win.ravel())
    whole_small = [k for k in np.unique(win) if k and area[k] < m and k not in cut_ids(s, y, x, h, w)]
    if not whole_small: assert_same_arrays(c, old_crop(s, y, x, h, w, m)) # the two rules differ only there

def diagonal_sample(flip):
    "Nuclei that are diagonal lines one pixel wide: connected only through corners (8-neighbourhood)."
    y, x = np.indices((7, 7)); d = (x - y) if not flip else (x + y)
    raw = np.where(d % 2 == 0, d // 2 + 10, 0)
    return make_sample(np.full((7, 7, 3), 200, np.uint8), raw, type_map=(raw % 3 + 1) * (raw > 0))

@pytest.mark.parametrize('flip', [False, True])
def test_cut_through_corners_every_window(flip):
    "Every window of a 7x7 map of diagonal nuclei: cut pieces are found through corners, at every border and edge."
    s = diagonal_sample(flip)
    for y in range(7):
        for x in range(7):
            for h in range(1, 8 - y):
                for w in range(1, 8 - x):
                    assert_same_arrays(crop_sample(s, y, x, h, w, min_area=50), rule_crop(s, y, x, h, w, 50))

def test_crop_rule_on_split_nucleus():
    "A nucleus in two pieces: the piece that does not cross the border leaves it uncut."
    inst = np.zeros((8, 8), np.int32); inst[1:3, 1:3] = 1; inst[5:8, 5:8] = 1; inst[0:2, 5:8] = 2
    s = Sample(np.zeros((8, 8, 3), np.uint8), inst).validate()
    assert crop_sample(s, 0, 0, 4, 4, min_area=5).n_instances == 1 # 4 px of nucleus 1, its piece does not cross
    # rows 1..7, columns 0..5: nucleus 1 shows 4 + 3 px and crosses at column 5; nucleus 2 shows 1 px and crosses
    assert crop_sample(s, 1, 0, 7, 6, min_area=5).inst_map.max() == 1 and (crop_sample(s, 1, 0, 7, 6, min_area=5).inst_map == 1).sum() == 7
    assert crop_sample(s, 1, 0, 7, 6, min_area=8).n_instances == 0

def test_check_flag_validates_again(monkeypatch):
    t = tiles[0]
    bad = Sample(t.image.astype(np.float32), t.inst_map, t.type_map, t.inst_types, {'image_id': 'f'})
    crop_sample(bad, 0, 0, 8, 8) # trusted: no validation per crop
    with pytest.raises(LabelError, match=r'\bf\b.*image must be uint8'): crop_sample(bad, 0, 0, 8, 8, check=True)
    monkeypatch.setattr(crops, 'CHECK_CROPS', True)
    with pytest.raises(LabelError): random_crop(bad, 8, 0)
    assert crop_sample(bad, 0, 0, 8, 8, check=False).shape == (8, 8)


# ---------------------------------------------------------------- random_crop
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), i=st.integers(0, 2), size=st.sampled_from([8, 24, 64, 80, 96, 200]),
       m=st.sampled_from([0, 1, 10, 30]))
def test_random_crop_invariants(seed, i, size, m):
    s = [tiles[0], tiles[1], untyped][i]
    c = random_crop(s, size, np.random.default_rng(seed), min_area=m)
    assert c.shape == (size, size)
    parent = pad_to(s, size, size)
    check_crop(c, parent)
    assert c.meta['image_id'] == s.meta['image_id'] and ('pad' in c.meta) == (size > 80)
    y, x, h, w = c.meta['crop']; assert_same_arrays(c, rule_crop(parent, y, x, h, w, m))
    if size <= 80 and m <= 1: # no padding: exactly the old random_crop, same draws
        assert_same_arrays(c, old_random_crop(s, size, np.random.default_rng(seed), m))

def test_random_crop_reproducible():
    a = [random_crop(tiles[0], 32, np.random.default_rng(3)).meta['crop'] for _ in range(2)]
    assert a[0] == a[1] and random_crop(tiles[0], 32, 3).meta['crop'] == a[0]


# ---------------------------------------------------------------- real data
@pytest.fixture(scope='module')
def real_samples():
    import os
    from pathlib import Path
    d = os.environ.get('NUCBOOK_DATA')
    if not d or not Path(d).is_dir(): pytest.skip('NUCBOOK_DATA is not set (real-data test)')
    from nucbook.data.datasets import load_dataset
    return {'consep': load_dataset('consep_tiles', 'train', root=d, limit=6), 'kumar': load_dataset('kumar', 'train', root=d, limit=2)}

@pytest.mark.realdata
@pytest.mark.parametrize('name', ['consep', 'kumar'])
def test_real_crops_equal_old_path(real_samples, name):
    rng = np.random.default_rng(0)
    samples = real_samples[name]
    assert samples[0].has_types == (name == 'consep')
    n_diff = 0
    for s in samples:
        H, W = s.shape
        for size in (256, 200, 97):
            for _ in range(3 if size == 256 else 2):
                y, x = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
                c0 = crop_sample(s, y, x, size, size, min_area=0)
                assert_same_arrays(c0, old_crop(s, y, x, size, size)); check_crop(c0, s)
                c = crop_sample(s, y, x, size, size, min_area=10)
                assert_same_arrays(c, rule_crop(s, y, x, size, size, 10)); check_crop(c, s)
                n_diff += c.n_instances != c0.n_instances
        seed = int(rng.integers(1 << 30)) # the trainer's call: the same crop as before
        assert_same_arrays(random_crop(s, 256, np.random.default_rng(seed)), old_random_crop(s, 256, np.random.default_rng(seed)))
    assert n_diff > 0 # min_area did drop cut slivers somewhere


# ---------------------------------------------------------------- padding
def old_pad(sample, t, b, l, r):
    "The former `pad_sample` (through `make_sample`)."
    H, W = sample.shape; n = sample.n_instances
    img = np.pad(sample.image, ((t, b), (l, r), (0, 0)), mode='reflect')
    inst = np.pad(sample.inst_map, ((t, b), (l, r)), mode='reflect').astype(np.int64)
    band_y = np.repeat(np.array([0, 1, 2]), [t, H, b]); band_x = np.repeat(np.array([0, 1, 2]), [l, W, r])
    region = band_y[:, None] * 3 + band_x[None, :]
    region = np.where(region == 4, 0, np.where(region > 4, region, region + 1))
    inst = np.where(inst > 0, inst + region * (n + 1), 0)
    types = {k + rg * (n + 1): int(sample.inst_types[k - 1]) for rg in range(9) for k in range(1, n + 1)}
    return make_sample(img, inst, inst_types=types)

def test_pad_sample_mirrors_and_gives_new_ids():
    s = hand_sample()
    p = pad_sample(s, (2, 1, 3, 0)); p.validate()
    assert p.shape == (13, 13) and p.meta['pad'] == (2, 1, 3, 0)
    assert np.array_equal(p.image, np.pad(s.image, ((2, 1), (3, 0), (0, 0)), mode='reflect'))
    assert np.array_equal(p.inst_map > 0, np.pad(s.inst_map, ((2, 1), (3, 0)), mode='reflect') > 0)
    assert np.array_equal(p.inst_map[2:12, 3:13], s.inst_map) # original nuclei keep their ids
    assert p.inst_map[0, 0] != p.inst_map[2, 3] # the mirrored corner nucleus is a different instance
    assert np.array_equal(p.type_map, np.pad(s.type_map, ((2, 1), (3, 0)), mode='reflect')) # mirrors keep their type
    for pad in [(2, 1, 3, 0), (4, 4, 4, 4), (0, 9, 9, 0)]: assert_same_arrays(pad_sample(s, pad), old_pad(s, *pad))
    assert_same_arrays(pad_sample(tiles[0], 30), old_pad(tiles[0], 30, 30, 30, 30))
    assert pad_sample(p, 1).meta['pad'] == (3, 2, 4, 1) # pads add up
    with pytest.raises(ValueError, match='reflect padding 10 of the 10x10 image h'): pad_sample(s, 10)
    with pytest.raises(ValueError, match='more than once'): pad_sample(s, (0, 11, 0, 0), mode='wrap')
    assert pad_sample(s, (0, 10, 0, 0), mode='symmetric').n_instances == 6
    with pytest.raises(ValueError, match='non-negative'): pad_sample(s, (1, -1, 0, 0))

def test_pad_to_is_the_one_padding():
    s = hand_sample()
    assert pad_to(s, 10, 4) is s
    q = pad_to(s, 40, 11); q.validate()
    assert q.shape == (40, 11) and q.meta['pad'] == (15, 15, 0, 1)
    assert np.array_equal(q.image[15:25, 0:10], s.image) and np.array_equal(q.inst_map[15:25, 0:10], s.inst_map)
    assert np.array_equal(q.image[:, 0:10], np.pad(s.image, ((15, 15), (0, 0), (0, 0)), mode='reflect'))
    assert len(np.unique(q.inst_map)) - 1 == q.n_instances
    a, b = random_crop(s, 16, 0), random_patches(s, 16, 1, 0)[0] # both go through pad_to
    assert a.meta['pad'] == b.meta['pad'] == (3, 3, 3, 3)


# ---------------------------------------------------------------- windows and patches
def test_random_patches_reproducible_and_valid():
    a = random_patches(tiles[0], 32, 6, rng=np.random.default_rng(7))
    b = random_patches(tiles[0], (32, 32), 6, rng=7)
    assert [x.meta['crop'] for x in a] == [x.meta['crop'] for x in b]
    for p in a: check_crop(p, tiles[0])
    big = random_patches(tiles[0], 100, 2, rng=0) # larger than the tile: mirror-padded first
    assert big[0].shape == (100, 100) and big[0].meta['pad'] == (10, 10, 10, 10)

@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 700), window=st.integers(1, 300), overlap=st.integers(0, 299))
def test_window_starts_cover_and_owner(length, window, overlap):
    if window > length or overlap >= window:
        with pytest.raises(ValueError): window_starts(length, window, overlap)
        return
    s = window_starts(length, window, overlap)
    assert s[0] == 0 and s[-1] + window == length and (np.diff(s) > 0).all() and (np.diff(s) <= window - overlap).all()
    own = window_owner(length, s, window)
    pos = np.arange(length)
    assert ((pos >= s[own]) & (pos < s[own] + window)).all() # each position lies in its owner
    assert (np.diff(own) >= 0).all() and set(own.tolist()) == set(range(len(s))) # owned runs in order, none empty
    d = np.abs(pos[:, None] + 0.5 - (s[None] + window / 2)); inside = (pos[:, None] >= s) & (pos[:, None] < s + window)
    assert (d[pos, own] <= np.where(inside, d, np.inf).min(1)).all() # owned by the nearest centre

def test_window_starts_examples():
    own = window_owner(512, window_starts(512, 256, 64), 256) # windows at 0, 192, 256: centres 128, 320, 384
    assert own[[0, 223, 224, 351, 352, 511]].tolist() == [0, 0, 1, 1, 2, 2]
    assert window_starts(100, 32, 8).tolist() == [0, 24, 48, 68] and window_starts(10, 4).tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match='pad the image'): window_starts(10, 20, 5)
    with pytest.raises(ValueError, match='overlap'): window_starts(100, 20, 20)

def test_sliding_windows_cover_with_overlap():
    w = sliding_window_patches(tiles[1], 40, overlap=20, pad=10)
    assert len(w) == 16 and {p.shape for p in w} == {(40, 40)}
    assert w[0].meta['window'] == (-10, -10) and w[-1].meta['window'] == (50, 50)
    padded = np.pad(tiles[1].image, ((10, 10), (10, 10), (0, 0)), mode='reflect')
    covered = np.zeros((80, 80), bool); owned = np.zeros((100, 100), int)
    for p in w:
        y, x = p.meta['window']
        assert np.array_equal(p.image, padded[y + 10:y + 50, x + 10:x + 50])
        covered[max(y, 0):y + 40, max(x, 0):x + 40] = True
        a, b, c, d = p.meta['own']; owned[y + 10 + a:y + 10 + b, x + 10 + c:x + 10 + d] += 1
    assert covered.all() and (owned == 1).all() # every pixel in some window, owned by exactly one
    assert len(sliding_window_patches(tiles[1], 80)) == 1
    with pytest.raises(ValueError, match='pad the image'): sliding_window_patches(tiles[1], 96)
