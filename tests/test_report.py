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


# --- paired comparison with the baseline (issue 19) -------------------------------------------------------------
from nucbook.bench.protocol import row_folder, scores
from nucbook.bench.report import per_image_scores, paired_bootstrap, paired_vs_baseline, format_paired
from nucbook.eval.metrics import evaluate


def test_paired_bootstrap_constant_gain_is_exact():
    "b = a + 2 on every image: every resample of the pairs gives 2, however much the images differ."
    rng = np.random.default_rng(0)
    a = pd.Series(rng.integers(0, 400, 15) / 4, index=[f'i{k}' for k in range(15)])  # 0 .. 100, exact in binary
    r = paired_bootstrap(a, (a + 2).sample(frac=1, random_state=0))  # matched by id, not position
    assert (r['delta'], r['lo'], r['hi'], r['n'], r['n_dropped']) == (2.0, 2.0, 2.0, 15, 0)
    assert r['p_boot'] == pytest.approx(2 / 10_001)  # the least p-value: every resample is > 0
    neg = paired_bootstrap(a + 2, a, n_boot=500)
    assert (neg['delta'], neg['lo'], neg['hi']) == (-2.0, -2.0, -2.0) and neg['p_boot'] == pytest.approx(2 / 501)
    assert paired_bootstrap(a, a)['p_boot'] == 1.0


def test_paired_bootstrap_two_pairs_known_distribution():
    "Differences 0 and 1: a resample's mean is 0, 1/2, 1 with chances 1/4, 1/2, 1/4."
    a, b = [3.0, 9.0], [3.0, 10.0]
    r = paired_bootstrap(a, b)
    assert (r['delta'], r['lo'], r['hi']) == (0.5, 0.0, 1.0)
    assert r['p_boot'] == pytest.approx(0.5, abs=0.03)  # 2 * P(mean <= 0) = 2 / 4
    assert [paired_bootstrap(a, b, ci=0.6)[k] for k in ('lo', 'hi')] == [0.0, 1.0]  # quantiles 0.2, 0.8
    assert [paired_bootstrap(a, b, ci=0.4)[k] for k in ('lo', 'hi')] == [0.5, 0.5]  # quantiles 0.3, 0.7
    assert paired_bootstrap([0, 0, 0], [0, 0, 10], statistic='median')['delta'] == 0.0
    assert paired_bootstrap([0, 0, 0], [0, 0, 10], statistic='mean')['delta'] == pytest.approx(10 / 3)


def test_paired_bootstrap_covers_known_difference_and_narrows():
    "Known gain 1.5 with symmetric noise on images of very different difficulty."
    rng = np.random.default_rng(1)
    def case(n):
        a = rng.uniform(20, 80, n)  # the images' difficulty: spread 60 points, far more than the gain
        return a, a + 1.5 + rng.normal(0, 2, n)
    small, large = paired_bootstrap(*case(10)), paired_bootstrap(*case(250))
    for r in (small, large): assert r['lo'] < 1.5 < r['hi'] and r['lo'] < r['delta'] < r['hi']
    width = lambda n: np.mean([(lambda r: r['hi'] - r['lo'])(paired_bootstrap(*case(n), n_boot=2000)) for _ in range(20)])
    assert width(250) < width(10) / 3  # about sqrt(25) = 5 times narrower (the mean width over 20 experiments)
    # many pairs: the percentile interval is about the normal one, delta ± 1.96 s / sqrt(n) (s of the differences)
    a, b = case(400)
    d, r = b - a, paired_bootstrap(a, b)
    se = d.std() / 20
    assert r['delta'] == pytest.approx(d.mean())
    assert r['lo'] == pytest.approx(d.mean() - 1.96 * se, abs=0.12 * se) and r['hi'] == pytest.approx(d.mean() + 1.96 * se, abs=0.12 * se)
    # coverage over repeated experiments is near the nominal 95 %
    hits = [(lambda r: r['lo'] <= 1.5 <= r['hi'])(paired_bootstrap(*case(40), n_boot=2000, seed=k)) for k in range(300)]
    assert 0.89 <= np.mean(hits) <= 0.98, np.mean(hits)


def test_paired_bootstrap_p_value_agrees_with_interval():
    "0 outside the 95 % interval exactly when p_boot < 0.05 (away from the edge)."
    rng = np.random.default_rng(2)
    seen = set()
    for k in range(40):
        d = rng.normal(rng.uniform(-1, 1), 1, 20)
        r = paired_bootstrap(np.zeros(20), d, n_boot=4000, seed=k)
        if min(abs(r['lo']), abs(r['hi'])) < 0.05 * (r['hi'] - r['lo']): continue
        outside = not r['lo'] <= 0 <= r['hi']
        assert outside == (r['p_boot'] < 0.05), r
        seen.add(outside)
    assert seen == {True, False}  # both kinds of case were checked


def test_paired_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(3)
    a = pd.Series(rng.uniform(0, 1, 30)); b = a + rng.normal(0.1, 0.2, 30)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5)['lo'] != paired_bootstrap(a, b, seed=6)['lo']
    assert paired_bootstrap(a, b, seed=5)['delta'] == paired_bootstrap(a, b, seed=6)['delta']


def test_paired_bootstrap_refuses_unpaired_and_empty():
    a = pd.Series([1.0, 2.0, 3.0], index=['x', 'y', 'z'])
    with pytest.raises(ValueError, match=r"not paired: 1 ids only in a \['z'\], 1 only in b \['w'\]"):
        paired_bootstrap(a, pd.Series([1.0, 2.0, 3.0], index=['x', 'y', 'w']))
    with pytest.raises(ValueError, match=r"b has duplicate ids \['x'\]"):
        paired_bootstrap(a, pd.Series([1.0, 2.0, 3.0], index=['x', 'x', 'y']))
    with pytest.raises(ValueError, match='a has 3 values and b 2: not paired'): paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r'no pair with both values \(3 pairs, every one has a NaN\)'):
        paired_bootstrap(a, pd.Series(np.nan, index=a.index))
    with pytest.raises(ValueError, match='no pair with both values'): paired_bootstrap([np.nan, 1.0], [1.0, np.nan])
    r = paired_bootstrap(a, pd.Series([np.nan, 4.0, 5.0], index=a.index))  # NaN dropped pairwise, and counted
    assert (r['delta'], r['n'], r['n_dropped']) == (2.0, 2, 1)
    with pytest.raises(ValueError, match='ci must be in'): paired_bootstrap(a, a, ci=95)
    with pytest.raises(ValueError, match='statistic must be one of'): paired_bootstrap(a, a, statistic='trimmed')
    with pytest.raises(ValueError, match='n_boot must be a positive integer'): paired_bootstrap(a, a, n_boot=0)


def _instances():
    t = np.zeros((16, 16), np.int32); t[2:6, 2:6] = 1; t[8:12, 8:12] = 2
    return t, np.where(t == 2, 0, t), np.zeros_like(t)


def test_per_image_scores_from_a_real_metrics_table(tmp_path):
    "What `evaluate` writes: per-image values whose mean is the `scores` number / 100; errors name the file."
    t, half, empty = _instances()
    table = evaluate([t, t, t, t], [t, half, empty, half], names=['a', 'b', 'c', 'd'], groups=['g1', 'g1', 'g2', 'g2'])
    folder = tmp_path/row_folder('+X', 3); folder.mkdir()
    table.to_csv(folder/'test_metrics.csv', index=False)
    aji = per_image_scores(folder, 'aji')
    assert aji.index.tolist() == ['a', 'b', 'c', 'd'] and aji.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.5])
    assert per_image_scores(folder/'test_metrics.csv', 'dice').tolist() == pytest.approx([1.0, 2 / 3, 0.0, 2 / 3])
    sc = scores(table)
    for key, col in (('dice', 'dice1'), ('aji', 'aji'), ('pq', 'pq'), ('dq', 'dq')):
        for g in ('all', 'g1', 'g2'):
            assert per_image_scores(table, col, None if g == 'all' else g).mean() * 100 == pytest.approx(sc[f'{key}_{g}'])
    with pytest.raises(FileNotFoundError, match=r'Baseline-seed3/test_metrics.csv: no per-image metrics table'):
        per_image_scores(tmp_path/row_folder('Baseline', 3), 'aji')
    with pytest.raises(ValueError, match=r"plus-X-seed3/test_metrics.csv: no metric column 'mpq'"): per_image_scores(folder, 'mpq')
    with pytest.raises(ValueError, match=r"no test image in group 'g3' \(groups: g1, g2\)"): per_image_scores(table, 'aji', 'g3')
    with pytest.raises(ValueError, match='image ids appear twice'): per_image_scores(pd.concat([table.iloc[:1], table]), 'aji')


def _write_tables(out:Path, per_row:dict, metric='aji', images=None):
    "Hand-made metrics tables (image rows, then the mean row) in `out/<row_folder>/test_metrics.csv`."
    for (row, seed), vals in per_row.items():
        ids = images or [f'img{i}' for i in range(len(vals))]
        t = pd.DataFrame(dict(kind='image', image=ids, n_images=1, **{metric: vals}))
        t = pd.concat([t, pd.DataFrame([dict(kind='mean', image='mean', n_images=len(vals), **{metric: np.nanmean(vals)})])])
        (out/row_folder(row, seed)).mkdir(parents=True, exist_ok=True)
        t.to_csv(out/row_folder(row, seed)/'test_metrics.csv', index=False)


BASE = {0: np.array([0.30, 0.45, 0.50, 0.62, 0.80]), 1: np.array([0.32, 0.41, 0.55, 0.60, 0.78])}
TABLES = {('Baseline', 0): BASE[0], ('Baseline', 1): BASE[1],
          ('+A', 0): BASE[0] + np.array([1, 2, 3, 4, 5]) / 100, ('+A', 1): BASE[1] + 0.01,
          ('+B', 0): BASE[0] - 0.02, ('+B', 1): BASE[1] + np.array([-4, 0, 0, 0, 4]) / 100}


def test_paired_vs_baseline_exact_deltas(tmp_path):
    "Two rows x two seeds: per seed the mean of the per-image gains (in %), pooled the mean over images of the seed means."
    _write_tables(tmp_path, TABLES)
    pv = paired_vs_baseline(tmp_path, ['+A', 'Baseline', '+B'], [0, 1], 'aji', n_boot=2000)
    assert pv[['row', 'seed']].values.tolist() == [['+A', 0], ['+A', 1], ['+A', 'all'], ['+B', 0], ['+B', 1], ['+B', 'all']]
    assert pv['delta'].tolist() == pytest.approx([3, 1, 2, -2, 0, -1], abs=1e-9)
    # no spread in the gains: the interval is the point
    for row, seed, v in (('+A', 1, 1), ('+B', 0, -2)):
        line = pv[(pv.row == row) & (pv.seed == seed)].iloc[0]
        assert (line['lo'], line['hi']) == pytest.approx((v, v), abs=1e-9)
    assert (pv['lo'] <= pv['delta'] + 1e-9).all() and (pv['delta'] <= pv['hi'] + 1e-9).all()
    assert pv['n_images'].tolist() == [5] * 6 and pv['n_seeds'].tolist() == [1, 1, 2, 1, 1, 2]
    # each per-seed delta is the difference of the rows' mean rows (what `scores` reports), in %
    for (row, seed), vals in TABLES.items():
        if row == 'Baseline': continue
        line = pv[(pv.row == row) & (pv.seed == seed)].iloc[0]
        assert line['delta'] == pytest.approx((vals.mean() - BASE[seed].mean()) * 100)
    assert pv.attrs['metric'] == 'aji' and pv.attrs['baseline'] == 'Baseline'
    assert pv.equals(paired_vs_baseline(tmp_path, ['+A', '+B'], [0, 1], 'aji', n_boot=2000))  # deterministic
    f = format_paired(pv)
    assert f.columns.tolist() == ['seed 0', 'seed 1', 'all'] and f.index.tolist() == ['+A', '+B']
    assert f.loc['+A', 'seed 1'] == '+1.00 [+1.00, +1.00]' and f.loc['+B', 'seed 0'] == '-2.00 [-2.00, -2.00]'
    assert f.columns.name == 'Δ aji [95% CI]'


def test_paired_vs_baseline_pools_seeds_where_both_have_a_value(tmp_path):
    "A NaN (an image not scored) with one seed: that seed drops the pair, the pooled line uses the other seed for it."
    t = dict(TABLES); t[('+A', 0)] = np.where(np.arange(5) == 4, np.nan, TABLES[('+A', 0)])
    _write_tables(tmp_path, t)
    pv = paired_vs_baseline(tmp_path, ['+A'], [0, 1], 'aji', n_boot=500).set_index('seed')
    assert pv.loc[0, 'delta'] == pytest.approx(2.5) and (pv.loc[0, 'n_images'], pv.loc[0, 'n_dropped']) == (4, 1)
    # pooled gains per image: (1 + 1) / 2, (2 + 1) / 2, (3 + 1) / 2, (4 + 1) / 2, then image 4 from seed 1 only: 1
    assert pv.loc['all', 'delta'] == pytest.approx(np.mean([1, 1.5, 2, 2.5, 1])) and pv.loc['all', 'n_images'] == 5


def test_paired_vs_baseline_names_missing_and_mismatched_folders(tmp_path):
    _write_tables(tmp_path, TABLES)
    (tmp_path/row_folder('+B', 1)/'test_metrics.csv').unlink()
    with pytest.raises(FileNotFoundError, match=r'1 row folder\(s\) without test_metrics.csv: \S*plus-B-seed1$'):
        paired_vs_baseline(tmp_path, ['+A', '+B'], [0, 1], 'aji')
    with pytest.raises(FileNotFoundError, match=r'4 row folder\(s\) without test_metrics.csv: \S*Baseline-seed2, \S*plus-A-seed2, \S*plus-B-seed1, \S*plus-B-seed2$'):
        paired_vs_baseline(tmp_path, ['+A', '+B'], [0, 1, 2], 'aji')
    _write_tables(tmp_path, {('+C', 0): BASE[0]}, images=['img0', 'img1', 'img2', 'img3', 'other'])
    with pytest.raises(ValueError, match=r'plus-C-seed0 and \S*Baseline-seed0: other test images'):
        paired_vs_baseline(tmp_path, ['+C'], [0], 'aji')
    _write_tables(tmp_path, {('+C', 1): BASE[1]})
    with pytest.raises(ValueError, match=r'plus-C-seed1 and \S*plus-C-seed0: other test images'):
        paired_vs_baseline(tmp_path, ['+C'], [0, 1], 'aji')
    with pytest.raises(ValueError, match="no metric column 'pq'"): paired_vs_baseline(tmp_path, ['+A'], [0], 'pq')
