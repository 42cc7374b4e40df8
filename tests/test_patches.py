"Tests of nucbook.data.crops: cropping, mirror padding, random / sliding-window patches, NucleiDataset."
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from nucbook.data.crops import crop_sample, pad_sample, random_patches, sliding_window_patches, window_starts, NucleiDataset
from nucbook.data.sample import Sample, type_map_from_types
from nucbook.data.synth import synth_tile

def hand_sample():
    inst = np.zeros((10, 10), np.int32); inst[0:3, 0:3] = 1; inst[4:9, 4:9] = 2; inst[8:10, 0:1] = 3
    t = np.array([2, 3, 1], np.int32)
    img = np.arange(300, dtype=np.uint8).reshape(10, 10, 3)
    return Sample(img, inst, type_map_from_types(inst, t), t, {'image_id': 'h'}).validate()

def test_crop_exact_values():
    s = hand_sample()
    c = crop_sample(s, 2, 2, 6, 8, min_area=4)
    assert c.n_instances == 1 and c.inst_types.tolist() == [3] and (c.inst_map == 1).sum() == 20
    assert np.array_equal(c.image, s.image[2:8, 2:10]) and c.meta['crop'] == (2, 2, 6, 8) and c.meta['parent'] == 'h'
    c = crop_sample(s, 2, 2, 6, 8, min_area=1) # the 1-px fragment of nucleus 1 is kept when min_area allows
    assert c.inst_types.tolist() == [2, 3]
    with pytest.raises(ValueError, match='does not fit in the 10x10 image of h'):
        crop_sample(s, -1, 0, 4, 4)

tiles = [synth_tile(i, size=80) for i in range(2)]

@settings(max_examples=25, deadline=None)
@given(y=st.integers(0, 60), x=st.integers(0, 60), h=st.integers(1, 20), w=st.integers(1, 20), m=st.integers(0, 30))
def test_crop_invariants(y, x, h, w, m):
    s = tiles[0]
    c = crop_sample(s, y, x, h, w, min_area=m).validate()
    ids = np.unique(c.inst_map); assert ids.tolist() == list(range(len(ids))) # contiguous
    full = np.bincount(s.inst_map.ravel()); win = s.inst_map[y:y + h, x:x + w]
    kept = {o for o in np.unique(win) if o and ((win == o).sum() == full[o] or (win == o).sum() >= m)}
    assert c.n_instances == len(kept)
    for o in kept: # types follow their nuclei
        new = np.unique(c.inst_map[win == o]); assert len(new) == 1
        assert c.inst_types[new[0] - 1] == s.inst_types[o - 1]

def test_pad_sample_mirrors_and_gives_new_ids():
    s = hand_sample()
    p = pad_sample(s, (2, 1, 3, 0))
    assert p.shape == (13, 13) and p.meta['pad'] == (2, 1, 3, 0)
    assert np.array_equal(p.image, np.pad(s.image, ((2, 1), (3, 0), (0, 0)), mode='reflect'))
    assert np.array_equal(p.inst_map > 0, np.pad(s.inst_map, ((2, 1), (3, 0)), mode='reflect') > 0)
    assert p.inst_map[0, 0] != p.inst_map[2, 3] # the mirrored corner nucleus is a different instance
    # every instance keeps the type of the nucleus it mirrors
    mirrored = np.pad(s.type_map, ((2, 1), (3, 0)), mode='reflect')
    assert np.array_equal(p.type_map, mirrored)
    with pytest.raises(ValueError, match='mirror padding'):
        pad_sample(s, 10)

def test_random_patches_reproducible_and_valid():
    a = random_patches(tiles[0], 32, 6, rng=np.random.default_rng(7))
    b = random_patches(tiles[0], (32, 32), 6, rng=7)
    assert [x.meta['crop'] for x in a] == [x.meta['crop'] for x in b]
    for p in a:
        p.validate(); y, x, h, w = p.meta['crop']
        assert np.array_equal(p.image, tiles[0].image[y:y + h, x:x + w])
    big = random_patches(tiles[0], 100, 2, rng=0) # larger than the tile: mirror-padded first
    assert big[0].shape == (100, 100) and big[0].meta['pad'] == (10, 10, 10, 10)

def test_sliding_windows_cover_with_overlap():
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]
    with pytest.raises(ValueError): window_starts(10, 20, 5)
    w = sliding_window_patches(tiles[1], 40, 20, pad=10)
    assert len(w) == 16 and {p.shape for p in w} == {(40, 40)}
    assert w[0].meta['window'] == (-10, -10) and w[-1].meta['window'] == (50, 50)
    padded = np.pad(tiles[1].image, ((10, 10), (10, 10), (0, 0)), mode='reflect')
    for p in w:
        y, x = p.meta['window']
        assert np.array_equal(p.image, padded[y + 10:y + 50, x + 10:x + 50])
    covered = np.zeros((80, 80), bool) # every original pixel lies in some window
    for p in w:
        y, x = p.meta['window']; covered[max(y, 0):y + 40, max(x, 0):x + 40] = True
    assert covered.all()

def test_nuclei_dataset_items_and_transform():
    calls = []
    def transform(s, rng):
        calls.append(float(rng.random()))
        return Sample(s.image[::-1].copy(), s.inst_map[::-1].copy(), s.type_map[::-1].copy(), s.inst_types, s.meta)
    ds = NucleiDataset(tiles, patch_size=24, transform=transform, seed=1)
    it = ds[0]
    assert set(it) == {'image', 'inst_map', 'type_map', 'index'}
    assert it['image'].shape == (3, 24, 24) and it['image'].dtype == torch.float32 and 0 <= it['image'].min() <= it['image'].max() <= 1
    assert it['inst_map'].dtype == torch.int64 and it['type_map'].shape == (24, 24)
    assert torch.equal(ds[0]['image'], it['image']) and calls[0] == calls[1] # same (seed, epoch, index) -> same item
    ds.set_epoch(3); ds[0]; assert calls[2] != calls[0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch['image'].shape == (2, 3, 24, 24)
    whole = NucleiDataset(tiles)
    assert whole[1]['inst_map'].max() == tiles[1].n_instances
    bad = NucleiDataset(tiles, transform=lambda s, rng: s.image)
    with pytest.raises(TypeError, match='transform must return a Sample'): bad[0]
    untyped = Sample(tiles[0].image, tiles[0].inst_map)
    assert 'type_map' not in NucleiDataset([untyped])[0]
