"""DiffMix (nbs/13_diffmix.ipynb): enlarging maps keep every nucleus's shape, type and count and stay inside without
overlaps; balancing maps are GradMix's labels on the original image; synthesis carries the maps exactly, starts from the
original and depends on the seed only; iteration-matched epochs; the paper's Table 1; the two SDM phases; the smoke run."""
import json
from smoke import run_smoke
import cv2
import numpy as np
import pytest
import torch
from nucbook.bench.protocol import check_paper
from nucbook.augment.canvas import check_record, unaccounted_nuclei
from nucbook.data.sample import LabelError, Sample, check_sample, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.engine.diffusion import make_noise_scheduler
from nucbook.models.sdm import SDMUNet, sdm_config
from nucbook.methods.diffmix import (DIFFMIX_ROWS, DIFFMIX_TABLES, ENLARGE_OUTCOMES, balancing_maps, crop_pairs,
                                     enlarging_map, gradmix_set, iteration_matched_epochs, label_map, map_fidelity,
                                     synthesis_order, synthesize, synthetic_counts, train_sdm, training_sets)

torch.set_num_threads(1)  # pytest -n 2 on 2 cores


def toy(nuclei, size=64, seed=0):
    "A typed sample with one filled ellipse per (cy, cx, ry, rx, type), later ones on top."
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((228, 180, 212), 6, (size, size, 3)), 0, 255).astype(np.uint8)
    inst = np.zeros((size, size), np.int32); types = {}
    for i, (cy, cx, ry, rx, t) in enumerate(nuclei, start=1):
        cv2.ellipse(inst, (cx, cy), (rx, ry), 0, 0, 360, i, -1); types[i] = t
    return make_sample(img, inst, inst_types=types, meta={'image_id': f'toy-{seed}'})


def shifted(mask, dy, dx):
    out = np.zeros_like(mask); ys, xs = np.nonzero(mask); out[ys + dy, xs + dx] = True; return out


def moves(s):
    return {r['source_id']: (r['outcome'], tuple(r['shift'])) for r in s.meta['augment'][-1]['steps'][0]['nuclei']}


def check_enlarging(s, e, d):
    "Every nucleus of `e` is the one of `s` moved by its recorded shift, |shift| <= d; nothing covered, cut or lost."
    assert e.n_instances == s.n_instances and np.array_equal(e.inst_types, s.inst_types)
    assert np.array_equal(np.bincount(e.inst_map.ravel()), np.bincount(s.inst_map.ravel()))  # areas: no overlap, inside
    assert np.array_equal(e.image, s.image)
    mv = moves(e)
    assert sorted(mv) == list(range(1, s.n_instances + 1))
    for i, (o, (dy, dx)) in mv.items():
        assert o in ENLARGE_OUTCOMES and max(abs(dy), abs(dx)) <= d, (i, o, dy, dx)
        assert (o == 'shifted') == ((dy, dx) != (0, 0))
        assert np.array_equal(e.inst_map == i, shifted(s.inst_map == i, dy, dx)), i


def randomised(model, std=0.05, seed=0):
    "The zero-initialised weights (ADM zero modules) drawn at random: an untrained net whose output depends on its inputs."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any(): p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope='module')
def tiles():
    return synth_dataset(4, 'train', seed=1, size=128, rare_share=0.2)


@pytest.fixture(scope='module')
def sdm():
    torch.manual_seed(0)
    return randomised(SDMUNet(**sdm_config('tiny', attention_resolutions=(16,))))


# ---- enlarging maps
def test_enlarging_hand_built():
    s = toy([(12, 12, 4, 5, 2), (40, 30, 5, 3, 3), (30, 2, 4, 4, 1), (50, 52, 3, 6, 4)])
    for sd in range(4):
        e = enlarging_map(s, 3, seed=sd)
        check_sample(e); check_enlarging(s, e, 3)
        assert moves(e)[3] == ('border', (0, 0))  # cut by the border: stays
        rec = e.meta['augment'][-1]; check_record(rec); assert unaccounted_nuclei(s, rec) == []
        assert sum(rec['params']['counts'].values()) == s.n_instances
    assert any(moves(enlarging_map(s, 3, seed=sd))[1][0] == 'shifted' for sd in range(4))
    e = enlarging_map(s, 3, seed=0, move_border=True); check_enlarging(s, e, 3)
    assert moves(e)[3][0] != 'border'
    # a disc inside a ring-shaped nucleus: neither can move without covering the other
    ring = np.zeros((40, 40), np.int32); cv2.circle(ring, (20, 20), 12, 1, -1); cv2.circle(ring, (20, 20), 5, 2, -1)
    boxed = make_sample(np.full((40, 40, 3), 200, np.uint8), ring, inst_types={1: 2, 2: 1}, meta={'image_id': 'ring'})
    for sd in range(6):
        r = enlarging_map(boxed, 3, seed=sd)
        assert np.array_equal(r.inst_map, boxed.inst_map) and {o for o, _ in moves(r).values()} <= {'stayed', 'zero'}


def test_enlarging_identity_bound_and_determinism(tiles):
    for j, t in enumerate(tiles):
        z = enlarging_map(t, 0, seed=j)
        assert np.array_equal(z.inst_map, t.inst_map) and np.array_equal(z.type_map, t.type_map)
        assert {o for o, _ in moves(z).values()} <= {'zero', 'border'}
        for d in (1, 2, 3):
            e = enlarging_map(t, d, seed=j); check_sample(e); check_enlarging(t, e, d)
            assert e.meta['augment'][-1]['params']['counts']['shifted'] > 0
        assert np.array_equal(enlarging_map(t, 3, seed=j).inst_map, enlarging_map(t, 3, seed=j).inst_map)
    assert not np.array_equal(enlarging_map(tiles[0], 3, seed=0).inst_map, enlarging_map(tiles[0], 3, seed=1).inst_map)
    # with d = 1 every nucleus draws from {-1, 0, 1}^2: over these tiles each offset shows up
    seen = {sh for j, t in enumerate(tiles) for o, sh in moves(enlarging_map(t, 1, seed=j)).values() if o == 'shifted'}
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} - {(0, 0)}


def test_enlarging_errors():
    s = toy([(20, 20, 4, 4, 1)])
    with pytest.raises(ValueError, match=r'toy-0\): max_shift must be a whole number >= 0'): enlarging_map(s, -1)
    with pytest.raises(ValueError, match='tries must be'): enlarging_map(s, 3, tries=0)
    with pytest.raises(LabelError, match=r'plain\): DiffMix label maps need nucleus types'):
        enlarging_map(make_sample(s.image, s.inst_map, meta={'image_id': 'plain'}))


# ---- label maps, balancing maps, patches
def test_label_map_channels():
    s = toy([(8, 8, 3, 3, 1), (8, 15, 3, 3, 2)], size=20)
    x = label_map(s, 4)
    assert x.shape == (6, 20, 20) and np.array_equal(x[:5].sum(0), np.ones((20, 20)))
    assert np.array_equal(x[2], (s.inst_map == 2).astype(np.float32)) and x[5][8, 11] == 1 and x[5][8, 8] == 0
    with pytest.raises(LabelError, match='do not fit a model of 1 types'): label_map(s, 1)


def test_balancing_maps_are_gradmix_labels(tiles):
    gm = gradmix_set(tiles, 1, seed=0, margin=12, area_ratio=1.0)
    bal = balancing_maps(tiles, 1, gradmix=gm)
    assert sum(b.meta['n_replaced'] for b in bal) > 0
    for t, g, b in zip(tiles, gm, bal):
        check_sample(b)
        assert np.array_equal(b.image, t.image)
        assert np.array_equal(b.inst_map, g.sample.inst_map) and np.array_equal(b.type_map, g.sample.type_map)
        assert np.array_equal(b.inst_types, g.sample.inst_types) and b.meta['map'] == 'balancing'
        assert (b.inst_types == 1).sum() - (t.inst_types == 1).sum() == b.meta['n_replaced'] == g.record['params']['n_replaced']
    order = synthesis_order(bal, seed=0); k = sum(b.meta['n_replaced'] > 0 for b in bal)
    assert sorted(order) == list(range(len(tiles))) and all(bal[i].meta['n_replaced'] > 0 for i in order[:k])
    with pytest.raises(ValueError, match=r"gradmix\[0\] was made from 'synth-1-train-0003'"): balancing_maps(tiles, 1, gradmix=gm[::-1])


def test_crop_pairs_line_up(tiles):
    maps = [enlarging_map(t, 3, seed=i) for i, t in enumerate(tiles)]
    ci, cm = crop_pairs(tiles, maps, [3, 1], patch=40, per_image=2, seed=2)
    assert len(ci) == len(cm) == 4
    for a, b in zip(ci, cm):
        y, x, h, w = a.meta['crop']
        assert a.meta['crop'] == b.meta['crop'] and (h, w) == (40, 40) and np.array_equal(b.image, a.image)
        check_sample(b)
    assert crop_pairs(tiles, None, [1], patch=40, per_image=2, seed=2)[0][0].meta['crop'] == ci[2].meta['crop']
    assert np.array_equal(crop_pairs(tiles, None, [0])[0][0].image, tiles[0].image)


# ---- synthesis
def test_synthesize_carries_the_maps_and_is_seeded(sdm):
    ns = make_noise_scheduler()
    src = synth_dataset(3, 'train', seed=2, size=32, rare_share=0.2)
    maps = [enlarging_map(t, 3, seed=i) for i, t in enumerate(src)]
    kw = dict(steps=10, start_step=4, s=1.5, batch_size=2)
    syn = synthesize(sdm, ns, src, maps, seed=5, **kw)
    for o, m, p in zip(src, maps, syn):
        check_sample(p)
        assert np.array_equal(p.inst_map, m.inst_map) and np.array_equal(p.type_map, m.type_map)
        assert np.array_equal(p.inst_types, m.inst_types) and not np.array_equal(p.image, o.image)
    meta = syn[2].meta['synthesis']
    assert (meta['source_image'], meta['map'], meta['seed'], meta['start_step'], meta['denoising_steps'], meta['start_timestep'],
            meta['convention']) == (src[2].meta['image_id'], 'enlarging', 7, 4, 5, 400, 'authors')
    again = synthesize(sdm, ns, src, maps, seed=5, **kw)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, syn))
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    one = lambda **k: synthesize(sdm, ns, src[:1], maps[:1], **{**kw, 'seed': 5, **k})[0].image  # patch 0 alone
    assert diff(one(), syn[0].image) <= 0.01  # another batch: the same up to float rounding
    assert diff(one(seed=9), one()) > 2 and diff(one(convention='paper'), one()) > 2  # the seed and the convention reach the sampler


def test_synthesis_starts_from_the_original_under_the_map(sdm):
    ns = make_noise_scheduler()
    src = [toy([(10, 10, 4, 5, 2), (22, 20, 5, 4, 3)], size=32, seed=1), toy([(12, 14, 4, 4, 1)], size=32, seed=2)]
    m = enlarging_map(src[0], 3, seed=0)
    other = Sample(255 - src[0].image, m.inst_map, m.type_map, m.inst_types, {'map': 'enlarging', 'image_id': 'other'})
    p = synthesize(sdm, ns, src[:1], [other], steps=10, start_step=0)[0]  # one step from t = 0
    assert np.array_equal(p.inst_map, other.inst_map)
    to_orig, to_map = (np.abs(p.image.astype(int) - a.astype(int)).mean() for a in (src[0].image, other.image))
    assert to_orig < 3 and to_map > 50, (to_orig, to_map)
    retyped = make_sample(src[0].image, src[0].inst_map, inst_types=[4] * src[0].n_instances)
    a = synthesize(sdm, ns, src[:1], [retyped], steps=10, start_step=4, seed=1)[0].image
    b = synthesize(sdm, ns, src[:1], [src[0]], steps=10, start_step=4, seed=1)[0].image
    assert not np.array_equal(a, b)  # the label map reaches the model
    with pytest.raises(ValueError, match='2 originals for 1 label maps'): synthesize(sdm, ns, src, [m])
    with pytest.raises(ValueError, match=r'toy-0\) is 20x20 \(WxH\), its original'):
        synthesize(sdm, ns, src[:1], [toy([(10, 10, 3, 3, 1)], size=20)])
    with pytest.raises(ValueError, match='unknown guidance convention'): synthesize(sdm, ns, src[:1], [m], convention='eq7')


# ---- training sets, tables
def test_iteration_matched_epochs_reproduce_the_paper():
    for N in (27, 432, 600):
        c = synthetic_counts(N)
        assert [iteration_matched_epochs(100, N, sum(c[r].values())) for r in DIFFMIX_ROWS] == [100, 50, 75, 75, 50]
    assert iteration_matched_epochs(12, 6, 2) == 9 and iteration_matched_epochs(10, 4, 1) == 8
    with pytest.raises(ValueError, match='n_original must be'): iteration_matched_epochs(100, 0, 1)
    pools = {k: [f'{k}{i}' for i in range(6)] for k in ('gradmix', 'enlarging', 'balancing')}
    ts = training_sets([f'o{i}' for i in range(6)], pools, base_epochs=100, seed=1)
    assert {r: (len(t.samples), t.epochs) for r, t in ts.items()} == \
        {'Baseline': (6, 100), 'GradMix': (12, 50), 'DiffMix-E': (8, 75), 'DiffMix-B': (8, 75), 'DiffMix': (12, 50)}
    assert ts['DiffMix'].added == {'balancing': 3, 'enlarging': 3} and ts['DiffMix-B'].samples[6:] == ts['DiffMix'].samples[6:8]
    with pytest.raises(ValueError, match='row DiffMix adds 3 enlarging samples'):
        training_sets(['o'] * 6, {**pools, 'enlarging': pools['enlarging'][:2]})


def test_paper_tables():
    for t in DIFFMIX_TABLES.values(): check_paper(t)
    rows = {(d, r['segmenter'], r['row']): r for d, t in DIFFMIX_TABLES.items() for r in t['rows']}
    assert len(rows) == 20 and {r[2] for r in rows} == set(DIFFMIX_ROWS)
    assert rows[('consep', 'HoVer-Net', 'Baseline')]['aji_all'] == 54.5 and rows[('consep', 'HoVer-Net', 'DiffMix')]['f1_c_1_all'] == 36.3
    assert rows[('glysac', 'HoVer-Net', 'DiffMix-B')]['pq_all'] == 64.2 and rows[('glysac', 'SONNET', 'GradMix')]['f1_c_2_all'] == 50.9
    assert rows[('consep', 'SONNET', 'DiffMix')]['f1_c_4_all'] == 57.5 and rows[('glysac', 'SONNET', 'DiffMix')]['f1_c_4_all'] is None
    assert DIFFMIX_TABLES['consep']['metrics']['f1_c_2_all'].startswith('F^I') and DIFFMIX_TABLES['glysac']['metrics']['f1_c_2_all'].startswith('F^L')
    # "4% and 9% margins from the second-highest result in classifying miscellaneous data" (CoNSeP, HoVer-Net and SONNET)
    for seg, gap in (('HoVer-Net', 4), ('SONNET', 9)):
        fm = sorted((r['f1_c_1_all'] for k, r in rows.items() if k[:2] == ('consep', seg)), reverse=True)
        assert round(fm[0] - fm[1]) == gap


def test_map_fidelity_scores_the_labels(tiles):
    same = map_fidelity(None, tiles, predict=lambda s: Sample(s.image, s.inst_map, s.type_map, s.inst_types, s.meta))
    assert same['n'] == 4 and all(abs(same[k] - 1) < 1e-5 for k in ('dice', 'pq', 'f1_d', 'acc', 'f1_type'))
    empty = map_fidelity(None, tiles, predict=lambda s: make_sample(s.image, np.zeros_like(s.inst_map), inst_types=[]))
    assert empty['dice'] == 0 and empty['f1_d'] == 0


def test_train_sdm_two_phases(tmp_path):
    from nucbook.core import load_checkpoint
    src = synth_dataset(2, 'train', seed=4, size=32)
    mk = lambda: SDMUNet(**sdm_config('tiny', attention_resolutions=(16,)))
    r = train_sdm(mk(), src, tmp_path, steps=2, cfg_steps=1, batch_size=2, cfg_lr=0.0, patch_size=16, ckpt_every=1)
    assert r.finished and (r.phase1.step, r.cfg.step) == (2, 1)
    for a, b in zip(r.phase1.ema_model().state_dict().values(), r.cfg.model.state_dict().values()): assert torch.equal(a, b)
    st = {p: load_checkpoint(tmp_path/p/'checkpoint.pt')['settings'] for p in ('phase1', 'cfg')}
    assert (st['phase1']['p_uncond'], st['cfg']['p_uncond'], st['phase1']['lr'], st['cfg']['lr']) == (0.0, 0.2, 1e-4, 0.0)
    again = train_sdm(mk(), src, tmp_path, steps=2, cfg_steps=1, batch_size=2, cfg_lr=0.0, patch_size=16, ckpt_every=1)
    assert (again.phase1.resumed_from, again.cfg.resumed_from) == (2, 1)


def test_smoke_notebook_runs(tmp_path):
    "The smoke profile end to end (`make test` runs it): SDM phases, maps, synthesis, five segmenter rows, tables."
    m = run_smoke('13_diffmix', tmp_path)
    assert m['label'].startswith('SMOKE RUN') and 'synthetic data' in m['label'] and 'NOT a reproduction' in m['label']
    assert [row['row'] for row in m['results']] == DIFFMIX_ROWS
    assert [row['epochs'] for row in m['results']] == [12, 6, 9, 9, 6] and [row['n_train'] for row in m['results']] == [6, 12, 8, 8, 12]
    assert all(row['dice_all'] > 25 and 'pq_all' in row and 'acc_all' in row for row in m['results'])
    assert m['sdm']['steps'] == [40, 20] and m['start_timestep'] == 375
    assert {k: v['patches'] for k, v in m['synthesis_timing'].items()} == {'balancing': 3, 'enlarging': 3}
    fid = m['label_fidelity']
    assert {v['n'] for v in fid.values()} == {3, 6} and all(0 <= v['dice'] <= 1 for v in fid.values())
    # beside our rows: the paper's HoVer-Net and SONNET numbers, both marked (consep_tiles is not the paper's unit)
    seg = m['table1_segmentation']['DiffMix']
    assert seg['AJI | paper HoVer-Net (consep: other dataset)'] == '56.30' and seg['AJI | Δ (HoVer-Net, consep)'] == '+1.80'
    assert seg['AJI | paper SONNET (consep: other dataset)'] == '57.00'
    assert m['table1_classification']['DiffMix']['F^M (miscellaneous) | Δ (HoVer-Net, consep)'] == '+15.90'
    share = m['rare_share']
    assert share['DiffMix-B']['other'] > share['Original']['other'] and share['GradMix']['samples'] == 12
    assert {'diffmix_fig2.png', 'sdm_loss.png', 'diffmix_data.png', 'params.json'} <= {p.name for p in tmp_path.iterdir()}
