"""Reports over the runs of `nucbook batch`: reading run folders and results.csv, mean ± std over folds, tables beside a
paper's numbers; the CPS grid (five folds from one command) and the fold layout it relies on."""
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from nucbook.core import atomic_write_json
from nucbook.cli import gather_results, run_name, load_grid, check_parameters, find_notebook
from nucbook.bench import read_runs, summarise_over, compare_table, summarise, load_splits

ROOT = Path(__file__).resolve().parents[1]


def write_batch(out:Path, per_fold:dict, other:dict|None=None, nb='11_insmix') -> list:
    "Run folders as `nucbook batch` leaves them (params.json with `injected` and `status`, metrics.json), and results.csv."
    runs = []
    for fold, results in per_fold.items():
        r = dict(name=run_name(nb, {'fold': fold}), notebook=nb, parameters={'dataset': 'cps', 'rows': ['Baseline', '+X'], 'fold': fold})
        atomic_write_json(out/r['name']/'params.json', dict(injected=r['parameters'], status='ok'))
        atomic_write_json(out/r['name']/'metrics.json', dict(label='x', results=results, table={'Baseline': {'aji_all': '1 ± 2'}}))
        runs.append(r)
    for fold, status in (other or {}).items():
        r = dict(name=run_name(nb, {'fold': fold}), notebook=nb, parameters={'fold': fold})
        atomic_write_json(out/r['name']/'params.json', dict(injected=r['parameters'], status=status))
        runs.append(r)
    gather_results(out, runs)  # the real results.csv writer
    return runs


def rng_results(seed=0, folds=5, seeds=3, rows=('Baseline', '+A', '+B')):
    rng = np.random.default_rng(seed)
    return {k: [dict(row=r, seed=s, aji_all=float(rng.normal(50, 5)), dice_all=float(rng.normal(70, 3)))
                for r in rows for s in range(seeds)] for k in range(1, folds + 1)}


def test_read_runs_from_folders_and_results_csv(tmp_path):
    per_fold = rng_results(folds=3, seeds=2)
    write_batch(tmp_path, per_fold, other={4: 'failed', 5: 'running'})
    a, b = read_runs(tmp_path), read_runs(tmp_path/'results.csv')
    assert len(a) == 3 * 3 * 2 and a.attrs['skipped'] == [('11_insmix-fold=4', 'status failed'), ('11_insmix-fold=5', 'status running')]
    cols = ['run', 'param.fold', 'param.dataset', 'row', 'seed', 'aji_all', 'dice_all']
    assert a[cols].values.tolist() == b[cols].values.tolist()
    for k, results in per_fold.items():  # every per-seed value arrives with its fold
        got = a[a['param.fold'] == k].sort_values(['row', 'seed'])
        want = pd.DataFrame(results).sort_values(['row', 'seed'])
        assert got['aji_all'].tolist() == want['aji_all'].tolist()
    # a folder without run folders falls back to its results.csv
    only_csv = tmp_path/'copy'; only_csv.mkdir(); (only_csv/'results.csv').write_text((tmp_path/'results.csv').read_text())
    assert read_runs(only_csv)[cols].values.tolist() == a[cols].values.tolist()


def test_read_runs_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such batch folder'): read_runs(tmp_path/'missing')
    with pytest.raises(ValueError, match='not the folder of a `nucbook batch`'): read_runs(tmp_path)
    write_batch(tmp_path, {}, other={1: 'failed'})
    with pytest.raises(ValueError, match='no finished run with results yet'): read_runs(tmp_path)
    write_batch(tmp_path, {2: [dict(seed=0, aji_all=1.0)]})
    with pytest.raises(ValueError, match=r'fold=2/metrics.json: `results` must be a list of per-row results'): read_runs(tmp_path)
    bad = tmp_path/'bad.csv'; bad.write_text('run,status\na,ok\n')
    with pytest.raises(ValueError, match=r"bad.csv: no column \['results'\]"): read_runs(bad)


def test_summarise_over_is_mean_of_fold_means_with_sample_std():
    df = pd.DataFrame([{'param.fold': k, **r} for k, rs in rng_results(seed=3).items() for r in rs])
    s = summarise_over(df)
    for row in ('Baseline', '+A', '+B'):
        fold_means = np.array([df[(df['param.fold'] == k) & (df.row == row)]['aji_all'].mean() for k in range(1, 6)])
        assert s.loc[row, 'aji_all_mean'] == pytest.approx(fold_means.mean())
        assert s.loc[row, 'aji_all_std'] == pytest.approx(fold_means.std(ddof=1))
        assert s.loc[row, 'n'] == 5 and s.loc[row, 'n_results'] == 15
    assert s.loc['+B', 'aji_all_delta'] == pytest.approx(s.loc['+B', 'aji_all_mean'] - s.loc['Baseline', 'aji_all_mean'])
    # with one seed per fold it is `summarise` over the folds
    one = df[df.seed == 0]
    cols = ['aji_all_mean', 'aji_all_std', 'aji_all_delta', 'dice_all_mean', 'dice_all_std']
    assert np.allclose(summarise_over(one)[cols].values, summarise(one.drop(columns=['seed', 'param.fold']))[cols].values)
    # seeds weigh within their fold only: a fold with more seeds does not count more
    uneven = pd.DataFrame([{'param.fold': 1, 'row': 'B', 'seed': s, 'aji_all': 10.0} for s in range(9)] +
                          [{'param.fold': 2, 'row': 'B', 'seed': 0, 'aji_all': 20.0}])
    assert summarise_over(uneven).loc['B', 'aji_all_mean'] == 15.0


def test_paper_fold_numbers_give_table4_exactly():
    "InsMix's supplementary per-fold CPS numbers (Baseline, InsMix) aggregate to its Table 4 (69.29 ± 4.41, ...)."
    folds = {'Baseline': ([70.87, 70.77, 74.73, 66.96, 63.13], [51.49, 50.1, 54.86, 47.87, 42.94]),
             'InsMix': ([72.52, 73.43, 76.43, 66.85, 65.58], [51.89, 52.96, 57.11, 48.78, 46.95])}
    df = pd.DataFrame([{'param.fold': k + 1, 'row': r, 'dice_all': d[k], 'aji_all': a[k]} for r, (d, a) in folds.items() for k in range(5)])
    s = summarise_over(df).round(2)
    assert s.loc['Baseline', ['dice_all_mean', 'dice_all_std', 'aji_all_mean', 'aji_all_std']].tolist() == [69.29, 4.41, 49.45, 4.44]
    assert s.loc['InsMix', ['dice_all_mean', 'dice_all_std', 'aji_all_mean', 'aji_all_std']].tolist() == [70.96, 4.59, 51.54, 3.93]
    assert s.loc['InsMix', 'aji_all_delta'] == 2.09  # "improves ... by 2.09% in AJI"


def test_summarise_over_missing_and_bad_input():
    df = pd.DataFrame([{'param.fold': k, 'row': r, 'seed': 0, 'aji_all': float(k)} for k in (1, 2, 3) for r in ('Baseline', '+A')])
    s = summarise_over(df.iloc[:-1])  # fold 3 of +A missing
    assert s.attrs['missing'] == [('+A', 3)] and s.loc['+A', 'n'] == 2 and s.loc['+A', 'aji_all_mean'] == 1.5
    with pytest.raises(ValueError, match="no column 'fold'"): summarise_over(df, over='fold')
    with pytest.raises(ValueError, match='the same param.fold, row and seed twice'): summarise_over(pd.concat([df, df.iloc[:1]]))


def test_compare_table_columns_and_deltas():
    df = pd.DataFrame([{'param.fold': k, 'row': r, 'aji_all': v + k, 'dice_all': 70.0}
                       for k in (1, 2, 3) for r, v in (('Baseline', 50.0), ('+X', 53.0))])
    paper = dict(paper='p', table='T', dataset='cps', unit='%', segmenter='NB-Net', metrics={'dice_all': 'Dice', 'aji_all': 'AJI'},
                 rows=[dict(row='Baseline', dice_all=[69.29, 4.41], aji_all=[49.45, 4.44]),
                       dict(row='+X', dice_all=[70.96, 4.59], aji_all=[51.54, 3.93])])
    t = compare_table(summarise_over(df), paper, 'HoVer-Net', 'cps')
    assert list(t.columns.get_level_values(0).unique()) == ['Dice', 'AJI', '']
    assert t.loc['+X', ('AJI', 'nucbook')] == '55.00 ± 1.00' and t.loc['+X', ('AJI', 'Δ')] == '+3.00'
    assert t.loc['+X', ('AJI', 'paper NB-Net (other segmenter)')] == '51.54 ± 3.93'
    assert t.loc['+X', ('AJI', 'Δ (NB-Net)')] == '+2.09' and t.loc['Baseline', ('Dice', 'Δ (NB-Net)')] == '+0.00'
    assert t.loc['+X', ('', 'n folds')] == 3
    assert not any('HoVer-Net' in c for c in t.columns.get_level_values(1))  # the paper has no HoVer-Net on CPS
    assert t.attrs['notes'] == ['Dice: the paper has no HoVer-Net number for these rows', 'AJI: the paper has no HoVer-Net number for these rows']
    seeds = summarise(df.rename(columns={'param.fold': 'seed'}))
    assert compare_table(seeds, metrics=['aji_all']).columns.tolist() == [('aji_all', 'nucbook'), ('aji_all', 'Δ'), ('', 'n seeds')]


def test_cps_grid_runs_five_folds_from_one_command():
    g = load_grid(ROOT/'grids'/'insmix_cps.yaml')
    assert [r['parameters']['fold'] for r in g['runs']] == [1, 2, 3, 4, 5] and g['profile'] == 'paper'
    assert len({r['name'] for r in g['runs']}) == 5 and str(g['out']) == 'runs/insmix-cps'
    nb = find_notebook(g['notebook'][0])
    for r in g['runs']:  # what `nucbook batch` checks before it starts any run
        p = check_parameters(nb, {**r['parameters'], 'profile': g['profile']})
        assert p['dataset'] == 'cps' and p['rows'] == ['Baseline', 'MixUp', 'CutOut', 'CutMix', 'CowOut', 'CowMix', '+SSD+BgP+s-GAN']
    # the notebook reads this batch folder by default
    from nucbook.cli import notebook_parameters
    assert 'insmix-cps' in notebook_parameters(nb)['cps_runs']


def _cps_fixture(root:Path, n:int, folds_csv:dict|None=None):
    base = root/'cps'
    for i in range(n):
        (base/'Images').mkdir(parents=True, exist_ok=True); (base/'Labels').mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(base/'Images'/f'img{i:02d}.png')
        lab = np.zeros((32, 32), np.uint16); lab[4:12, 4:12] = 1; lab[20:28, 18:26] = 2
        Image.fromarray(lab).save(base/'Labels'/f'img{i:02d}.png')
    if folds_csv: (base/'folds.csv').write_text('image_id,fold\n' + ''.join(f'{k},{v}\n' for k, v in folds_csv.items()))


@pytest.mark.parametrize('with_csv', [False, True])
def test_cps_folds_as_the_notebook_states(tmp_path, with_csv):
    "Fold K tests, the other four train; without folds.csv, fold = (index in sorted ids) % 5 + 1."
    ids = [f'img{i:02d}' for i in range(12)]
    assign = {k: (i * 7) % 5 + 1 for i, k in enumerate(ids)} if with_csv else {k: i % 5 + 1 for i, k in enumerate(ids)}
    _cps_fixture(tmp_path, 12, assign if with_csv else None)
    seen = []
    for fold in range(1, 6):
        sp = load_splits('cps', root=tmp_path, fold=fold)
        test_ids = [s.meta['image_id'] for s in sp.test]; train_ids = {s.meta['image_id'] for s in sp.train}
        assert test_ids == [k for k in ids if assign[k] == fold]
        assert train_ids == set(ids) - set(test_ids)
        assert sp.record['split'] == dict(method='folds', fold=fold, train_splits=[f'fold{k}' for k in range(1, 6) if k != fold],
                                          test_splits=[f'fold{fold}'])
        seen += test_ids
    assert sorted(seen) == ids  # every image is tested exactly once over the five folds
