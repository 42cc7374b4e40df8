"""DiffMix's benchmark rows (issue 19, `bench_rows`): kinds and counts, valid typed and untyped outputs, determinism,
read-back without retraining or resampling, exact resume after a crash, refusal of changed settings, skips."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from nucbook.data.crops import crop_sample
from nucbook.data.sample import LabelError, check_sample
from nucbook.engine.loop import SettingsMismatch
from nucbook.models.sdm import load_sdm, SDMUNet
import nucbook.methods.diffmix as dm
from nucbook.methods.diffmix import DIFFMIX_BENCH_PROFILES, DIFFMIX_BENCH_ROWS, bench_rows

torch.set_num_threads(1)
KINDS = ('augmentation', 'synthetic', 'train', 'skip')
SMOKE = DIFFMIX_BENCH_PROFILES['smoke']


@pytest.fixture(scope='module')
def first(bench_train, tmp_path_factory):
    "All three rows, made once (seed 0, smoke, n = 4) into a folder: (rows, folder)."
    work = tmp_path_factory.mktemp('diffmix-seed0')
    return bench_rows(bench_train, 0, work, n_synthetic=4, profile='smoke', rare=1), work


def stamps(work) -> dict: return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns for p in Path(work).rglob('*') if p.is_file()}


def arrays(samples) -> list: return [(s.image, s.inst_map, s.type_map, s.inst_types) for s in samples]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(arrays(a), arrays(b)):
        for u, v in zip(x, y):
            if u is None: assert v is None
            else: np.testing.assert_array_equal(u, v)


def test_rows_kinds_counts_and_samples(first, bench_train):
    rows, work = first
    assert list(rows) == list(DIFFMIX_BENCH_ROWS) == ['DiffMix-E', 'DiffMix-B', 'DiffMix']
    ids, types = {s.meta['image_id'] for s in bench_train}, {int(t) for s in bench_train for t in s.inst_types}
    for r, row in rows.items():
        assert [k for k in KINDS if k in row] == ['synthetic'] and row['synthesises'] is True and row['note']
        assert len(row['synthetic']) == 4
        for i, s in enumerate(row['synthetic']):
            check_sample(s)
            assert s.image.dtype == np.uint8 and s.inst_map.dtype == np.int32 and s.shape == (96, 96)
            assert s.has_types and set(s.inst_types.tolist()) <= types  # the training set's type numbering
            if s.n_instances: np.testing.assert_array_equal(np.unique(s.inst_map)[1:], np.arange(1, s.n_instances + 1))
            assert s.meta['image_id'] == f'{r}-seed0-{i:04d}' and s.meta['method'] == r and s.meta['source'] in ids
            json.dumps(s.meta)
    maps = {r: [s.meta['map'] for s in row['synthetic']] for r, row in rows.items()}
    assert maps == {'DiffMix-E': ['enlarging'] * 4, 'DiffMix-B': ['balancing'] * 4, 'DiffMix': ['balancing'] * 2 + ['enlarging'] * 2}
    E, B, D = (rows[r]['synthetic'] for r in DIFFMIX_BENCH_ROWS)
    assert_same(D, B[:2] + E[2:])  # DiffMix: the first n_B balancing patches, then enlarging patches n_B..n-1
    # the images are the SDM's: not the original windows, not equal across kinds of the same window
    assert all(np.abs(e.image.astype(int) - b.image.astype(int)).mean() > 0 for e, b in zip(E, B))


def test_outputs_follow_their_maps(first, bench_train):
    "Each patch carries its map's record; the balancing patches carry more rare nuclei than the enlarging ones."
    E, B = first[0]['DiffMix-E']['synthetic'], first[0]['DiffMix-B']['synthetic']
    rare = lambda ss: sum(int((s.inst_types == 1).sum()) for s in ss)
    assert rare(B) > rare(E)
    assert all(e.meta['augment'][-1]['method'] == 'enlarging' and e.meta['synthesis']['map'] == 'enlarging' for e in E)
    assert all(b.meta['augment'][-1]['method'] == 'gradmix' and b.meta['synthesis']['map'] == 'balancing' for b in B)
    assert sum(b.meta['n_replaced'] for b in B) > 0


def test_generator_record(first, bench_train):
    rows, work = first
    g = rows['DiffMix']['generator']
    assert json.loads(json.dumps(g)) == g and all(r['generator'] == g for r in rows.values())
    assert g['steps'] == [SMOKE['diff_steps'], SMOKE['cfg_steps']] and g['profile'] == 'smoke' and g['seed'] == 0
    assert g['seconds'] > 0 and g['n_classes'] == 4 and g['side'] == 96 and g['typed'] is True
    assert Path(g['weights']) == work/'sdm'/'cfg'/'model'
    m = SDMUNet(**g['config'])
    assert g['n_params'] == sum(p.numel() for p in m.parameters()) and m.label_channels == 6
    load_sdm(work/'sdm'/'cfg'/'model'/'unet'/'sdm.pt', g['config'])  # the weights load


def test_same_arguments_same_outputs(first, bench_train, tmp_path):
    "Another folder, the same seed: the same patches bit for bit (here DiffMix-E at n = 2: the first two of n = 4)."
    torch.manual_seed(1234); np.random.seed(1234)  # as in another process: the global random state plays no part
    again = bench_rows(bench_train, 0, tmp_path, n_synthetic=2, profile='smoke', rare=1, rows=['DiffMix-E'])
    assert list(again) == ['DiffMix-E']
    assert_same(again['DiffMix-E']['synthetic'], first[0]['DiffMix-E']['synthetic'][:2])
    assert not (tmp_path/'balancing.npz').exists()  # only the pools a requested row needs


def test_read_back_does_not_retrain_or_resample(first, bench_train, monkeypatch):
    rows, work = first
    before = stamps(work)
    def forbidden(*a, **kw): raise AssertionError('called on a finished folder')
    monkeypatch.setattr(dm, 'train_sdm', forbidden); monkeypatch.setattr(dm, 'synthesize', forbidden)
    back = bench_rows(bench_train, 0, work, n_synthetic=4, profile='smoke', k=9, rare=1)  # k does not shape DiffMix's rows
    assert stamps(work) == before
    for r in DIFFMIX_BENCH_ROWS:
        assert_same(back[r]['synthetic'], rows[r]['synthetic'])
        assert [s.meta for s in back[r]['synthetic']] == [s.meta for s in rows[r]['synthetic']]
        assert back[r]['generator'] == rows[r]['generator']


def test_resume_after_a_crash_gives_the_uninterrupted_patches(first, bench_train, tmp_path, monkeypatch):
    real = dm.train_sdm
    def crash(*a, **kw):  # trains a first chunk (stopped with a checkpoint after one step), then the process "dies"
        real(*a, **{**kw, 'max_seconds': 1e-9}); raise KeyboardInterrupt('killed')
    monkeypatch.setattr(dm, 'train_sdm', crash)
    with pytest.raises(KeyboardInterrupt): bench_rows(bench_train, 0, tmp_path, n_synthetic=1, rare=1, rows=['DiffMix-E'])
    assert (tmp_path/'sdm'/'phase1'/'checkpoint.pt').exists() and not (tmp_path/'generator.json').exists()
    monkeypatch.setattr(dm, 'train_sdm', real)
    got = bench_rows(bench_train, 0, tmp_path, n_synthetic=1, rare=1, rows=['DiffMix-E'])['DiffMix-E']
    assert got['generator']['steps'] == [SMOKE['diff_steps'], SMOKE['cfg_steps']]
    assert_same(got['synthetic'], first[0]['DiffMix-E']['synthetic'][:1])


@pytest.mark.parametrize('change, key', [(dict(seed=1), 'seed'), (dict(n_synthetic=5), 'n_synthetic'),
                                         (dict(profile='full'), 'profile'), (dict(rare=None), 'rare'),
                                         (dict(train=slice(0, 5)), 'data.n')])
def test_changed_settings_are_refused(first, bench_train, change, key):
    work = first[1]
    before = stamps(work)
    args = dict(train=bench_train, seed=0, work=work, n_synthetic=4, profile='smoke', rare=1, rows=['DiffMix-E'])
    if 'train' in change: change = dict(train=bench_train[change['train']])
    with pytest.raises(SettingsMismatch, match=key) as e: bench_rows(**{**args, **change})
    assert e.value.path == work/'bench.json' and str(work) in str(e.value) and 'another folder' in str(e.value) and key in e.value.diffs
    assert stamps(work) == before  # nothing trained or rewritten


def test_untyped_data(bench_untyped, tmp_path):
    "DiffMix-E runs on untyped data (one nucleus class) and returns untyped Samples; the balancing rows are skipped."
    rows = bench_rows(bench_untyped, 0, tmp_path, n_synthetic=2, profile='smoke', rare=None)
    assert list(rows) == list(DIFFMIX_BENCH_ROWS)
    for r in ('DiffMix-B', 'DiffMix'): assert list(rows[r]) == ['skip'] and 'rare type' in rows[r]['skip']
    E = rows['DiffMix-E']
    assert [k for k in KINDS if k in E] == ['synthetic'] and len(E['synthetic']) == 2 and 'untyped' in E['note']
    for s in E['synthetic']:
        check_sample(s); assert s.inst_types is None and s.type_map is None and s.shape == (96, 96)
    assert E['generator']['n_classes'] == 1 and E['generator']['config']['label_channels'] == 3  # background, nucleus, edges


def test_skips_train_nothing(bench_train, bench_untyped, tmp_path):
    skip = bench_rows(bench_untyped, 0, tmp_path/'u', 4, rows=['DiffMix-B', 'DiffMix'])
    assert all(list(v) == ['skip'] for v in skip.values()) and list(skip) == ['DiffMix-B', 'DiffMix']
    typed_no_rare = bench_rows(bench_train, 0, tmp_path/'t', 4, rare=None, rows=['DiffMix-B'])
    assert list(typed_no_rare['DiffMix-B']) == ['skip']
    assert bench_rows(bench_train, 0, tmp_path/'n', 0, rare=1) == {r: {'synthetic': [], 'synthesises': True,
                                                               'note': 'n_synthetic is 0: nothing synthesised'} for r in DIFFMIX_BENCH_ROWS}
    assert bench_rows(bench_train, 0, tmp_path/'e', 4, rows=[]) == {}
    assert not any(tmp_path.iterdir())  # no folder made


def test_arguments(bench_train, bench_untyped, tmp_path):
    with pytest.raises(ValueError, match=r"unknown rows \['GradMix'\]"): bench_rows(bench_train, 0, tmp_path, 4, rows=['GradMix'])
    with pytest.raises(ValueError, match='profile must be one of'): bench_rows(bench_train, 0, tmp_path, 4, profile='paper')
    with pytest.raises(ValueError, match='n_synthetic must be a whole number >= 0'): bench_rows(bench_train, 0, tmp_path, -1)
    with pytest.raises(ValueError, match='needs the training Samples'): bench_rows([], 0, tmp_path, 4)
    with pytest.raises(LabelError, match='synth-0-train-0001.* is untyped'): bench_rows(bench_train[:1] + bench_untyped[1:], 0, tmp_path, 4)
    with pytest.raises(ValueError, match='rare type 7 occurs in none of the 6'): bench_rows(bench_train, 0, tmp_path, 4, rare=7)
    small = [crop_sample(s, 0, 0, 90, 128) for s in bench_train]
    with pytest.raises(ValueError, match=r'is 128x90 \(WxH\).*under the 96 px'): bench_rows(small, 0, tmp_path, 4, rare=1)
    assert not any(tmp_path.iterdir())
