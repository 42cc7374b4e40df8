"""NucleiMix (nbs/12_nucleimix.ipynb): Eq. 1, stable softmaxes, insertion masks, labels and types after every insertion,
termination, margins, known pixels after progressive and conventional inpainting, feature extractors, clear errors."""
import warnings
from smoke import run_smoke
import cv2
import numpy as np
import pytest
import torch
from nucbook.augment.canvas import Canvas, check_record, unaccounted_nuclei
from nucbook.data.sample import LabelError, Sample, check_sample, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.engine.diffusion import make_noise_scheduler
from nucbook.methods.nucleimix import (BACKGROUND, OFFLINE_SPREAD, CTransPathFeatures, EncoderFeatures, Insertion, Location, NucleiMix,
                                       OfflineFeatures, adjust_geometry, axial_difference, candidate_locations,
                                       candidate_probabilities, context_patch, ellipse_angle, fit_context_model,
                                       glcm_features, insert_nucleus, insertion_counts, insertion_masks,
                                       progressive_inpaint, rare_probabilities)
from nucbook.models.unet import make_unet


def toy(nuclei, size=96, seed=0):
    "A typed sample with one filled ellipse per (cy, cx, ry, rx, angle, type), later ones on top."
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((228, 180, 212), 6, (size, size, 3)), 0, 255).astype(np.uint8)
    inst = np.zeros((size, size), np.int32); types = {}
    for i, (cy, cx, ry, rx, a, t) in enumerate(nuclei, start=1):
        cv2.ellipse(inst, (cx, cy), (rx, ry), a, 0, 360, i, -1); types[i] = t
    for i, t in types.items(): img[inst == i] = np.clip(rng.normal((60 + 20 * t, 50, 150), 10, ((inst == i).sum(), 3)), 0, 255)
    return make_sample(img, inst, inst_types=types, meta={'image_id': f'toy-{seed}'})


class FakeEps(torch.nn.Module):
    "A noise predictor that is not a diffusion model at all: what the checks below test does not depend on it."
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.tensor(0.3))
    def forward(self, x, t): return type('out', (), {'sample': torch.tanh(x) * self.w})()


@pytest.fixture(scope='module')
def train():
    return synth_dataset(3, 'train', seed=3, size=160, rare_share=0.2)


@pytest.fixture(scope='module')
def fitted(train):
    nm = NucleiMix([1], [2, 3, 4], context_size=96, context_hole=48, exclusion=2.0, margin=20)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # p capped: few rare nuclei
        return nm.fit(train, seed=0)


@pytest.fixture(scope='module')
def scene():
    "A target with a major nucleus in the middle, and a source image with a rare nucleus."
    tgt = toy([(64, 64, 5, 8, 0, 2), (64, 46, 4, 4, 0, 3), (20, 100, 4, 4, 0, 4)], size=128, seed=1)
    src = toy([(40, 40, 7, 4, 20, 1), (70, 20, 4, 4, 0, 2)], seed=2)
    T = candidate_locations([tgt, src], [1], [2, 3, 4], per_pixels=10**6)
    return tgt, src, T[0], next(l for l in T if l.kind == 'rare')


# ---- Eq. 1 and the candidate softmax
def test_eq1_hand_built():
    X_r = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # D = 1, 2, 3
    e = np.exp([-3.0, -2.0, -3.0])  # w = 3, 1, 1
    np.testing.assert_allclose(rare_probabilities([0.0, 0.0], X_r, [3, 1, 1]), e / e.sum(), rtol=1e-12)
    e = np.exp([-2.0, -4.0, -3.0])  # w = 2, 2, 1
    np.testing.assert_allclose(rare_probabilities([0.0, 0.0], X_r, [2, 2, 1]), e / e.sum(), rtol=1e-12)
    p = rare_probabilities([1e4, 0.0], X_r, [1, 1, 1])  # every exp(-D) underflows
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(p[2] / p[0], np.exp(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match='need 3 finite weights'): rare_probabilities([0.0, 0.0], X_r, [1, -1, 1])
    with pytest.raises(ValueError, match='x_t has 3 values'): rare_probabilities([0.0, 0.0, 0.0], X_r, [1, 1, 1])


def test_candidate_softmax_is_stable():
    np.testing.assert_allclose(candidate_probabilities([-1e4, -1e4 + np.log(3)]), [0.25, 0.75], rtol=1e-12)
    np.testing.assert_allclose(candidate_probabilities([1e4, 1e4 + np.log(3)]), [0.25, 0.75], rtol=1e-12)
    np.testing.assert_allclose(candidate_probabilities([1e4, -1e4]), [1.0, 0.0], atol=1e-300)
    with pytest.raises(ValueError, match='NaN or infinite'): candidate_probabilities([0.0, np.inf])


def test_context_model_is_the_rare_gaussian():
    from scipy.stats import multivariate_normal
    X_r = np.random.default_rng(0).normal(0, 1, (50, 8)) * np.linspace(2, 0.5, 8)
    cm = fit_context_model(X_r, p=3)
    Z = cm.transform(X_r)
    ref = multivariate_normal(Z.mean(0), np.cov(Z.T, bias=True) + 1e-6 * np.eye(3)).logpdf(Z)
    np.testing.assert_allclose(cm.log_likelihood(X_r), ref, rtol=1e-9)
    with pytest.warns(UserWarning, match='capped to 2'): assert fit_context_model(X_r[:3], p=16).p == 2


# ---- masks, geometry
def test_mask_layers_exact():
    N = np.zeros((11, 11), bool); N[5, 5] = True
    d = np.abs(np.indices((11, 11)) - 5).sum(0)
    m = insertion_masks(N, major=N)
    assert np.array_equal(m['keep'], d <= 1) and np.array_equal(m['ring'], (d >= 2) & (d <= 3))
    assert np.array_equal(m['erase'], d <= 2) and np.array_equal(m['conventional'], (d >= 1) & (d <= 3))
    O = d == 3
    m = insertion_masks(N, None, O)
    assert np.array_equal(m['ring'], d == 2) and not m['erase'].any()


def test_rotation_onto_the_target():
    m = np.zeros((41, 41), np.uint8); cv2.ellipse(m, (20, 20), (12, 4), 15, 0, 360, 1, -1); m = m.astype(bool)
    img = np.zeros((41, 41, 3), np.uint8)
    a0 = ellipse_angle(m)
    for target in ((a0 + 80) % 180, (a0 - 50) % 180, (a0 + 35) % 180):
        _, m2, info = adjust_geometry(img, m, target, np.random.default_rng(0), flip_p=0.0)
        assert abs(axial_difference(ellipse_angle(m2), target)) < 2 and abs(info['rotation']) > 30
    _, m3, info = adjust_geometry(img, m, ellipse_angle(m) + 20, np.random.default_rng(0), flip_p=0.0)
    assert np.array_equal(m3, m) and info['rotation'] == 0


# ---- insertion
def test_copy_and_replace_labels_and_type(scene):
    tgt, src, major_loc, rare_loc = scene
    c = Canvas(tgt); si = c.add_source(src)
    e = insert_nucleus(c, major_loc, src, rare_loc, np.random.default_rng(0), si)
    assert isinstance(e, Insertion), e
    a = c.finish('nucleimix', {}); check_sample(a.sample); check_record(a.record)
    assert a.sample.inst_types[e.code - 1] == 1 and np.array_equal((a.sample.inst_map == e.code)[e.frame], e.nucleus)
    assert a.record['instances'][e.code - 1]['replaces'] == [0, major_loc.inst_id] and unaccounted_nuclei(tgt, a.record) == []
    changed = (a.sample.image != tgt.image).any(-1); region = np.zeros(tgt.shape, bool); region[e.frame] = e.region
    assert not (changed & ~region).any()


def test_refusals(scene):
    tgt, src, major_loc, rare_loc = scene
    r = lambda loc, **kw: insert_nucleus(Canvas(tgt), loc, src, rare_loc, np.random.default_rng(0), 0, **kw)
    e = r(major_loc)
    assert r(major_loc, margin=60) == 'margin'
    assert r(major_loc, earlier=[e]) == 'near_insertion' and r(major_loc, earlier=[e], exclusion=0) == 'overlap'
    assert r(Location(BACKGROUND, 0, 0, 0, (64.0, 53.0), (9, 9))) == 'no_space'
    with pytest.raises(ValueError, match='source must be a rare nucleus'):
        insert_nucleus(Canvas(tgt), major_loc, src, major_loc, np.random.default_rng(0))


def test_labels_valid_after_every_insertion_and_rare_types(fitted, train):
    res = fitted.augment(train, 10, seed=0, check=True)  # check_sample of the changed image after each insertion
    rep = res.report
    assert rep['inserted'] > 0 and rep['inserted'] + sum(rep['rejected'].values()) == rep['drawn']
    for e in res.insertions:
        s = res.samples[e.image]; i = e.record['id']
        assert s.inst_types[i - 1] == 1 and e.record['type'] == 1
        assert np.array_equal((s.inst_map == i)[e.frame], e.nucleus)
        H, W = s.shape; ys, xs = np.nonzero(e.region)  # margins: the masks stay 20 px from the border
        assert ys.min() + e.y0 >= 20 and xs.min() + e.x0 >= 20 and ys.max() + e.y0 < H - 20 and xs.max() + e.x0 < W - 20
    for j, a in res.augmented.items():
        check_sample(a.sample); check_record(a.record); assert unaccounted_nuclei(train[j], a.record) == []
    cnt = insertion_counts(train, res.samples)
    assert cnt.loc[1, 'change'] == rep['inserted']


def test_reproducible(fitted, train):
    a, b, c = (fitted.augment(train, 6, seed=s) for s in (5, 5, 6))
    assert a.records() == b.records()
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.inst_map, y.inst_map) for x, y in zip(a.samples, b.samples))
    key = lambda r: [(e.image, e.record['target_id'], e.record['source_id']) for e in r.insertions]
    assert key(a) != key(c)


def test_terminates_without_valid_candidates():
    small = [toy([(28, 28, 5, 7, 0, 2), (12, 12, 4, 4, 0, 1), (44, 40, 4, 4, 0, 1)], size=56, seed=s) for s in range(2)]
    nm = NucleiMix([1], [2], context_size=64, context_hole=32, per_pixels=100)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); nm.fit(small)
    r = nm.augment(small, 50, seed=0).report  # every location is within the 30 px margin
    assert r['inserted'] == 0 and r['exhausted'] and r['drawn'] == r['candidates'] > 0 and r['candidates_left'] == 0
    assert r['rejected']['margin'] == r['candidates']


def test_known_pixels_identical_after_inpainting(scene):
    tgt, src, major_loc, rare_loc = scene
    c = Canvas(tgt); si = c.add_source(src)
    ins = [insert_nucleus(c, major_loc, src, rare_loc, np.random.default_rng(0), si),
           insert_nucleus(c, Location(BACKGROUND, 0, 0, 0, (64.0, 86.0), (9, 9)), src, rare_loc, np.random.default_rng(1), si, exclusion=0)]
    assert all(isinstance(e, Insertion) for e in ins), ins
    img = c.image.copy()
    def union(attr):
        m = np.zeros(tgt.shape, bool)
        for e in ins: m[e.frame] |= getattr(e, attr)
        return m
    sched = make_noise_scheduler(); torch.manual_seed(0)
    for model in (FakeEps(), make_unet('tiny')):
        out, st = progressive_inpaint(img, ins, model, sched, steps=1, seed=0, tile=64)
        hole = union('erase') | union('ring')
        assert np.array_equal(out[~hole], img[~hole]) and np.array_equal(out[union('keep')], img[union('keep')])
        assert np.array_equal(st['stage1'][~union('erase')], img[~union('erase')])
        conv, _ = progressive_inpaint(img, ins, model, sched, steps=1, seed=0, tile=64, mode='conventional')
        assert np.array_equal(conv[~union('conventional')], img[~union('conventional')])
        assert (conv[union('conventional')] != img[union('conventional')]).any()


def test_augment_with_inpainting_keeps_labels_and_known_pixels(fitted, train):
    plain = fitted.augment(train, 3, seed=1)
    torch.manual_seed(0)
    inp = fitted.augment(train, 3, seed=1, inpaint=dict(model=make_unet('tiny'), noise_scheduler=make_noise_scheduler(), steps=1, tile=64))
    assert plain.records() == inp.records()
    for j, a in inp.augmented.items():
        b = plain.augmented[j].sample; assert np.array_equal(a.sample.inst_map, b.inst_map)
        hole = np.zeros(b.shape, bool)
        for e in inp.insertions:
            if e.image == j: hole[e.frame] |= e.erase | e.ring
        assert np.array_equal(a.sample.image[~hole], b.image[~hole])


# ---- feature extractors
def test_ctranspath_features_from_released_layout(tmp_path):
    from nucbook.models.ctranspath import CTransPath, ctranspath_input, ctranspath_released_state
    torch.manual_seed(0); model = CTransPath().eval()
    torch.save({'model': ctranspath_released_state(model)}, tmp_path/'ctranspath.pth')
    ext = CTransPathFeatures(tmp_path/'ctranspath.pth', device='cpu')
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    f = ext(x)
    with torch.no_grad(): ref = model(ctranspath_input(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy()
    assert f.shape == (2, 772) and f.dtype == np.float32 and ext.name == 'ctranspath'
    np.testing.assert_allclose(f[:, :768], ref, atol=1e-5); np.testing.assert_allclose(f[:, 768:], glcm_features(x))
    with pytest.raises(FileNotFoundError, match='nope.pth: CTransPath checkpoint not found'): CTransPathFeatures(tmp_path/'nope.pth')


def test_offline_and_encoder_features():
    from nucbook.models.hovernet import HoVerNet
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f = OfflineFeatures(scaled=False)(x)
    v = x.reshape(2, -1, 3).astype(float); od = -np.log10((v + 1) / 256)
    np.testing.assert_allclose(f[:, :12], np.concatenate([(v / 255).mean(1), (v / 255).std(1), od.mean(1), od.std(1)], 1), atol=1e-6)
    np.testing.assert_allclose(f[:, 12:], glcm_features(x))
    np.testing.assert_allclose(OfflineFeatures()(x), f / OFFLINE_SPREAD, rtol=1e-6)
    assert f.shape == (2, 16)
    torch.manual_seed(0); e = EncoderFeatures(HoVerNet('tiny'))
    assert e(x).shape == (2, 128)


# ---- errors name the problem
def test_errors_name_the_problem(scene, train, fitted):
    tgt, src, major_loc, rare_loc = scene
    with pytest.raises(ValueError, match=r'toy-1\): location centre \(y=200, x=5\) lies outside the 128x128'):
        context_patch(tgt, Location('major', 0, 1, 2, (200.0, 5.0), (5, 5)))
    bad = Sample(tgt.image.astype(np.float64) / 255, tgt.inst_map, tgt.type_map, tgt.inst_types, tgt.meta)
    with pytest.raises(LabelError, match=r'toy-1\): image must be uint8'): context_patch(bad, major_loc)
    with pytest.raises(ValueError, match="unknown fill 'telea'"): context_patch(tgt, major_loc, fill='telea')
    with pytest.raises(ValueError, match='expected uint8 patches N x H x W x 3'): OfflineFeatures()(np.zeros((2, 8, 8)))
    untyped = make_sample(tgt.image, tgt.inst_map, meta={'image_id': 'plain'})
    with pytest.raises(LabelError, match=r'samples\[0\] \(plain\): NucleiMix needs nucleus types'):
        candidate_locations([untyped], [1], [2])
    with pytest.raises(ValueError, match='overlap'): NucleiMix([1], [1, 2])
    with pytest.raises(ValueError, match='0 nuclei of the rare types \\[1\\]'):
        NucleiMix([1], [2], context_size=64, context_hole=32).fit([toy([(40, 40, 5, 5, 0, 2)])])
    with pytest.raises(RuntimeError, match='call fit'): NucleiMix([1], [2]).augment(train, 1)
    res = fitted.augment(train, 2, seed=0); assert res.report['inserted'] > 0
    with pytest.raises(ValueError, match='not the 3 training samples'): fitted.augment(res.samples, 1)  # labels changed
    with pytest.raises(ValueError, match='unknown mode'): progressive_inpaint(tgt.image, [], FakeEps(), make_noise_scheduler(), mode='x')


def test_smoke_notebook_runs(tmp_path):
    "The smoke profile end to end (`make test` runs it): diffusion training, inpainting, comparators, segmenter rows, tables."
    m = run_smoke('12_nucleimix', tmp_path)
    assert m['label'].startswith('SMOKE RUN') and 'synthetic data' in m['label'] and 'NOT a reproduction' in m['label']
    assert "augmented rows: 6 epochs from the baseline's epoch 6" in m['label']
    rep = m['nucleimix']['reports']['8']
    assert rep['inserted'] == 8 and not rep['exhausted'] and rep['inserted'] + sum(rep['rejected'].values()) == rep['drawn']
    # Table 1 form: NucleiMix adds exactly its insertions to the rare class (none of them covered a rare nucleus here)
    t1 = m['table1']
    assert t1['NucleiMix (k=8)']['other'] - t1['Original']['other'] == 8 and t1['NucleiMix (k=8)']['inserted'] == 8
    assert {c: v['inserted'] for c, v in m['comparators'].items()} == {'CutMix': 8, 'CopyPaste': 8, 'GradMix': 0}
    assert [row['row'] for row in m['results']] == ['Baseline', 'NucleiMix', 'CutMix', 'CopyPaste', 'GradMix']
    assert all(row['dice_all'] > 25 and 'f1_d_all' in row and 'pq_all' in row for row in m['results'])
    # beside our rows: SONNET's and PointNu's numbers, labelled as other segmenters on another dataset, with their gains
    t3 = m['table3']['NucleiMix']
    assert t3['AJI | paper SONNET (consep: other dataset)'] == '49.80 ± 0.60' and t3['AJI | Δ (SONNET, consep)'] == '+1.90'
    assert m['table4']['NucleiMix']['F_c^M (miscellaneous) | Δ (SONNET, consep)'] == '+5.80'
    assert not any('HoVer-Net' in k for k in t3)  # the paper has no HoVer-Net row: nothing is offered as comparable
    assert list(m['steps_curve']) == ['2', '4', '8'] and all(v['mae'] >= 0 for v in m['steps_curve'].values())
    assert 0 <= m['label_fidelity']['NucleiMix']['found'] <= 1 and m['label_fidelity']['NucleiMix']['n_inserted'] == 8
    assert m['diffusion']['preset'] == 'tiny' and m['diffusion']['steps'] == 20
    assert {'nucleimix_stages.png', 'inpainting_vs_steps.png', 'diffusion_loss.png', 'params.json'} <= {p.name for p in tmp_path.iterdir()}
