"""Gong et al.'s pre-synthesis (nucbook.augment.presynth): Eq. 1 on a hand-built case, exact labels on crowded generated
cases (overlapping, touching, border nuclei), the HED jitter, the background, determinism, bad input, real data, and the
benchmark's quick mode."""
import os, subprocess, sys
from dataclasses import replace
from pathlib import Path
import numpy as np
import cv2
import pytest
from skimage.color import rgb2hed, hed_from_rgb
from nucbook.data.sample import LabelError, check_sample, make_sample
from nucbook.data.synth import synth_tile
from nucbook.augment.canvas import check_record, unaccounted_nuclei
from nucbook.augment.mix import augment_set, load_augmented
from nucbook.augment.presynth import (LOG_ADJUST, PreSynthConfig, PreSynthesis, Warp, background, deform_instances,
                                      foreground, fuse, hed_jitter, hed_stains, nuclei_region, presynth_sample,
                                      presynthesize, warp_mask)

ROOT = Path(__file__).resolve().parents[1]


def rounding_bound(img):
    """Per pixel and HED channel, the largest concentration change that rounding `img` to uint8 can cause: each RGB value
    v is off by at most 0.5, so its optical density log(v/255)/log(1e-6) by at most 0.5 / ((v - 0.5) |log 1e-6|), and a
    concentration (a row of `hed_from_rgb` applied to the three densities) by the |row|-weighted sum."""
    dod = 0.5 / ((img.astype(float) - 0.5) * abs(LOG_ADJUST))
    return dod @ np.abs(hed_from_rgb) + 1e-9


def unclipped(*imgs):
    "Pixels no channel of which the clip to [0, 255] may have touched (the rounding bound holds there)."
    return np.logical_and.reduce([((i > 0) & (i < 255)).all(-1) for i in imgs])


def components(mask):
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


# ---------------------------------------------------------------- Eq. 1
def test_fuse_is_eq1_on_a_hand_built_4x4_case():
    B = np.zeros((4, 4, 3), np.uint8); N = np.zeros((4, 4, 3), np.uint8)
    B[..., 0] = [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111], [112, 113, 114, 115]]
    N[..., 0] = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    B[..., 1], N[..., 1] = 200, 50  # constant channels: which source a pixel took is plain to see
    B[..., 2], N[..., 2] = B[..., 0] + 40, N[..., 0] + 60
    M = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [3, 0, 2, 0], [3, 3, 0, 0]], np.int32)
    ID = fuse(B, N, M)
    assert ID.dtype == np.uint8 and ID.shape == (4, 4, 3)
    assert ID[..., 0].tolist() == [[100, 1, 2, 103], [104, 5, 6, 7], [8, 109, 10, 111], [12, 13, 114, 115]]
    assert ID[..., 1].tolist() == [[200, 50, 50, 200], [200, 50, 50, 50], [50, 200, 50, 200], [50, 50, 200, 200]]
    assert ID[..., 2].tolist() == [[140, 61, 62, 143], [144, 65, 66, 67], [68, 149, 70, 151], [72, 73, 154, 155]]


def test_fuse_refuses_mismatched_inputs():
    B = N = np.zeros((4, 4, 3), np.uint8); M = np.zeros((4, 4), np.int32)
    with pytest.raises(LabelError, match=r'fuse: N is 4x3 \(WxH\) but the instance map is 4x4'): fuse(B, N[:3], M)
    with pytest.raises(LabelError, match='fuse: B must be a uint8'): fuse(B.astype(np.float32), N, M)
    with pytest.raises(LabelError, match='fuse: M must be a 2-D integer array'): fuse(B, N, M.astype(float))
    with pytest.raises(LabelError, match='fuse: M has negative ids'): fuse(B, N, M - 1)


# ---------------------------------------------------------------- labels
CROWDED = [dict(seed=s, size=size, density=density, cluster_share=0.9)
           for s, size, density in ((0, 96, 2.5), (1, 96, 2.5), (2, 128, 3.0), (3, 80, 4.0), (4, 112, 2.0))]
CONFIGS = [PreSynthConfig(), PreSynthConfig(scale=(1.3, 1.8), deform=0.35), PreSynthConfig(scale=(0.5, 0.7), order='id')]


def check_labels(x, p):
    "Every label invariant of one pre-synthesis `p` of sample `x`."
    rec = check_record(p.record); st = rec['steps'][0]; M = p.inst_map; n = int(M.max())
    s = check_sample(p.to_sample(x))  # int32, ids 1..n' with no gap, types consistent
    assert M.dtype == np.int32 and np.array_equal(np.unique(M)[1:], np.arange(1, n + 1))
    assert n == x.n_instances - len(rec['dropped']) and unaccounted_nuclei(x, rec) == []
    assert len(rec['instances']) == n == len(p.warps)
    assert [r['area'] for r in rec['instances']] == s[1:].tolist()
    src = [r['source_id'] for r in rec['instances']]
    assert len(set(src)) == n and not set(src) & {d['source_id'] for d in rec['dropped']}  # nothing merged or duplicated
    assert [w.source_id for w in p.warps] == src
    if x.has_types: assert np.array_equal(p.inst_types, x.inst_types[np.array(src, int) - 1])
    else: assert p.inst_types is None
    for k in range(1, n + 1): assert components(M == k) == 1, f'nucleus {k} is in pieces'
    # refused nuclei keep their outline (op 'kept', identity warp) unless a later nucleus covered them (dropped)
    gone = {d['source_id'] for d in rec['dropped']}
    assert {r['source_id'] for r in rec['instances'] if r['op'] == 'kept'} == set(st['refused']) - gone
    assert all(w.op == 'kept' and w.scale == 1 and w.coef == () for w in p.warps if w.source_id in st['refused'])
    # clipped nuclei reach the border of M (or were covered later)
    edge = np.zeros(M.shape, bool); edge[[0, -1], :] = edge[:, [0, -1]] = True
    on_edge = {src[k - 1] for k in np.unique(M[edge]) if k}
    assert set(st['clipped']) - gone <= on_edge
    # Eq. 1, and N is 0 off the nuclei
    assert np.array_equal(p.image[M > 0], p.foreground[M > 0]) and np.array_equal(p.image[M == 0], p.background[M == 0])
    assert p.foreground[M == 0].max(initial=0) == 0
    return rec, st


def test_labels_exact_on_overlapping_touching_and_border_nuclei():
    seen = dict(clipped=0, cut=0, refused=0, redrawn=0, shrunk=0, grown=0)
    for i, kw in enumerate(CROWDED):
        x = synth_tile(**kw)
        for c in CONFIGS:
            p = presynthesize(x, i, c)
            rec, st = check_labels(x, p)
            seen['clipped'] += len(st['clipped']); seen['refused'] += len(st['refused']); seen['redrawn'] += st['redrawn']
            seen['cut'] += sum(r['cut'] for r in rec['instances'])
            seen['shrunk'] += sum(w.scale < 1 for w in p.warps); seen['grown'] += sum(w.scale > 1 for w in p.warps)
    assert min(seen.values()) > 0, seen  # each case the record knows about happened


def test_a_covered_nucleus_is_dropped_and_recorded():
    "A small nucleus beside a large one, both x2: painted in id order, the large one covers it; largest first, it stays."
    yy, xx = np.mgrid[:80, :80]; m = np.zeros((80, 80), np.int32)
    m[np.hypot(yy - 40, xx - 30) <= 15] = 2; m[np.hypot(yy - 40, xx - 48) <= 2.5] = 1
    x = make_sample(np.full((80, 80, 3), 200, np.uint8), m)
    p = presynthesize(x, 0, PreSynthConfig(scale=(2, 2), deform=0, order='id'))
    assert p.record['dropped'] == [{'source': 0, 'source_id': 1, 'area': 0, 'reason': 'covered', 'replaces': [0, 1]}]
    assert p.inst_map.max() == 1 and p.record['instances'][0]['source_id'] == 2
    check_labels(x, p)
    q = presynthesize(x, 0, PreSynthConfig(scale=(2, 2), deform=0))
    assert q.record['dropped'] == [] and [r['source_id'] for r in q.record['instances']] == [1, 2]
    assert q.record['instances'][1]['cut']  # the large one, with the small one on top
    check_labels(x, q)


def test_identity_settings_give_back_the_input():
    "s = 1, no deformation, no mask blur: M(x) = the input's labels; no blur or jitter: ID(x) = x on the nuclei."
    x = synth_tile(7, size=96, density=2.5, cluster_share=0.9)
    c = PreSynthConfig(scale=(1, 1), deform=0, mask_sigma=0, blur_sigma=0, h_alpha=(1, 1), h_beta=(0, 0), e_alpha=(1, 1), e_beta=(0, 0))
    p = presynthesize(x, 0, c)
    assert np.array_equal(p.inst_map, x.inst_map) and np.array_equal(p.inst_types, x.inst_types)
    assert {r['op'] for r in p.record['instances']} == {'deformed'} and not any(r['cut'] for r in p.record['instances'])
    fg = x.inst_map > 0
    assert np.abs(p.image[fg].astype(int) - x.image[fg]).max() <= 1  # the HED round trip: uint8 rounding only
    om = nuclei_region(x.inst_map, c.dilate)
    assert np.abs(p.image[~om].astype(int) - x.image[~om]).max() <= 1


def test_each_nucleus_carries_its_own_texture():
    "Nuclei painted in flat colours: every pixel of nucleus k of M shows the colour of the nucleus of x it came from."
    x = synth_tile(2, size=128, density=3.0, cluster_share=0.9)
    cols = np.random.default_rng(0).integers(40, 216, (x.n_instances + 1, 3)).astype(np.uint8); cols[0] = 255
    flat = replace(x, image=cols[x.inst_map])
    for c in (PreSynthConfig(), PreSynthConfig(scale=(1.3, 1.8), deform=0.35, blur_sigma=2.0)):
        M, w = deform_instances(x.inst_map, 1, c, x.inst_types)
        N = foreground(flat.image, x.inst_map, M, w, None, c, h_jitter=(1.0, 0.0))
        lab = np.r_[0, [v.source_id for v in w]][M]
        assert np.abs(N.astype(int) - cols[lab])[M > 0].max() <= 1


def test_warp_moves_the_outline_by_s_r_theta():
    w = Warp(1, (32.0, 32.0), 1.3, (0.2,), (0.0,))  # r = 1.2 along x, 0.8 along y
    assert np.allclose(w.radial(np.array([0, np.pi / 2, np.pi])), [1.2, 0.8, 1.2])
    qy, qx = w.source_points(np.array([32.0, 42.4]), np.array([47.6, 32.0]))
    assert np.allclose(qy, [32, 42]) and np.allclose(qx, [42, 32])
    yy, xx = np.mgrid[:65, :65]; disc = np.hypot(yy - 32, xx - 32) <= 12  # edge at 12.5 px
    mi, (y0, x0) = warp_mask(disc, (0, 0), w, mask_sigma=0)
    ys, xs = np.nonzero(mi)
    half = lambda v: (v.max() - v.min() + 1) / 2
    assert abs(half(xs[ys + y0 == 32]) - 1.56 * 12.5) <= 1 and abs(half(ys[xs + x0 == 32]) - 1.04 * 12.5) <= 1
    assert abs(ys.mean() + y0 - 32) <= 0.5 and abs(xs.mean() + x0 - 32) <= 0.5


# ---------------------------------------------------------------- HED
@pytest.mark.parametrize('img', [synth_tile(0, size=64).image,
                                 np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)])
def test_hed_jitter_with_alpha_1_beta_0_is_the_identity_up_to_rounding(img):
    "Tolerance: 1 grey level (the round trip is exact in float64 but for the 1e-6 floor of 0 and the final rounding)."
    for c in range(3): assert np.abs(hed_jitter(img, c, 1.0, 0.0).astype(int) - img).max() <= 1
    assert np.allclose(np.maximum(hed_stains(img), 0), rgb2hed(img), atol=1e-12)  # rgb2hed, without its clamp


@pytest.mark.parametrize('channel,alpha,beta', [(0, 1.3, 0.01), (0, 0.7, -0.004), (1, 1.25, 0.005)])
def test_hed_jitter_changes_one_channel_only(channel, alpha, beta):
    x = synth_tile(1, size=96).image
    j = hed_jitter(x, channel, alpha, beta)
    a, b, tol, ok = hed_stains(x), hed_stains(j), rounding_bound(j), unclipped(j)
    assert ok.sum() >= 1000  # enough pixels the clip to [0, 255] left alone (a negative shift whitens the pale ones)
    for c in range(3):
        want = alpha * a[..., c] + beta if c == channel else a[..., c]
        assert (np.abs(b[..., c] - want) <= tol[..., c])[ok].all(), c
    assert np.abs(b[..., channel] - a[..., channel])[ok].mean() > 5 * tol[..., channel][ok].mean()  # and it did change


def test_presynthesis_jitters_H_in_the_foreground_and_E_in_the_background():
    x = synth_tile(4, size=112, density=2.0); c = PreSynthConfig()
    p = presynthesize(x, 3, c)
    aH, bH = p.record['params']['h_jitter']; aE, bE = p.record['params']['e_jitter']
    assert c.h_alpha[0] <= aH <= c.h_alpha[1] and c.e_beta[0] <= bE <= c.e_beta[1]
    B0 = background(x.image, x.inst_map, c.dilate, c.radius, c.inpaint)
    a, b, tol, ok = hed_stains(B0), hed_stains(p.background), rounding_bound(p.background), unclipped(p.background)
    assert (np.abs(b[..., 1] - (aE * a[..., 1] + bE)) <= tol[..., 1])[ok].all()
    assert (np.abs(b - a)[..., [0, 2]] <= tol[..., [0, 2]])[ok].all()
    fg = p.inst_map > 0
    N0 = foreground(x.image, x.inst_map, p.inst_map, p.warps, None, c, h_jitter=(1.0, 0.0))[fg]
    N1 = p.foreground[fg]
    a, b, ok = hed_stains(N0), hed_stains(N1), unclipped(N0, N1)
    tol = rounding_bound(N0) + rounding_bound(N1)
    assert (np.abs(b[:, 0] - (aH * a[:, 0] + bH)) <= tol[:, 0])[ok].all()
    assert (np.abs(b - a)[:, 1:] <= tol[:, 1:])[ok].all()


# ---------------------------------------------------------------- B(x)
def test_background_inpaints_the_dilated_nuclei_and_nothing_else():
    x = synth_tile(3, size=128); m = x.inst_map
    for method in ('ns', 'telea'):
        B = background(x.image, m, dilate=2, radius=3, method=method)
        om = nuclei_region(m, 2)
        assert np.array_equal(B[~om], x.image[~om])  # outside: bit-identical
        assert (B[om] == x.image[om]).all(-1).mean() < 0.01  # inside: hardly a pixel left as it was
        h, hb = hed_stains(x.image)[..., 0], hed_stains(B)[..., 0]
        assert np.median(hb[m > 0]) < 1.5 * np.median(h[~om]) < np.median(h[m > 0]) / 5  # nuclei gone: background's H
    assert (nuclei_region(m, 2) & ~nuclei_region(m, 0)).any() and np.array_equal(nuclei_region(m, 0), m > 0)
    assert np.array_equal(background(x.image, np.zeros_like(m)), x.image)


# ---------------------------------------------------------------- determinism, samples, errors
def test_deterministic_per_seed_and_seeds_differ():
    x = synth_tile(6, size=96)
    a, b, c = presynthesize(x, 5), presynthesize(x, np.random.default_rng(5)), presynthesize(x, 6)
    for k in ('image', 'inst_map', 'background', 'foreground'): assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert a.record['steps'] == b.record['steps'] and a.record['params']['seed'] == 5 and b.record['params']['seed'] is None
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.inst_map, c.inst_map)


def test_samples_records_and_the_augmentation_interface(tmp_path):
    x = synth_tile(8, size=96)
    s = presynth_sample(x, 4)
    assert s.meta['presynth'] == {'method': 'gong-presynth', 'seed': 4, 'source_image_id': 'synth-8'}
    assert s.meta['image_id'] == 'synth-8~gong-presynth' and s.meta['augment'][-1]['sources'][0]['image_id'] == 'synth-8'
    untyped = make_sample(x.image, x.inst_map, meta={'image_id': 'u'})
    pu = presynthesize(untyped, 4)
    assert pu.inst_types is None and presynth_sample(untyped, 4).type_map is None
    assert np.array_equal(pu.inst_map, presynthesize(x, 4).inst_map)  # types ride along, they change nothing
    out = augment_set([x, untyped], PreSynthesis(scale=(0.7, 1.4)), n_per_sample=2, seed=1, out_dir=tmp_path)
    assert len(out) == 4 and [o.sample.meta['image_id'] for o in out][:2] == ['synth-8~gong-presynth0', 'u~gong-presynth0']
    back = load_augmented(tmp_path / 'aug_00000.npz')
    assert np.array_equal(back.sample.inst_map, out[0].sample.inst_map) and check_record(back.record)['method'] == 'gong-presynth'
    assert back.record['params']['config']['scale'] == [0.7, 1.4]


def test_bad_input_gives_clear_errors():
    x = synth_tile(1, size=64)  # 4 nuclei
    with pytest.raises(LabelError, match=r'inst_map is 64x64 \(WxH\) but the image is 63x64'):
        presynthesize(replace(x, image=x.image[:, :-1]), 0)
    with pytest.raises(LabelError, match=r'synth-1\): image must be uint8'):
        presynthesize(replace(x, image=x.image.astype(np.float32) / 255), 0)
    with pytest.raises(LabelError, match='inst_map must be int32'):
        presynthesize(replace(x, inst_map=x.inst_map.astype(np.int64)), 0)
    with pytest.raises(LabelError, match=r'background: image is 63x64 \(WxH\) but the instance map is 64x64'):
        background(x.image[:, :-1], x.inst_map)
    with pytest.raises(LabelError, match='background: image must be a uint8 H x W x 3 array, got float64'):
        background(x.image.astype(float), x.inst_map)
    with pytest.raises(LabelError, match='foreground: image must be a uint8'):
        foreground(x.image[..., :2], x.inst_map, x.inst_map, [], 0)
    gap = x.inst_map.copy(); gap[gap == 1] = 0
    with pytest.raises(LabelError, match='instance ids are not contiguous'): deform_instances(gap, 0)
    M, w = deform_instances(x.inst_map, 0)
    with pytest.raises(LabelError, match=f'M has {M.max()} nuclei but there are {len(w) - 1} warps'):
        foreground(x.image, x.inst_map, M, list(w)[:-1], 0)
    with pytest.raises(ValueError, match='channel must be 0'): hed_jitter(x.image, -1, 1, 0)
    with pytest.raises(ValueError, match='scale must be > 0'): PreSynthConfig(scale=(0, 1))
    with pytest.raises(ValueError, match="inpaint must be one of \\['ns', 'telea'\\]"): PreSynthConfig(inpaint='fmm')
    with pytest.raises(ValueError, match='method must be one of'): background(x.image, x.inst_map, method='fmm')


# ---------------------------------------------------------------- real data, benchmark
def test_labels_exact_on_a_monuseg_crop(data_root):
    from nucbook.data.datasets import load_dataset
    from nucbook.data.crops import crop_sample
    tile = load_dataset('kumar', 'train', root=data_root, limit=1)[0]
    for y, x0 in ((0, 0), (300, 300), (744, 744)):  # corners: border nuclei; the middle: a crowded region
        x = crop_sample(tile, y, x0, 256, 256)
        check_labels(x, presynthesize(x, y))


def test_benchmark_quick_mode_prints_a_row():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'NUCBOOK_DATA': '', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_presynth.py'), '--quick'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(l.split() for l in r.stdout.splitlines() if l.startswith('synthetic'))
    assert row[1] == '128' and float(row[3]) > 0 and len(row) == 10, r.stdout
