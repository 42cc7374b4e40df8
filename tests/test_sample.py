"The sample conventions and label utilities every module relies on, and sample sets on disk."
import json, zipfile
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage as ndi
from dataclasses import replace
from nucbook.data.sample import (LabelError, check_sample, keep_largest_component, load_samples, make_sample,
                                 remove_small_instances, save_samples, to_inst_map, types_from_type_map, type_map_from_types)


def _largest_piece_loop(m):
    "Straightforward reference: for each id, label its pixels and keep the largest piece (first in raster order on ties)."
    out = m.copy()
    for i in np.unique(m)[1:]:
        lab, n = ndi.label(m == i, structure=np.ones((3, 3)))
        if n > 1:
            keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
            out[(lab > 0) & (lab != keep)] = 0
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), k=st.integers(1, 6))
def test_keep_largest_component_matches_reference_loop(seed, k):
    m = np.random.default_rng(seed).integers(0, k + 1, (20, 26)).astype(np.int32)
    assert np.array_equal(keep_largest_component(m), _largest_piece_loop(m))


def test_tie_keeps_first_piece_in_raster_order():
    m = np.array([[1, 0, 1]], np.int32)
    assert keep_largest_component(m).tolist() == [[1, 0, 0]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), min_area=st.integers(1, 6))
def test_make_sample_invariants_on_random_labels(seed, min_area):
    rng = np.random.default_rng(seed)
    raw = rng.choice([0, 3, 8, 20, 21], size=(16, 16)).astype(np.int64)
    types = {3: 1, 8: 2, 20: 3, 21: 4}
    s = make_sample(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), raw, inst_types=types, min_area=min_area)
    ids = np.unique(s.inst_map)[1:]
    assert list(ids) == list(range(1, s.n_instances + 1))
    assert (np.bincount(s.inst_map.ravel())[1:] >= min_area).all()
    assert np.array_equal(s.type_map, type_map_from_types(s.inst_map, s.inst_types))
    assert np.array_equal(types_from_type_map(s.inst_map, s.type_map), s.inst_types)


def test_to_inst_map_keeps_order_and_reports_original_ids():
    new, old = to_inst_map(np.array([[0, 40, 40], [7, 0, 12]], np.uint16))
    assert new.tolist() == [[0, 3, 3], [1, 0, 2]] and old.tolist() == [7, 12, 40]


def test_bad_labels_name_the_file():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(LabelError, match='x.tif: label map has dtype float32'):
        make_sample(img, np.zeros((4, 4), np.float32), meta={'source': 'x.tif'})
    with pytest.raises(LabelError, match='y.png: label map size 5x4'):
        make_sample(img, np.zeros((4, 5), np.int32), meta={'source': 'y.png'})
    with pytest.raises(LabelError, match='2 instance types for 1 instances'):
        make_sample(img, np.eye(4, dtype=np.int32), inst_types=[1, 2])


def test_remove_small_instances_renumbers():
    m = np.array([[5, 5, 0, 9], [5, 0, 0, 0]], np.int32)
    assert remove_small_instances(m, 2).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_one_validator_for_samples_and_augmentations():
    "`Sample.validate` and the augmentations' input check are the same `check_sample`: same rules, same messages."
    s = make_sample(np.zeros((3, 4, 3), np.uint8), np.array([[1, 1, 0, 2], [1, 0, 0, 2], [0, 0, 0, 0]]),
                    inst_types=[3, 1], meta={'source': 't.mat'})
    assert check_sample(s).tolist() == [7, 3, 2]
    cases = [(replace(s, inst_map=s.inst_map.astype(np.int64)), 'must be int32'),
             (replace(s, inst_map=np.where(s.inst_map == 1, 0, s.inst_map)), 'not contiguous'),
             (replace(s, inst_types=np.array([3, 1, 1])), '3 instance types for 2 instances'),
             (replace(s, type_map=s.type_map * 0), 'type_map disagrees'),
             (replace(s, inst_map=s.inst_map[:2]), 'but the image is')]
    for bad, msg in cases:
        with pytest.raises(LabelError, match=msg): bad.validate()
        with pytest.raises(LabelError, match=r'pool\[1\] \(t.mat\): .*' + msg): check_sample(bad, 'pool[1]')


def random_set(seed, n=4):
    "n samples of random labels and sizes, typed and untyped alternately, with meta JSON does not write as it is."
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        h, w = rng.integers(5, 30, 2)
        raw = rng.choice([0, 3, 8, 20], size=(h, w))
        types = {3: 1, 8: 2, 20: int(rng.integers(1, 5))} if i % 2 == 0 else None
        out.append(make_sample(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), raw, inst_types=types,
                               meta={'image_id': f'r{seed}-{i}', 'box': (int(h), int(w)), 'area': np.int64(h * w),
                                     'mean': np.float32(0.5)}))
    return out


@pytest.mark.parametrize('seed', range(3))
def test_sample_set_round_trip_is_exact(seed, tmp_path):
    samples = random_set(seed)
    path = save_samples(tmp_path/'a'/'set.npz', samples, {'seed': seed, 'sizes': (1, 2), 'lr': np.float64(0.1)})
    back, settings = load_samples(path)
    assert settings == {'lr': 0.1, 'seed': seed, 'sizes': [1, 2]} and len(back) == len(samples)
    for a, b in zip(samples, back):
        assert b.has_types == a.has_types
        for f in ('image', 'inst_map', 'type_map', 'inst_types'):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or (np.array_equal(x, y) and x.dtype == y.dtype), f
        assert b.meta == json.loads(json.dumps({**a.meta, 'area': int(a.meta['area']), 'mean': 0.5}))  # tuples as lists
    again = tmp_path/'again.npz'
    save_samples(again, back, settings)  # what was read back writes the same arrays again
    with np.load(path) as x, np.load(again) as y:
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def test_sample_set_of_the_layout_before_its_tag(tmp_path):
    "DiffMix's sets written before `save_samples` had its tag: the same arrays without 'format' and 'kind' are read."
    s = random_set(7, 1)[0]
    np.savez_compressed(tmp_path/'old.npz', settings=np.array('{"kind": "enlarging"}'), n=np.array(1), **{
        '0_image': s.image, '0_inst_map': s.inst_map, '0_type_map': s.type_map, '0_inst_types': s.inst_types,
        '0_meta': np.array(json.dumps({'image_id': 'x'}))})
    (b,), settings = load_samples(tmp_path/'old.npz')
    assert settings == {'kind': 'enlarging'} and np.array_equal(b.inst_types, s.inst_types) and b.meta == {'image_id': 'x'}
    with pytest.raises(ValueError, match="old.npz: a sample set of kind '', not 'k/1'"): load_samples(tmp_path/'old.npz', 'k/1')


def test_sample_set_errors_name_the_file(tmp_path):
    good = save_samples(tmp_path/'good.npz', random_set(1, 2), kind='k/1')
    with pytest.raises(FileNotFoundError, match='nothing.npz: no such sample set'): load_samples(tmp_path/'nothing.npz')
    # a damaged member inside an intact archive (the archive's checksum fails)
    with zipfile.ZipFile(good) as z: info = z.getinfo('0_image.npy')
    data = bytearray(good.read_bytes()); mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[mid] ^= 0xFF; (tmp_path/'damaged.npz').write_bytes(bytes(data))
    with pytest.raises(ValueError, match='damaged.npz: not a readable sample set'): load_samples(tmp_path/'damaged.npz')
    (tmp_path/'empty.npz').write_bytes(b'')
    with pytest.raises(ValueError, match='empty.npz: not a sample set'): load_samples(tmp_path/'empty.npz')
    with pytest.raises(ValueError, match="good.npz: a sample set of kind 'k/1', not 'k/2'"): load_samples(good, 'k/2')
    assert len(load_samples(good, 'k/1')[0]) == 2
    with pytest.raises(TypeError, match="x.npz: the extra array 'o' holds Python objects"):
        save_samples(tmp_path/'x.npz', [], extra={'o': np.array([{}, 1], dtype=object)})
    with pytest.raises(LabelError, match=r'x.npz: samples\[0\]: expected a nucbook Sample'): save_samples(tmp_path/'x.npz', [np.zeros(3)])
    assert not (tmp_path/'x.npz').exists()
