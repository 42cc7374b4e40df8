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

# ---------------------------------------------------------------- NucleiMix's protocol: class counts, scores, warm start, label fidelity

from nucbook.bench import (class_count_table, warm_start_protocol, baseline_weights, label_fidelity, METRIC_PATTERN)
from nucbook.data.sample import make_sample, LabelError

def typed_row(types, image_id):
    "One 2x2 nucleus per entry of `types`, in a row."
    inst = np.zeros((4, 4 * len(types) + 1), np.int32)
    for i in range(len(types)): inst[1:3, 4 * i + 1:4 * i + 3] = i + 1
    return make_sample(np.zeros(inst.shape + (3,), np.uint8), inst, inst_types=dict(enumerate(types, 1)), meta={'image_id': image_id})

def test_class_count_table_exact():
    sets = {'Original': [typed_row([1, 2, 2, 3], 'a'), typed_row([3, 3, 4], 'b')],
            'CutMix (k=2)': [typed_row([1, 1, 2, 3], 'a'), typed_row([3, 1, 4], 'b')], 'empty': []}
    t = class_count_table(sets, {0: 'background', 1: 'miscellaneous', 2: 'inflammatory', 3: 'epithelial', 4: 'spindle'})
    assert list(t.columns) == ['miscellaneous', 'inflammatory', 'epithelial', 'spindle', 'total']
    assert t.to_dict(orient='index') == {
        'Original': {'miscellaneous': 1, 'inflammatory': 2, 'epithelial': 3, 'spindle': 1, 'total': 7},
        'CutMix (k=2)': {'miscellaneous': 3, 'inflammatory': 1, 'epithelial': 2, 'spindle': 1, 'total': 7},
        'empty': {'miscellaneous': 0, 'inflammatory': 0, 'epithelial': 0, 'spindle': 0, 'total': 0}}
    assert t.attrs['images'] == {'Original': 2, 'CutMix (k=2)': 2, 'empty': 0}
    with pytest.raises(LabelError, match=r"Original: image 1 \(b\) has nuclei of types \[4\]"):
        class_count_table(sets, {1: 'm', 2: 'i', 3: 'e'})
    with pytest.raises(LabelError, match='has no nucleus types'):
        class_count_table({'x': [make_sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32))]}, {1: 'm'})

def test_scores_segmentation_and_classification_in_percent():
    from nucbook.eval.metrics import evaluate
    s = load_splits('synthetic', n_train=1, n_test=1, tile_size=64).test  # two typed test tiles, groups seen / unseen
    sc = scores(evaluate(s, s))  # a perfect prediction
    for g in ('all', 'seen', 'unseen'):
        assert sc[f'dice_{g}'] == sc[f'aji_{g}'] == sc[f'dq_{g}'] == sc[f'f1_d_{g}'] == sc[f'acc_{g}'] == 100.0
        assert sc[f'sq_{g}'] == pytest.approx(100.0, abs=1e-3) and sc[f'pq_{g}'] == pytest.approx(100.0, abs=1e-3)
    types = sorted({int(t) for x in s for t in x.inst_types})
    assert {f'f1_c_{t}_all' for t in types} <= set(sc) and all(sc[f'f1_c_{t}_all'] == 100.0 for t in types)
    assert all(METRIC_PATTERN.match(k) for k in sc)
    t = pd.DataFrame([dict(kind='mean', group='all', dice1=0.8, aji=0.6, dq=0.7, sq=0.8, pq=0.56),
                      dict(kind='pooled', group='all', f1_d=0.9, acc=0.5, f1_c_1=0.25, f1_c_2=np.nan, tp_d=5, r2=0.3)])
    assert scores(t) == pytest.approx({'dice_all': 80.0, 'aji_all': 60.0, 'dq_all': 70.0, 'sq_all': 80.0, 'pq_all': 56.0,
                                       'f1_d_all': 90.0, 'acc_all': 50.0, 'f1_c_1_all': 25.0})

def test_summarise_classification_columns():
    res = [dict(row='Baseline', seed=s, f1_d_all=80.0 + s, acc_all=90.0, f1_c_1_all=20.0 + 2 * s, dq_all=70.0, sq_all=75.0 - s, n_train=3)
           for s in range(3)] + [dict(row='CutMix', seed=s, f1_d_all=82.0, acc_all=91.0 + s, f1_c_1_all=30.0, dq_all=71.0, sq_all=76.0, n_train=3)
                                 for s in range(3)]
    s = summarise(res)
    assert [c[:-5] for c in s.columns if c.endswith('_mean')] == ['f1_d_all', 'acc_all', 'f1_c_1_all', 'dq_all', 'sq_all']  # not n_train
    assert s.loc['CutMix', 'f1_c_1_all_delta'] == pytest.approx(8.0) and s.loc['Baseline', 'f1_c_1_all_std'] == pytest.approx(2.0)
    f = format_summary(s)
    assert f.loc['Baseline', 'f1_c_1_all'] == '22.00 ± 2.00' and f.loc['CutMix', 'Δacc_all'] == '+2.00'
    assert f.loc['Baseline', 'sq_all'] == '74.00 ± 1.00' and f.loc['CutMix', 'f1_d_all'] == '82.00 ± 0.00'

def test_warm_start_protocol_rows(tmp_path):
    ws = warm_start_protocol(dict(epochs=100, T_0=25, lr=1e-4, eta_min=1e-5, weight_decay=0.0))
    assert ws['baseline'] == dict(epochs=100, T_0=25, lr=1e-4, eta_min=1e-5, weight_decay=0.0, snapshot_epochs=(50,))
    assert ws['augmented'] == dict(epochs=50, T_0=25, lr=1e-4, eta_min=1e-5, weight_decay=0.0)
    assert ws['record'] == {'epochs': 100, 'warm_start': {'snapshot': 50, 'epochs': 50}}
    assert warm_start_protocol(dict(epochs=100, T_0=25), snapshot=75)['augmented']['epochs'] == 25
    with pytest.raises(ValueError, match=r'in 1\.\.99'): warm_start_protocol(dict(epochs=100), snapshot=100)
    with pytest.raises(ValueError, match=r"sets \[.snapshot_epochs.\] itself"): warm_start_protocol(dict(epochs=4, snapshot_epochs=(2,)))
    with pytest.warns(UserWarning, match='not a multiple of T_0'): warm_start_protocol(dict(epochs=10, T_0=3))
    assert baseline_weights(tmp_path, 2, 50) == tmp_path / 'Baseline-seed2' / 'weights_epoch50.pt'
    # in small: the baseline keeps epoch 1, an augmented row trains 1 epoch from it
    sp = load_splits('synthetic', n_train=3, n_test=1, tile_size=64)
    cfg = dict(batch_size=4, crop_size=64, crops_per_image=1, threads=1, progress=False, val_every=0, T_0=1)
    small = warm_start_protocol({**cfg, 'epochs': 2})
    b = train_and_evaluate('Baseline', None, 0, sp.train, sp.test, small['baseline'], 'tiny', tmp_path, window=64)
    snap = baseline_weights(tmp_path, 0, small['snapshot'])
    assert snap.is_file() and 'init_from' not in b and b['epochs'] == 2
    r = train_and_evaluate('+CutMix', lambda: get_augmentation('cutmix'), 0, sp.train, sp.test, small['augmented'], 'tiny', tmp_path,
                           window=64, init_from=snap)
    assert (r['epochs'], r['init_from'], r['cached']) == (1, str(snap), False)
    from nucbook.core import load_checkpoint
    assert load_checkpoint(Path(r['folder']) / 'last.pt')['settings']['init_weights'] == str(snap)
    assert json.loads((Path(r['folder']) / 'eval.json').read_text())['setting']['init_from'] == str(snap)
    again = train_and_evaluate('+CutMix', lambda: pytest.fail('retrained'), 0, sp.train, sp.test, small['augmented'], 'tiny', tmp_path,
                               window=64, init_from=snap)
    assert again['cached'] and again['init_from'] == str(snap)
    with pytest.raises(ValueError, match=r'finished with other settings \(init_from\)'):
        train_and_evaluate('+CutMix', lambda: get_augmentation('cutmix'), 0, sp.train, sp.test, small['augmented'], 'tiny', tmp_path,
                           window=64, init_from=tmp_path / 'Baseline-seed0' / 'last.pt')
    with pytest.raises(ValueError, match='differ: give one of them'):
        train_and_evaluate('x', None, 0, sp.train, sp.test, {**small['augmented'], 'init_weights': 'a.pt'}, init_from='b.pt')
    # an offline-augmented training set is not a baseline row, and says what it is
    off = train_and_evaluate('CutMix (k=2)', None, 0, sp.train, sp.test, small['augmented'], 'tiny', tmp_path, window=64,
                             init_from=snap, offline={'method': 'cutmix', 'k': 2, 'seed': 0})
    setting = json.loads((Path(off['folder']) / 'eval.json').read_text())['setting']
    assert setting['baseline'] is False and setting['offline'] == {'method': 'cutmix', 'k': 2, 'seed': 0} and off['offline']['k'] == 2

def test_reproduction_gaps_and_label_with_a_warm_start():
    nm = dict(epochs=100, warm_start={'snapshot': 50, 'epochs': 50})
    rec = {**KUMAR_PAPER, 'dataset_resolved': 'consep_tiles', 'epochs': 100, 'warm_start': {'snapshot': 50, 'epochs': 50}}
    assert reproduction_gaps(rec, 'consep_tiles', nm) == [] and reproduction_gaps({**rec, 'paper_setting': nm}, 'consep_tiles') == []
    assert run_label(rec, 'consep_tiles', nm) == ("consep_tiles, paper profile, HoVer-Net (paper), 100 epochs (augmented rows: 50 epochs "
                                                  "from the baseline's epoch 50), seeds 0, 1, 2")
    scratch = {k: v for k, v in rec.items() if k != 'warm_start'}
    assert reproduction_gaps(scratch, 'consep_tiles', nm) == ["augmented rows trained from scratch, not 50 epochs from the baseline's epoch 50"]
    other = {**rec, 'epochs': 4, 'warm_start': {'snapshot': 2, 'epochs': 2}, 'profile': 'smoke'}
    assert reproduction_gaps(other, 'consep_tiles', nm) == ['smoke profile', '4 epochs, not 100',
                                                            "augmented rows 2 epochs from the baseline's epoch 2, not 50 epochs from the baseline's epoch 50"]
    assert reproduction_gaps(rec, 'consep_tiles') == ['100 epochs, not 300', "augmented rows 50 epochs from the baseline's epoch 50, not trained from scratch"]
    assert reproduction_gaps(KUMAR_PAPER, 'kumar') == []  # the common protocol's runs are unchanged

def disk(inst, cy, cx, i, r=3):
    yy, xx = np.mgrid[:inst.shape[0], :inst.shape[1]]; inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i

def test_label_fidelity_exact_shares_with_a_fake_predictor():
    inst = np.zeros((60, 60), np.int32)
    for i, c in enumerate([(10, 10), (10, 40), (40, 10), (40, 40), (52, 52)], 1): disk(inst, *c, i)
    # ids 1, 2 inserted (type 1); 3 real rare (type 1); 4, 5 major (type 2)
    lab = make_sample(np.zeros((60, 60, 3), np.uint8), inst, inst_types={1: 1, 2: 1, 3: 1, 4: 2, 5: 2}, meta={'image_id': 'h'})
    pred = np.zeros((60, 60), np.int32)
    for i, c in enumerate([(12, 12), (10, 26), (40, 12), (40, 40)], 1): disk(pred, *c, i)  # id 2's prediction is 14 px away
    calls = []
    def fake(types):
        def f(s): calls.append(s.meta['image_id']); return make_sample(s.image, pred, inst_types=types)
        return f
    other = make_sample(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32), inst_types={}, meta={'image_id': 'o'})
    lf = label_fidelity(None, [other, lab], [(1, 1), (1, 2)], predict=fake({1: 1, 2: 1, 3: 2, 4: 2}))
    assert calls == ['h'] and all(type(v) in (int, float) for v in lf.values())  # plain numbers, for metrics.json
    assert lf == {'n_inserted': 2, 'n_found': 1, 'n_typed': 1, 'found': 0.5, 'found_typed': 0.5,
                  'real_n': 1, 'real_n_found': 1, 'real_n_typed': 0, 'real_found': 1.0, 'real_found_typed': 0.0, 'n_images': 1}
    lf = label_fidelity(None, [lab], [(0, 1), (0, 2)], radius=15, predict=fake({1: 2, 2: 1, 3: 1, 4: 2}))
    assert (lf['n_found'], lf['n_typed'], lf['found'], lf['found_typed'], lf['real_found_typed']) == (2, 1, 1.0, 0.5, 1.0)
    untyped = label_fidelity(None, [lab], [(0, 1)], predict=lambda s: make_sample(s.image, pred))
    assert untyped['n_found'] == 1 and untyped['n_typed'] is None and np.isnan(untyped['found_typed'])
    empty = label_fidelity(None, [lab], [], predict=fake({}))
    assert empty['n_inserted'] == 0 and np.isnan(empty['found']) and empty['n_images'] == 0
    with pytest.raises(ValueError, match=r'inserted\[0\] = \(0, 9\): samples\[0\] \(h\) has no instance 9'):
        label_fidelity(None, [lab], [(0, 9)], predict=fake({}))
    with pytest.raises(ValueError, match='give the model or a predict function'): label_fidelity(None, [lab], [(0, 1)])

def test_label_fidelity_with_a_model_and_insert_rare():
    import torch
    from nucbook.augment.mix import insert_rare, CopyPaste
    from nucbook.models.hovernet import HoVerNet
    train = load_splits('synthetic', n_train=3, n_test=1, tile_size=160).train
    assert sum(int((s.inst_types == 1).sum()) for s in train) > 0
    out, rep = insert_rare(CopyPaste(types=(1,)), train, 4, rare=1, seed=0)
    torch.manual_seed(0)
    lf = label_fidelity(HoVerNet('tiny', n_types=4), out, rep['inserted_ids'], window=64)
    assert lf['n_inserted'] == len(rep['inserted_ids']) == 4 and lf['n_images'] == len({i for i, _ in rep['inserted_ids']})
    assert 0 <= lf['n_typed'] <= lf['n_found'] <= 4 and lf['real_n'] == sum(int((out[i].inst_types == 1).sum()) for i in
                                                                             {i for i, _ in rep['inserted_ids']}) - 4

def test_scores_keep_requested_extras_and_train_and_evaluate_passes_them(tmp_path):
    from nucbook.eval.metrics import evaluate
    sp = load_splits('synthetic', n_train=1, n_test=1, tile_size=64)
    t = evaluate(sp.test, sp.test, extra=('aji_gong', 'object_dice', 'ap'))
    sc = scores(t, ('aji_gong', 'object_dice', 'ap', 'pixel_f1', 'object_f1'))
    for g in ('all', 'seen', 'unseen'):  # a perfect prediction: every extra is 100 %
        for k in ('aji_gong', 'object_dice', 'ap50', 'ap50_95', 'pixel_f1', 'object_f1'):
            assert sc[f'{k}_{g}'] == pytest.approx(100.0), (k, g)
    assert all(METRIC_PATTERN.match(k) for k in sc)
    assert not any(k.startswith(('aji_gong', 'ap', 'pixel_f1')) for k in scores(t))  # only on request
    with pytest.raises(ValueError, match='unknown extra scores'): scores(t, 'hd95')
    kw = dict(cfg=dict(epochs=1, batch_size=2, crop_size=32, crops_per_image=1, lr=1e-3, val_every=0, progress=False), window=64, out_dir=tmp_path)
    r = train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], extra=('ap', 'aji_gong'), **kw)
    assert {'ap50_all', 'ap50_95_all', 'aji_gong_all'} <= set(r) and 'object_dice_all' not in r
    assert train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], extra=('aji_gong', 'ap'), **kw)['cached']  # order free
    with pytest.raises(ValueError, match='other settings.*extra'):
        train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], **kw)
    with pytest.raises(ValueError, match='other settings.*conventions'):  # scored under other conventions: not the same row
        train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], extra=('ap', 'aji_gong'), conventions='stardist', **kw)
    r2 = train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], extra=('ap',), conventions='stardist', **{**kw, 'out_dir': tmp_path/'sd'})
    assert json.loads((tmp_path/'sd'/'Baseline-seed0'/'eval.json').read_text())['setting']['conventions'] == 'stardist' and 'ap50_all' in r2
    with pytest.raises(ValueError, match='nope'):
        train_and_evaluate('Baseline', None, 0, sp.train, sp.test[:1], conventions='nope', **{**kw, 'out_dir': tmp_path/'bad'})
