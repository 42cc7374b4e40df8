"""Gong et al.'s benchmark row (nbs/14_gong.ipynb, `bench_rows`, issue 19): kind and count, Sample validity, types of
M(x1) carried, sizes at least the bench's crop, determinism, read-back without retraining, another n reusing G, refusal
of changed settings, untyped data, row selection and bad input. One real smoke run (the bench's smoke input); the other
tests run a cut-down profile (a few steps) patched into `BENCH_PROFILES`."""
import json, random, time
from pathlib import Path
import numpy as np
import pytest
import torch
from nucbook.augment.presynth import PreSynthConfig, presynthesize
from nucbook.bench.protocol import load_splits
from nucbook.data.crops import random_crop
from nucbook.data.sample import Sample, check_sample
from nucbook.data.synth import synth_dataset
from nucbook.engine.loop import SettingsMismatch
import nucbook.methods.gong as gong
from nucbook.methods.gong import BENCH_PROFILES, BENCH_ROW, PHASES, bench_rows, synth_side

torch.set_num_threads(1)  # pytest -n 2 on 2 cores

MINI = {**BENCH_PROFILES['smoke'], 'gd_steps': 2, 's_steps': 1, 'joint_steps': 1, 'crop': 32}  # the plumbing, in about a second


@pytest.fixture
def mini(monkeypatch):
    "The smoke profile cut to a few steps (the code path of 'smoke', not its training length)."
    monkeypatch.setitem(BENCH_PROFILES, 'smoke', MINI)


def tiles(n=3, size=64, seed=0, typed=True):
    out = synth_dataset(n, 'train', seed=seed, size=size)
    return out if typed else [Sample(s.image, s.inst_map, meta=s.meta) for s in out]


def check_outputs(samples, seed, train, side):
    "The contract's rules for generated Samples."
    ids = [s.meta['image_id'] for s in samples]
    assert ids == [f'{BENCH_ROW}-seed{seed}-{i:04d}' for i in range(len(samples))]
    train_ids = {s.meta['image_id'] for s in train}
    for s in samples:
        check_sample(s)
        assert s.image.dtype == np.uint8 and s.image.shape == (side, side, 3) and s.inst_map.dtype == np.int32
        assert s.has_types == train[0].has_types
        assert s.meta['method'] == BENCH_ROW and set(s.meta['source']) <= train_ids and len(s.meta['source']) == 2
        json.dumps(s.meta)


def smoke_row_kind_count_types(rows, work, smoke_train):
    assert list(rows) == [BENCH_ROW]
    row = rows[BENCH_ROW]
    assert set(row) == {'synthetic', 'generator', 'synthesises', 'note'} and row['synthesises'] is True
    assert len(row['synthetic']) == 6
    check_outputs(row['synthetic'], 0, smoke_train, 128)
    for i, s in enumerate(row['synthetic']):  # image i from its draws: labels M(x1), each nucleus typed as its source in x1
        rng = np.random.default_rng([0, i]); j1, j2 = rng.integers(len(smoke_train), size=2)
        x1 = random_crop(smoke_train[j1], 128, rng); random_crop(smoke_train[j2], 128, rng)
        pre = presynthesize(x1, rng, PreSynthConfig())
        np.testing.assert_array_equal(s.inst_map, pre.inst_map)
        np.testing.assert_array_equal(s.inst_types, [x1.inst_types[w.source_id - 1] for w in pre.warps])
        assert s.inst_types.dtype == np.int32 and set(s.inst_types) <= set(np.concatenate([t.inst_types for t in smoke_train]))
    g = row['generator']; json.dumps(g)
    assert g['phases_run'] == list(PHASES) and g['steps'] == {'pretrain_gd': 20, 'pretrain_s': 8, 'joint': 6}
    assert g['weights'] == 'random-init' and 'offline' in g['encoder']['name'] and 'offline' in row['note']
    assert g['profile'] == 'smoke' and g['n_params'] == g['n_params_all']['decoder'] > 0 and g['read_back'] is False
    assert all((work/p/'checkpoint.pt').exists() for p in PHASES)


def read_back_does_not_retrain(rows, work, smoke_train, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in Path(work).rglob('*') if p.is_file()}
    def boom(*a, **k): raise AssertionError('a read-back call trained G')
    with monkeypatch.context() as m:
        m.setattr(gong, 'bench_generator', boom)
        again = bench_rows(smoke_train, seed=0, work=work, n_synthetic=6, profile='smoke', rare=1)[BENCH_ROW]
    assert again['generator']['read_back'] is True
    assert {p: p.stat().st_mtime_ns for p in Path(work).rglob('*') if p.is_file()} == mtimes
    for a, b in zip(rows[BENCH_ROW]['synthetic'], again['synthetic']):
        np.testing.assert_array_equal(a.image, b.image); np.testing.assert_array_equal(a.type_map, b.type_map)
        assert a.meta == b.meta


def another_n_reuses_the_trained_generator(rows, work, smoke_train):
    ckpts = {p: p.stat().st_mtime_ns for p in Path(work).rglob('*.pt')}
    two = bench_rows(smoke_train, seed=0, work=work, n_synthetic=2, profile='smoke')[BENCH_ROW]
    assert len(two['synthetic']) == 2 and two['generator']['read_back'] is False
    assert {p: p.stat().st_mtime_ns for p in Path(work).rglob('*.pt')} == ckpts  # no phase ran a step
    for a, b in zip(two['synthetic'], rows[BENCH_ROW]['synthetic']):  # image i is a function of (seed, i): another batch, float rounding
        np.testing.assert_array_equal(a.inst_map, b.inst_map)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


def changed_settings_are_refused(work, smoke_train, monkeypatch):
    with pytest.raises(SettingsMismatch, match=f'{work} holds the Gong et al. generator of other settings') as e:
        bench_rows(smoke_train, seed=1, work=work, n_synthetic=6)
    assert 'seed' in e.value.diffs and str(work) in str(e.value)
    with pytest.raises(SettingsMismatch, match='data.n'): bench_rows(smoke_train[:5], seed=0, work=work, n_synthetic=6)
    untyped = [Sample(s.image, s.inst_map, meta=s.meta) for s in smoke_train]
    with pytest.raises(SettingsMismatch, match='typed'): bench_rows(untyped, seed=0, work=work, n_synthetic=6)
    with monkeypatch.context() as m:
        m.setitem(BENCH_PROFILES, 'smoke', {**BENCH_PROFILES['smoke'], 'gd_steps': 21})
        with pytest.raises(SettingsMismatch, match='gd_steps'): bench_rows(smoke_train, seed=0, work=work, n_synthetic=6)


def test_smoke_row(tmp_path, monkeypatch):
    "The real smoke profile on the bench's smoke input (6 typed tiles of 128 px, rare type 1), once (one test: one run under xdist)."
    smoke_train = load_splits('synthetic', n_train=6, n_test=2, tile_size=128).train
    t0 = time.process_time()
    rows = bench_rows(smoke_train, seed=0, work=tmp_path, n_synthetic=6, profile='smoke', rare=1)
    cpu = time.process_time() - t0
    smoke_row_kind_count_types(rows, tmp_path, smoke_train)
    assert cpu < 40, f'the smoke row took {cpu:.1f} s of CPU (about 13 s expected)'
    read_back_does_not_retrain(rows, tmp_path, smoke_train, monkeypatch)
    another_n_reuses_the_trained_generator(rows, tmp_path, smoke_train)
    changed_settings_are_refused(tmp_path, smoke_train, monkeypatch)


def test_deterministic_across_folders(mini, tmp_path):
    train = tiles(3, 96)
    torch.manual_seed(1); np.random.seed(1)
    a = bench_rows(train, 3, tmp_path/'a', 3)[BENCH_ROW]['synthetic']
    torch.manual_seed(2); np.random.seed(2)  # the caller's random state plays no part
    b = bench_rows(train, 3, tmp_path/'b', 3)[BENCH_ROW]['synthetic']
    c = bench_rows(train, 4, tmp_path/'c', 3)[BENCH_ROW]['synthetic']
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image); np.testing.assert_array_equal(x.inst_map, y.inst_map)
        np.testing.assert_array_equal(x.inst_types, y.inst_types); assert x.meta == y.meta
    assert not np.array_equal(a[0].image, c[0].image)  # another seed, other images
    assert [s.meta['image_id'] for s in c] == [f'{BENCH_ROW}-seed4-{i:04d}' for i in range(3)]


def test_untyped_works_and_small_images_reach_the_bench_crop(mini, tmp_path):
    train = tiles(2, 64, typed=False)
    row = bench_rows(train, 0, tmp_path, 3, rare=None)[BENCH_ROW]
    assert len(row['synthetic']) == 3 and row['synthesises'] is True
    check_outputs(row['synthetic'], 0, train, 96)  # 64 px tiles: 96 px images (mirror-padded windows)
    assert all(s.inst_types is None and s.type_map is None for s in row['synthetic'])
    assert synth_side(train, 256, 512) == 256 and synth_side(tiles(1, 128), 96) == 128


def test_rows_selection_and_bad_input(mini, tmp_path):
    train = tiles(2, 96)
    assert bench_rows(train, 0, tmp_path/'none', 3, rows=[]) == {} and not (tmp_path/'none').exists()
    with pytest.raises(ValueError, match=r"unknown rows \['InsMix'\]"): bench_rows(train, 0, tmp_path/'x', 3, rows=['InsMix'])
    with pytest.raises(ValueError, match='profile must be one of'): bench_rows(train, 0, tmp_path/'x', 3, profile='paper')
    with pytest.raises(ValueError, match='n_synthetic must be a whole number'): bench_rows(train, 0, tmp_path/'x', 2.5)
    with pytest.raises(ValueError, match='no training samples'): bench_rows([], 0, tmp_path/'x', 3)
    with pytest.raises(ValueError, match='mixes typed and untyped'): bench_rows(train + tiles(1, 96, typed=False), 0, tmp_path/'x', 3)
    row = bench_rows(train, 0, tmp_path/'zero', 0, rows=[BENCH_ROW])[BENCH_ROW]
    assert row['synthetic'] == []


def test_callers_random_state_is_kept(mini, tmp_path):
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    st = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    bench_rows(tiles(2, 96), 0, tmp_path, 1)
    assert random.getstate() == st[0] and np.array_equal(np.random.get_state()[1], st[1]) and torch.equal(torch.get_rng_state(), st[2])


def test_full_profile_is_the_papers():
    f = BENCH_PROFILES['full']  # Algorithm 1 with AdaIN's optimiser for (G, D), the paper's S and joint settings
    assert (f['adain_size'], f['seg_size'], f['crop'], f['min_side'], f['max_side']) == ('paper', 'paper', 256, 256, 512)
    assert (f['gd_steps'], f['gd_batch'], f['gd_lr']) == (160_000, 8, 1e-4)
    assert (f['s_steps'], f['s_batch'], f['s_lr'], f['joint_batch'], f['joint_lr'], f['lam'], f['gamma']) == (3000, 2, 1e-4, 1, 1e-5, 10.0, 0.5)
