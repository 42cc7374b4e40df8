"""Semantic-aware augmentation's benchmark row (issue 19, nbs/15_semantic.ipynb `bench_rows`): kind and count, typed and
untyped training sets, determinism, read-back without retraining, refusal of changed settings, Sample validity.
One test runs the real smoke profile; the others a tiny profile (a few WAE steps, one search layer) to stay fast."""
import json, time
import numpy as np
import pytest
import torch
from nucbook.data.sample import Sample, check_sample, make_sample
from nucbook.engine.loop import SettingsMismatch
import nucbook.methods.semantic as sem
from nucbook.methods.semantic import BENCH_PROFILES, SEMANTIC_BENCH_ROW, bench_rows

torch.set_num_threads(1)  # pytest -n 2 on 2 cores
ROW = SEMANTIC_BENCH_ROW
TINY = dict(BENCH_PROFILES['smoke'], wae_steps=6, wae_batch=8, n_cells=4, keep=1, max_depth=1, max_policies=20)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(sem.BENCH_PROFILES, 'smoke', TINY)


def untyped(ss): return [Sample(s.image, s.inst_map, meta=dict(s.meta)) for s in ss]


def check_row(out, bench_train, n, seed=0, side=128):
    "One row of kind 'synthetic' with exactly n valid Samples of the given side, typed exactly when train is."
    assert list(out) == [ROW]
    r = out[ROW]
    assert r['synthesises'] is True and isinstance(r['note'], str)
    assert set(r) == {'synthetic', 'synthesises', 'note', 'generator'}
    json.dumps(r['generator'])
    g = r['synthetic']
    assert len(g) == n
    ids = {s.meta['image_id'] for s in bench_train}
    typed = bench_train[0].inst_types is not None
    for i, s in enumerate(g):
        check_sample(s)
        assert s.image.dtype == np.uint8 and s.inst_map.dtype == np.int32 and s.shape == (side, side)
        assert s.n_instances > 0 and np.array_equal(np.unique(s.inst_map), np.arange(s.n_instances + 1))
        assert (s.inst_types is not None) == typed
        assert s.meta['image_id'] == f'{ROW}-seed{seed}-{i:04d}'
        assert s.meta['method'] == ROW and s.meta['source'] and set(s.meta['source']) <= ids
    assert len({s.meta['image_id'] for s in g}) == n
    return r


def arrays(r): return [(s.image, s.inst_map, s.type_map, s.inst_types) for s in r['synthetic']]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y): assert (u is None and v is None) or np.array_equal(u, v)


def test_smoke_profile_typed(bench_train, tmp_path):
    "The real smoke profile: kind, count, types kept from the source nuclei, time, and a read-back that trains nothing."
    t0 = time.time(); out = bench_rows(bench_train, 0, tmp_path, n_synthetic=5, profile='smoke', rare=1); dt = time.time() - t0
    r = check_row(out, bench_train, 5)
    by_id = {s.meta['image_id']: s for s in bench_train}
    classes = set(np.concatenate([s.inst_types for s in bench_train]).tolist())
    for s in r['synthetic']:
        assert set(s.inst_types.tolist()) <= classes
        for o in s.meta['augment'][-1]['steps'][0]['objects']:
            assert [int(s.inst_types[j - 1]) for j in o['ids']] == [int(by_id[o['source']].inst_types[j - 1]) for j in o['source_ids']]
    g = r['generator']
    assert (g['profile'], g['wae'], g['steps'], g['this_call']['wae_steps']) == ('smoke', 'tiny', 150, 150)
    assert g['n_params'] > 0 and g['this_call']['policies_scored'] == sum(v['policies'] for v in g['searches'].values()) > 0
    assert dt < 60, f'smoke bench_rows took {dt:.1f} s'  # ~15 s on one loaded CPU thread; the bound only catches a blow-up
    t0 = time.time(); again = bench_rows(bench_train, 0, tmp_path, n_synthetic=5, profile='smoke', rare=1)[ROW]
    assert time.time() - t0 < 5
    assert (again['generator']['this_call']['wae_steps'], again['generator']['this_call']['policies_scored']) == (0, 0)
    assert again['generator']['generated_read_back'] and again['generator']['seconds'] == g['seconds']
    same(arrays(r), arrays(again))
    assert [s.meta for s in r['synthetic']] == [s.meta for s in again['synthetic']]


def test_untyped(bench_train, tmp_path, tiny):
    torch.manual_seed(123); np.random.seed(123); state = (torch.get_rng_state(), np.random.get_state()[1].copy())
    out = bench_rows(untyped(bench_train), 0, tmp_path, n_synthetic=3, rare=None)
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])  # caller's RNG untouched
    r = check_row(out, untyped(bench_train), 3)
    assert all(s.inst_types is None and s.type_map is None for s in r['synthetic'])
    assert 'untyped' in r['note']


def test_deterministic_and_seeded(bench_train, tmp_path, tiny):
    a = check_row(bench_rows(bench_train, 3, tmp_path/'a', n_synthetic=3), bench_train, 3, seed=3)  # typed in, typed out
    b = bench_rows(bench_train, 3, tmp_path/'b', n_synthetic=3)[ROW]
    same(arrays(a), arrays(b))
    assert [s.meta for s in a['synthetic']] == [s.meta for s in b['synthetic']]
    assert a['generator']['weights_digest'] == b['generator']['weights_digest']
    c = bench_rows(bench_train, 4, tmp_path/'c', n_synthetic=3)[ROW]
    assert c['synthetic'][0].meta['image_id'] == f'{ROW}-seed4-0000'
    assert not all(np.array_equal(x.inst_map, y.inst_map) for x, y in zip(a['synthetic'], c['synthetic']))


def test_read_back_does_not_retrain(bench_train, tmp_path, tiny):
    first = bench_rows(bench_train, 0, tmp_path, n_synthetic=2)[ROW]
    files = ['wae/checkpoint.pt', 'synthetic_n2.npz', 'bench.json', 'seconds.json']
    stamp = {f: (tmp_path/f).stat().st_mtime_ns for f in files}
    searches = {f: (tmp_path/f).read_text() for f in ('search_single.json', 'search_multi.json')}
    again = bench_rows(bench_train, 0, tmp_path, n_synthetic=2)[ROW]
    assert {f: (tmp_path/f).stat().st_mtime_ns for f in files} == stamp  # no checkpoint, set or record rewritten
    assert {f: (tmp_path/f).read_text() for f in searches} == searches  # every evaluation read back (the file is re-saved as it was)
    assert again['generator']['this_call']['wae_steps'] == 0 and again['generator']['this_call']['policies_scored'] == 0
    same(arrays(first), arrays(again))
    # another budget: the generator is reused, image k is a function of (seed, k): 4 images extend the 2
    more = bench_rows(bench_train, 0, tmp_path, n_synthetic=4)[ROW]
    assert more['generator']['this_call']['policies_scored'] == 0 and not more['generator']['generated_read_back']
    assert len(more['synthetic']) == 4
    same(arrays(first), arrays(more)[:2])


def test_refuses_changed_settings(bench_train, tmp_path, tiny, monkeypatch):
    bench_rows(bench_train, 0, tmp_path, n_synthetic=2)
    with pytest.raises(SettingsMismatch, match=r'bench\.json was written by a run with other settings \(seed\)') as e:
        bench_rows(bench_train, 1, tmp_path, n_synthetic=2)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(SettingsMismatch, match=r'other settings \(train\.'):
        bench_rows(bench_train[:5], 0, tmp_path, n_synthetic=2)
    with pytest.raises(SettingsMismatch, match=r'typed'):
        bench_rows(untyped(bench_train), 0, tmp_path, n_synthetic=2)
    monkeypatch.setitem(sem.BENCH_PROFILES, 'smoke', dict(TINY, wae_steps=7))
    with pytest.raises(SettingsMismatch, match=r'settings\.wae_steps'):
        bench_rows(bench_train, 0, tmp_path, n_synthetic=2)


def test_rows_and_arguments(bench_train, tmp_path, tiny):
    assert bench_rows(bench_train, 0, tmp_path/'none', n_synthetic=2, rows=[]) == {}
    assert not (tmp_path/'none').exists()  # nothing requested: nothing trained or written
    assert list(bench_rows(bench_train, 0, tmp_path/'one', n_synthetic=1, rows=[ROW])) == [ROW]
    with pytest.raises(ValueError, match="unknown rows \\['Rare'\\]"): bench_rows(bench_train, 0, tmp_path, 2, rows=['Rare'])
    with pytest.raises(ValueError, match='profile must be one of'): bench_rows(bench_train, 0, tmp_path, 2, profile='paper')
    with pytest.raises(ValueError, match='n_synthetic must be a whole number >= 1'): bench_rows(bench_train, 0, tmp_path, 0)
    with pytest.raises(ValueError, match='mixes typed and untyped'):
        bench_rows(bench_train[:2] + untyped(bench_train[2:]), 0, tmp_path, 2)


def test_skip_without_cells(tmp_path):
    "Nuclei only at the image border: no cell for the collections, so no scorer can be trained: a skip, not a crash."
    m = np.zeros((128, 128), np.int32); m[:10, :10] = 1; m[60:70, 118:] = 2
    s = make_sample(np.full((128, 128, 3), 30, np.uint8), m, meta={'image_id': 'edge'})
    out = bench_rows([s], 0, tmp_path, n_synthetic=2)
    assert set(out[ROW]) == {'skip'} and 'image borders' in out[ROW]['skip']
