"""InsMix: SSD constraints, instance-correct copy-paste, background perturbation, smooth-GAN parts, resume, interface,
the occlusion invariant on real crops."""
import json, os, subprocess, sys
from smoke import run_smoke
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st
from nucbook.data.sample import Sample, LabelError, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.augment.canvas import InstanceBank, check_record, largest_piece, unlabelled_nucleus_pixels, unaccounted_nuclei
from nucbook.augment.mix import as_transform, augment_set, load_augmented
from nucbook.engine.loop import step_seed
import nucbook.methods.insmix as insmix_module
from nucbook.methods.insmix import (f_scale, f_shape, f_dis, ssd_satisfied, ssd_copy_paste, pasted_mask,
                            background_perturbation, foreground_similarity, SmoothGenerator, PatchDiscriminator,
                            GatedConv2d, composite, l1_distance, triplet_loss_D, adversarial_loss_G, generator_loss,
                            train_smooth_gan, load_generator, smooth, InsMix, SSD_DEFAULTS, gan_batch, to_tensor_image,
                            to_uint8_image, INSMIX_KUMAR, INSMIX_CPS, INSMIX_CPS_FOLDS, INSMIX_TABLES, COMPARATOR)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiles(): return synth_dataset(3, 'train', seed=0, size=128)


@pytest.fixture(scope='module')
def bank(tiles): return InstanceBank.from_samples(tiles)


def disk(shape, cy, cx, r):
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


# ---------------------------------------------------------------- SSD constraint functions (Eqs. 1-2)
def test_ssd_functions_known_values():
    a = np.zeros((20, 20), bool); a[5:11, 5:11] = True          # 36 px square, centroid (7.5, 7.5)
    b = np.zeros((9, 30), bool); b[3:6, 2:14] = True            # 36 px 3x12 bar in another frame
    assert f_scale(a, b) == 1.0
    # aligned: the 3x12 bar over the 6x6 square overlaps 3x6 = 18 px -> |a - b| = 18 + 18 = 36 -> 36/36
    assert f_shape(a, b) == pytest.approx(1.0)
    c = np.zeros((4, 4), bool); c[1:4, 1:4] = True              # 9 px
    assert f_scale(a, c) == 4.0 == f_scale(c, a)
    assert f_shape(a, c) == pytest.approx((36 - 9) / 36)        # c lies inside a once aligned
    far = np.zeros((20, 20), bool); far[14:20, 14:20] = True
    assert f_shape(a, far, align=False) == 2.0 and f_shape(a, far) == 0.0
    assert f_dis(a, far) == pytest.approx(np.hypot(9, 9))
    assert f_dis((0, 0), (3, 4)) == 5.0
    assert f_scale(10, 25) == 2.5
    # alignment moves the template onto the original's centroid: an L of 5 px against a 2x2 square in another frame.
    # L = {(0,0),(1,0),(2,0),(2,1),(2,2)}, centroid (1.4, 0.6); square centroid (0.5, 0.5) -> shift round(0.9, 0.1) = (1, 0)
    L = np.zeros((3, 3), bool); L[:, 0] = True; L[2, :] = True
    sq2 = np.zeros((2, 2), bool); sq2[:] = True
    # the square lands on (1..2, 0..1): overlap {(1,0),(2,0),(2,1)} = 3 -> |L - sq| = 5 + 4 - 6 = 3 -> 3 / 5
    assert f_shape(L, sq2) == pytest.approx(3 / 5) and f_shape(sq2, L) == pytest.approx(3 / 5)
    assert f_shape(L, L) == 0.0 and f_scale(L, sq2) == 5 / 4


def test_ssd_disks_and_bounds():
    d1, d2 = disk((41, 41), 20, 20, 8), disk((41, 41), 20, 20, 4)
    s = f_shape(d1, d2)
    assert s == pytest.approx((d1.sum() - d2.sum()) / d1.sum())  # concentric: the small disk lies inside
    far = np.roll(d2, 15, 1)  # disjoint where they are: every pixel of both differs
    assert f_shape(d1, far, align=False) == (d1.sum() + d2.sum()) / d1.sum() and f_shape(d1, far) == s
    assert f_dis(d1, far) == 15.0
    assert ssd_satisfied(2.0, 0.8, 0.0, **SSD_DEFAULTS) and not ssd_satisfied(2.01, 0.8, 0.0, **SSD_DEFAULTS)
    assert ssd_satisfied(1.0, 0.0, 40 * 2 ** 0.5, **SSD_DEFAULTS) and not ssd_satisfied(1.0, 0.0, 57.0, **SSD_DEFAULTS)
    assert not ssd_satisfied(1.0, 0.81, 1.0, **SSD_DEFAULTS) and not ssd_satisfied(1.0, 0.0, 4.9, delta=5.0)
    with pytest.raises(ValueError, match='empty'): f_shape(np.zeros((3, 3), bool), d1)
    with pytest.raises(ValueError, match='cannot be compared'): f_shape(d1, d2[:30], align=False)


def test_bank(tiles, bank):
    assert len(bank) > 10 and (bank.areas >= 10).all()
    for m, p, c in zip(bank.masks[:20], bank.pixels[:20], bank.centroids[:20]):
        assert p.shape[:2] == m.shape and m[0].any() and m[:, 0].any()  # tight box
        ys, xs = np.nonzero(m); assert np.allclose(c, (ys.mean(), xs.mean()))
    assert len(InstanceBank.from_samples(tiles, exclude_border=False)) > len(bank)
    idx = bank.with_area_between(50, 120)
    assert set(idx) == set(np.flatnonzero((bank.areas >= 50) & (bank.areas <= 120)))


# ---------------------------------------------------------------- copy-paste
@pytest.mark.parametrize('thr', [dict(), dict(epsilon=1.3, rho=0.5, delta=10.0, gamma=30.0),
                                 dict(epsilon=3.0, rho=1.0, delta=0.0, gamma=20.0)])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_every_paste_satisfies_its_thresholds(bank, thr, seed):
    s = synth_dataset(1, 'val', seed=seed, size=128)[0]
    out, full = ssd_copy_paste(s, bank, seed, paste_ratio=0.8, random_count=False, **thr)
    out.validate(); check_record(full); rec = full['steps'][0]
    assert rec['thresholds'] == {**SSD_DEFAULTS, **thr}
    assert rec['n_requested'] == round(0.8 * s.n_instances) == len(rec['pasted']) + rec['failed']
    assert len(rec['pasted']) > 0
    for p in rec['pasted']:
        assert ssd_satisfied(p['f_scale'], p['f_shape'], p['f_dis'], **rec['thresholds'])
        # recompute each value independently from the anchor, the template and where it was put
        M_o = s.inst_map == p['anchor']; M_t = bank.masks[p['template']]
        assert p['f_scale'] == pytest.approx(f_scale(M_o, M_t)) and p['f_shape'] == pytest.approx(f_shape(M_o, M_t))
        placed = np.zeros(s.inst_map.shape, bool); y0, x0 = p['top_left']; th, tw = M_t.shape
        placed[y0:y0 + th, x0:x0 + tw] = M_t
        assert p['f_dis'] == pytest.approx(f_dis(M_o, placed))


@pytest.mark.parametrize('seed', range(4))
def test_labels_stay_instance_correct(bank, seed):
    s = synth_dataset(1, 'val', seed=seed, size=128)[0]
    out, full = ssd_copy_paste(s, bank, seed, paste_ratio=1.0, random_count=False, min_area=10)
    out.validate(); rec = full['steps'][0]
    kept = {p['id']: p for p in rec['pasted'] if p['id'] is not None}
    M = pasted_mask(out, full)
    assert np.array_equal(M, pasted_mask(out, rec))  # from the record or from its copy-paste step
    # pixels: template pixels under surviving pasted nuclei, the original image where nothing was pasted
    painted = np.zeros(s.inst_map.shape, bool)
    for p in rec['pasted']:
        y0, x0 = p['top_left']; t = bank.masks[p['template']]; painted[y0:y0 + t.shape[0], x0:x0 + t.shape[1]] |= t
    assert np.array_equal(out.image[~painted], s.image[~painted])
    for i, p in kept.items():
        assert out.inst_types[i - 1] == bank.types[p['template']] == p['type']
    # originals: kept ones are exactly their old pixels minus what was pasted over them, one piece of >= min_area
    # when cut; dropped ones were covered entirely (a placement leaving less is refused)
    new_of = {r['source_id']: r['id'] for r in full['instances'] if r['source'] == 0}
    gone = {d['source_id'] for d in full['dropped'] if d['source'] == 0}
    assert {d['reason'] for d in full['dropped']} <= {'covered'}
    for old in range(1, s.n_instances + 1):
        if old in gone: assert old not in new_of and (painted[s.inst_map == old]).all(); continue
        new = new_of[old]
        assert out.inst_types[new - 1] == s.inst_types[old - 1]
        mine = out.inst_map == new
        assert np.array_equal(mine, (s.inst_map == old) & ~painted)
        if full['instances'][new - 1]['cut']: assert mine.sum() >= 10 and largest_piece(mine) == mine.sum()
    assert not (M & ~painted).any()
    assert out.n_instances == s.n_instances - len(gone) + len(kept)


def test_paste_without_constraints_and_edge_cases(bank):
    s = synth_dataset(1, 'val', seed=3, size=128)[0]
    out, rec = ssd_copy_paste(s, bank, 0, constrained=False, paste_ratio=0.5, random_count=False)
    out.validate(); rec = rec['steps'][0]; assert not rec['constrained'] and rec['failed'] == 0
    empty = make_sample(np.full((64, 64, 3), 200, np.uint8), np.zeros((64, 64), np.int32), inst_types={})
    e, r = ssd_copy_paste(empty, bank, 0); assert e.n_instances == 0 and r['steps'][0]['pasted'] == []
    # types are neither invented nor dropped: an untyped crop needs an untyped bank, and the reverse
    untyped = Sample(s.image, s.inst_map, meta={'image_id': 'u'})
    with pytest.raises(LabelError, match='cannot mix an untyped sample with a typed instance bank'): ssd_copy_paste(untyped, bank, 0)
    plain = InstanceBank.from_samples([replace(t, type_map=None, inst_types=None) for t in synth_dataset(2, 'train', seed=0, size=128)])
    u, _ = ssd_copy_paste(untyped, plain, 0); u.validate(); assert u.inst_types is None
    with pytest.raises(LabelError, match='cannot mix a typed sample with an untyped instance bank'): ssd_copy_paste(s, plain, 0)
    # impossible thresholds: nothing pasted, sample unchanged
    n, r = ssd_copy_paste(s, bank, 0, epsilon=1.0, rho=0.0)
    assert np.array_equal(n.image, s.image) and r['steps'][0]['failed'] == r['steps'][0]['n_requested']


def one_template_case(template_shape):
    "A crop with two disk nuclei (r 5) far apart and a bank holding one template (a filled rectangle, untyped)."
    inst = np.zeros((96, 96), np.int32); inst[disk((96, 96), 28, 28, 5)] = 1; inst[disk((96, 96), 68, 68, 5)] = 2
    crop = make_sample(np.full((96, 96, 3), 200, np.uint8), inst, meta={'image_id': 'crop'})
    t = np.zeros((40, 40), np.int32); h, w = template_shape; t[20 - h // 2:20 - h // 2 + h, 20 - w // 2:20 - w // 2 + w] = 1
    bank = InstanceBank.from_samples([make_sample(np.full((40, 40, 3), 90, np.uint8), t, meta={'image_id': 'tpl'})])
    assert len(bank) == 1 and not bank.typed
    return crop, bank, inst == 1, bank.masks[0]


@pytest.mark.parametrize('template_shape', [(5, 12), (13, 11), (3, 8)])
def test_ssd_acceptance_is_exactly_eq1(template_shape):
    "A template passes exactly when its true f_scale <= epsilon and f_shape <= rho (boundaries just above / below)."
    crop, bank, M_o, M_t = one_template_case(template_shape)
    sc, sh = f_scale(M_o, M_t), f_shape(M_o, M_t)
    kw = dict(paste_ratio=1.0, random_count=False, max_tries=60)
    for seed in range(3):
        ok = ssd_copy_paste(crop, bank, seed, epsilon=sc + 1e-6, rho=sh, **kw)[1]['steps'][0]  # f_shape <= rho: equality passes
        assert len(ok['pasted']) == 2 and ok['failed'] == 0, ok
        assert all(p['f_scale'] == pytest.approx(sc) and p['f_shape'] == pytest.approx(sh) for p in ok['pasted'])
        for thr in (dict(epsilon=sc - 1e-6, rho=2.0), dict(epsilon=100.0, rho=sh - 1e-6)):
            no = ssd_copy_paste(crop, bank, seed, **thr, **kw)[1]['steps'][0]
            assert no['pasted'] == [] and no['failed'] == 2, (thr, no)


def test_placement_distance_band():
    "Every paste's centroid lies at a distance in [delta, gamma] from its anchor's centroid, measured independently."
    crop, bank, _, M_t = one_template_case((5, 7))
    for seed in range(6):
        out, rec = ssd_copy_paste(crop, bank, seed, delta=12.0, gamma=15.0, rho=2.0, epsilon=100.0, paste_ratio=1.0,
                                  random_count=False, max_tries=100)
        step = rec['steps'][0]; assert len(step['pasted']) >= 1
        for p in step['pasted']:
            placed = np.zeros(crop.inst_map.shape, bool); y0, x0 = p['top_left']; placed[y0:y0 + 5, x0:x0 + 7] = bank.masks[0]
            d = f_dis(crop.inst_map == p['anchor'], placed)
            assert 12.0 <= d <= 15.0 and p['f_dis'] == pytest.approx(d)


def test_no_paste_into_crops_with_too_few_nuclei(bank):
    "As the authors: nothing is pasted where paste_ratio * N < min_paste (2): N = 3 at ratio 0.5 stays as it is."
    s = synth_dataset(1, 'val', seed=0, size=128)[0]
    first = lambda k: make_sample(s.image, np.where(s.inst_map <= k, s.inst_map, 0), inst_types={j + 1: s.inst_types[j] for j in range(k)})
    for k in (1, 2, 3):
        out, rec = ssd_copy_paste(first(k), bank, 0)
        assert rec['steps'][0]['n_requested'] == 0 and np.array_equal(out.image, s.image) and out.n_instances == k
        assert InsMix(bank, bgp=False)(first(k), 0).sample.n_instances == k
    for seed in range(5):
        assert ssd_copy_paste(first(4), bank, seed, rho=2.0, epsilon=100.0)[1]['steps'][0]['n_requested'] >= 1
    assert ssd_copy_paste(first(3), bank, 0, min_paste=1.0, rho=2.0, epsilon=100.0)[1]['steps'][0]['n_requested'] >= 1


# ---------------------------------------------------------------- background perturbation
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0, 1), patch=st.sampled_from([8, 13, 20]))
def test_background_perturbation_only_permutes_free_patches(seed, alpha, patch):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    inst = np.zeros((h, w), np.int32)
    for i in range(int(rng.integers(0, 6))):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 8)
        inst[disk((h, w), cy, cx, r)] = i + 1
    s = make_sample(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), inst)
    out, rec = background_perturbation(s, seed, alpha, patch)
    assert np.array_equal(out.inst_map, s.inst_map)
    nuc = s.inst_map > 0
    assert np.array_equal(out.image[nuc], s.image[nuc])
    gh, gw = h // patch, w // patch
    blocks = lambda im: im[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch, 3).swapaxes(1, 2).reshape(gh * gw, -1)
    fg = nuc[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch).any((1, 3)).ravel()
    assert rec['n_free'] == int((~fg).sum()) and rec['n_shuffled'] == (lambda k: k if k >= 2 else 0)(round(alpha * rec['n_free']))
    b0, b1 = blocks(s.image), blocks(out.image)
    moved = {d for _, d in rec['moves']}
    for src, dst in rec['moves']:
        assert not fg[src] and not fg[dst] and np.array_equal(b1[dst], b0[src])
    assert sorted(s_ for s_, _ in rec['moves']) == sorted(moved)  # sources and destinations: the same set
    assert len(rec['moves']) == rec['n_shuffled'] and all(s_ != d for s_, d in rec['moves'])  # every drawn patch moves
    for k in set(range(gh * gw)) - moved: assert np.array_equal(b1[k], b0[k])
    assert np.array_equal(out.image[gh * patch:], s.image[gh * patch:])  # partial rows / columns untouched
    assert np.array_equal(out.image[:, gw * patch:], s.image[:, gw * patch:])


def test_background_perturbation_bad_input(tiles):
    with pytest.raises(ValueError, match='alpha'): background_perturbation(tiles[0], 0, alpha=-0.1)
    with pytest.raises(ValueError, match='patch'): background_perturbation(tiles[0], 0, patch=0)
    same, rec = background_perturbation(tiles[0], 0, alpha=0.0)
    assert np.array_equal(same.image, tiles[0].image) and rec['moves'] == []


# ---------------------------------------------------------------- smooth-GAN parts
def test_fse_attention_picks_most_similar_patch():
    # one-hot-ish features: each original cell j has a distinct direction; the template cell's 3x3 patch equals the
    # patch around original cell (4, 6) up to scale, so cosine similarity 1 there and < 1 elsewhere
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 8, 10, 10, generator=g)
    f[0, :, 6:9, 1:4] = 0.5 * f[0, :, 3:6, 5:8]  # template cell (7, 2) <- neighbourhood of (4, 6)
    M_o = torch.zeros(1, 1, 10, 10); M_o[0, 0, 3:6, 4:9] = 1
    M_t = torch.zeros(1, 1, 10, 10); M_t[0, 0, 7, 2] = 1
    out, atts = foreground_similarity(f, M_t, M_o, softmax_scale=10, return_attention=True)
    it, jo, A = atts[0]
    assert int(jo[A[0].argmax()]) == 4 * 10 + 6 and torch.allclose(A.sum(1), torch.ones(1))
    # without a temperature the weights are flatter but the peak is the same
    _, atts1 = foreground_similarity(f, M_t, M_o, softmax_scale=1, return_attention=True)
    assert int(atts1[0][1][atts1[0][2][0].argmax()]) == 46 and atts1[0][2].max() < A.max()
    keep = torch.ones(1, 1, 10, 10, dtype=bool); keep[0, 0, 7, 2] = False
    assert torch.equal(out[keep.expand_as(out)], f[keep.expand_as(f)])


def fse_reference(f, M_t, M_o, scale=10.0):
    "Eqs. 6-7 cell by cell in numpy: zero-padded 3x3 patches, cosine similarity, softmax over the original cells, the weighted patches folded back (overlaps averaged)."
    C, h, w = f.shape; fp = np.pad(f, ((0, 0), (1, 1), (1, 1))); patch = lambda y, x: fp[:, y:y + 3, x:x + 3]
    I_t = [(y, x) for y in range(h) for x in range(w) if M_t[y, x]]
    I_o = [(y, x) for y in range(h) for x in range(w) if M_o[y, x] and not M_t[y, x]]
    acc, cnt = np.zeros_like(f), np.zeros((h, w))
    for y, x in I_t:
        p_i = patch(y, x).ravel()
        S = np.array([p_i @ patch(*j).ravel() / (np.linalg.norm(p_i) * np.linalg.norm(patch(*j))) for j in I_o])
        A = np.exp(scale * (S - S.max())); A /= A.sum()
        R = sum(a * patch(*j) for a, j in zip(A, I_o))
        for dy in range(3):
            for dx in range(3):
                if 0 <= y + dy - 1 < h and 0 <= x + dx - 1 < w: acc[:, y + dy - 1, x + dx - 1] += R[:, dy, dx]; cnt[y + dy - 1, x + dx - 1] += 1
    out = f.copy(); out[:, M_t] = acc[:, M_t] / cnt[M_t]
    return out


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('scale', [10.0, 1.0])
def test_fse_equals_eqs_6_7_written_out(seed, scale):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(3, 9, 8))
    M_t = rng.random((9, 8)) < 0.15; M_t[4, 4:6] = True          # adjacent template cells: overlapping patches
    M_o = (rng.random((9, 8)) < 0.4); M_o[4, 4] = True            # one original cell under the template: not attended to
    t = lambda a: torch.tensor(a[None, None] if a.ndim == 2 else a[None], dtype=torch.float32)
    out, atts = foreground_similarity(t(f), t(M_t), t(M_o), softmax_scale=scale, return_attention=True)
    assert np.allclose(out[0].double().numpy(), fse_reference(f, M_t, M_o, scale), atol=1e-5)
    it, jo, A = atts[0]
    assert set(jo.tolist()) == {y * 8 + x for y in range(9) for x in range(8) if M_o[y, x] and not M_t[y, x]}
    assert torch.allclose(A.sum(1), torch.ones(len(it)))
    # batch items are independent: a second item with no template is returned unchanged
    two = foreground_similarity(torch.cat([t(f), t(f)]), torch.cat([t(M_t), torch.zeros_like(t(M_t))]), torch.cat([t(M_o), t(M_o)]), scale)
    assert torch.equal(two[1], t(f)[0]) and torch.allclose(two[0], out[0])


def probe_generator(cnum=4, seed=0) -> SmoothGenerator:
    "A fixed G whose output depends visibly on its input (conv weights N(0, 2 sqrt(2 / fan_in)), zero bias): at PyTorch's default init this deep gated network is almost constant."
    G = SmoothGenerator(cnum=cnum).eval(); g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2 * (2 / fan_in) ** 0.5); m.bias.zero_()
    return G


def test_fse_and_original_mask_steer_the_generator(monkeypatch):
    """On a 32 x 448 strip, template at the left, original nuclei at the far right (beyond the convolutions' reach):
    G's output on the template changes with the original nuclei's appearance and with M_o, only through the FSE, and
    not with the background in between."""
    G = probe_generator()
    u = torch.rand(1, 3, 32, 448, generator=torch.Generator().manual_seed(1)) * 2 - 1
    M = torch.zeros(1, 1, 32, 448); M[..., 8:24, 8:24] = 1
    M_o = torch.zeros(1, 1, 32, 448); M_o[..., 8:24, 400:424] = 1
    u_nuc = u.clone(); u_nuc[..., 8:24, 400:424] *= -1
    u_bg = u.clone(); u_bg[..., 8:24, 200:224] *= -1
    M_o_small = M_o.clone(); M_o_small[..., 8:24, 412:424] = 0
    on_t = lambda y: y[M.bool().expand_as(y)]
    with torch.no_grad():
        y = G(u, M, M_o)
        assert (on_t(G(u_nuc, M, M_o)) - on_t(y)).abs().max() > 0.1   # the original nuclei's appearance reaches the template
        assert (on_t(G(u, M, M_o_small)) - on_t(y)).abs().max() > 0.1  # so does the mask of the original nuclei
        assert torch.equal(on_t(G(u_bg, M, M_o)), on_t(y))              # background that is not M_o does not
        M_none = torch.zeros_like(M_o)
        assert torch.equal(on_t(G(u_nuc, M, M_none)), on_t(G(u, M, M_none)))  # no original nuclei: nothing to borrow
    # the premise: with the FSE replaced by the identity, the far nuclei cannot reach the template at all
    monkeypatch.setattr(insmix_module, 'foreground_similarity', lambda f, *a, **k: f)
    with torch.no_grad(): assert torch.equal(on_t(G(u_nuc, M, M_o)), on_t(G(u, M, M_o)))


@pytest.mark.parametrize('size', [32, 64])
def test_discriminator_is_a_patchgan(size):
    D = PatchDiscriminator(ndf=4)
    with torch.no_grad(): assert D(torch.zeros(2, 3, size, size)).shape == (2, 1, size // 8 - 2, size // 8 - 2)
    G = SmoothGenerator(cnum=4)
    with pytest.raises(ValueError, match='multiple of 4'): G(torch.zeros(1, 3, 30, 32), torch.zeros(1, 1, 30, 32), torch.zeros(1, 1, 30, 32))
    assert GatedConv2d(3, 5, 3, stride=2)(torch.zeros(1, 3, 16, 16)).shape == (1, 5, 8, 8)


def test_gated_conv_is_elu_times_sigmoid_gate():
    gc = GatedConv2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    f, g = gc.conv(x).chunk(2, dim=1)
    assert torch.allclose(gc(x), torch.nn.functional.elu(f) * torch.sigmoid(g))


def test_spectral_norm_bounds_each_layer():
    D = PatchDiscriminator(ndf=4).train()
    for _ in range(30): D(torch.randn(2, 3, 64, 64))  # power iterations converge
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    for c in convs:
        W = c.weight.detach().reshape(c.weight.shape[0], -1)
        assert torch.linalg.matrix_norm(W, 2) == pytest.approx(1.0, abs=0.05)


def test_losses_hand_computed():
    Da = torch.zeros(3, 1, 2, 2); Dp = torch.full((3, 1, 2, 2), 0.25)
    Dn = torch.stack([torch.full((1, 2, 2), v) for v in (3.0, 0.75, 0.0)])
    assert torch.allclose(l1_distance(Da, Dn), torch.tensor([3.0, 0.75, 0.0]))
    # max(0, 0.25 - d_an + 1): 0, 0.5, 1.25 -> mean 0.5833
    assert triplet_loss_D(Da, Dp, Dn).item() == pytest.approx((0 + 0.5 + 1.25) / 3)
    assert triplet_loss_D(Da, Dp, Dn, m=2.0).item() == pytest.approx((0 + 1.5 + 2.25) / 3)
    assert adversarial_loss_G(Da, Dp, Dn).item() == pytest.approx(((3 - .25) + (.75 - .25) + (0 - .25)) / 3)
    u, Gu = torch.zeros(1, 3, 2, 2), torch.tensor([0.2, -0.2, 0.4, 0.0] * 3).reshape(1, 3, 2, 2)
    L_G, L_adv, L_rec = generator_loss(Da, Dp, Dn, u, Gu, lam=10)
    assert L_rec.item() == pytest.approx(0.2) and L_G.item() == pytest.approx(L_adv.item() + 2.0)
    x = torch.full((1, 3, 2, 2), 0.5); M = torch.tensor([[[[1., 0.], [0., 0.]]]])
    assert torch.equal(composite(torch.ones_like(x), x, M)[0, :, 0, 0], torch.ones(3))
    assert torch.equal(composite(torch.ones_like(x), x, M)[0, :, 1, 1], torch.full((3,), 0.5))


def test_training_resume_is_exact(tmp_path, tiles, bank):
    kw = dict(bank=bank, cnum=4, ndf=4, batch_size=1, crop=32, device='cpu', progress=False, ckpt_every=1, seed=3)
    G_full, D_full, h_full = train_smooth_gan(tiles, 3, **kw)
    ck = tmp_path/'gan.pt'
    train_smooth_gan(tiles, 1, ckpt_path=ck, **kw)
    assert ck.exists() and not list(tmp_path.glob('.*tmp'))
    with pytest.raises(ValueError, match='extend=True'): train_smooth_gan(tiles, 3, ckpt_path=ck, **kw)
    with pytest.raises(ValueError, match=r'lr: 0\.0002 in the checkpoint, 0\.001 now'):
        train_smooth_gan(tiles, 1, ckpt_path=ck, **{**kw, 'lr': 1e-3})
    with pytest.raises(ValueError, match='batch_size'): train_smooth_gan(tiles, 1, ckpt_path=ck, **{**kw, 'batch_size': 2})
    G_res, D_res, h_res = train_smooth_gan(tiles, 3, ckpt_path=ck, extend=True, **kw)
    assert h_res['step'] == [1, 2, 3] and np.allclose(h_res['L_D'], h_full['L_D'], atol=1e-5)
    for a, b in zip(G_full.state_dict().values(), G_res.state_dict().values()): assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(D_full.state_dict().values(), D_res.state_dict().values()): assert torch.allclose(a, b, atol=1e-5)
    G_loaded = load_generator(ck)
    assert all(torch.equal(a, b) for a, b in zip(G_loaded.state_dict().values(), G_res.state_dict().values()))
    assert train_smooth_gan(tiles, 3, ckpt_path=ck, **kw)[2]['step'] == [1, 2, 3]  # finished: nothing more to do


def test_smooth_is_the_composite_of_G(tiles, bank):
    "S(u) = G(u) on the template, u elsewhere, exactly; sizes that are not multiples of 4 are padded and cropped back."
    G = probe_generator(cnum=4)
    s = synth_dataset(1, 'val', seed=5, size=100)[0]
    out, rec = ssd_copy_paste(s, bank, 0)
    M = pasted_mask(out, rec); M_o = (out.inst_map > 0) & ~M
    assert M.any()
    sm = smooth(G, out.image, M, M_o)
    m = lambda a: torch.tensor(a[None, None], dtype=torch.float32)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0 if t.shape[-1] % 4 == 0 else 4 - t.shape[-1] % 4, 0, 0 if t.shape[-2] % 4 == 0 else 4 - t.shape[-2] % 4), mode='reflect')
    with torch.no_grad(): G_u = to_uint8_image(G(pad(to_tensor_image(out.image)), pad(m(M)), pad(m(M_o)))[..., :100, :100])[0]
    assert np.array_equal(sm[M], G_u[M]) and np.array_equal(sm[~M], out.image[~M])
    assert (sm[M] != out.image[M]).any()  # this G does change the template
    assert np.array_equal(smooth(G, out.image, np.zeros_like(M), M_o), out.image)


def test_first_training_step_follows_eqs_3_to_5(tiles, bank):
    "The logged losses of step 1 are Eqs. 3-5 recomputed from the same initial weights and batch (D updated before L_adv)."
    kw = dict(cnum=4, ndf=4, batch_size=2, crop=64, seed=5)
    _, _, h = train_smooth_gan(tiles, 1, bank=bank, device='cpu', progress=False, **kw)
    torch.manual_seed(kw['seed']); G, D = SmoothGenerator(4).train(), PatchDiscriminator(4).train()
    b = gan_batch(tiles, bank, np.random.default_rng(step_seed(kw['seed'], 0)), 2, 64)
    assert b['M'].any(), 'the batch has no pasted template'
    with torch.no_grad(): S = composite(G(b['u'], b['M'], b['M_o']), b['u'], b['M'])
    L_D = triplet_loss_D(D(b['x_a']), D(b['x_p']), D(S), 1.0)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999)); opt.zero_grad(); L_D.backward(); opt.step()
    with torch.no_grad():
        G_u = G(b['u'], b['M'], b['M_o']); S = composite(G_u, b['u'], b['M'])
        L_adv = adversarial_loss_G(D(b['x_a']), D(b['x_p']), D(S))
    assert h['L_D'][0] == pytest.approx(L_D.item(), abs=1e-5) and h['L_adv'][0] == pytest.approx(L_adv.item(), abs=1e-5)
    assert h['L_rec'][0] == pytest.approx((b['u'] - G_u).abs().mean().item(), abs=1e-6)
    assert h['L_G'][0] == pytest.approx(h['L_adv'][0] + 10 * h['L_rec'][0], abs=1e-5)


# ---------------------------------------------------------------- pipeline and the common interface
def test_insmix_pipeline_interface(tmp_path, tiles, bank):
    G = SmoothGenerator(cnum=4).eval()
    s = synth_dataset(1, 'val', seed=2, size=128)[0]
    a = InsMix(bank, generator=G)(s, 7)
    a.sample.validate(); check_record(a.record); json.dumps(a.record['params'])
    assert [x['op'] for x in a.record['steps']] == ['ssd_copy_paste', 'smooth', 'background_perturbation']
    # the common record: pasted rows are the surviving templates, their sources the bank images they came from
    pasted = [p for p in InsMix.pasted(a.record) if p['id'] is not None]
    rows = {r['id']: r for r in a.record['instances']}
    assert sorted(p['id'] for p in pasted) == sorted(i for i, r in rows.items() if r['op'] == 'pasted')
    for p in pasted:
        r = rows[p['id']]; src = a.record['sources'][r['source']]
        assert src['role'] == 'bank' and [src['image_id'], r['source_id']] == p['source'] and r['type'] == p['type']
    assert a.sample.meta['augment'][-1] is a.record
    for p in InsMix.pasted(a.record): assert ssd_satisfied(p['f_scale'], p['f_shape'], p['f_dis'], **SSD_DEFAULTS)
    b = InsMix(bank, generator=G)(s, 7)  # reproducible
    assert np.array_equal(a.sample.image, b.sample.image) and np.array_equal(a.sample.inst_map, b.sample.inst_map)
    # each part alone
    only_bgp = InsMix(paste=None, bgp=True)(s, 0).sample
    assert np.array_equal(only_bgp.inst_map, s.inst_map)
    only_ssd = InsMix(bank, bgp=False)(s, 0)
    assert [x['op'] for x in only_ssd.record['steps']] == ['ssd_copy_paste']
    # bank from the pool, online hook, offline writer
    lazy = InsMix(bgp=False); lazy(s, 0, pool=tiles)
    assert len(lazy.bank) == len(bank)
    tf = as_transform(InsMix(bank), p=1.0)
    assert tf(s, np.random.default_rng(0)).validate().n_instances > 0
    items = augment_set([s, tiles[0]], InsMix(bank), n_per_sample=1, seed=0, out_dir=tmp_path)
    back = load_augmented(tmp_path/'aug_00001.npz')
    assert np.array_equal(back.sample.inst_map, items[1].sample.inst_map) and back.record['method'] == 'insmix'
    with pytest.raises(ValueError, match='paste must be'): InsMix(paste='copy')
    with pytest.raises(ValueError, match='smoothing needs'): InsMix(paste=None, generator=G)
    with pytest.raises(ValueError, match='instance bank'): InsMix()(s, 0)
    untyped_pool = [replace(t, type_map=None, inst_types=None) for t in tiles]
    with pytest.raises(LabelError, match='cannot mix a typed sample with an untyped instance bank'): InsMix()(s, 0, untyped_pool)
    with pytest.raises(LabelError, match='mix typed and untyped'): InsMix()(s, 0, tiles[:1] + untyped_pool[1:])
    with pytest.raises(LabelError, match='cannot mix an untyped sample'): InsMix(bank)(replace(s, type_map=None, inst_types=None), 0)


def test_paper_tables_name_the_right_comparator():
    "The comparable rows are Table 1's HoVer-Net rows; TAFE (Kumar) and NB-Net (CPS) rows are another segmenter's."
    seg = lambda t, r: r.get('segmenter', t['segmenter'])
    hv = {r['row']: r for r in INSMIX_KUMAR['rows'] if seg(INSMIX_KUMAR, r) == COMPARATOR}
    assert COMPARATOR == 'HoVer-Net' and list(hv) == ['Baseline', '+SSD+BgP+s-GAN']
    assert [hv['Baseline'][k] for k in ('dice_seen', 'dice_unseen', 'dice_all', 'aji_seen', 'aji_unseen', 'aji_all')] == [80.60, 80.41, 80.52, 59.35, 56.27, 58.03]
    assert [hv['+SSD+BgP+s-GAN'][k] for k in ('dice_seen', 'dice_unseen', 'dice_all', 'aji_seen', 'aji_unseen', 'aji_all')] == [80.33, 81.93, 81.02, 59.40, 57.67, 58.66]
    assert round(hv['+SSD+BgP+s-GAN']['aji_all'] - hv['Baseline']['aji_all'], 2) == 0.63
    assert {seg(INSMIX_KUMAR, r) for r in INSMIX_KUMAR['rows']} == {'HoVer-Net', 'TAFE'} and INSMIX_CPS['segmenter'] == 'NB-Net'
    assert all('segmenter' not in r for r in INSMIX_CPS['rows'])
    assert set(INSMIX_TABLES) == {'kumar', 'cps'}
    for r in INSMIX_KUMAR['rows']:  # Table 1: All = (8 seen + 6 unseen images) / 14
        for m in ('dice', 'aji'):
            if f'{m}_seen' in r: assert (8 * r[f'{m}_seen'] + 6 * r[f'{m}_unseen']) / 14 == pytest.approx(r[f'{m}_all'], abs=0.007)


def test_cps_fold_numbers_give_table4():
    from nucbook.bench import summarise_over
    df = pd.DataFrame([dict(row=r, fold=k, **{m: v[k] for m, v in vals.items()}) for r, vals in INSMIX_CPS_FOLDS.items() for k in range(5)])
    t = summarise_over(df, over='fold').round(2)
    assert list(INSMIX_CPS_FOLDS) == [r['row'] for r in INSMIX_CPS['rows']]
    for r in INSMIX_CPS['rows']:
        for m in ('dice_all', 'aji_all'): assert t.loc[r['row'], [f'{m}_mean', f'{m}_std']].tolist() == r[m], (r['row'], m)


def notebook_label(record, profile):
    "The first line of the notebook's tables (cell 'label = ...' of 11_insmix)."
    from nucbook.bench import run_label
    return ('SMOKE RUN (checks that the pipeline runs): ' if profile == 'smoke' else '') + run_label(record, list(INSMIX_TABLES))


def test_labels_say_what_ran():
    from nucbook.bench import run_record, load_splits
    syn = load_splits('synthetic', n_train=1, n_test=1, tile_size=64)
    lab = notebook_label(run_record(syn, profile='smoke', model_size='tiny', seeds=[0], epochs=15, segmenter=COMPARATOR), 'smoke')
    assert lab.startswith('SMOKE RUN') and 'synthetic data' in lab and 'seed 0' in lab and 'NOT a reproduction' in lab
    kumar = dict(dataset='kumar', kind='manifest', resolved='kumar', split=dict(method='manifest'), counts={}, mpp={}, classes=None)
    lab = notebook_label(run_record(kumar, profile='smoke', model_size='tiny', seeds=[0, 1], epochs=15, segmenter=COMPARATOR), 'smoke')
    assert lab.startswith('SMOKE RUN (checks that the pipeline runs): kumar, smoke profile') and 'synthetic' not in lab
    full = run_record(kumar, profile='paper', model_size='paper', seeds=[0, 1, 2], epochs=300, segmenter=COMPARATOR, encoder_weights='w.tar')
    assert notebook_label(full, 'paper') == 'kumar, paper profile, HoVer-Net (paper), 300 epochs, seeds 0, 1, 2'
    assert 'encoder from scratch' in notebook_label({**full, 'encoder_weights': None}, 'paper')
    cps = dict(dataset='cps', kind='manifest', resolved='cps', split=dict(method='folds', fold=3), counts={}, mpp={}, classes=None)
    assert notebook_label(run_record(cps, profile='paper', model_size='paper', seeds=[0], epochs=300, encoder_weights='w'), 'paper').startswith('cps fold 3, paper profile')


@pytest.mark.realdata
def test_kumar_label_from_its_split(data_root):
    from nucbook.bench import run_record, load_splits
    sp = load_splits('kumar', root=data_root, prefer='png', limit=1)
    lab = notebook_label(run_record(sp, profile='smoke', model_size='tiny', seeds=[0, 1], epochs=15, segmenter=COMPARATOR), 'smoke')
    assert 'kumar, smoke profile' in lab and 'synthetic' not in lab


@pytest.mark.parametrize('seed', range(4))
def test_background_perturbation_protects_pasted_nuclei(bank, seed):
    "In InsMix the perturbation runs after pasting: patches holding any nucleus, pasted ones included, stay where they are."
    s = synth_dataset(1, 'val', seed=seed + 10, size=128)[0]
    a = InsMix(bank, alpha=1.0)(s, seed)           # every free patch moves
    b = InsMix(bank, bgp=False)(s, seed)           # the same pastes, no perturbation
    assert np.array_equal(a.sample.inst_map, b.sample.inst_map)
    nuc = a.sample.inst_map > 0
    assert np.array_equal(a.sample.image[nuc], b.sample.image[nuc])
    step = a.record['steps'][-1]; assert step['op'] == 'background_perturbation' and step['n_shuffled'] >= 2
    gw, P = step['grid'][1], step['patch']
    for src, dst in step['moves']:
        for k in (src, dst):
            r, c = divmod(k, gw); assert not nuc[r * P:(r + 1) * P, c * P:(c + 1) * P].any()


def test_smoke_notebook_runs(tmp_path):
    "`make demo`: the smoke profile end to end (smooth-GAN, augmentation, segmenter with and without InsMix)."
    m = run_smoke('11_insmix', tmp_path)
    assert m['label'].startswith('SMOKE RUN') and 'synthetic data' in m['label'] and set(m['table3']) == {'Baseline', '+SSD+BgP+s-GAN'}
    # beside our rows: the paper's HoVer-Net numbers (another dataset here) and TAFE's as another segmenter's, with their deltas
    t3 = m['table3']['+SSD+BgP+s-GAN']
    assert t3['AJI (all) | paper HoVer-Net (kumar: other dataset)'] == '58.66' and t3['AJI (all) | Δ (HoVer-Net, kumar)'] == '+0.63'
    assert t3['AJI (all) | paper TAFE (kumar: other dataset)'] == '63.31' and t3['AJI (all) | Δ (TAFE, kumar)'] == '+1.79'
    assert m['table1']['AJI (all) | paper HoVer-Net (kumar: other dataset)'] == {'Baseline': '58.03', '+SSD+BgP+s-GAN': '58.66'}
    assert m['table4_over_folds']['source'].startswith('STAND-IN') or 'insmix-cps' in m['table4_over_folds']['source']
    dice = [row['dice_all'] for row in m['results']]
    assert len(dice) == 4 and min(dice) > 50, dice  # the segmenters learned something in the smoke budget
    from nucbook.eval.fid import default_extractor
    ext = default_extractor()  # offline features unless NUCBOOK_FID_WEIGHTS names the official weights
    assert m['realism']['copy-paste']['comparable'] == getattr(ext, 'comparable', False) and m['realism']['copy-paste']['extractor'] == ext.name
    assert {'insmix_examples.png', 'smooth_gan.pt', 'params.json', 'aji_by_row.png', 'smooth_gan_losses.png', 'data.png'} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.realdata
def test_kumar_training_split_augments(data_root, monkeypatch):
    monkeypatch.setenv('NUCBOOK_DATA', str(data_root))
    from nucbook.data.datasets import load_dataset
    from nucbook.data.crops import random_crop
    train = load_dataset('kumar', 'train')
    assert len(train) == 16
    bank = InstanceBank.from_samples(train)
    assert len(bank) > 5000 and (bank.types == 0).all() and not bank.typed  # Kumar is untyped
    rng = np.random.default_rng(0)
    for i in range(6):
        crop = random_crop(train[i], 256, rng)
        a = InsMix(bank)(crop, rng)
        a.sample.validate()
        assert a.sample.inst_types is None
        pasted = InsMix.pasted(a.record)
        assert pasted and all(ssd_satisfied(p['f_scale'], p['f_shape'], p['f_dis'], **SSD_DEFAULTS) for p in pasted)


# ---------------------------------------------------------------- the occlusion invariant on real crops
@lru_cache(maxsize=None)
def real_sets(root:str):
    "CoNSeP training tiles (typed) and Kumar training images (untyped), with an instance bank of each."
    from nucbook.data.datasets import load_dataset
    sets = {'consep': load_dataset('consep_tiles', 'train', root=root, limit=48), 'kumar': load_dataset('kumar', 'train', root=root, limit=4)}
    return {k: (v, InstanceBank.from_samples(v)) for k, v in sets.items()}


@pytest.mark.realdata
@pytest.mark.parametrize('data', ['consep', 'kumar'])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31))
def test_occlusion_invariant_on_real_crops(data_root, data, seed):
    "No pixel that still shows an original or a pasted nucleus is labelled background; occluded nuclei stay valid."
    from nucbook.data.crops import random_crop
    train, bank = real_sets(str(data_root))[data]
    rng = np.random.default_rng(seed)
    s = random_crop(train[int(rng.integers(len(train)))], 256, rng)
    a = InsMix(bank)(s, rng)  # SSD copy-paste + background perturbation
    check_record(a.record); a.sample.validate()
    errors, shown = unlabelled_nucleus_pixels(s, a)
    assert shown > 0 and errors == 0, (errors, shown)  # before the canvas: 0.5-0.6% of `shown`
    assert unaccounted_nuclei(s, a.record) == []
    for p in InsMix.pasted(a.record):  # pasted pixels that still show the template are labelled
        m, px = bank.masks[p['template']], bank.pixels[p['template']]; y0, x0 = p['top_left']; h, w = m.shape
        shows = m & (a.sample.image[y0:y0 + h, x0:x0 + w] == px).all(-1)
        assert (a.sample.inst_map[y0:y0 + h, x0:x0 + w][shows] > 0).all()
    for r in a.record['instances']:
        if r['cut']: assert r['area'] >= a.record['min_area'] and largest_piece(a.sample.inst_map == r['id']) == r['area']


def test_insmix_online_with_the_hovernet_standard_augmentation():
    "The paper profile's path: InsMix on the context crop, then HoVer-Net's warp to the crop size; labels stay valid, no fill."
    from nucbook.augment.canvas import InstanceBank
    from nucbook.augment.mix import as_transform
    from nucbook.data.sample import check_sample
    from nucbook.data.synth import synth_dataset
    from nucbook.engine.train import CropDataset, TrainConfig
    from nucbook.methods.insmix import InsMix, SmoothGenerator
    train = synth_dataset(3, 'train', seed=0, size=256)
    seen = []
    insmix = as_transform(InsMix(InstanceBank.from_samples(train), generator=SmoothGenerator(cnum=8).eval()), pool=train, p=1.0)
    def spy(s, rng):
        out = insmix(s, rng); seen.append((s.shape, out.n_instances - s.n_instances)); return out
    ds = CropDataset(train, TrainConfig(crop_size=128, augment='hovernet'), [spy], typed=True)
    assert ds.side > 128
    for i in range(3):
        s = ds.sample(0, i)
        check_sample(s)
        assert s.shape == (128, 128) and s.meta['standard_augment']['profile'] == 'hovernet'
        assert s.meta['standard_augment']['fill_fraction'] == 0.0
    assert [sh for sh, _ in seen] == [(ds.side, ds.side)] * 3
    assert any(n > 0 for _, n in seen)  # InsMix pasted nuclei into the context crops
