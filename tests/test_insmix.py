"""InsMix: SSD constraints, instance-correct copy-paste, background perturbation, smooth-GAN parts, resume, interface,
the occlusion invariant on real crops."""
import json, os, subprocess, sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st
from nucbook.data.sample import Sample, LabelError, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.augment.canvas import InstanceBank, check_record, largest_piece, unlabelled_nucleus_pixels, unaccounted_nuclei
from nucbook.augment.mix import as_transform, augment_set, load_augmented
from nucbook.methods.insmix import (f_scale, f_shape, f_dis, ssd_satisfied, ssd_copy_paste, pasted_mask,
                            background_perturbation, foreground_similarity, SmoothGenerator, PatchDiscriminator,
                            GatedConv2d, composite, l1_distance, triplet_loss_D, adversarial_loss_G, generator_loss,
                            train_smooth_gan, load_generator, smooth, InsMix, SSD_DEFAULTS)

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


def test_ssd_disks_and_bounds():
    d1, d2 = disk((41, 41), 20, 20, 8), disk((41, 41), 20, 20, 4)
    s = f_shape(d1, d2)
    assert s == pytest.approx((d1.sum() - d2.sum()) / d1.sum())  # concentric: the small disk lies inside
    assert 0 <= f_shape(d1, np.roll(d2, 15, 1), align=False) <= 2
    assert ssd_satisfied(2.0, 0.8, 0.0, **SSD_DEFAULTS) and not ssd_satisfied(2.01, 0.8, 0.0, **SSD_DEFAULTS)
    assert not ssd_satisfied(1.0, 0.0, 57.0, **SSD_DEFAULTS)
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


@pytest.mark.parametrize('size', [32, 64, 96])
def test_generator_and_discriminator_shapes(size):
    G, D = SmoothGenerator(cnum=4), PatchDiscriminator(ndf=4)
    u = torch.rand(2, 3, size, size) * 2 - 1
    M = torch.zeros(2, 1, size, size); M[:, :, 4:12, 4:12] = 1
    M_o = torch.zeros(2, 1, size, size); M_o[:, :, 16:28, 16:28] = 1
    with torch.no_grad():
        y = G(u, M, M_o)
        assert y.shape == u.shape and y.abs().max() <= 1
        assert D(u).shape == (2, 1, size // 8 - 2, size // 8 - 2)
    with pytest.raises(ValueError, match='multiple of 4'): G(u[..., :30], M[..., :30], M_o[..., :30])
    assert GatedConv2d(3, 5, 3, stride=2)(torch.zeros(1, 3, 16, 16)).shape == (1, 5, 8, 8)


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


def test_smooth_changes_only_template_pixels(tiles, bank):
    G = SmoothGenerator(cnum=4).eval()
    s = synth_dataset(1, 'val', seed=5, size=100)[0]  # not a multiple of 4: padded inside
    out, rec = ssd_copy_paste(s, bank, 0)
    M = pasted_mask(out, rec)
    sm = smooth(G, out.image, M, (out.inst_map > 0) & ~M)
    assert sm.shape == out.image.shape and np.array_equal(sm[~M], out.image[~M]) and (sm[M] != out.image[M]).any()


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


def test_smoke_notebook_runs(tmp_path):
    "`make demo`: the smoke profile end to end (smooth-GAN, augmentation, segmenter with and without InsMix)."
    r = subprocess.run([str(Path(sys.executable).parent/'nucbook'), 'run', '11_insmix', '--profile', 'smoke', '--out', str(tmp_path),
                        '--no-progress'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((tmp_path/'metrics.json').read_text())
    assert m['label'].startswith('SMOKE') and set(m['table3']) == {'Baseline', '+SSD+BgP+s-GAN'}
    dice = [row['dice_all'] for row in m['results']]
    assert len(dice) == 4 and min(dice) > 50, dice  # the segmenters learned something in the smoke budget
    assert not m['realism']['copy-paste']['comparable']  # offline FID features are labelled as such
    assert {'insmix_examples.png', 'smooth_gan.pt', 'params.json'} <= {p.name for p in tmp_path.iterdir()}


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
