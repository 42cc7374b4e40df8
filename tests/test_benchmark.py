"""The benchmark (issue 19): its protocol constants, the grid files, and the smoke grid run end to end by `nucbook batch`
and read by the benchmark notebook."""
import json, subprocess, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from nucbook.cli import load_grid, check_parameters, find_notebook
from nucbook.data.sample import Sample, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.bench.benchmark import (BENCH_ROWS, BENCH_PROFILES, METHODS, METHOD_ROWS, MIX_ROWS, RARE_MIX_ROWS, check_plan,
                                     plan_rows, synthetic_budget, rare_type, row_method)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_every_row_has_one_source_and_every_method_a_bench_rows():
    sources = ['Baseline', *MIX_ROWS, *RARE_MIX_ROWS, *(r for rs in METHOD_ROWS.values() for r in rs)]
    assert sorted(sources) == sorted(BENCH_ROWS) and len(set(sources)) == len(sources)
    assert set(METHODS) == set(METHOD_ROWS)
    for name, mod in METHODS.items():
        assert callable(getattr(mod, 'bench_rows', None)), f'{mod.__name__} has no bench_rows'
    assert row_method('Copy-Paste') == 'mix' and row_method('NucleiMix') == 'nucleimix'


@pytest.mark.parametrize('n, s, want', [(6, 0.5, 6), (8, 0.25, 3), (10, 0.2, 3), (1, 0.1, 0), (3, 0.75, 9)])
def test_synthetic_budget_gives_the_share_of_crops(n, s, want):
    assert synthetic_budget(n, s) == want


def test_synthetic_budget_refuses_bad_input():
    for bad in (dict(n_real=0, share=0.5), dict(n_real=2.5, share=0.5), dict(n_real=4, share=1.0), dict(n_real=4, share=-0.1)):
        with pytest.raises(ValueError, match='synthetic_budget'): synthetic_budget(**bad)


def test_rare_type_registered_counted_and_untyped():
    tr = synth_dataset(3, 'train', seed=0, size=96)
    assert rare_type(tr, 'synthetic') == 1
    retyped = [make_sample(s.image, s.inst_map, inst_types=np.r_[[4], np.full(s.n_instances - 1, 2)]) for s in tr]
    assert rare_type(retyped) == 4 and rare_type(retyped, '/some/own/folder') == 4
    assert rare_type([Sample(s.image, s.inst_map) for s in tr]) is None


def test_check_plan_names_the_method_row_and_problem():
    tr = synth_dataset(2, 'train', seed=0, size=96)
    untyped = [Sample(s.image, s.inst_map, meta={'image_id': f'u{i}'}) for i, s in enumerate(tr)]
    with pytest.raises(ValueError, match=r"m\.bench_rows: row 'R': .* is untyped but the training set is typed"):
        check_plan('R', {'synthetic': untyped}, 2, 2, True, 'm.bench_rows')
    with pytest.raises(ValueError, match='must be a list of 3 Samples, got 2'):
        check_plan('R', {'synthetic': untyped}, 2, 3, False)
    with pytest.raises(TypeError, match='not a Sample'):
        check_plan('R', {'synthetic': [tr[0].image, tr[1].image]}, 2, 2, True)
    with pytest.raises(ValueError, match='exactly one of'):
        check_plan('R', {}, 2, 2, True)
    assert check_plan('R', {'train': tr, 'inserted': [[1, 1]]}, 2, 2, True)['inserted'] == [[1, 1]]


def test_plan_rows_refuses_unknown_profile_and_rows(tmp_path):
    tr = synth_dataset(2, 'train', seed=0, size=96)
    with pytest.raises(ValueError, match="profile must be one of smoke, paper"):
        plan_rows(['Baseline'], tr, 0, tmp_path, 2, profile='full')
    with pytest.raises(ValueError, match="unknown benchmark row 'Cutmix'"):
        plan_rows(['Cutmix'], tr, 0, tmp_path, 2)


@pytest.mark.parametrize('grid', ['benchmark_smoke', 'benchmark_full'])
def test_grid_files_name_valid_parameters(grid):
    g = load_grid(ROOT/'grids'/f'{grid}.yaml')
    assert g['notebook'] == ['16a_bench_run']
    seeds = sorted({r['parameters']['seed'] for r in g['runs']})
    assert len(seeds) >= 3  # the protocol: at least three seeds
    for r in g['runs']:
        check_parameters(find_notebook(r['notebook']), {**r['parameters'], 'profile': g['profile']})
    if grid == 'benchmark_full':
        assert sorted({r['parameters']['dataset'] for r in g['runs']}) == ['consep_tiles', 'dsb2018', 'kumar', 'monuseg2018']
        assert g['slurm']['gpus_per_run'] == 1 and g['profile'] == 'paper'
    else:
        assert g['profile'] == 'smoke' and {r['parameters']['dataset'] for r in g['runs']} == {'synthetic'}


def test_profiles_hold_the_same_settings():
    assert set(BENCH_PROFILES) == {'smoke', 'paper'}
    assert set(BENCH_PROFILES['smoke']) == set(BENCH_PROFILES['paper'])
    assert BENCH_PROFILES['paper']['seg_size'] == 'paper' and BENCH_PROFILES['paper']['epochs'] == 300


def test_smoke_grid_runs_every_row_and_the_benchmark_notebook_reads_it(tmp_path):
    "The smoke grid (3 seeds, every row) by `nucbook batch --jobs 3`, then the benchmark notebook over its runs."
    out = tmp_path/'bench'
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN/'nucbook'), 'batch', 'grids/benchmark_smoke.yaml', '--jobs', '3', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    t_grid = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = pd.read_csv(out/'results.csv')
    assert sorted(res['status']) == ['ok'] * 3
    for run in res['run']:
        m = json.loads((out/run/'metrics.json').read_text())
        assert [x['row'] for x in m['results']] == BENCH_ROWS, (run, m['skipped'])  # typed synthetic tiles: every row runs
        assert m['n_synthetic'] == 6 and m['rare'] == 1 and m['label'].startswith('SMOKE RUN')
        by = {x['row']: x for x in m['results']}
        for row in ('DiffMix-E', 'DiffMix-B', 'DiffMix', 'Gong et al.', 'Semantic-aware'):
            assert by[row]['kind'] == 'synthetic' and by[row]['n_train'] == 12 and by[row]['epochs_run'] == 5  # 6 + 6, E' = 10 * 6 / 12
            assert np.isfinite(by[row]['fidelity_pq'])
        for row in ('GradMix', 'NucleiMix'):
            assert by[row]['kind'] == 'train' and by[row]['n_train'] == 6 and 0 <= by[row]['fidelity_found'] <= 100
        for row in ('MixUp', 'CutOut', 'CutMix', 'CowOut', 'CowMix', 'Copy-Paste', 'InsMix'):
            assert by[row]['kind'] == 'augmentation' and by[row]['aug_p'] == 0.5 and by[row]['epochs_run'] == 10
        assert all(np.isfinite(x['fid']) and np.isfinite(x['pq_all']) for x in m['results'])
    t1 = time.perf_counter()
    r = subprocess.run([str(BIN/'nucbook'), 'run', '16_benchmark', '-p', 'runs', str(out), '--out', str(tmp_path/'read'),
                        '--no-progress'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    t_read = time.perf_counter() - t1
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rm = json.loads((tmp_path/'read'/'metrics.json').read_text())
    assert rm['label'].startswith('SMOKE RUN') and len(rm['runs']) == 3
    assert [t['row'] for t in rm['table']] == BENCH_ROWS
    paired = pd.DataFrame(rm['paired']['synthetic'])
    assert len(paired) == (len(BENCH_ROWS) - 1) * 4  # each row: seeds 0, 1, 2 and 'all'
    assert (paired['lo'] <= paired['delta']).all() and (paired['delta'] <= paired['hi']).all()
    assert {f.name for f in (tmp_path/'read').glob('*.png')} == {'paired_synthetic.png', 'realism_synthetic.png'}
    print(f'smoke grid {t_grid:.0f} s, benchmark notebook {t_read:.0f} s')


def test_own_folder_of_real_typed_tiles_runs_the_rare_class_rows(data_root, tmp_path):
    "Your own folder, typed real H&E (CoNSeP tiles): the rare-class and generating rows run on it; the rare type is counted."
    from nucbook.data.datasets import load_dataset, save_own_folder  # (NucleiMix's smoke on 6 real tiles: ~90 s on one core)
    tiles = load_dataset('consep_tiles', 'train', root=data_root, limit=64)
    rare_n = lambda s: int((np.asarray(s.inst_types) == 1).sum())
    train = sorted(tiles, key=lambda s: (-rare_n(s), s.meta['image_id']))[:6]   # the tiles with most 'other' nuclei
    test = load_dataset('consep_tiles', 'test', root=data_root, limit=2)
    own = tmp_path/'own'
    save_own_folder(train, own, split='train'); save_own_folder(test, own, split='test')
    r = subprocess.run([str(BIN/'nucbook'), 'run', '16a_bench_run', '--profile', 'smoke', '-p', 'dataset', str(own),
                        '-p', 'rows', '[GradMix, NucleiMix, DiffMix-B]', '-p', 'epochs', '1', '-p', 'k', '2',
                        '--out', str(tmp_path/'run'), '--no-progress'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    counts = pd.Series(np.concatenate([s.inst_types for s in train])).value_counts()
    assert m['rare'] == int(counts.idxmin()) and m['dataset_kind'] == 'folder'   # an own folder: the least frequent type
    by = {x['row']: x for x in m['results']}
    assert list(by) == ['Baseline', 'GradMix', 'NucleiMix', 'DiffMix-B'], m['skipped']
    assert by['NucleiMix']['kind'] == 'train' and by['NucleiMix']['inserted'] == 2 and by['GradMix']['inserted'] >= 1
    assert by['DiffMix-B']['n_train'] == 12 and by['DiffMix-B']['n_synthetic'] == 6
    assert all(np.isfinite(x['pq_all']) and np.isfinite(x['fid']) for x in m['results'])
