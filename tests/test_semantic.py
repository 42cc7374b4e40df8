"""Semantic-aware augmentation (nbs/15_semantic.ipynb): the greedy policy search (finds a known best policy, stops when
the score stops improving, deterministic, resumable, refuses changed settings), the rank-based draw, image creation
(no overlaps, exact labels, the training images' count distribution and single/multi ratio), the paper's tables and
the smoke run."""
import json, subprocess, sys
from smoke import run_smoke
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy import stats
from nucbook.augment.canvas import check_record
from nucbook.augment.cells import OPERATIONS, MAGNITUDES, apply_policy, box_objects, collections
from nucbook.bench.protocol import check_paper
from nucbook.data.sample import check_sample, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.engine.loop import SettingsMismatch
from nucbook.models.wae import WAE, wae_config
from nucbook.methods.semantic import (SEMANTIC_TABLES, CountDistribution, compose, count_distribution, draw_cells,
                                      draw_policy, generate, greedy_search, is_dark_field, noise_background, policy_name,
                                      rank_probabilities, wae_scorer)

torch.set_num_threads(1)  # pytest -n 2 on 2 cores
ROOT = Path(__file__).resolve().parents[1]
TARGET = (('Contrast', 4), ('Rotate', 8), ('Equalize', 0))


def toy_score(policy):
    "1 - 0.01 j per step j matching TARGET; the first wrong step and every step beyond TARGET cost."
    s = 0.0
    for j, (u, t) in enumerate(zip(policy, TARGET)):
        if u != t: return s - 0.3 * (u[0] != t[0]) - 0.05 * abs(u[1] - t[1]) - 0.2 * max(0, len(policy) - len(TARGET))
        s += 1 - 0.01 * j
    return s - 0.2 * max(0, len(policy) - len(TARGET))


# ---- greedy search
@pytest.mark.parametrize('keep', [1, 3])
def test_search_finds_the_known_best_and_stops(keep):
    res = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=8, keep=keep, max_policies=50_000)
    assert res.best['policy'] == TARGET and res.best['layer'] == 3
    assert res.stopped == 'no_improvement' and len(res.layers) == 4  # layer 4 only adds a step: the search stops there
    assert [l['evaluated'] for l in res.layers] == [110] + [110 * keep] * 3  # Eq. 1 for keep = 1
    assert [l['improved'] for l in res.layers] == [True, True, True, False]
    scores = [r['score'] for r in res.ranked]
    assert scores == sorted(scores, reverse=True) and len(res) == len({r['policy'] for r in res.ranked})


def test_search_extends_the_strongest():
    "Every layer's candidates are the best `keep` of the layer before, each extended by one (operation, magnitude)."
    res = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=3, keep=2)
    by_layer = {l: [r for r in res.ranked if r['layer'] == l] for l in (1, 2, 3)}
    for l in (2, 3):
        parents = sorted(by_layer[l - 1], key=lambda r: (-r['score'], r['order']))[:2]
        assert {r['policy'][:-1] for r in by_layer[l]} == {p['policy'] for p in parents}
    assert res.stopped == 'max_depth'


def test_search_is_deterministic_and_seeded():
    a = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=5, keep=2, seed=3)
    b = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=5, keep=2, seed=3)
    c = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=5, keep=2, seed=4)
    assert a.ranked == b.ranked
    assert c.best['policy'] == a.best['policy'] and [r['order'] for r in c.ranked] != [r['order'] for r in a.ranked]


def test_search_budget():
    res = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=5, keep=2, max_policies=250)
    assert len(res) == 250 and res.stopped == 'max_policies' and [l['evaluated'] for l in res.layers] == [110, 140]
    res = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=5, keep=1, max_policies=220)
    assert len(res) == 220 and res.stopped == 'max_policies' and len(res.layers) == 2


def test_search_resumes_identically(tmp_path):
    full = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=6, keep=2)
    f = tmp_path/'s.json'
    for stop_at in (37, 250, 400):  # inside layer 1, 2 and 3
        f.unlink(missing_ok=True); n = [0]
        def flaky(p):
            n[0] += 1
            if n[0] > stop_at: raise KeyboardInterrupt
            return toy_score(p)
        with pytest.raises(KeyboardInterrupt): greedy_search(flaky, OPERATIONS, MAGNITUDES, max_depth=6, keep=2, out=f, save_every=7)
        assert len(json.loads(f.read_text())['evaluated']) == stop_at
        calls = []
        again = greedy_search(lambda p: calls.append(p) or toy_score(p), OPERATIONS, MAGNITUDES, max_depth=6, keep=2, out=f)
        assert again.ranked == full.ranked and again.layers == full.layers and again.stopped == full.stopped
        assert len(calls) == len(full) - stop_at and again.scored_now == len(calls)
    assert greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=6, keep=2, out=f).scored_now == 0


def test_search_refuses_changed_settings(tmp_path):
    f = tmp_path/'s.json'
    greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=2, keep=1, out=f, scorer={'model': 'a'})
    for change, key in (({'keep': 2}, 'keep'), ({'seed': 1}, 'seed'), ({'max_policies': 100}, 'max_policies'),
                        ({'scorer': {'model': 'b'}}, 'scorer.model'), ({'operations': OPERATIONS[:5]}, 'operations')):
        kw = dict(operations=OPERATIONS, magnitudes=MAGNITUDES, max_depth=2, keep=1, out=f, scorer={'model': 'a'}) | change
        with pytest.raises(SettingsMismatch, match=key) as e: greedy_search(toy_score, **kw)
        assert str(f) in str(e.value)
    # a file whose stored scores do not lead to its stored policies (edited, or written by another version): refused
    g = tmp_path/'g.json'
    greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=2, out=g)
    d = json.loads(g.read_text())
    worst = min(range(110), key=lambda i: d['evaluated'][i][1]); d['evaluated'][worst][1] = 99.0  # another best of layer 1
    g.write_text(json.dumps(d))
    with pytest.raises(ValueError, match='comes from another scorer'):
        greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=2, out=g)


def test_scorer_identity_guards_resume(tmp_path):
    "The WAE scorer names its weights: a search file of one model is refused for another."
    cells = collections(synth_dataset(2, 'train', seed=1, size=96, density=0.5), seed=0).single
    torch.manual_seed(0); m1 = WAE(**wae_config('tiny')).eval(); m2 = WAE(**wae_config('tiny')).eval()
    s1, s2 = wae_scorer(m1, cells, 4, seed=0), wae_scorer(m2, cells, 4, seed=0)
    f = tmp_path/'w.json'
    ops = ['FlipLR', 'Smooth']
    r1 = greedy_search(s1, ops, 2, max_depth=2, out=f, scorer=s1.settings)
    assert greedy_search(s1, ops, 2, max_depth=2, out=f, scorer=wae_scorer(m1, cells, 4, seed=0).settings).ranked == r1.ranked
    with pytest.raises(SettingsMismatch, match='scorer.model'): greedy_search(s2, ops, 2, max_depth=2, out=f, scorer=s2.settings)
    s3 = wae_scorer(m1, cells[::-1][:4], 4, seed=0)  # other cells scored, the same seed
    with pytest.raises(SettingsMismatch, match='scorer.cells'): greedy_search(s3, ops, 2, max_depth=2, out=f, scorer=s3.settings)


# ---- rank-based draw
@pytest.mark.parametrize('n,alpha', [(15, 2.0), (40, 1.0), (6, 0.0)])
def test_draw_follows_rank_probabilities(n, alpha):
    ranked = [((OPERATIONS[i % 11], i // 11),) for i in range(60)]
    rng = np.random.default_rng(0)
    where = {p: i for i, p in enumerate(ranked)}
    counts = np.bincount([where[draw_policy(ranked, rng, top=n, alpha=alpha)] for _ in range(30_000)], minlength=n)
    assert len(counts) == n  # nothing beyond the first `top`
    p = rank_probabilities(n, alpha)
    assert stats.chisquare(counts, 30_000 * p).pvalue > 0.01  # fixed seed: the draw follows p_i
    assert counts[0] == counts.max() if alpha > 0 else True


def test_rank_probabilities_exact():
    np.testing.assert_allclose(rank_probabilities(3), np.array([36, 9, 4]) / 49, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rank_probabilities(2, alpha=1), [2 / 3, 1 / 3], rtol=0, atol=1e-12)
    assert rank_probabilities(1000)[0] == pytest.approx(1 / (np.pi ** 2 / 6), abs=1e-3)  # 1 / sum 1/i^2 -> 6 / pi^2


# ---- image creation
@pytest.fixture(scope='module')
def train():
    return synth_dataset(30, 'train', seed=2, size=128, density=0.5)


@pytest.fixture(scope='module')
def col(train):
    return collections(train, min_area=10, noise_size=24, n_noise=30, seed=0)


STILL = [(('FlipLR', 0),), (('FlipUD', 0), ('Contrast', 9)), (('Resize', 0),), (('Resize', 9), ('Smooth', 0)), (('Equalize', 0),)]


def objects_of(s):
    return s.meta['augment'][-1]['steps'][0]['objects']


def assert_exact(s, col):
    "Every placed object is its cell under its policy, pixel for pixel and label for label, at the recorded place."
    cells = {c.source: c for c in col.single + col.multi}
    covered = np.zeros(s.inst_map.shape, bool)
    for o in objects_of(s):
        cell = apply_policy(cells[(o['source'], tuple(o['source_ids']))], o['policy'], refused='skip')
        (x, y), (w, h) = o['xy'], o['size']
        assert cell.inst.shape == (h, w)
        assert np.array_equal(s.inst_map[y:y + h, x:x + w], np.array([0] + o['ids'])[cell.inst])
        assert np.array_equal(s.image[y:y + h, x:x + w][cell.inst > 0], cell.image[cell.inst > 0])
        covered[y:y + h, x:x + w] |= cell.inst > 0
    assert np.array_equal(covered, s.inst_map > 0)  # no labelled pixel that no object explains


def assert_apart(s, gap=1):
    "Bounding boxes grown by `gap` never meet another box: no overlap, and each object is one object of the new image."
    objs = objects_of(s)
    for i, a in enumerate(objs):
        (x, y), (w, h) = a['xy'], a['size']
        for b in objs[i + 1:]:
            (X, Y), (W, H) = b['xy'], b['size']
            assert x + w + gap <= X or X + W + gap <= x or y + h + gap <= Y or Y + H + gap <= y, (a, b)
    groups, _ = box_objects(s.inst_map)
    assert sorted(len(g) for g in groups) == sorted(len(o['ids']) for o in objs)


def test_compose_exact_labels_no_overlap(col, train):
    cd = count_distribution(train)
    crowded = CountDistribution(cd.objects * 8, cd.single * 8, cd.areas, cd.image_ids)  # 8x as dense: many refused places
    for k in range(12):
        for dist in (cd, crowded):
            s = compose(col, STILL, STILL, dist, size=128, background='blank', rng=k, fill=(9, 9, 9))
            check_sample(s); check_record(s.meta['augment'][-1])
            assert_exact(s, col); assert_apart(s)
            assert np.all(s.image[s.inst_map == 0] == 9)  # the blank canvas untouched between the objects
            p = s.meta['semantic']
            assert p['placed']['single'] + p['placed']['multi'] + p['skipped'] == p['drawn']['objects']
    assert crowded.draw(np.random.default_rng(0), 128 * 128) > 0
    assert sum(compose(col, STILL, STILL, crowded, size=128, rng=k).meta['semantic']['skipped'] for k in range(5)) > 0


def test_compose_with_rotations_and_noise(col, train):
    cd = count_distribution(train)
    ranked = [((op, m),) for op in OPERATIONS for m in range(MAGNITUDES)]
    for k in range(6):
        s = compose(col, ranked, ranked, cd, size=128, background='noise', rng=k, top=110, alpha=0.0)
        check_sample(s); assert_apart(s)
        assert s.n_instances == sum(len(o['ids']) for o in objects_of(s))
        assert s.has_types and len(s.inst_types) == s.n_instances  # typed cells keep their types
    a, b = generate(col, ranked, ranked, cd, 2, seed=1, size=96), generate(col, ranked, ranked, cd, 2, seed=1, size=96)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.inst_map, y.inst_map) for x, y in zip(a, b))


def test_count_distribution_and_ratio_kept(col, train):
    "Generated images of the training images' size: their object counts follow the training counts (two-sample KS test,"
    " p > 0.01 with a fixed seed; the same counts shifted by 2 are rejected), and single-cells keep their share (binomial test)."
    cd = count_distribution(train)
    gen = generate(col, STILL, STILL, cd, 300, seed=0, size=128)
    placed = np.array([len(box_objects(g.inst_map)[0]) for g in gen])  # objects of the new images, counted from their labels
    assert sum(g.meta['semantic']['skipped'] for g in gen) <= 3  # sparse enough that (nearly) every drawn object finds a place
    assert stats.ks_2samp(placed, cd.objects).pvalue > 0.01
    assert stats.ks_2samp(placed + 2, cd.objects).pvalue < 0.01  # the test can tell a shift of 2 objects
    single = sum(g.meta['semantic']['placed']['single'] for g in gen)
    assert stats.binomtest(single, int(placed.sum()), cd.single_share).pvalue > 0.01
    assert 0.5 < cd.single_share < 0.95  # both kinds present in the training images


def test_count_distribution_scales_with_area():
    m = np.zeros((50, 50), np.int32); m[5:9, 5:9] = 1; m[20:24, 20:24] = 2; m[23:27, 24:28] = 3; m[40:44, 10:14] = 4
    cd = count_distribution([make_sample(np.zeros((50, 50, 3), np.uint8), m)])
    assert (cd.objects.tolist(), cd.single.tolist()) == ([3], [2])  # 2 and 3 share a box row: one multi-cell
    rng = np.random.default_rng(0)
    assert {cd.draw(rng, 2500) for _ in range(20)} == {3}
    d = [cd.draw(rng, 2500 // 4) for _ in range(4000)]  # 0.75 objects: 0 or 1, 1 three times in four
    assert set(d) == {0, 1} and abs(np.mean(d) - 0.75) < 0.03


def test_noise_background_and_dark_field():
    pieces = [np.full((20, 20, 3), 70, np.uint8), np.full((30, 26, 3), 70, np.uint8)]
    assert np.all(noise_background(pieces, (40, 90), 0) == 70)
    dark = np.full((30, 30, 3), 5, np.uint8); dark[10:15, 10:15] = 180
    assert is_dark_field(dark) and not is_dark_field(255 - dark)
    with pytest.raises(ValueError, match='no background piece'): noise_background([], 16)


def test_draw_cells(col):
    made = draw_cells(col.multi, STILL, 20, rng=0)
    assert all(c.kind == 'multi' and c.ops in STILL for c in made)


def test_real_dsb_images(data_root):
    "On real DSB 2018 images: the dark-field rule, and composed images from their cells keep labels exact and apart."
    from nucbook.data.datasets import load_dataset
    ss = load_dataset('dsb2018', 'stage1_test', data_root, limit=12)
    dark = [s for s in ss if is_dark_field(s)]
    assert 0 < len(dark) < len(ss)  # the rule keeps grey dark images, not the coloured or bright ones
    assert all(not is_dark_field(s) for s in ss if s.image.astype(int).std(axis=2).mean() > 5)
    c = collections(dark, seed=0); cd = count_distribution(dark)
    for k in range(4):
        s = compose(c, STILL, STILL, cd, size=256, rng=k, fill=0)
        check_sample(s); assert_exact(s, c); assert_apart(s)


# ---- the paper's tables
def test_paper_tables():
    for t in SEMANTIC_TABLES.values(): check_paper(t)
    t2 = {r['row']: r for r in SEMANTIC_TABLES['table2_dsb2018']['rows']}
    assert (t2['Sem-Aware']['fid'], t2['Sem-Aware']['kid'], t2['StyleGAN2-Diff']['fid']) == (23.32, 0.0212, 10.36)
    t4 = {r['row']: r for r in SEMANTIC_TABLES['table4_cart']['rows']}
    assert (t4['DCGAN']['fid'], t4['BigGAN-SD']['kid']) == (343.59, 0.5216)
    t5 = SEMANTIC_TABLES['table5_dsb2018']['rows']
    assert len(t5) == 22 and t5[0]['segmenter'] == 'Faster R-CNN R-101' and (t5[0]['ap_box'], t5[1]['ap_box']) == (38.6, 44.0)
    assert all('other segmenter' in r['label'] for r in t5) and SEMANTIC_TABLES['table5_dsb2018']['segmenter'] == 'HoVer-Net'
    assert [r['jaccard'] for r in SEMANTIC_TABLES['table5_nseg_cart']['rows']] == [32.69, 43.48]


def test_smoke_notebook_runs(tmp_path):
    "The smoke profile end to end (`make test` runs it): WAE, both searches, generation, realism, two segmenter rows."
    m = run_smoke('15_semantic', tmp_path)
    assert m['label'].startswith('SMOKE RUN') and 'synthetic data' in m['label'] and 'NOT a reproduction' in m['label']
    assert [x['row'] for x in m['results']] == ['Baseline', 'Sem-Aware']
    assert [x['n_train'] for x in m['results']] == [8, 14] and all('ap50_all' in x and 'ap50_95_all' in x for x in m['results'])
    assert {k: v['policies evaluated'] for k, v in m['searches'].items()} == {'single': 325, 'multi': 325}  # 65 + 2 x 65 + 2 x 65 (max_depth 3)
    assert m['wae']['steps'] == 150 and m['r'] == 6 and m['generation']['size'] == 128
    assert 'NOT comparable' in m['realism']['features']
    for kind in ('single', 'multi'):
        s = json.loads((tmp_path/f'search_{kind}.json').read_text())
        assert len(s['evaluated']) == 325 and s['finished'] and s['settings']['scorer']['kind'] == kind
    assert {'semantic_search.png', 'semantic_fig3_single.png', 'semantic_fig4_multi.png', 'semantic_fig5_images.png',
            'semantic_data.png', 'params.json'} <= {p.name for p in tmp_path.iterdir()}


def test_magnitude_free_operations_are_scored_once_and_recorded(tmp_path):
    "single_magnitude: the operations without a magnitude are tried at magnitude 0 only; the search still finds TARGET."
    free = ['FlipLR', 'FlipUD', 'AutoContrast', 'Equalize', 'Smooth']
    res = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=1, single_magnitude=free)
    assert len(res) == 6 * 10 + 5 and len({tuple(r['policy']) for r in res.ranked}) == len(res)
    assert all(r['policy'][0][1] == 0 for r in res.ranked if r['policy'][0][0] in free)
    full = greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=8, keep=1, single_magnitude=[o for o in free if o not in {u[0] for u in TARGET}])
    assert tuple(full.best['policy']) == tuple(TARGET)
    f = tmp_path/'s.json'
    greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=2, out=f, single_magnitude=free)
    with pytest.raises(SettingsMismatch):  # a search file made with other magnitude rules is not resumed
        greedy_search(toy_score, OPERATIONS, MAGNITUDES, max_depth=2, out=f)
