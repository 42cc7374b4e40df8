"Tests of nucbook.bench.protocol: splits and their record, one row trained and read back, summaries, paper tables."
import json, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

from nucbook.bench import (Splits, load_splits, train_and_evaluate, summarise, format_summary, paper_table, check_paper,
                           run_record, run_label, reproduction_gaps, row_folder, scores)
from nucbook.data.datasets import save_own_folder, seeded_split
from nucbook.data.synth import synth_dataset
from nucbook.augment.mix import get_augmentation

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NUCBOOK_CACHE', str(tmp_path / 'label-cache'))

@pytest.fixture
def own(tmp_path):
    "12 synthetic tiles written as a plain images/ + labels/ (+ types.csv) folder."
    return save_own_folder(synth_dataset(12, 'train', seed=3, size=48), tmp_path / 'own')

# ---------------------------------------------------------------- splits

def test_synthetic_splits_groups_and_record():
    sp = load_splits('synthetic', n_train=3, n_test=2, n_val=1, tile_size=48, split_seed=0)
    assert isinstance(sp, Splits) and (len(sp.train), len(sp.val), len(sp.test)) == (3, 1, 4)
    assert [s.meta['group'] for s in sp.test] == ['seen', 'seen', 'unseen', 'unseen'] and sp.groups == ['seen', 'unseen']
    train, test = sp
    assert train is sp.train and test is sp.test
    r = sp.record
    assert (r['dataset'], r['kind'], r['resolved']) == ('synthetic', 'synthetic', 'synthetic')
    assert r['split']['method'] == 'synthetic' and r['split']['seed'] == 0
    tr = r['counts']['train']
    assert {k: v for k, v in tr.items() if k != 'groups'} == {'images': 3, 'nuclei': sum(s.n_instances for s in sp.train),
                                                              'image_ids': [s.meta['image_id'] for s in sp.train]}
    assert tr.get('groups', {'seen': 0, 'unseen': 0}) == {'seen': 0, 'unseen': 0}  # training tiles have no group
    assert r['counts']['test']['groups'] == {'seen': 2, 'unseen': 2}
    assert sp.n_types == 4 and r['classes']['1'] == 'other'
    # the seen group is the training generator's settings, unseen another one (as the InsMix notebook had it)
    seen_ids = [s.meta['image_id'] for s in synth_dataset(2, 'test', seed=0, size=48)]
    assert [s.meta['image_id'] for s in sp.test[:2]] == seen_ids
    unseen = synth_dataset(2, 'test', seed=1, size=48, density=1.6, cluster_share=0.8, proportions=(0.2, 0.3, 0.5))
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.inst_map, b.inst_map) for a, b in zip(sp.test[2:], unseen))
    json.dumps(r)

def test_own_folder_seeded_split_record(own):
    sp = load_splits(str(own), test_share=0.25, split_seed=0)
    r = sp.record
    assert (r['kind'], r['resolved']) == ('folder', str(own.resolve()))
    assert r['split'] == {'method': 'seeded', 'test_share': 0.25, 'val_share': 0.0, 'seed': 0}
    assert {k: v['images'] for k, v in r['counts'].items()} == {'train': 9, 'val': 0, 'test': 3}
    stems = sorted(p.stem for p in (own / 'images').iterdir())
    assert r['counts']['test']['image_ids'] == seeded_split(stems, 0.25, 0.0, 0)['test']
    assert r['counts']['test']['nuclei'] == sum(s.n_instances for s in sp.test)
    assert not set(r['counts']['train']['image_ids']) & set(r['counts']['test']['image_ids'])
    assert r['mpp'] == {'mpp': None, 'values': [], 'n_unknown': 12, 'uniform': False}
    assert sp.groups == [] and sp.n_types == 4 # types.csv read
    assert 'SEEDED split (test_share 0.25, val_share 0.0, seed 0)' in sp.describe()
    assert load_splits(own).record == r # reproducible
    v = load_splits(own, val_share=0.2, split_seed=1, mpp=0.5)
    assert {k: x['images'] for k, x in v.record['counts'].items()} == {'train': 7, 'val': 2, 'test': 3}
    assert v.record['mpp']['mpp'] == 0.5 and all(s.meta['mpp'] == 0.5 for s in v.train + v.val + v.test)

def test_own_folder_split_folders(tmp_path):
    tiles = synth_dataset(6, 'train', seed=1, size=48)
    for name, part in (('train', tiles[:3]), ('val', tiles[3:4]), ('test', tiles[4:])):
        save_own_folder(part, tmp_path / 'd', split=name)
    (tmp_path / 'd' / 'dataset.yaml').write_text('name: mine\nmpp: 0.25\nclasses: {1: a, 2: b, 3: c, 4: d}\n')
    sp = load_splits(tmp_path / 'd')
    assert sp.record['split'] == {'method': 'folders', 'folders': ['test', 'train', 'val'], 'ignored': []}
    assert (len(sp.train), len(sp.val), len(sp.test)) == (3, 1, 2) and sp.record['mpp']['mpp'] == 0.25
    assert sp.classes == {0: 'background', 1: 'a', 2: 'b', 3: 'c', 4: 'd'}
    assert {s.meta['dataset'] for s in sp.train} == {'mine'}
    import shutil; shutil.rmtree(tmp_path / 'd' / 'test')
    with pytest.raises(ValueError, match='no test/'): load_splits(tmp_path / 'd')

def test_registered_dataset_with_one_split_on_disk_gets_a_seeded_split(tmp_path):
    "DSB 2018 layout with stage1_test only (as in the shared copy): a seeded split of it, said in the record."
    from PIL import Image
    for k in range(4):
        case = tmp_path / 'dsb2018' / 'stage1_test' / f'c{k}'
        (case / 'images').mkdir(parents=True); (case / 'masks').mkdir()
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(case / 'images' / f'c{k}.png')
        m = np.zeros((16, 16), np.uint8); m[2:6, 2:6] = 255; Image.fromarray(m).save(case / 'masks' / 'm1.png')
    (tmp_path / 'dsb2018' / 'stage1_solution.csv').write_text('ImageId,EncodedPixels\n')
    with pytest.warns(UserWarning, match='train split .* is not on disk'):
        sp = load_splits('dsb2018', root=tmp_path, test_share=0.25)
    r = sp.record
    assert r['split']['method'] == 'seeded' and r['split']['of_split'] == ['stage1_test']
    assert (len(sp.train), len(sp.test)) == (3, 1) and r['resolved'] == 'dsb2018'
    with pytest.raises(FileNotFoundError, match='stage1_train'): load_splits('dsb2018', root=tmp_path, fallback=False)

def test_bad_dataset_names():
    with pytest.raises(KeyError, match="no manifest for dataset 'nope'"): load_splits('nope')
    with pytest.raises(KeyError, match="tnbc has no split 'train'"): load_splits('tnbc')
    with pytest.raises(ValueError, match='CPS fold must be 1..5'): load_splits('cps', fold=6)

@pytest.mark.realdata
def test_real_kumar_splits(data_root):
    sp = load_splits('kumar', root=data_root, prefer='png') # instance maps: no XML parsing
    r = sp.record
    assert r['split']['method'] == 'manifest' and r['counts']['train']['images'] == 16
    assert r['counts']['test']['groups'] == {'seen': 8, 'unseen': 6} and r['mpp']['uniform']

# ---------------------------------------------------------------- one row, trained and read back

def test_train_and_evaluate_tiny_and_resume(tmp_path, monkeypatch):
    sp = load_splits('synthetic', n_train=3, n_test=1, tile_size=64)
    cfg = dict(epochs=1, batch_size=4, crop_size=64, crops_per_image=1, threads=1, progress=False, val_every=0)
    t0 = time.perf_counter()
    r = train_and_evaluate('+CutOut', lambda: get_augmentation('cutout'), 0, sp.train, sp.test, cfg, 'tiny',
                           tmp_path / 'seg', aug_p=0.5, window=64, record=run_record(sp, profile='smoke', seeds=[0]))
    assert time.perf_counter() - t0 < 60
    folder = tmp_path / 'seg' / 'plus-CutOut-seed0'
    assert r['folder'] == str(folder) and (folder / 'eval.json').exists() and (folder / 'last.pt').exists()
    assert not r['cached'] and r['row'] == '+CutOut' and r['seed'] == 0 and r['aug_p'] == 0.5
    assert {'dice_all', 'aji_all', 'pq_all', 'dice_seen', 'aji_seen', 'dice_unseen', 'aji_unseen'} <= set(r)
    assert all(0 <= r[k] <= 100 for k in r if k.startswith(('dice_', 'aji_', 'pq_')))
    saved = json.loads((folder / 'eval.json').read_text())
    assert saved['record']['split']['method'] == 'synthetic' and saved['setting']['row'] == '+CutOut'
    # a second call reads the result back: nothing is trained (Trainer is never built) and the factory is not called
    import nucbook.bench.protocol as P
    monkeypatch.setattr(P, 'Trainer', lambda *a, **k: pytest.fail('retrained a finished row'))
    r2 = train_and_evaluate('+CutOut', lambda: pytest.fail('factory called'), 0, sp.train, sp.test, cfg, 'tiny',
                            tmp_path / 'seg', aug_p=0.5, window=64)
    assert r2['cached'] and {k: v for k, v in r2.items() if k != 'cached'} == {k: v for k, v in r.items() if k != 'cached'}
    with pytest.raises(ValueError, match=r'finished with other settings \(aug_p\)'):
        train_and_evaluate('+CutOut', lambda: None, 0, sp.train, sp.test, cfg, 'tiny', tmp_path / 'seg', aug_p=0.25, window=64)
    with pytest.raises(ValueError, match='test_data'):
        other = load_splits('synthetic', n_train=3, n_test=1, tile_size=64, split_seed=5)
        train_and_evaluate('+CutOut', None, 0, sp.train, other.test, cfg, 'tiny', tmp_path / 'seg', aug_p=0.5, window=64)

def test_row_folder_and_scores():
    assert row_folder('+SSD+BgP+s-GAN', 2) == 'plus-SSDplus-BgPplus-s-GAN-seed2'
    assert row_folder('a b/c', 0) == 'a_b_c-seed0'
    t = pd.DataFrame([dict(kind='image', group='seen', dice1=0.1, aji=0.1, pq=0.1),
                      dict(kind='mean', group='all', dice1=0.8, aji=0.6, pq=0.5),
                      dict(kind='mean', group='seen', dice1=0.9, aji=0.7, pq=0.55)])
    s = scores(t)
    assert s == pytest.approx({'dice_all': 80.0, 'aji_all': 60.0, 'pq_all': 50.0, 'dice_seen': 90.0, 'aji_seen': 70.0, 'pq_seen': 55.0})

# ---------------------------------------------------------------- summaries

RESULTS = [dict(row='Baseline', seed=0, aji_all=60.0, dice_all=80.0), dict(row='Baseline', seed=1, aji_all=62.0, dice_all=81.0),
           dict(row='Baseline', seed=2, aji_all=64.0, dice_all=79.0),
           dict(row='+Aug', seed=0, aji_all=63.0, dice_all=82.0), dict(row='+Aug', seed=1, aji_all=67.0, dice_all=80.0),
           dict(row='+Aug', seed=2, aji_all=62.0, dice_all=81.0),
           dict(row='+Worse', seed=0, aji_all=55.0, dice_all=75.0), dict(row='+Worse', seed=1, aji_all=57.0, dice_all=76.0)]

def test_summarise_exact_mean_std_delta():
    s = summarise(RESULTS)
    assert list(s.index) == ['Baseline', '+Aug', '+Worse']
    assert s.loc['Baseline', 'aji_all_mean'] == 62.0 and s.loc['Baseline', 'aji_all_std'] == pytest.approx(2.0) # sample std (ddof=1)
    assert s.loc['+Aug', 'aji_all_mean'] == pytest.approx(64.0)
    assert s.loc['+Aug', 'aji_all_std'] == pytest.approx(np.sqrt(((63 - 64) ** 2 + (67 - 64) ** 2 + (62 - 64) ** 2) / 2))
    assert s.loc['+Aug', 'aji_all_delta'] == pytest.approx(2.0)        # better than the baseline: positive
    assert s.loc['+Worse', 'aji_all_delta'] == pytest.approx(-6.0)     # worse: negative
    assert s.loc['+Worse', 'dice_all_delta'] == pytest.approx(-4.5)
    assert s.loc['Baseline', 'aji_all_delta'] == 0.0
    assert s['n_seeds'].tolist() == [3, 3, 2]
    assert s.loc['+Worse', 'dice_all_std'] == pytest.approx(np.sqrt(0.5))
    f = format_summary(s)
    assert f.loc['+Aug', 'aji_all'] == '64.00 ± 2.65' and f.loc['+Worse', 'Δaji_all'] == '-6.00'

def test_summarise_options_and_errors():
    one = summarise([dict(row='Baseline', seed=0, aji_all=60.0)])
    assert np.isnan(one.loc['Baseline', 'aji_all_std']) and format_summary(one).loc['Baseline', 'aji_all'] == '60.00'
    s = summarise(RESULTS, baseline='+Aug', rows=['+Worse', 'Baseline', 'not run'])
    assert list(s.index) == ['+Worse', 'Baseline'] and s.loc['Baseline', 'aji_all_delta'] == pytest.approx(-2.0)
    assert not [c for c in summarise(RESULTS, baseline=None).columns if c.endswith('_delta')]
    assert list(summarise(RESULTS, metrics=['aji_all']).columns) == ['aji_all_mean', 'aji_all_std', 'aji_all_delta', 'n_seeds']
    with pytest.raises(ValueError, match='same row and seed twice'): summarise(RESULTS + RESULTS[:1])
    with pytest.raises(ValueError, match='no results'): summarise([])

# ---------------------------------------------------------------- paper tables

PAPER = dict(paper='InsMix (Lin et al., MICCAI 2022)', table='Table 1', dataset='kumar', unit='%', segmenter='TAFE',
             metrics={'dice_all': 'Dice', 'aji_all': 'AJI'},
             rows=[dict(row='Baseline', label='HoVer-Net (Res50)', segmenter='HoVer-Net', dice_all=80.52, aji_all=58.03),
                   dict(row='Baseline', label='TAFE', dice_all=82.06, aji_all=61.52),
                   dict(row='+Aug', label='TAFE + InsMix', dice_all=82.56, aji_all=[63.31, 1.2]),
                   dict(row='+Other', label='Mask R-CNN + X', segmenter='Mask R-CNN', aji_all=50.0)])

def test_paper_table_only_the_comparator_is_comparable():
    t = paper_table(summarise(RESULTS), PAPER, comparator='HoVer-Net', dataset='kumar')
    assert t.loc['Baseline', 'aji_all'] == 62.0 and t.loc['Baseline', 'paper aji_all (HoVer-Net)'] == 58.03
    assert np.isnan(t.loc['+Aug', 'paper aji_all (HoVer-Net)']) # no HoVer-Net row for +Aug in the paper: nothing comparable
    assert t.loc['+Aug', 'paper aji_all (TAFE segmenter, not comparable)'] == 63.31
    assert t.loc['+Aug', 'paper aji_all std (TAFE segmenter, not comparable)'] == 1.2
    assert t.loc['Baseline', 'paper dice_all (TAFE segmenter, not comparable)'] == 82.06
    assert not any('Mask R-CNN' in c for c in t.columns) # a segmenter with no row of ours adds no column
    comparable = [c for c in t.columns if c.startswith('paper') and 'not comparable' not in c]
    assert comparable == ['paper dice_all (HoVer-Net)', 'paper aji_all (HoVer-Net)']
    assert t.attrs['comparator'] == 'HoVer-Net' and t.attrs['comparable']
    # with TAFE as our segmenter the roles swap
    t2 = paper_table(summarise(RESULTS), PAPER, comparator='TAFE')
    assert t2.loc['+Aug', 'paper aji_all (TAFE)'] == 63.31 and t2.loc['Baseline', 'paper aji_all (HoVer-Net segmenter, not comparable)'] == 58.03
    # another dataset: nothing is comparable
    t3 = paper_table(summarise(RESULTS), PAPER, comparator='HoVer-Net', dataset='synthetic')
    assert not [c for c in t3.columns if c.startswith('paper') and 'not comparable' not in c] and not t3.attrs['comparable']
    # a comparator the paper never used: its columns exist and are empty
    t4 = paper_table(summarise(RESULTS), PAPER, comparator='U-Net')
    assert t4['paper aji_all (U-Net)'].isna().all()

def test_check_paper_rejects_malformed_tables():
    with pytest.raises(ValueError, match=r"lacks \['segmenter'\]"): check_paper({k: v for k, v in PAPER.items() if k != 'segmenter'})
    with pytest.raises(ValueError, match='row 0 has no `row`'): check_paper({**PAPER, 'rows': [dict(aji_all=1.0)]})
    with pytest.raises(ValueError, match=r"has values for \['pq_all'\]"): check_paper({**PAPER, 'rows': [dict(row='B', pq_all=1.0)]})
    with pytest.raises(ValueError, match='expected a number'): check_paper({**PAPER, 'rows': [dict(row='B', aji_all=[1, 2, 3])]})

# ---------------------------------------------------------------- run record

def test_run_record_says_what_ran(own):
    sp = load_splits(own)
    r = run_record(sp, profile='smoke', model_size='tiny', seeds=0, epochs=3)
    assert (r['dataset'], r['dataset_kind'], r['dataset_resolved']) == (str(own), 'folder', str(own.resolve()))
    assert r['split']['method'] == 'seeded' and r['counts']['train']['images'] == 9 and r['mpp']['mpp'] is None
    assert (r['profile'], r['model_size'], r['seeds'], r['epochs']) == ('smoke', 'tiny', [0], 3)
    assert run_record(sp.record)['counts'] == r['counts']
    json.dumps(r)

# ---------------------------------------------------------------- labels

KUMAR_PAPER = dict(dataset='kumar', dataset_kind='manifest', dataset_resolved='kumar', split={'method': 'manifest'},
                   profile='paper', model_size='paper', seeds=[0, 1, 2], epochs=300)

def test_run_label_synthetic_smoke_says_so_from_the_record():
    sp = load_splits('synthetic', n_train=2, n_test=1, tile_size=48)
    lab = run_label(run_record(sp, profile='smoke', model_size='tiny', seeds=[0, 1], epochs=15), paper_dataset='kumar')
    assert lab == ('synthetic data, smoke profile, HoVer-Net (tiny), 15 epochs, seeds 0, 1 — NOT a reproduction '
                   '(smoke profile; synthetic data; tiny segmenter, not paper size; 15 epochs, not 300)')

def test_run_label_own_folder_names_the_resolved_folder(own):
    lab = run_label(run_record(load_splits(own), profile='paper', model_size='paper', seeds=0, epochs=300, paper_dataset='kumar'))
    assert lab.startswith(f'own folder {own.resolve()}, paper profile, HoVer-Net (paper), 300 epochs, seed 0 — NOT a reproduction')
    assert "own folder, not the paper's kumar" in lab and 'synthetic' not in lab

def test_run_label_kumar_paper_profile_is_a_reproduction_and_smoke_is_not():
    assert run_label(KUMAR_PAPER, paper_dataset='kumar') == 'kumar, paper profile, HoVer-Net (paper), 300 epochs, seeds 0, 1, 2'
    assert reproduction_gaps({**KUMAR_PAPER, 'paper_dataset': ['kumar', 'cps']}) == []  # the record may carry the paper's datasets
    smoke = run_label({**KUMAR_PAPER, 'profile': 'smoke', 'model_size': 'tiny', 'epochs': 15, 'seeds': [0]}, paper_dataset='kumar')
    assert smoke.startswith('kumar, smoke profile, HoVer-Net (tiny), 15 epochs, seed 0 — NOT a reproduction (smoke profile;')
    assert 'synthetic' not in smoke
    # the paper profile elsewhere, cut short, limited, or with a fresh encoder is not a reproduction either
    assert 'NOT a reproduction (monuseg2018, not the paper\'s kumar)' in run_label({**KUMAR_PAPER, 'dataset_resolved': 'monuseg2018'}, 'kumar')
    assert reproduction_gaps({**KUMAR_PAPER, 'split': {'method': 'manifest', 'limit': 3}}, 'kumar') == ['at most 3 images per split']
    assert reproduction_gaps({**KUMAR_PAPER, 'split': {'method': 'seeded'}}, 'kumar') == ["a seeded split, not the paper's"]
    assert reproduction_gaps({**KUMAR_PAPER, 'encoder_weights': None}, 'kumar') == ['encoder from scratch, not ImageNet weights']
    assert reproduction_gaps({**KUMAR_PAPER, 'std_aug': 'light'}, 'kumar') == ["'light' standard augmentation, not 'hovernet'"]
    assert reproduction_gaps({**KUMAR_PAPER, 'std_aug': 'hovernet'}, 'kumar') == []
    assert reproduction_gaps(KUMAR_PAPER) == ["the paper's dataset not given"]
    assert run_label({**KUMAR_PAPER, 'dataset_resolved': 'cps', 'split': {'method': 'folds', 'fold': 3}}, 'cps').startswith('cps fold 3,')

def test_run_label_single_seed_and_bad_records():
    assert run_label({**KUMAR_PAPER, 'seeds': [7], 'epochs': 1}, 'kumar') == 'kumar, paper profile, HoVer-Net (paper), 1 epoch, seed 7 — NOT a reproduction (1 epoch, not 300)'
    assert 'seeds' not in run_label({**KUMAR_PAPER, 'seeds': [7]}, 'kumar')
    with pytest.raises(ValueError, match='names no dataset'): run_label({'profile': 'smoke'})
    with pytest.raises(TypeError, match='expected the dict of run_record'): run_label('kumar')

def test_format_summary_single_seed_has_no_plus_minus():
    s = summarise([dict(row='Baseline', seed=0, aji_all=60.0), dict(row='+Aug', seed=0, aji_all=62.0), dict(row='+Aug', seed=1, aji_all=64.0)])
    f = format_summary(s)
    assert f.loc['Baseline', 'aji_all'] == '60.00' and '±' not in f.loc['Baseline'].to_string()
    assert f.loc['+Aug', 'aji_all'] == f'63.00 ± {np.sqrt(2):.2f}' and f.loc['+Aug', 'Δaji_all'] == '+3.00'
    s.loc['Baseline', 'aji_all_std'] = 0.0  # a zero spread reported for one seed still shows no ±
    assert format_summary(s).loc['Baseline', 'aji_all'] == '60.00'
