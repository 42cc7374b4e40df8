"""Cell collections and the Table 1 operations (`nucbook.augment.cells`): multi-cell grouping on hand-built maps,
geometric operations that keep ids, counts and masks exact, photometric ones that never touch labels, the magnitude
map, noise pieces free of nuclei, determinism, clear errors; on synthetic tiles and one real DSB 2018 image."""
from functools import lru_cache
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from nucbook.augment.cells import (Cell, CellCollections, collections, multi_cell_groups, box_objects, noise_windows,
                                   OPERATIONS, MAGNITUDES, GEOMETRIC, PHOTOMETRIC, op_value, apply_op, apply_policy,
                                   OpRefused, pad_cell, cell_batch, rotate_size, read_noise_folder)
from nucbook.data.sample import LabelError, make_sample
from nucbook.data.synth import synth_dataset


@lru_cache(None)
def synth_cc(seed=0):
    tiles = synth_dataset(6, seed=11, size=160)
    return tiles, collections(tiles, n_noise=25, noise_size=20, seed=seed)


def toy(kind='multi'):
    "A bright ellipse (id 1) and a dimmer disc (id 2) on a dark, noisy field."
    yy, xx = np.mgrid[:30, :40]
    e = ((yy - 14) / 6) ** 2 + ((xx - 14) / 12) ** 2 <= 1
    d = (yy - 16) ** 2 + (xx - 31) ** 2 <= 36
    inst = np.zeros((30, 40), np.int32); inst[e] = 1; inst[d & ~e] = 2
    img = np.full((30, 40, 3), 20, np.uint8); img[inst == 1] = (200, 120, 220); img[inst == 2] = (120, 80, 160)
    img = (img + np.random.default_rng(0).integers(0, 25, img.shape)).astype(np.uint8)
    if kind == 'single': return Cell(img, (inst == 1).astype(np.int32), 'single', ('toy', (5,)))
    return Cell(img, inst, 'multi', ('toy', (3, 8)))


def long_axis(mask):
    "Angle (degrees, counter-clockwise, 0..180) of the mask's long axis, y pointing up."
    ys, xs = np.nonzero(mask)
    _, vec = np.linalg.eigh(np.cov(np.stack([xs, -ys])))
    return np.degrees(np.arctan2(vec[1, -1], vec[0, -1])) % 180


# ---------------------------------------------------------------- grouping

def test_groups_on_a_hand_built_map():
    L = np.zeros((14, 20), np.int32)
    L[2:4, 2:4] = 1; L[3:6, 3:5] = 2      # boxes share pixels
    L[6:8, 5:7] = 3                       # touches 2's box at a corner only
    L[2:4, 8:10] = 4                      # alone
    L[10:12, 2:4] = 5; L[10:12, 5:7] = 6  # one empty column apart
    L[9:11, 12:14] = 7; L[10:14, 14:16] = 8  # 8 reaches the last row: 7 and 8 dropped together
    L[5:7, 17:19] = 9; L[6:8, 18:20] = 10  # 10 reaches the last column
    assert multi_cell_groups(L) == [[1, 2, 3]]
    assert multi_cell_groups(L, touching=False) == [[1, 2]]
    groups, border = box_objects(L)
    assert groups == [[1, 2, 3], [4], [5], [6], [7, 8], [9, 10]]
    assert border == [False, False, False, False, True, True]


def test_transitive_chain_is_one_group():
    L = np.zeros((10, 24), np.int32)  # 1 meets 2, 2 meets 3, 3 meets 4; 1 and 4 are 8 columns apart
    L[2:4, 2:6] = 1; L[3:5, 5:9] = 2; L[4:6, 8:12] = 3; L[5:7, 11:15] = 4
    L[2:4, 18:21] = 5
    assert multi_cell_groups(L, touching=False) == [[1, 2, 3, 4]]
    assert multi_cell_groups(L) == [[1, 2, 3, 4]]
    perm = np.array([0, 4, 2, 5, 1, 3], np.int32)  # ids in another order: the same objects (1, 2, 3, 4 -> 4, 2, 5, 1)
    assert multi_cell_groups(perm[L]) == [[1, 2, 4, 5]]


def test_border_member_drops_the_whole_group():
    L = np.zeros((10, 10), np.int32)
    L[0:2, 3:5] = 1; L[1:4, 4:6] = 2; L[3:5, 5:7] = 3  # only 1 reaches row 0
    assert multi_cell_groups(L) == []
    L[0, 3:5] = 0  # now nothing reaches the border
    assert multi_cell_groups(L) == [[1, 2, 3]]


def test_groups_partition_synthetic_maps():
    for t in synth_dataset(3, seed=5, size=128):
        groups, _ = box_objects(t.inst_map)
        ids = sorted(i for g in groups for i in g)
        assert ids == list(range(1, t.n_instances + 1))
        sl = __import__('scipy.ndimage', fromlist=['x']).find_objects(t.inst_map)
        box = {i: (s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1) for i, s in enumerate(sl, 1)}
        meets = lambda a, b: (box[a][0] <= box[b][2] + 1 and box[b][0] <= box[a][2] + 1 and
                              box[a][1] <= box[b][3] + 1 and box[b][1] <= box[a][3] + 1)
        where = {i: k for k, g in enumerate(groups) for i in g}
        for a in box:  # boxes that meet are in one group
            for b in box:
                if a < b and meets(a, b): assert where[a] == where[b]


# ---------------------------------------------------------------- magnitudes

def test_op_value_ends_and_grid():
    ends = {'Rotate': (0, 30), 'Posterize': (8, 4), 'Contrast': (0.1, 1.9), 'Brightness': (0.1, 1.9),
            'Sharpness': (0.1, 1.9), 'Resize': (0.5, 1.5)}
    for name, (v0, v9) in ends.items():
        assert op_value(name, 0) == pytest.approx(v0) and op_value(name, 9) == pytest.approx(v9), name
    assert op_value('Rotate', 3) == pytest.approx(10) and op_value('Contrast', 5) == pytest.approx(1.1)
    assert op_value('Resize', 6) == pytest.approx(0.5 + 6 / 9)
    assert [op_value('Posterize', m) for m in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    for name in set(OPERATIONS) - set(ends): assert {op_value(name, m) for m in range(10)} == {None}
    assert OPERATIONS == ('FlipLR', 'FlipUD', 'AutoContrast', 'Equalize', 'Rotate', 'Posterize', 'Contrast',
                          'Brightness', 'Sharpness', 'Smooth', 'Resize') and MAGNITUDES == 10
    assert GEOMETRIC == {'FlipLR', 'FlipUD', 'Rotate', 'Resize'} and PHOTOMETRIC == set(OPERATIONS) - GEOMETRIC


def test_bad_input_errors():
    c = toy()
    with pytest.raises(ValueError, match="unknown operation 'Shear'"): apply_op(c, 'Shear', 1)
    for m in (-1, 10, 2.0, True, None):
        with pytest.raises(ValueError, match='Rotate: the magnitude must be an integer in 0..9'): apply_op(c, 'Rotate', m)
    with pytest.raises(ValueError, match='step 1 must be a'): apply_policy(c, [('FlipLR', 0), ('Rotate',)])
    with pytest.raises(ValueError, match="unknown operation 'Invert'"): apply_policy(c, [('Invert', 0)])
    with pytest.raises(ValueError, match="refused must be"): apply_policy(c, [], refused='ignore')
    with pytest.raises(LabelError, match=r"multi cell \(toy, ids \[3, 8\]\): inst is 40x30 \(WxH\) but the image is 40x29"):
        Cell(c.image[:29], c.inst, 'multi', ('toy', (3, 8)))
    with pytest.raises(LabelError, match='a noise piece holds no instance'): Cell(c.image, c.inst, 'noise', ('toy', (3, 8)))
    with pytest.raises(LabelError, match='bool'): Cell(c.image, c.inst, 'multi', ('toy', (3, 8)), valid=np.ones((30, 40)))
    with pytest.raises(TypeError, match='expected a Cell'): apply_op(c.image, 'FlipLR', 0)


# ---------------------------------------------------------------- geometric operations

@pytest.mark.parametrize('name', sorted(GEOMETRIC))
def test_geometric_keep_ids_and_counts(name):
    tiles, cc = synth_cc()
    for c in cc.single[:15] + cc.multi[:15] + [toy()]:
        for m in range(MAGNITUDES):
            try: o = apply_op(c, name, m)
            except OpRefused: assert name in ('Rotate', 'Resize'); continue
            assert sorted(set(np.unique(o.inst).tolist()) - {0}) == list(range(1, c.n + 1))  # ids exact: none new, none lost
            assert o.source == c.source and o.types == c.types and o.ops == ((name, m),)
            assert o.valid[o.inst > 0].all() and o.image.shape[:2] == o.inst.shape


def test_flips_are_exact():
    c = toy()
    f = apply_op(c, 'FlipLR', 4)
    assert np.array_equal(f.image, c.image[:, ::-1]) and np.array_equal(f.inst, np.fliplr(c.inst))
    ff = apply_op(f, 'FlipLR', 9)
    assert np.array_equal(ff.image, c.image) and np.array_equal(ff.inst, c.inst)
    u = apply_op(c, 'FlipUD', 0)
    assert np.array_equal(u.inst, np.flipud(c.inst)) and np.array_equal(apply_op(u, 'FlipUD', 0).image, c.image)


def test_rotate_moves_image_and_mask_together():
    c = toy()
    r0 = apply_op(c, 'Rotate', 0)
    assert np.array_equal(r0.image, c.image) and np.array_equal(r0.inst, c.inst)
    for m in (3, 6, 9):
        theta = op_value('Rotate', m)
        r = apply_op(c, 'Rotate', m)
        assert r.inst.shape == rotate_size(30, 40, theta)
        assert np.allclose(r.areas / c.areas, 1, atol=0.03)  # area kept
        assert long_axis(r.inst == 1) == pytest.approx(theta, abs=1.5)  # the ellipse turned counter-clockwise
        bright = r.image.mean(-1) > 80  # the image's object lies on the rotated labels (unrotated labels: IoU 0.4)
        assert (bright & (r.inst > 0)).sum() / (bright | (r.inst > 0)).sum() > 0.9
        assert r.valid.sum() == pytest.approx(30 * 40, abs=40)  # the whole crop is kept
    back = apply_op(c, 'Rotate', 9, rng=np.random.default_rng(1))
    dirs = {round(long_axis(apply_op(c, 'Rotate', 9, rng=s).inst == 1)) for s in range(10)}
    assert dirs == {30, 150}  # with an rng, both directions (+30 and -30 degrees)
    assert long_axis(apply_op(c, 'Rotate', 9, rng=3).inst == 1) == long_axis(apply_op(c, 'Rotate', 9, rng=3).inst == 1)
    assert back.ops == (('Rotate', 9),)


def test_rotated_noise_marks_its_padding():
    n = Cell(toy().image, np.zeros((30, 40), np.int32), 'noise', ('toy', ()))
    r = apply_op(n, 'Rotate', 9)
    assert not r.valid.all() and r.valid.sum() == pytest.approx(1200, abs=40)
    assert (r.image[~r.valid] == 0).all()


def test_resize_scales_areas():
    c = toy()
    for m in (0, 2, 7, 9):
        s = op_value('Resize', m); o = apply_op(c, 'Resize', m)
        assert o.inst.shape == (round(30 * s), round(40 * s))
        assert np.allclose(o.areas / c.areas, s * s, rtol=0.1)
        # pixel-exact: the labels are PIL's nearest-neighbour resize of the input labels
        ref = np.asarray(Image.fromarray(c.inst).resize(o.inst.shape[::-1], Image.NEAREST))
        assert np.array_equal(o.inst, ref)
    half = apply_op(c, 'Resize', 0)  # scale 1/2: every second pixel, and 2 x 2 means of the image
    assert np.array_equal(half.inst, c.inst[1::2, 1::2])
    assert np.abs(half.image.astype(int) - c.image.reshape(15, 2, 20, 2, 3).mean((1, 3))).max() <= 1


def test_resize_refuses_to_lose_an_instance():
    ti = np.zeros((7, 9), np.int32); ti[2, 2:7] = 1; ti[3, 2:7] = 2
    thin = Cell(np.zeros((7, 9, 3), np.uint8), ti, 'multi', ('thin', (1, 2)))
    with pytest.raises(OpRefused, match=r"multi cell \(thin, ids \[1, 2\]\): Resize \(m=0, 0.5\) would lose instance\(s\) \[2\]"):
        apply_op(thin, 'Resize', 0)
    with pytest.raises(OpRefused): apply_policy(thin, [('FlipUD', 1), ('Resize', 0)])
    kept = apply_policy(thin, [('FlipUD', 1), ('Resize', 0), ('Resize', 9)], refused='skip')
    assert kept.ops == (('FlipUD', 1), ('Resize', 9)) and kept.n == 2


# ---------------------------------------------------------------- photometric operations

@pytest.mark.parametrize('name', sorted(PHOTOMETRIC))
def test_photometric_touch_the_object_only(name):
    tiles, cc = synth_cc()
    for c in cc.single[:8] + cc.multi[:8] + [toy()]:
        out = c.inst == 0
        for m in range(MAGNITUDES):
            o = apply_op(c, name, m)
            assert np.array_equal(o.inst, c.inst) and np.array_equal(o.valid, c.valid)  # never the labels
            assert np.array_equal(o.image[out], c.image[out])  # nor the context
            assert o.ops == ((name, m),)
    c = toy()
    for m in range(MAGNITUDES):  # and they do change the object where they should
        changed = (apply_op(c, name, m).image != c.image).any()
        assert changed == (name != 'Posterize' or op_value('Posterize', m) < 8), (name, m)


def test_contrast_is_pils_on_a_whole_noise_piece():
    img = toy().image
    n = Cell(img, np.zeros((30, 40), np.int32), 'noise', ('toy', ()))
    for m in (0, 3, 9):
        f = op_value('Contrast', m)
        assert np.array_equal(apply_op(n, 'Contrast', m).image, np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(f)))
        assert np.array_equal(apply_op(n, 'Brightness', m).image, np.asarray(ImageEnhance.Brightness(Image.fromarray(img)).enhance(f)))


def test_contrast_uses_the_objects_mean():
    c = toy('single'); R = c.inst > 0
    o = apply_op(c, 'Contrast', 0)  # factor 0.1: the object's pixels go 90% of the way to its mean grey
    grey = np.asarray(Image.fromarray(c.image).convert('L'))[R].mean()
    assert abs(np.asarray(Image.fromarray(o.image).convert('L'))[R].mean() - grey) < 3
    assert abs(grey - np.asarray(Image.fromarray(c.image).convert('L')).mean()) > 30  # the crop's mean is far off


# ---------------------------------------------------------------- collections

def test_collections_match_their_sources():
    tiles, cc = synth_cc()
    assert isinstance(cc, CellCollections) and len(cc.single) > 20 and len(cc.multi) > 5 and len(cc.noise) == 25
    src = {t.meta['image_id']: t for t in tiles}
    for c in cc.single + cc.multi:
        s = src[c.source[0]]; y0, x0, y1, x1 = c.box
        lut = np.zeros(s.n_instances + 1, np.int32); lut[list(c.source[1])] = np.arange(1, c.n + 1)
        assert np.array_equal(c.inst, lut[s.inst_map[y0:y1, x0:x1]]) and np.array_equal(c.image, s.image[y0:y1, x0:x1])
        assert y0 > 0 and x0 > 0 and y1 < s.shape[0] and x1 < s.shape[1]
        assert c.areas.min() >= 10 and (c.kind == 'single') == (c.n == 1)
    for c in cc.single:
        y0, x0, y1, x1 = c.box
        assert set(np.unique(src[c.source[0]].inst_map[y0:y1, x0:x1]).tolist()) <= {0, c.source[1][0]}
    for c in cc.multi:
        assert sorted(c.source[1]) in multi_cell_groups(src[c.source[0]].inst_map)


def test_noise_pieces_hold_no_nucleus():
    tiles, cc = synth_cc()
    src = {t.meta['image_id']: t for t in tiles}
    seen = {}
    for c in cc.noise:
        s = src[c.source[0]]; y0, x0, y1, x1 = c.box
        assert (y1 - y0, x1 - x0) == (20, 20) and c.kind == 'noise' and not c.inst.any()
        assert not s.inst_map[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3].any()  # nor one within the margin
        assert np.array_equal(c.image, s.image[y0:y1, x0:x1])
        t = seen.setdefault(c.source[0], np.zeros(s.shape, int)); t[y0:y1, x0:x1] += 1
    assert max(t.max() for t in seen.values()) == 1  # pieces do not overlap


def test_collections_are_deterministic_per_seed():
    tiles, a = synth_cc(0)
    b = collections(tiles, n_noise=25, noise_size=20, seed=0)
    for x, y in zip(a.single + a.multi + a.noise, b.single + b.multi + b.noise):
        assert x.box == y.box and x.source == y.source and np.array_equal(x.image, y.image) and np.array_equal(x.inst, y.inst)
    assert len(a.noise + a.single + a.multi) == len(b.noise + b.single + b.multi)
    c = collections(tiles, n_noise=25, noise_size=20, seed=1)
    assert [x.box for x in c.noise] != [x.box for x in a.noise]
    assert [x.box for x in c.single + c.multi] == [x.box for x in a.single + a.multi]
    assert a.per_image == c.per_image


def test_counts_per_image():
    tiles, cc = synth_cc()
    for t, r in zip(tiles, cc.per_image):
        groups, border = box_objects(t.inst_map)
        assert r['nuclei'] == t.n_instances and r['border'] == sum(border)
        assert r['single'] + r['multi'] + r['small'] == sum(not e for e in border)
        assert r['single'] == sum(c.source[0] == r['image_id'] for c in cc.single)


def test_noise_folder(tmp_path):
    tiles, _ = synth_cc()
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(tmp_path / 'b.png')
    Image.fromarray(np.full((12, 12, 4), 60, np.uint8)).save(tmp_path / 'a.png')
    (tmp_path / 'notes.txt').write_text('not an image')
    got = collections(tiles[:1], n_noise=0, noise_folder=tmp_path).noise
    assert [c.source for c in got] == [('a.png', ()), ('b.png', ())] and got[1].image.shape == (20, 30, 3)
    (tmp_path / 'c.tif').write_bytes(b'garbage')
    with pytest.raises(LabelError, match=r'c\.tif: cannot read the noise image'): read_noise_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match='noise folder not found'): read_noise_folder(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images'): read_noise_folder(tmp_path / 'empty')


def test_collections_bad_input():
    tiles, _ = synth_cc()
    with pytest.raises(LabelError, match=r'samples\[0\]'): collections([tiles[0].image])
    with pytest.raises(LabelError, match='mix typed and untyped'):
        collections([tiles[0], make_sample(tiles[1].image, tiles[1].inst_map)])
    with pytest.raises(ValueError, match='min_area >= 1'): collections(tiles[:1], min_area=0)


def test_noise_windows_brute_force():
    rng = np.random.default_rng(0)
    L = (rng.random((20, 24)) < 0.02).astype(np.int32)
    for size, margin in ((4, 0), (5, 2)):
        free = noise_windows(L, size, margin)
        want = np.array([[not L[max(y - margin, 0):y + size + margin, max(x - margin, 0):x + size + margin].any()
                          for x in range(24 - size + 1)] for y in range(20 - size + 1)])
        assert np.array_equal(free, want)


# ---------------------------------------------------------------- autoencoder input

def test_pad_cell_and_batch():
    c = toy()
    im, mk = pad_cell(c, 64)
    assert np.array_equal(mk[17:47, 12:52], c.inst > 0) and mk.sum() == (c.inst > 0).sum() and not im[~mk].any()
    im, mk = pad_cell(c, 20)  # 30 x 40 -> 15 x 20, aspect kept
    ys, xs = np.nonzero(mk)
    assert xs.max() - xs.min() > ys.max() - ys.min() and mk.sum() / (c.inst > 0).sum() == pytest.approx(0.25, abs=0.03)
    b = cell_batch([c, toy('single')], 48)
    assert b.shape == (2, 3, 48, 48) and b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1
    assert np.array_equal(b[0], pad_cell(c, 48)[0].transpose(2, 0, 1) / np.float32(255))


# ---------------------------------------------------------------- real data

def test_real_dsb_image(data_root):
    from nucbook.data.datasets import load_dataset
    s = load_dataset('dsb2018', 'stage1_test', root=data_root, limit=1, labels='rle')[0]
    cc = collections([s], n_noise=10, noise_size=24)
    assert len(cc.single) + len(cc.multi) > 5
    H, W = s.shape
    for c in cc.single + cc.multi:
        y0, x0, y1, x1 = c.box
        assert y0 > 0 and x0 > 0 and y1 < H and x1 < W
        assert set(np.unique(s.inst_map[y0:y1, x0:x1][c.inst > 0]).tolist()) == set(c.source[1])
    for c in cc.noise:
        y0, x0, y1, x1 = c.box
        assert not s.inst_map[y0:y1, x0:x1].any()
    for c in (cc.single + cc.multi)[:20]:
        for name in OPERATIONS:
            o = apply_policy(c, [(name, 9), ('Rotate', 4)], refused='skip')
            assert sorted(set(np.unique(o.inst).tolist()) - {0}) == list(range(1, c.n + 1))
