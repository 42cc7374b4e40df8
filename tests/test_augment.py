"""Invariants of every augmentation (property-based, on synthetic and on real crops), the occlusion rule, the record
schema, exact hand-built cases, and errors on bad input."""
import json
from dataclasses import replace
from functools import lru_cache
from types import SimpleNamespace
import cv2
import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st
from scipy import ndimage as ndi
from nucbook.augment.canvas import Augmented, check_record, largest_piece, unlabelled_nucleus_pixels, unaccounted_nuclei
from nucbook.augment.mix import (MixUp, CutOut, CutMix, CowOut, CowMix, CopyPaste, GradMix, AUGMENTATIONS,
                             as_transform, augment_set, load_augmented, blend, erase, mask_mix, get_augmentation, median_at)
from nucbook.data.sample import Sample, LabelError, check_sample, make_sample, types_from_type_map
from datahelpers import random_sample

SETTINGS = dict(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def make_aug(name):
    "Every method, with settings that make it act on small random tiles."
    if name == 'gradmix': return GradMix(margin=4, area_ratio=1.0, min_area=4)
    if name == 'copypaste_rare': return CopyPaste(types=(1,), min_area=4)
    return AUGMENTATIONS[name](min_area=4)

METHODS = sorted(AUGMENTATIONS) + ['copypaste_rare']
TYPED_ONLY = {'gradmix', 'copypaste_rare'}

def donor_views(inp:Sample, rec:dict, pool) -> list:
    "The pixel-aligned donor images of a record (CutMix, CowMix, MixUp): what a pixel may show instead of the input."
    out = []
    for src in rec['sources'][1:]:
        if 'crop_xy' in src:
            (x0, y0), (h, w) = src['crop_xy'], inp.shape
            out.append(pool[src['pool_index']].image[y0:y0 + h, x0:x0 + w])
    return out

def rule_violations(inp:Sample, out:Augmented, pool) -> list:
    "Output nuclei that break the occlusion rule: cut, yet in several pieces or below min_area."
    s, rec, bad = out.sample, out.record, []
    for r in rec['instances']:
        if not r['cut']: continue
        src = rec['sources'][r['source']]
        if 'crop_xy' in src:  # a donor cropped to the sample's size entered the canvas as its view: compare to that
            (x0, y0), (h, w) = src['crop_xy'], inp.shape
            if r['area'] == int((pool[src['pool_index']].inst_map[y0:y0 + h, x0:x0 + w] == r['source_id']).sum()): continue
        if r['area'] < rec['min_area'] or largest_piece(s.inst_map == r['id']) != r['area']: bad.append(r)
    return bad

def check_invariants(inp:Sample, out:Augmented, pool, aug):
    s, rec = out.sample, out.record
    # image shape and dtype kept; labels valid
    assert s.image.shape == inp.image.shape and s.image.dtype == inp.image.dtype
    assert s.inst_map.dtype == np.int32 and s.inst_map.shape == inp.inst_map.shape
    area = check_sample(s); s.validate()
    n = s.n_instances
    assert set(np.unique(s.inst_map)) <= set(range(n + 1)) and (area[1:] > 0).all()  # contiguous 1..N
    # the occlusion rule: no input-nucleus pixel that still shows is labelled background (MixUp's labels='sample'
    # drops the donor's labels by design; the input's are all kept); cut nuclei are one piece of >= min_area
    assert unlabelled_nucleus_pixels(inp, out, donor_views(inp, rec, pool))[0] == 0
    assert rule_violations(inp, out, pool) == [] and unaccounted_nuclei(inp, rec) == []
    check_record(rec)
    if inp.has_types:
        assert s.has_types and len(s.inst_types) == n
        assert (s.type_map[s.inst_map == 0] == 0).all()
        for i in range(1, n + 1): assert len(np.unique(s.type_map[s.inst_map == i])) == 1  # constant within each
        assert np.array_equal(types_from_type_map(s.inst_map, s.type_map), s.inst_types)
    else: assert s.type_map is None and s.inst_types is None
    # provenance agrees with the labels
    json.dumps(rec)
    assert rec['method'] == aug.name and rec['sources'][0]['image_id'] == inp.meta['image_id']
    rows = rec['instances']
    assert [r['id'] for r in rows] == list(range(1, n + 1))
    for r, sl in zip(rows, ndi.find_objects(s.inst_map)):
        assert r['box'] == [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
        assert r['area'] == area[r['id']]
        assert r['type'] == (int(s.inst_types[r['id'] - 1]) if s.has_types else None)
        src = inp if r['source'] == 0 else pool[rec['sources'][r['source']]['pool_index']]
        assert 1 <= r['source_id'] <= src.n_instances  # pasted / mixed ids exist in their source
        if src.has_types: assert src.inst_types[r['source_id'] - 1] == r['type']
        if r['op'] == 'kept' and not r['cut']:  # untouched instances keep their exact mask
            assert np.array_equal(s.inst_map == r['id'], inp.inst_map == r['source_id'])
        if r['op'] == 'mixed' and not r['cut']:  # donors are aligned (same size here)
            assert np.array_equal(s.inst_map == r['id'], src.inst_map == r['source_id'])
        if r['op'] in ('pasted', 'replaced'): assert r['source'] > 0 or aug.name == 'gradmix'
        if r['op'] == 'replaced': assert r['replaces'][0] == 0 and 1 <= r['replaces'][1] <= inp.n_instances
    for d in rec['dropped']:  # covered entirely, or a remnant (pieces each below min_area) removed from view
        assert 0 <= d['source'] < len(rec['sources']) and (d['area'] == 0) == (d['reason'] == 'covered')
    kept_src = {(r['source'], r['source_id']) for r in rec['instances'] if r['op'] in ('kept', 'mixed')}
    assert not any((d['source'], d['source_id']) in kept_src for d in rec['dropped'] if 'replaces' not in d)
    assert s.meta['augment'][-1] == rec

@pytest.mark.parametrize('name', METHODS)
@settings(**SETTINGS)
@given(seed=st.integers(0, 10 ** 6), aug_seed=st.integers(0, 2 ** 32 - 1), typed=st.booleans(),
       shape=st.sampled_from([(32, 32), (48, 40), (64, 64)]))
def test_invariants(name, seed, aug_seed, typed, shape):
    typed = typed or name in TYPED_ONLY
    inp = random_sample(seed, shape, typed)
    pool = [random_sample(seed + k, shape, typed) for k in range(1, 4)]
    aug = make_aug(name)
    out = aug(inp, aug_seed, pool)
    check_invariants(inp, out, pool, aug)
    again = aug(inp, aug_seed, pool)  # same seed, identical output
    assert np.array_equal(out.sample.image, again.sample.image) and np.array_equal(out.sample.inst_map, again.sample.inst_map)
    assert out.record == again.record

@pytest.mark.parametrize('name', ['mixup', 'cutmix'])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10 ** 6), aug_seed=st.integers(0, 2 ** 32 - 1), k=st.integers(2, 5))
def test_batch_invariants(name, seed, aug_seed, k):
    batch = [random_sample(seed + i, (40, 40)) for i in range(k)]
    aug = make_aug(name); outs = aug.batch(batch, aug_seed)
    assert len(outs) == k and len({json.dumps(o.record['params']) for o in outs}) == 1  # one lam / box per batch
    partners = [o.record['sources'][1]['pool_index'] for o in outs]
    assert sorted(partners) == list(range(k)) and all(p != i for i, p in enumerate(partners))
    for inp, out in zip(batch, outs): check_invariants(inp, out, batch, aug)

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10 ** 6), min_area=st.integers(0, 30))
def test_mask_mix_region_grows_only_over_what_the_rule_removes(seed, min_area):
    "The donor region used contains the drawn mask; what it adds are pieces of the sample's nuclei or whole donor nuclei."
    a, b = random_sample(seed, (40, 40), n_max=20), random_sample(seed + 1, (40, 40), n_max=20)
    mask = np.random.default_rng(seed).random((40, 40)) < 0.5
    mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3) > 0.5
    got = mask_mix(a, b, mask, min_area=min_area, pool_index=0)
    check_invariants(a, got, [b], SimpleNamespace(name='cutmix', min_area=min_area))
    lab = got.sample.inst_map; donor_ids = {r['id']: r['source_id'] for r in got.record['instances'] if r['source'] == 1}
    sample_ids = {r['id']: r['source_id'] for r in got.record['instances'] if r['source'] == 0}
    for i, sid in sample_ids.items(): assert not ((lab == i) & mask).any() and ((lab == i) <= (a.inst_map == sid)).all()
    for i, sid in donor_ids.items(): assert ((lab == i) <= (b.inst_map == sid)).all()
    grown = got.record['steps'][0]['grown_px']
    assert grown >= 0 and got.record['steps'][0]['fraction'] == pytest.approx(mask.mean() + grown / mask.size)
    # the region grew only over pieces of the sample's nuclei and over whole donor nuclei
    whole = [sid for i, sid in donor_ids.items() if not got.record['instances'][i - 1]['cut']]
    changed = ~mask & (got.sample.image != a.image).any(-1)
    assert ((a.inst_map[changed] > 0) | np.isin(b.inst_map[changed], whole)).all()

# ---- exact hand-built cases
def hand_pair():
    ia = np.zeros((8, 8), np.int32); ia[1:3, 1:7] = 1; ia[5:8, 5:8] = 2
    ib = np.zeros((8, 8), np.int32); ib[4:8, 0:4] = 1; ib[0:2, 6:8] = 2
    a = make_sample(np.full((8, 8, 3), 200, np.uint8), ia, inst_types={1: 2, 2: 3}, meta={'image_id': 'a'})
    b = make_sample(np.full((8, 8, 3), 40, np.uint8), ib, inst_types={1: 1, 2: 4}, meta={'image_id': 'b'})
    return a, b

def test_cutout_known_box():
    a, _ = hand_pair()
    box = np.zeros((8, 8), bool); box[0:4, 4:8] = True  # cuts nucleus 1 in half; nucleus 2 untouched
    r = erase(a, box, fill=(1, 2, 3), min_area=1)
    exp = np.zeros((8, 8), np.int32); exp[1:3, 1:4] = 1; exp[5:8, 5:8] = 2
    assert np.array_equal(r.sample.inst_map, exp) and r.sample.inst_types.tolist() == [2, 3]
    assert (r.sample.image[box] == [1, 2, 3]).all() and (r.sample.image[~box] == 200).all()
    assert [(x['cut'], x['area']) for x in r.record['instances']] == [(True, 6), (False, 9)]
    r = erase(a, box, min_area=7)  # the 6-pixel half is erased too (not left showing unlabelled), nucleus 2 renumbered 1
    assert r.sample.n_instances == 1 and r.sample.inst_types.tolist() == [3]
    assert r.record['dropped'] == [{'source': 0, 'source_id': 1, 'area': 6, 'reason': 'small'}]
    assert (r.sample.image[1:3, 1:4] == 0).all() and r.record['steps'][0]['grown_px'] == 6

def test_cutout_class_erases_its_recorded_box():
    s = random_sample(5, (64, 64))
    for seed in range(10):
        r = CutOut(fill=0, min_area=4)(s, seed)
        x0, y0, x1, y1 = r.record['params']['box']
        inside = np.zeros((64, 64), bool); inside[y0:y1, x0:x1] = True
        assert (r.sample.image[inside] == 0).all() and (r.sample.inst_map[inside] == 0).all()
        # outside the box only invalid pieces of cut nuclei are erased (the region grew over them)
        changed = ~inside & (r.sample.image != s.image).any(-1)
        assert (s.inst_map[changed] > 0).all() and (r.sample.image[changed] == 0).all()
        assert int(changed.sum()) == r.record['steps'][0]['grown_px']

def test_cutmix_hand_made():
    a, b = hand_pair()
    box = np.zeros((8, 8), bool); box[3:8, 0:6] = True
    r = mask_mix(a, b, box, min_area=1)
    # a's nucleus 2 (rows 5-7, cols 5-7) loses cols 5 -> keeps rows 5-7, cols 6-7; b's nucleus 1 fully inside the box
    exp = np.zeros((8, 8), np.int32); exp[1:3, 1:7] = 1; exp[5:8, 6:8] = 2; exp[4:8, 0:4] = 3
    assert np.array_equal(r.sample.inst_map, exp)
    assert r.sample.inst_types.tolist() == [2, 3, 1]
    assert [(x['source'], x['source_id'], x['op'], x['cut']) for x in r.record['instances']] == \
        [(0, 1, 'kept', False), (0, 2, 'kept', True), (1, 1, 'mixed', False)]
    assert (r.sample.image[box] == 40).all() and (r.sample.image[~box] == 200).all()

def test_mixup_union_and_weights():
    a, b = hand_pair()
    r = blend(a, b, 0.75, min_area=1)
    assert (r.sample.image == round(0.75 * 200 + 0.25 * 40)).all()
    # a's nuclei on top; b's nucleus 1 loses its pixel under... none overlap a's, b's nucleus 2 overlaps a's nucleus 1? no
    exp = a.inst_map.copy(); exp[(b.inst_map == 1) & (exp == 0)] = 3; exp[(b.inst_map == 2) & (exp == 0)] = 4
    assert np.array_equal(r.sample.inst_map, exp) and r.sample.inst_types.tolist() == [2, 3, 1, 4]
    assert r.record['params']['lam'] == 0.75

def test_copypaste_hand_made():
    tgt = make_sample(np.full((20, 20, 3), 230, np.uint8), np.zeros((20, 20), np.int32), inst_types={})
    dm = np.zeros((12, 12), np.int32); dm[2:6, 3:7] = 1; dm[8:11, 8:11] = 2
    dimg = np.full((12, 12, 3), 100, np.uint8); dimg[dm == 1] = (10, 20, 30)
    donor = make_sample(dimg, dm, inst_types={1: 1, 2: 3}, meta={'image_id': 'd'})
    r = CopyPaste(n_paste=(1, 1), scale=(1, 1), types=(1,), flip=False, min_area=1)(tgt, 0, [donor])
    assert r.sample.n_instances == 1 and r.sample.inst_types.tolist() == [1]
    x0, y0 = r.record['steps'][0]['pastes'][0]['xy']
    assert r.record['steps'][0]['pastes'][0]['id'] == 1
    exp = np.zeros((20, 20), np.int32); exp[y0:y0 + 4, x0:x0 + 4] = 1
    assert np.array_equal(r.sample.inst_map, exp)
    assert (r.sample.image[exp == 1] == (10, 20, 30)).all() and (r.sample.image[exp == 0] == 230).all()
    assert r.record['instances'][0] | {} == {'id': 1, 'source': 1, 'source_id': 1, 'op': 'pasted', 'cut': False,
                                             'area': 16, 'box': [x0, y0, x0 + 4, y0 + 4], 'type': 1}

def test_copypaste_occludes():
    "A nucleus pasted over a target nucleus takes its pixels; the target keeps the rest or is dropped."
    tm = np.zeros((10, 10), np.int32); tm[:, :] = 1
    tgt = make_sample(np.zeros((10, 10, 3), np.uint8), tm, inst_types={1: 2})
    dm = np.zeros((6, 6), np.int32); dm[1:5, 1:5] = 1
    donor = make_sample(np.full((6, 6, 3), 9, np.uint8), dm, inst_types={1: 1})
    r = CopyPaste(n_paste=(1, 1), scale=(1, 1), flip=False, min_area=1)(tgt, 0, [donor])
    assert r.sample.n_instances == 2 and (r.sample.inst_map == 2).sum() == 16 and (r.sample.inst_map == 1).sum() == 84
    assert r.record['instances'][0]['cut'] and r.sample.inst_types.tolist() == [2, 1]

def test_gradmix_hand_made():
    inst = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]; inst[(yy - 40) ** 2 + (xx - 40) ** 2 <= 144] = 1; inst[10:15, 10:15] = 2
    img = np.full((64, 64, 3), 220, np.uint8); img[inst == 1] = (90, 40, 120); img[inst == 2] = (30, 10, 60)
    g = make_sample(img, inst, inst_types={1: 2, 2: 1}, meta={'image_id': 'g'})
    r = GradMix(margin=5, fraction=1.0, min_area=1)(g, 0)
    exp = np.zeros((64, 64), np.int32); exp[38:43, 38:43] = 1; exp[10:15, 10:15] = 2
    assert np.array_equal(r.sample.inst_map, exp) and r.sample.inst_types.tolist() == [1, 1]
    assert r.record['instances'][0]['centroid'] == [40.0, 40.0]
    rp = r.record['steps'][0]['replacements']
    assert len(rp) == 1 and rp[0]['id'] == 1 and rp[0]['source_id'] == 2 and rp[0]['centroid_before'] == [40.0, 40.0]
    # no rare nucleus of its own: the pool's one replaces the SMALLER of two major nuclei (ascending size order)
    inst2 = inst.copy(); inst2[inst2 == 2] = 0; inst2[(yy - 15) ** 2 + (xx - 15) ** 2 <= 100] = 2
    g2 = make_sample(img, inst2, inst_types={1: 2, 2: 3}, meta={'image_id': 'g2'})
    pm = np.zeros((64, 64), np.int32); pm[30:34, 30:35] = 1
    p = make_sample(np.full((64, 64, 3), 50, np.uint8), pm, inst_types={1: 1}, meta={'image_id': 'p'})
    r = GradMix(margin=5, fraction=1.0, min_area=1)(g2, 0, [p])
    assert r.record['params']['n_replaced'] == 1 and r.sample.inst_types.tolist() == [2, 1]
    assert r.record['sources'][1]['image_id'] == 'p' and (r.sample.inst_map == 2).sum() == 20
    assert np.array_equal(r.sample.inst_map == 1, inst2 == 1)  # the larger one is untouched
    assert r.record['instances'][1]['centroid'] == [15.0, 14.5]  # 4 rows: shifted by whole pixels, centre at half a pixel

def test_median_at_matches_scipy():
    rng = np.random.default_rng(0); ch = rng.integers(0, 256, (25, 31)).astype(np.uint8); where = rng.random((25, 31)) < 0.4
    fp = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11)).astype(bool)
    assert np.array_equal(median_at(ch, where, fp), ndi.median_filter(ch, footprint=fp, mode='reflect')[where])

# ---- online and offline use
def test_transform_hook_and_offline_set(tmp_path):
    pool = [random_sample(i, (32, 32)) for i in range(4)]
    t = as_transform(CowMix(min_area=4), pool)
    out = t(pool[0], np.random.default_rng(1))
    assert isinstance(out, Sample) and out.meta['augment'][-1]['method'] == 'cowmix'
    assert np.array_equal(out.inst_map, t(pool[0], np.random.default_rng(1)).inst_map)
    assert as_transform(CowMix(), pool, p=0.0)(pool[0], np.random.default_rng(0)) is pool[0]
    A = augment_set(pool[:2], GradMix(margin=4, area_ratio=1.0), n_per_sample=2, seed=3, pool=pool, out_dir=tmp_path)
    files = sorted(tmp_path.glob('aug_*.npz')); assert len(files) == 4
    for a, f in zip(A, files):
        b = load_augmented(f)
        assert np.array_equal(a.sample.image, b.sample.image) and np.array_equal(a.sample.type_map, b.sample.type_map)
        assert a.record == b.record and b.sample.meta['image_id'] == a.sample.meta['image_id']
    B = augment_set(pool[:2], GradMix(margin=4, area_ratio=1.0), n_per_sample=2, seed=3, pool=pool)
    assert all(np.array_equal(a.sample.inst_map, b.sample.inst_map) for a, b in zip(A, B))

# ---- bad input
def test_bad_input_raises_clear_errors():
    s = random_sample(1, (32, 32)); pool = [random_sample(2, (32, 32))]
    with pytest.raises(LabelError, match='but the image is'): CutOut()(replace(s, inst_map=s.inst_map[:30]), 0)
    with pytest.raises(LabelError, match='dtype float64'): CutOut()(replace(s, inst_map=s.inst_map.astype(float)), 0)
    with pytest.raises(LabelError, match='pool\\[0\\].*dtype float64'):
        CutMix()(s, 0, [replace(pool[0], inst_map=pool[0].inst_map.astype(float))])
    with pytest.raises(LabelError, match='expected a nucbook Sample'): MixUp()(s.image, 0, pool)
    for name in ('mixup', 'cutmix', 'cowmix', 'copypaste'):
        for empty in ([], None):
            with pytest.raises(ValueError, match='needs a non-empty pool'): get_augmentation(name)(s, 0, empty)
        with pytest.raises(ValueError, match='needs a non-empty pool'): as_transform(get_augmentation(name))
    with pytest.raises(LabelError, match='smaller than the 32x32 sample'): CutMix()(s, 0, [random_sample(3, (20, 40))])
    untyped = random_sample(4, (32, 32), typed=False)
    with pytest.raises(LabelError, match='cannot mix a typed sample with an untyped one'): CowMix()(s, 0, [untyped])
    with pytest.raises(LabelError, match='GradMix needs typed'): GradMix()(untyped, 0)
    with pytest.raises(LabelError, match='needs a typed sample'): CopyPaste(types=(1,))(untyped, 0, [s])
    with pytest.raises(LabelError, match='disagrees'): CutOut()(replace(s, type_map=s.type_map * 0 + 1), 0)
    with pytest.raises(ValueError, match='at least 2'): CutMix().batch([s])
    with pytest.raises(ValueError, match="labels must be"): MixUp(labels='soft')(s, 0, pool)
    with pytest.raises(ValueError, match='mask has shape'): erase(s, np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match='unknown augmentation'): get_augmentation('mosaic')

def test_larger_donor_is_cropped():
    s = random_sample(1, (32, 32)); big = random_sample(2, (64, 80))
    r = CutMix(min_area=4)(s, 0, [big])
    x0, y0 = r.record['sources'][1]['crop_xy']
    assert 0 <= x0 <= 48 and 0 <= y0 <= 32
    for row in r.record['instances']:
        if row['op'] == 'mixed' and not row['cut']:
            assert np.array_equal(r.sample.inst_map == row['id'], big.inst_map[y0:y0 + 32, x0:x0 + 32] == row['source_id'])


# ---- the occlusion rule, the record schema, typed/untyped, on real crops
@pytest.mark.parametrize('name', METHODS)
def test_record_schema(name):
    inp = random_sample(7, (48, 48)); pool = [random_sample(8 + k, (48, 48)) for k in range(3)]
    rec = make_aug(name)(inp, 0, pool).record
    check_record(rec)
    assert list(rec)[:7] == ['method', 'params', 'min_area', 'sources', 'instances', 'dropped', 'steps']
    assert rec['sources'][0]['role'] == 'sample' and all(s['role'] == 'donor' for s in rec['sources'][1:])
    for r in rec['instances']: assert r['op'] in ('kept', 'mixed', 'pasted', 'replaced') and len(r['box']) == 4
    if name.startswith('gradmix'): assert all('centroid' in r for r in rec['instances'])

@pytest.mark.parametrize('name', ['mixup', 'cutmix', 'cowmix', 'copypaste'])
def test_typed_and_untyped_never_mix(name):
    typed, untyped = random_sample(1, (32, 32)), random_sample(2, (32, 32), typed=False)
    aug = get_augmentation(name)
    with pytest.raises(LabelError, match=r'pool\[0\].*cannot mix a typed sample with an untyped one'): aug(typed, 0, [untyped])
    with pytest.raises(LabelError, match='cannot mix an untyped sample with a typed one'): aug(untyped, 0, [typed])

@lru_cache(maxsize=None)
def real_sets(root:str):
    "A slice of the CoNSeP training tiles (typed, 256 x 256) and of the Kumar training images (untyped, 1000 x 1000)."
    from nucbook.data.datasets import load_dataset
    return load_dataset('consep_tiles', 'train', root=root, limit=48), load_dataset('kumar', 'train', root=root, limit=4)

REAL = [('copypaste', 'consep'), ('copypaste', 'kumar'), ('cutmix', 'consep'), ('cutmix', 'kumar'), ('gradmix', 'consep'),
        ('cowmix', 'kumar'), ('cutout', 'kumar'), ('cowout', 'consep')]

@pytest.mark.realdata
@pytest.mark.parametrize('name,data', REAL)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31))
def test_occlusion_invariant_on_real_crops(data_root, name, data, seed):
    "Random 256 x 256 crops: no input-nucleus pixel that still shows is labelled background; cut nuclei are valid."
    from nucbook.data.crops import random_crop
    consep, kumar = real_sets(str(data_root))
    pool = consep if data == 'consep' else kumar
    rng = np.random.default_rng(seed)
    inp = random_crop(pool[int(rng.integers(len(pool)))], 256, rng)
    out = get_augmentation(name)(inp, rng, pool)
    errors, shown = unlabelled_nucleus_pixels(inp, out, donor_views(inp, out.record, pool))
    assert errors == 0, (errors, shown)  # shown can be 0: a mix box may cover every nucleus of a sparse crop (then all are recorded)
    assert rule_violations(inp, out, pool) == [] and unaccounted_nuclei(inp, out.record) == []
    check_record(out.record)

@pytest.mark.realdata
def test_occlusion_invariant_when_a_mix_covers_every_nucleus(data_root):
    "A CoNSeP crop with two nuclei whose CutMix box covers both (found by a random draw that once failed CI)."
    from nucbook.data.crops import random_crop
    consep, _ = real_sets(str(data_root))
    rng = np.random.default_rng(25088)
    inp = random_crop(consep[int(rng.integers(len(consep)))], 256, rng)
    out = get_augmentation('cutmix')(inp, rng, consep)
    assert inp.n_instances == 2 and unlabelled_nucleus_pixels(inp, out, donor_views(inp, out.record, consep)) == (0, 0)
    assert unaccounted_nuclei(inp, out.record) == [] and rule_violations(inp, out, consep) == []

# ---------------------------------------------------------------- a budget of rare nuclei (insert_rare)

from nucbook.augment.canvas import Canvas
from nucbook.augment.mix import Augmentation, insert_rare, rare_change

def test_rare_change_counts_from_the_record():
    a, b = hand_pair()  # a: nuclei of types 2, 3; b: types 1 (rare), 4
    box = np.zeros((8, 8), bool); box[3:8, 0:6] = True  # b's rare nucleus comes in, a's type-3 nucleus is cut but kept
    r = mask_mix(a, b, box, min_area=1)
    assert rare_change(a, r, 1) == {'added': 1, 'lost': 0, 'new_ids': [3], 'kept': {1: 1, 2: 2}}
    assert rare_change(a, r, (1, 3))['added'] == 1 and rare_change(a, r, 3)['added'] == 0
    box = np.zeros((8, 8), bool); box[4:8, 4:8] = True  # a's type-3 nucleus goes under the box; nothing rare comes in
    r = mask_mix(a, b, box, min_area=1)
    assert {k: rare_change(a, r, 3)[k] for k in ('added', 'lost')} == {'added': 0, 'lost': 1}
    with pytest.raises(ValueError, match='positive type id'): rare_change(a, r, 0)

class Stamp(Augmentation):
    "Pastes `per_call` 3x3 rare squares (type 1) into the free slots of a 12x12 image: two slots per image."
    name = 'stamp'
    def __init__(self, per_call=1): super().__init__(min_area=1); self.per_call = per_call
    def apply(self, sample, area, rng, pool):
        c = Canvas(sample, area, 1); src = c.add_source(None, 'stamp', image_id='stamp'); n = 0
        for y, x in ((4, 4), (8, 8)):
            if n < self.per_call and not sample.inst_map[y:y + 3, x:x + 3].any():
                n += c.paste(np.ones((3, 3), bool), y, x, src, 1, type=1, pixels=np.zeros((3, 3, 3), np.uint8)) is not None
        return c.finish(self.name, self.config())

def stamp_set(n=3):
    out = []
    for i in range(n):
        inst = np.zeros((12, 12), np.int32); inst[0:2, 0:2] = 1; types = {1: 2}
        if i == 0: inst[0:2, 9:11] = 2; types[2] = 1
        out.append(make_sample(np.full((12, 12, 3), 200, np.uint8), inst, inst_types=types, meta={'image_id': f's{i}'}))
    return out

def n_rare(samples, rare=(1,)): return sum(int(np.isin(s.inst_types, rare).sum()) for s in samples)

def test_insert_rare_hand_built_known_count():
    S = stamp_set()
    out, rep = insert_rare(Stamp(), S, 5, rare=1, seed=3)
    assert (rep['inserted'], rep['applications'], rep['passes'], rep['lost'], rep['exhausted'], rep['stopped']) == (5, 5, 2, 0, False, 'k reached')
    assert rep['per_pass'] == [3, 2] and n_rare(out) == 1 + 5 and n_rare(S) == 1
    order = np.random.default_rng([3, 0]).permutation(3).tolist()
    assert [r['index'] for r in rep['log']] == order + np.random.default_rng([3, 1]).permutation(3).tolist()[:2]
    assert sorted(rep['inserted_ids']) == sorted([i, j] for i, s in enumerate(out) for j in range(1, s.n_instances + 1)
                                                  if s.inst_types[j - 1] == 1 and not (i == 0 and j == 2))
    assert [len(s.meta.get('augment', [])) for s in out] == [sum(r['index'] == i for r in rep['log']) for i in range(3)]
    # 2 per call and 3 wanted: the second call would overshoot and is refused (Stamp cannot be bounded)
    _, rep = insert_rare(Stamp(per_call=2), S, 3, rare=1, seed=0)
    assert rep['inserted'] == 2 and rep['refused']['overshoot'] >= 2 and rep['exhausted']

def test_insert_rare_exhausted_terminates():
    _, rep = insert_rare(Stamp(), stamp_set(), 100, rare=1, seed=0, max_passes=50)
    assert (rep['inserted'], rep['passes'], rep['exhausted'], rep['per_pass']) == (6, 3, True, [3, 3, 0])
    no_rare = [random_sample(s, (48, 48), rare_share=0.0) for s in range(4)]
    for aug in (CutMix(min_area=4), CopyPaste(types=(1,), min_area=4), GradMix(margin=4, area_ratio=1.0, min_area=4)):
        out, rep = insert_rare(aug, no_rare, 10, rare=1, seed=0)
        assert (rep['inserted'], rep['applications'], rep['passes'], rep['exhausted']) == (0, 0, 1, True)
        assert all(o is s for o, s in zip(out, no_rare))

def comparator_set():
    return [random_sample(s, (64, 64), n_max=20, rare_share=0.3) for s in range(6)]

@pytest.mark.parametrize('aug', [CutMix(min_area=4), CopyPaste(types=(1,), min_area=4), GradMix(margin=4, area_ratio=1.0, min_area=4)],
                         ids=['cutmix', 'copypaste', 'gradmix'])
def test_insert_rare_comparators(aug):
    S = comparator_set()
    out, rep = insert_rare(aug, S, 7, rare=1, seed=5)
    assert rep['inserted'] == 7 and rep['stopped'] == 'k reached' and len(out) == len(S)
    assert [s.meta['image_id'] for s in out] == [s.meta['image_id'] for s in S]  # same order
    for s in out:
        check_sample(s); s.validate()
        assert np.array_equal(types_from_type_map(s.inst_map, s.type_map), s.inst_types)
    assert n_rare(out) == n_rare(S) + rep['inserted'] - rep['lost']
    assert all(out[i].inst_types[j - 1] == 1 for i, j in rep['inserted_ids'])
    assert sum(r['added'] for r in rep['log']) == 7 and rep['applications'] == len(rep['log'])
    out2, rep2 = insert_rare(aug, S, 7, rare=1, seed=5)  # reproducible from the seed
    assert rep2 == rep and all(np.array_equal(a.image, b.image) and np.array_equal(a.inst_map, b.inst_map) for a, b in zip(out, out2))
    _, rep3 = insert_rare(aug, S, 7, rare=1, seed=6)
    assert rep3['log'] != rep['log']
    json.dumps(rep)

def test_insert_rare_capped_methods_and_bad_input():
    assert CopyPaste(n_paste=(2, 5)).capped(3).n_paste == (2, 3) and CopyPaste(n_paste=(2, 5)).capped(1).n_paste == (1, 1)
    cp = CopyPaste(n_paste=(1, 4)); assert cp.capped(4) is cp and CutMix().capped(1) is None
    g = GradMix(); assert g.capped(2).max_replace == 2 and g.max_replace is None and GradMix(max_replace=1).capped(5).max_replace == 1
    S = stamp_set()
    with pytest.raises(ValueError, match=r'CopyPaste\(types=\(1,\)\)'): insert_rare(CopyPaste(), S, 2, rare=1)
    with pytest.raises(ValueError, match='not one of the rare types'): insert_rare(GradMix(rare_type=3), S, 2, rare=1)
    with pytest.raises(ValueError, match='k must be'): insert_rare(Stamp(), S, -1, rare=1)
    with pytest.raises(LabelError, match=r'samples\[0\] \(u\): insert_rare needs typed samples'):
        insert_rare(Stamp(), [make_sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), meta={'image_id': 'u'})], 1, rare=1)

class StampCover(Stamp):
    "Each call also pastes a type-2 square over the top-left nucleus, which drops it: the ids of what stays shift down."
    name = 'stampcover'
    def apply(self, sample, area, rng, pool):
        c = Canvas(sample, area, 1); src = c.add_source(None, 'stamp', image_id='stamp')
        c.paste(np.ones((2, 2), bool), 0, 0, src, 2, type=2, pixels=np.full((2, 2, 3), 9, np.uint8))
        for y, x in ((4, 4), (8, 8)):
            if not sample.inst_map[y:y + 3, x:x + 3].any():
                c.paste(np.ones((3, 3), bool), y, x, src, 1, type=1, pixels=np.zeros((3, 3, 3), np.uint8)); break
        return c.finish(self.name, self.config())

def test_insert_rare_follows_inserted_nuclei_through_later_applications():
    out, rep = insert_rare(StampCover(), stamp_set(), 6, rare=1, seed=0)
    assert (rep['inserted'], rep['applications'], rep['passes'], rep['lost']) == (6, 6, 2, 0)
    own = int(out[0].inst_map[0, 9])  # image 0's own rare nucleus, renumbered from 2 to 1 by the first cover
    assert own == 1 and out[0].inst_types[own - 1] == 1
    expect = sorted([i, j] for i, s in enumerate(out) for j in range(1, s.n_instances + 1) if s.inst_types[j - 1] == 1 and (i, j) != (0, own))
    assert sorted(rep['inserted_ids']) == expect and len(expect) == 6
    assert all(out[i].inst_types[j - 1] == 1 for i, j in rep['inserted_ids'])
