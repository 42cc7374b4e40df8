"""Tests of nucbook.data.formats: PanNuke, CoNIC and Lizard loaders on fixtures written here in exactly the distributed
layouts (N = 3 images of 256x256), the CoNIC and HoVer-Net writers (round trips), the manifests, `nucbook verify` on
the fixtures, and the dataset-name messages of issue 13 item 6."""
import json, warnings
from pathlib import Path
import numpy as np
import pytest
import scipy.io as sio
import yaml, jsonschema
from PIL import Image

from nucbook.data import formats as F
from nucbook.data import datasets as D
from nucbook.data.datasets import load_dataset, load_manifest, list_datasets, read_hovernet_mat, resolve_dataset
from nucbook.data.sample import LabelError, Sample, make_sample, check_sample

from datahelpers import _cache  # noqa: F401 (autouse: label caches in the test's folder)

H = W = 256

# ---------------------------------------------------------------- fixtures in the distributed layouts

def pannuke_masks():
    """Three hand-built PanNuke masks (float64, 6 channels). Image 0: neoplastic ids 1 and 7; connective id 1 (an id
    repeated in another channel); a dead nucleus overlapping neoplastic 1 on 4 pixels; epithelial id 2.
    Image 1: one inflammatory nucleus (id 3). Image 2: no nucleus at all."""
    m = np.zeros((3, H, W, 6))
    m[0, 10:20, 10:20, 0] = 1; m[0, 10:20, 100:110, 0] = 7
    m[0, 200:210, 10:20, 2] = 1
    m[0, 18:24, 18:24, 3] = 4 # overlaps neoplastic 1 on rows 18-19, cols 18-19 (4 pixels)
    m[0, 150:160, 150:160, 4] = 2
    m[1, 30:40, 30:40, 1] = 3
    m[..., 5] = m[..., :5].sum(-1) == 0 # background channel, as several releases store it
    return m

def write_pannuke(base, masks=None, tissues=('Breast', 'Colon', 'Bile-duct'), folds=(1, 2, 3), image_dtype=np.float64):
    "PanNuke: `Fold k/images/foldk/{images,types}.npy`, `Fold k/masks/foldk/masks.npy` (float64 0-255 images)."
    masks = pannuke_masks() if masks is None else masks
    for k in folds:
        f = F.pannuke_files(base, k)
        for p in f.values(): p.parent.mkdir(parents=True, exist_ok=True)
        img = np.random.default_rng(k).integers(0, 256, (len(masks), H, W, 3)).astype(image_dtype)
        np.save(f['images'], img); np.save(f['masks'], masks.astype(np.float64)); np.save(f['types'], np.array(tissues))
    return base

def conic_labels():
    "Three CoNIC patches (uint16 instance map, class map) and their counts.csv rows, counted by hand."
    lab = np.zeros((3, H, W, 2), np.uint16)
    lab[0, 100:110, 100:110] = (1, 2)   # epithelial inside the central window: counted
    lab[0, 0:10, 50:60] = (2, 1)        # neutrophil in rows 0-9: outside the window (rows 16..239), not counted
    lab[0, 10:20, 200:210] = (3, 6)     # connective in rows 10-19: its rows 16-19 are inside, counted
    lab[0, 245:256, 5:15] = (4, 3)      # lymphocyte in rows 245-255: outside, not counted
    lab[1, 50:60, 50:60] = (1, 4)       # plasma
    lab[1, 60:70, 50:60] = (2, 5)       # eosinophil
    lab[2, 70:80, 70:80] = (1, 6); lab[2, 90:99, 90:99] = (2, 2)
    counts = [[0, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 1]]
    return lab, counts

CONIC_NAMES = ['consep_1-0000', 'consep_2-0000', 'consep_1-0001']

def write_conic(base, labels=None, names=CONIC_NAMES, counts=None):
    "CoNIC: images.npy (uint8), labels.npy (uint16), counts.csv, patch_info.csv, as extract_patches.py writes them."
    lab, cnt = conic_labels()
    labels = lab if labels is None else labels; counts = cnt if counts is None else counts
    base.mkdir(parents=True, exist_ok=True)
    np.save(base / 'images.npy', np.random.default_rng(0).integers(0, 256, (*labels.shape[:3], 3), dtype=np.uint8))
    np.save(base / 'labels.npy', labels)
    (base / 'counts.csv').write_text(','.join(F.CONIC_CLASSES) + '\n' + ''.join(','.join(map(str, r)) + '\n' for r in counts))
    (base / 'patch_info.csv').write_text('patch_info\n' + ''.join(n + '\n' for n in names))
    return base

def lizard_map():
    a = np.zeros((H, W), np.int32); a[5:15, 5:15] = 40; a[50:60, 50:60] = 7; a[100:110, 30:45] = 12
    return a

def write_lizard(base, kaggle=False):
    """Lizard: Lizard_Images1/2/*.png, Lizard_Labels/Labels/*.mat (inst_map, id, class, bbox, centroid), info.csv;
    with `kaggle=True` the mirror's nesting (lizard_images1/Lizard_Images1/...)."""
    a = lizard_map()
    cases = {'consep_1': ('Lizard_Images1', [12, 7, 40], [5, 1, 2]),   # ids listed out of order
             'glas_3': ('Lizard_Images2', [40, 7, 12, 9], [2, 2, 6, 3]),  # id 9 has no pixels
             'crag_2': ('Lizard_Images2', [7, 12, 40], [3, 4, 4])}
    nest = (lambda p: f'{p.lower()}/{p}') if kaggle else (lambda p: p)
    lab = base / nest('Lizard_Labels') / 'Labels'; lab.mkdir(parents=True, exist_ok=True)
    for k, (name, (folder, ids, cl)) in enumerate(cases.items()):
        (base / nest(folder)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(base / nest(folder) / f'{name}.png')
        col = lambda v: np.asarray(v, np.int32).reshape(-1, 1)
        sio.savemat(lab / f'{name}.mat', {'inst_map': a, 'id': col(ids), 'class': col(cl),
                                          'bbox': np.zeros((len(ids), 4), np.int32), 'centroid': np.zeros((len(ids), 2))})
    (lab.parent / 'info.csv').write_text('Filename,Source,Split\nconsep_1,consep,1\nglas_3,glas,1\ncrag_2,crag,2\n')
    return base

@pytest.fixture(scope='module')
def pannuke_root(tmp_path_factory):
    return write_pannuke(tmp_path_factory.mktemp('root') / 'pannuke').parent

# ---------------------------------------------------------------- manifests

def test_manifests_validate_and_describe_the_formats():
    schema = json.loads((D.manifest_dir() / 'schema.json').read_text())
    for n in ('pannuke', 'conic', 'lizard'):
        m = json.loads(json.dumps(yaml.safe_load((D.manifest_dir() / f'{n}.yaml').read_text())))
        jsonschema.validate(m, schema)
        assert m['name'] == n and m['loader'] == n and m['manual'] and n in D.LOADERS
        assert all(d['url'] is None and d['sha256'] is None and d['size'] is None for d in m['download'])
    p = load_manifest('pannuke')
    assert {s: (v['count'], v['fold'], v['dir']) for s, v in p['splits'].items()} == \
        {'fold1': (2656, 1, 'Fold 1'), 'fold2': (2523, 2, 'Fold 2'), 'fold3': (2722, 3, 'Fold 3')}
    assert D.class_map('pannuke') == {0: 'background', 1: 'neoplastic', 2: 'inflammatory', 3: 'connective', 4: 'dead',
                                      5: 'epithelial'}
    conic = {0: 'background', 1: 'neutrophil', 2: 'epithelial', 3: 'lymphocyte', 4: 'plasma', 5: 'eosinophil', 6: 'connective'}
    assert D.class_map('conic') == conic and D.class_map('lizard') == conic
    assert [conic[k] for k in range(1, 7)] == list(F.CONIC_CLASSES) # counts.csv column order = class ids
    assert D.rare_types('pannuke') == [4] and D.rare_types('conic') == [1, 5] and D.rare_types('lizard') == [1, 5]
    assert (p['mpp'], load_manifest('conic')['mpp'], load_manifest('lizard')['mpp']) == (0.25, 0.5, 0.5)
    assert list(load_manifest('lizard')['splits']) == ['fold1', 'fold2', 'fold3']
    assert set(load_manifest('conic')['splits']) == {'train', 'test'}
    assert [d['filename'] for d in p['download']] == ['fold_1.zip', 'fold_2.zip', 'fold_3.zip']
    assert [d['filename'] for d in load_manifest('lizard')['download']] == ['lizard_images1.zip', 'lizard_images2.zip', 'lizard_labels.zip']

# ---------------------------------------------------------------- PanNuke

def test_pannuke_instances_unique_per_image_with_types(pannuke_root):
    s = load_dataset('pannuke', 'fold1', root=pannuke_root)
    assert len(s) == 3 and all(isinstance(x, Sample) for x in s)
    for x in s: check_sample(x)
    a = s[0]
    # ids in order: neoplastic 1, neoplastic 7, connective 1, dead 4, epithelial 2
    assert a.inst_types.tolist() == [1, 1, 3, 4, 5]
    assert a.inst_map[15, 15] == 1 and a.inst_map[15, 105] == 2 and a.inst_map[205, 15] == 3
    assert a.inst_map[155, 155] == 5 and a.inst_map[19, 19] == 4 # the overlap went to the later (dead) channel
    assert (a.inst_map == 1).sum() == 100 - 4 and (a.inst_map == 4).sum() == 36
    assert a.meta['label_stats'] == {'n_per_channel': [2, 0, 1, 1, 1], 'n_overlap_pixels': 4, 'channel5': 'background'}
    assert s[1].inst_types.tolist() == [2] and s[2].n_instances == 0
    assert [x.meta['tissue'] for x in s] == ['Breast', 'Colon', 'Bile-duct']
    assert [x.meta['organ'] for x in s] == ['breast', 'colon', 'bile_duct']
    assert a.meta['fold'] == 1 and a.meta['index'] == 0 and a.meta['split'] == 'fold1' and a.meta['mpp'] == 0.25
    assert a.meta['source'].endswith('Fold 1/images/fold1/images.npy[0]')
    want = np.load(pannuke_root / 'pannuke/Fold 1/images/fold1/images.npy')[2]
    assert s[2].image.dtype == np.uint8 and np.array_equal(s[2].image, want.astype(np.uint8))
    assert s[0].image.flags.writeable and not isinstance(s[0].image, np.memmap) # a copy, not a view of the file

def test_pannuke_channel5_forms_give_the_same_labels(tmp_path):
    m = pannuke_masks(); m0 = m.copy(); m0[..., 5] = 0
    a = load_dataset('pannuke', 'fold1', root=write_pannuke(tmp_path / 'a' / 'pannuke', m, folds=(1,)))
    b = load_dataset('pannuke', 'fold1', root=write_pannuke(tmp_path / 'b' / 'pannuke', m0, folds=(1,)))
    for x, y in zip(a, b):
        assert np.array_equal(x.inst_map, y.inst_map) and np.array_equal(x.inst_types, y.inst_types)
    assert [x.meta['label_stats']['channel5'] for x in b] == ['empty'] * 3
    assert a[2].meta['label_stats']['channel5'] == 'background' # all-background image

def test_pannuke_reads_only_the_requested_items(pannuke_root, monkeypatch):
    calls, real = [], F.pannuke_instances
    monkeypatch.setattr(F, 'pannuke_instances', lambda m, src=None: calls.append(src) or real(m, src))
    loads, real_load = [], np.load
    monkeypatch.setattr(np, 'load', lambda *a, **k: loads.append(k.get('mmap_mode')) or real_load(*a, **k))
    s = load_dataset('pannuke', 'fold2', root=pannuke_root, limit=1)
    assert [x.meta['index'] for x in s] == [0] and len(calls) == 1 and calls[0].endswith('masks.npy[0]')
    assert loads == ['r', 'r', None] # images and masks memory-mapped; the small types.npy read whole
    calls.clear()
    s = load_dataset('pannuke', 'fold3', root=pannuke_root, items=[2, 1])
    assert [x.meta['index'] for x in s] == [2, 1] and [c[-3:] for c in calls] == ['[2]', '[1]']
    with pytest.raises(IndexError, match=r'images.npy: items \[3\] out of range; the file holds 3 items'):
        load_dataset('pannuke', 'fold1', root=pannuke_root, items=[3])

@pytest.mark.parametrize('break_it, err, match', [
    (lambda f: np.save(f['masks'], pannuke_masks()[..., :5]), LabelError, r'masks.npy: masks have shape \(3, 256, 256, 5\), 5 channels; expected N x H x W x 6'),
    (lambda f: np.save(f['masks'], pannuke_masks()[:2]), LabelError, r'masks.npy: 2 masks but .*images.npy holds 3 images'),
    (lambda f: np.save(f['masks'], pannuke_masks()[:, :128]), LabelError, r'masks.npy: masks are 256x128 \(WxH\) but the images'),
    (lambda f: np.save(f['types'], np.array(['Breast', 'Colon'])), LabelError, r'types.npy: \(2,\) tissue types for the 3 images'),
    (lambda f: np.save(f['types'], np.array(['Breast', 1, 2], dtype=object), allow_pickle=True), LabelError, r'types.npy: PanNuke tissue types is stored as Python objects'),
    (lambda f: np.save(f['images'], np.random.default_rng(0).random((3, H, W, 3))), LabelError, r'images.npy\[0\]: image values all in \[0, 1\]'),
    (lambda f: np.save(f['images'], np.full((3, H, W, 3), 300.0)), LabelError, r'images.npy\[0\]: image values in \[300, 300\]; expected 0-255'),
    (lambda f: np.save(f['images'], np.zeros((3, H, W))), LabelError, r'images.npy: images have shape \(3, 256, 256\); expected N x H x W x 3'),
    (lambda f: np.save(f['masks'], pannuke_masks() * 0.5), LabelError, r'masks.npy\[0\]: channel 0 \(neoplastic\) has non-integer values'),
    (lambda f: f['masks'].write_bytes(f['masks'].read_bytes()[:1000]), LabelError, r'masks.npy: cannot read PanNuke masks'),
    (lambda f: f['types'].unlink(), FileNotFoundError, r'types.npy: PanNuke tissue types not found'),
])
def test_pannuke_bad_files_are_named(tmp_path, break_it, err, match):
    base = write_pannuke(tmp_path / 'pannuke', folds=(1,))
    break_it(F.pannuke_files(base, 1))
    with pytest.raises(err, match=match):
        load_dataset('pannuke', 'fold1', root=tmp_path)

def test_pannuke_missing_fold_and_uint8_images(tmp_path):
    base = write_pannuke(tmp_path / 'pannuke', folds=(1,), image_dtype=np.uint8)
    assert load_dataset('pannuke', 'fold1', root=tmp_path)[1].image.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match=r'Fold 2: PanNuke fold 2 not found \(unzip fold_2.zip there\)'):
        load_dataset('pannuke', 'fold2', root=base)

def test_pannuke_verify_and_register_through_the_cli(tmp_path, capsys):
    "`nucbook verify pannuke --root DIR`: layout checked, then 'nothing to verify' until `fetch --from` records hashes."
    from nucbook.cli import main
    root = tmp_path / 'root'; write_pannuke(root / 'pannuke')
    with pytest.raises(SystemExit) as e: main(['verify', 'pannuke', '--root', str(root)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'nothing to verify for pannuke: 0 files checked' in err and 'nucbook fetch pannuke --from' in err
    with pytest.raises(SystemExit): main(['verify', 'pannuke', '--root', str(tmp_path / 'empty')])
    err = capsys.readouterr().err
    assert "dataset 'pannuke' not found under" in err and 'set $NUCBOOK_DATA to the folder that holds it (in Python: root=)' in err
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(['fetch', 'pannuke', '--from', str(root / 'pannuke'), '--dest', str(root)]) == 0
        assert main(['verify', 'pannuke', '--root', str(root)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out[out.out.index('{'):out.out.rindex('}') + 1])['files_checked'] == 9 and 'UNVERIFIED' in out.err
    np.save(root / 'pannuke/Fold 2/images/fold2/types.npy', np.array(['Breast', 'Colon', 'Lung'])) # a changed file is caught
    with pytest.raises(SystemExit): main(['verify', 'pannuke', '--root', str(root)])
    assert 'types.npy: modified' in capsys.readouterr().err
    (root / 'pannuke/Fold 3/masks/fold3/masks.npy').unlink() # an incomplete copy fails the layout check
    with pytest.raises(SystemExit): main(['verify', 'pannuke', '--root', str(root)])
    assert 'unexpected layout' in capsys.readouterr().err

# ---------------------------------------------------------------- CoNIC

def test_conic_counts_rule_by_hand():
    lab, counts = conic_labels()
    for x, c in zip(lab, counts): assert F.conic_counts(x[..., 0], x[..., 1]).tolist() == c
    inst = np.zeros((H, W), np.int32); cls = np.zeros((H, W), np.int32)
    inst[15:17, 100:102] = 1; cls[15:17, 100:102] = 2 # rows 15-16: one row inside the window
    inst[240:242, 100:102] = 2; cls[240:242, 100:102] = 4 # rows 240-241: outside (the window ends at row 239)
    inst[100:101, 239:241] = 3; cls[100:101, 239:241] = 3 # column 239 inside, 240 outside
    assert F.conic_counts(inst, cls).tolist() == [0, 1, 1, 0, 0, 0]
    cls[100, 239] = 0 # its pixel inside the window is untyped: not counted
    assert F.conic_counts(inst, cls).tolist() == [0, 1, 0, 0, 0, 0]

def test_conic_loads_with_a_seeded_split_by_source_image(tmp_path):
    write_conic(tmp_path / 'conic')
    tr, te = load_dataset('conic', 'train', root=tmp_path), load_dataset('conic', 'test', root=tmp_path)
    for x in tr + te: check_sample(x)
    assert sorted(x.meta['index'] for x in tr + te) == [0, 1, 2]
    parents = lambda xs: {x.meta['parent_image'] for x in xs}
    assert not parents(tr) & parents(te) and parents(tr) | parents(te) == {'consep_1', 'consep_2'}
    assert len(te) in (1, 2) and all(x.meta['split'] == 'test' for x in te)
    by = {x.meta['index']: x for x in tr + te}
    assert by[0].meta['split'] == by[2].meta['split'] # consep_1's two patches stay together
    assert by[0].inst_types.tolist() == [2, 1, 6, 3] and by[2].inst_types.tolist() == [6, 2]
    assert by[1].meta['counts'] == dict(zip(F.CONIC_CLASSES, [0, 0, 0, 1, 1, 0]))
    m = by[0].meta
    assert (m['split_method'], m['split_seed'], m['test_share'], m['cohort'], m['image_id']) == \
        ('seeded by source image', 0, 0.2, 'consep', 'consep_1-0000')
    lab = np.load(tmp_path / 'conic/labels.npy')
    for i, x in by.items(): assert np.array_equal(x.inst_map, lab[i, ..., 0]) # CoNIC's maps are already 0..n
    assert len(load_dataset('conic', root=tmp_path)) == 3 # every patch once
    seeds = {tuple(x.meta['index'] for x in load_dataset('conic', 'test', root=tmp_path, seed=k)) for k in range(8)}
    assert seeds <= {(1,), (0, 2)} and len(seeds) == 2 # other seeds choose the other source image, never half of one

def test_conic_split_invariants():
    names = [f'{c}_{i}-{k:04d}' for c, n in (('consep', 16), ('crag', 40), ('dpath', 7), ('glas', 1)) for i in range(n) for k in range(4)]
    rng = np.random.default_rng(0); names = [names[i] for i in rng.permutation(len(names))] # array order is arbitrary
    for seed in range(3):
        sp = F.conic_split(names, 0.25, seed)
        assert sorted(sp['train'] + sp['test']) == list(range(len(names)))
        src = lambda idx: {F.conic_source_image(names[i]) for i in idx}
        assert not src(sp['train']) & src(sp['test'])
        per = {c: sum(F.conic_cohort(s) == c for s in src(sp['test'])) for c in ('consep', 'crag', 'dpath', 'glas')}
        assert per == {'consep': 4, 'crag': 10, 'dpath': 2, 'glas': 0} # round(n * 0.25) per cohort, a lone image trains
    assert F.conic_split(names, 0.25, 0) == F.conic_split(names, 0.25, 0) and F.conic_split(names, 0.25, 0) != F.conic_split(names, 0.25, 1)
    flat = F.conic_split(names, 0.25, 0, stratify=False)
    assert len({F.conic_source_image(names[i]) for i in flat['test']}) == 16 # round(64 * 0.25) images over all cohorts

def test_conic_counts_csv_disagreement_warns(tmp_path):
    lab, counts = conic_labels(); counts[2] = [0, 2, 0, 0, 0, 1]
    write_conic(tmp_path / 'conic', counts=counts)
    with pytest.warns(UserWarning, match=r'counts.csv: the counts of 1 of [23] patches differ .*: consep_1-0001$'):
        load_dataset('conic', root=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_dataset('conic', root=tmp_path, check_counts=False)

@pytest.mark.parametrize('kw, match', [
    (dict(labels=conic_labels()[0][..., :1]), r'labels.npy: labels have shape \(3, 256, 256, 1\); expected N x H x W x 2'),
    (dict(labels=conic_labels()[0][:2]), r'labels.npy: labels have shape \(2, 256, 256\) \(N, H, W\) but .*images.npy has \(3, 256, 256\)'),
    (dict(labels=conic_labels()[0].astype(np.float32)), r'labels.npy: labels have dtype float32; expected integers'),
    (dict(names=CONIC_NAMES[:2]), r'patch_info.csv: 2 patch names for the 3 patches'),
    (dict(names=['a-0', 'b-0', 'a-0']), r"patch_info.csv: line 4: patch 'a-0' repeats line 2"),
    (dict(counts=[[0] * 6] * 2), r'counts.csv: 2 rows for the 3 patches'),
])
def test_conic_bad_files_are_named(tmp_path, kw, match):
    kw = dict(kw); labels = kw.pop('labels', None)
    if labels is not None and labels.shape[0] != 3: # write images for 3 patches, labels for fewer
        write_conic(tmp_path / 'conic'); np.save(tmp_path / 'conic/labels.npy', labels)
    else: write_conic(tmp_path / 'conic', labels=labels, **kw)
    with pytest.raises(LabelError, match=match):
        load_dataset('conic', 'train', root=tmp_path, check_counts=False)

def test_conic_class_out_of_range_names_the_patch(tmp_path):
    lab, _ = conic_labels(); lab[1, 0, 0] = (9, 7)
    write_conic(tmp_path / 'conic', labels=lab)
    with pytest.raises(LabelError, match=r'labels.npy\[1\] \(consep_2-0000\): class map has values \[7\] outside 0..6'):
        load_dataset('conic', root=tmp_path, check_counts=False)

# ---------------------------------------------------------------- Lizard

@pytest.mark.parametrize('kaggle', [False, True])
def test_lizard_types_follow_ids(tmp_path, kaggle):
    write_lizard(tmp_path / 'lizard', kaggle)
    f1 = load_dataset('lizard', 'fold1', root=tmp_path)
    assert [x.meta['image_id'] for x in f1] == ['consep_1', 'glas_3']
    for x in f1: check_sample(x)
    a = f1[0] # ids 7, 12, 40 -> 1, 2, 3; classes by id: 7 -> 1, 12 -> 5, 40 -> 2
    assert a.inst_types.tolist() == [1, 5, 2] and a.inst_map[55, 55] == 1 and a.inst_map[105, 35] == 2 and a.inst_map[10, 10] == 3
    assert f1[1].inst_types.tolist() == [2, 6, 2] and f1[1].meta['label_stats'] == {'n_rows': 4, 'n_absent': 1}
    assert (a.meta['cohort'], a.meta['fold'], a.meta['mpp'], a.meta['organ']) == ('consep', 1, 0.5, 'colon')
    f2 = load_dataset('lizard', 'fold2', root=tmp_path)
    assert [x.meta['image_id'] for x in f2] == ['crag_2'] and f2[0].inst_types.tolist() == [3, 4, 4]
    assert load_dataset('lizard', 'fold3', root=tmp_path) == []

@pytest.mark.parametrize('mat, match', [
    (dict(id=[[7], [40]], **{'class': [[1], [2]]}), r'crag_2.mat: ids \[12\] of inst_map have no row in id/class'),
    (dict(id=[[7], [12], [40]], **{'class': [[1], [2]]}), r'crag_2.mat: id has 3 rows but class has 2'),
    (dict(id=[[7], [12], [40]], **{'class': [[1], [0], [2]]}), r'crag_2.mat: class values \[0\] \(ids \[12\]\) outside 1..6'),
    (dict(id=[[7], [12], [12], [40]], **{'class': [[1], [2], [2], [2]]}), r'crag_2.mat: ids \[12\] have several rows'),
    (dict(id=[[0], [7], [12], [40]], **{'class': [[1], [1], [2], [2]]}), r'crag_2.mat: id has values < 1'),
    (dict(id=[[7], [12], [40]], **{'class': [[1], [2], [3]]}, centroid=np.zeros((2, 2))), r'crag_2.mat: centroid has shape \(2, 2\); expected \(3, 2\)'),
    (dict(id=[[7], [12], [40]]), r'crag_2.mat: no class in .mat'),
])
def test_lizard_bad_labels_are_named(tmp_path, mat, match):
    write_lizard(tmp_path / 'lizard')
    sio.savemat(tmp_path / 'lizard/Lizard_Labels/Labels/crag_2.mat', {'inst_map': lizard_map(), **mat})
    with pytest.raises(LabelError, match=match):
        load_dataset('lizard', 'fold2', root=tmp_path)

def test_lizard_missing_files_are_named(tmp_path):
    write_lizard(tmp_path / 'lizard')
    (tmp_path / 'lizard/Lizard_Images2/crag_2.png').unlink()
    with pytest.raises(FileNotFoundError, match=r"info.csv: image 'crag_2' not found"):
        load_dataset('lizard', 'fold2', root=tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / 'lizard/Lizard_Images1/glas_3.png')
    with pytest.raises(LabelError, match=r"glas_3.png: image 'glas_3' is also in"):
        load_dataset('lizard', 'fold1', root=tmp_path)
    (tmp_path / 'lizard/Lizard_Images1/glas_3.png').unlink()
    (tmp_path / 'lizard/Lizard_Labels/info.csv').unlink()
    with pytest.raises(FileNotFoundError, match=r'info.csv: Lizard info.csv not found'):
        load_dataset('lizard', 'fold1', root=tmp_path)

def test_lizard_verify_reports_an_incomplete_copy(tmp_path):
    from nucbook.data.fetch import verify, FetchError
    write_lizard(tmp_path / 'lizard')
    with pytest.raises(FetchError, match=r'lizard: unexpected layout .*Lizard_Images\*/\*.png: 3 files, expected at least 238'):
        verify('lizard', root=tmp_path)

# ---------------------------------------------------------------- writers

def test_write_conic_npy_round_trips_through_the_loader(tmp_path):
    write_conic(tmp_path / 'conic')
    truth = load_dataset('conic', root=tmp_path)
    p = F.write_conic_npy(tmp_path / 'pred' / 'pred.npy', truth)
    a = np.load(p)
    assert a.shape == (3, H, W, 2) and a.dtype == np.int32
    # the written array is a labels.npy the loader reads back to the same samples
    out = tmp_path / 'rt' / 'conic'; out.mkdir(parents=True)
    for f in ('images.npy', 'counts.csv', 'patch_info.csv'): (out / f).write_bytes((tmp_path / 'conic' / f).read_bytes())
    np.save(out / 'labels.npy', a[np.argsort([x.meta['index'] for x in truth])].astype(np.uint16))
    back = {x.meta['index']: x for x in load_dataset('conic', root=out.parent)}
    for x in truth:
        y = back[x.meta['index']]
        assert np.array_equal(x.inst_map, y.inst_map) and np.array_equal(x.type_map, y.type_map) and np.array_equal(x.image, y.image)
    lab = np.load(tmp_path / 'conic/labels.npy')
    pairs = [(lab[i, ..., 0], lab[i, ..., 1]) for i in range(3)]
    assert np.array_equal(np.load(F.write_conic_npy(tmp_path / 'p16.npy', pairs, dtype='uint16')), lab)
    assert np.array_equal(np.load(F.write_conic_npy(tmp_path / 'arr.npy', lab)), lab.astype(np.int32))
    dicts = [{'inst_map': i, 'type_map': c} for i, c in pairs]
    assert np.array_equal(np.load(F.write_conic_npy(tmp_path / 'd.npy', dicts)), lab)
    assert np.array_equal(np.loadtxt(F.write_conic_counts(tmp_path / 'counts.csv', pairs), delimiter=',', skiprows=1),
                          conic_labels()[1])

def test_write_conic_npy_refuses_bad_predictions_and_writes_atomically(tmp_path):
    p = tmp_path / 'pred.npy'; p.write_bytes(b'old')
    inst = np.zeros((8, 8), np.int32); inst[1:3, 1:3] = 70000
    for preds, err, match in [
        ([(inst, inst > 0)], LabelError, 'does not fit in uint16'),
        ([(inst, np.full((8, 8), 7))], LabelError, r'prediction 0: class map has values up to 7'),
        ([(inst, inst > 0), (np.zeros((4, 8), np.int32),) * 2], LabelError, r'prediction 1: is 8x4 \(WxH\), prediction 0 is 8x8'),
        ([(inst - 1, inst > 0)], LabelError, r'prediction 0: instance map has negative values'),
        ([make_sample(np.zeros((8, 8, 3), np.uint8), inst, meta={'source': 'x.png'})], LabelError, r'prediction 0 \(x.png\): untyped sample'),
        ([np.zeros((8, 8, 3))], LabelError, r'prediction 0: expected a Sample'),
        ([], ValueError, 'no predictions'),
    ]:
        with pytest.raises(err, match=match): F.write_conic_npy(p, preds, dtype='uint16')
    assert p.read_bytes() == b'old' and [q.name for q in tmp_path.iterdir()] == ['pred.npy'] # unchanged, no temp files
    with pytest.raises(ValueError, match=r'pred.csv: CoNIC reads a .npy file'): F.write_conic_npy(tmp_path / 'pred.csv', [(inst, inst > 0)])

def test_write_hovernet_mat_round_trips(tmp_path):
    m = np.zeros((20, 30), np.int32); m[2:6, 3:7] = 9; m[10:12, 20:26] = 4; m[15:18, 1:2] = 300
    p = F.write_hovernet_mat(tmp_path / 'a.mat', m, {9: 2, 4: 1, 300: 3})
    raw = sio.loadmat(p)
    assert np.array_equal(raw['inst_map'], m) and raw['inst_map'].dtype == np.int32
    assert raw['inst_uid'].tolist() == [[4], [9], [300]] and raw['inst_type'].tolist() == [[1], [2], [3]]
    assert np.allclose(raw['inst_centroid'], [[22.5, 10.5], [4.5, 3.5], [1.0, 16.0]]) # (x, y) per id, ascending ids
    back = read_hovernet_mat(p)
    assert np.array_equal(back['inst_map'], m) and back['inst_types'] == {4: 1, 9: 2, 300: 3}
    assert np.array_equal(back['type_map'], np.select([m == 4, m == 9, m == 300], [1, 2, 3], 0))
    # HoVer-Net's compute_stats.py reads exactly these (shapes it indexes: inst_type[:, 0], inst_centroid (n, 2))
    assert raw['inst_type'][:, 0].tolist() == [1, 2, 3] and raw['inst_centroid'].astype('float32').shape == (3, 2)
    # a Sample writes its own map and types; loading it back gives the same sample
    s = make_sample(np.zeros((20, 30, 3), np.uint8), m, inst_types={9: 2, 4: 1, 300: 3})
    r = read_hovernet_mat(F.write_hovernet_mat(tmp_path / 's.mat', s))
    t = make_sample(s.image, r['inst_map'], inst_types=r['inst_types'])
    assert np.array_equal(t.inst_map, s.inst_map) and np.array_equal(t.inst_types, s.inst_types)
    e = sio.loadmat(F.write_hovernet_mat(tmp_path / 'e.mat', np.zeros((5, 5), np.int32), []))
    assert (e['inst_uid'].shape, e['inst_type'].shape, e['inst_centroid'].shape) == ((0, 1), (0, 1), (0, 2))
    u = sio.loadmat(F.write_hovernet_mat(tmp_path / 'u.mat', m))
    assert 'inst_type' not in u and 'type_map' not in u and u['inst_uid'].tolist() == [[4], [9], [300]]
    assert 'type_map' not in sio.loadmat(F.write_hovernet_mat(tmp_path / 'n.mat', m, [1, 2, 3], type_map=False))

def test_write_hovernet_mat_refuses_bad_input(tmp_path):
    m = np.zeros((6, 6), np.int32); m[0:2, 0:2] = 3; m[3:5, 3:5] = 8
    with pytest.raises(LabelError, match=r'x.mat: 1 types for 2 instances'): F.write_hovernet_mat(tmp_path / 'x.mat', m, [1])
    with pytest.raises(LabelError, match=r'x.mat: no type for instances \[8\]'): F.write_hovernet_mat(tmp_path / 'x.mat', m, {3: 1})
    with pytest.raises(LabelError, match=r'x.mat: label map has dtype float64'): F.write_hovernet_mat(tmp_path / 'x.mat', m * 0.5)
    big = m.astype(np.int64); big[0, 0] = 2**31
    with pytest.raises(LabelError, match='does not fit in int32'): F.write_hovernet_mat(tmp_path / 'x.mat', big)
    assert not list(tmp_path.iterdir()) # nothing written, no temp files

# ---------------------------------------------------------------- dataset names and messages (issue 13 item 6)

def test_unknown_names_suggest_only_what_is_accepted(tmp_path, capsys):
    from nucbook.cli import main
    assert list_datasets()[-1] == 'synthetic' and 'synthetic' not in list_datasets(synthetic=False)
    assert {'pannuke', 'conic', 'lizard'} <= set(list_datasets(synthetic=False))
    with pytest.raises(KeyError) as e: load_manifest('nope')
    assert 'synthetic' not in str(e.value) and 'pannuke' in str(e.value)
    for cmd in (['verify', 'nope', '--root', str(tmp_path)], ['fetch', 'nope', '--dest', str(tmp_path)]):
        with pytest.raises(SystemExit): main(cmd)
        err = capsys.readouterr().err
        assert "no manifest for dataset 'nope'" in err and 'synthetic' not in err
    with pytest.raises(SystemExit): main(['verify', 'synthetic', '--root', str(tmp_path)]) # and it is indeed refused
    assert 'synthetic' in capsys.readouterr().err
    for f in (resolve_dataset, load_dataset): # these accept 'synthetic', so their errors list it
        with pytest.raises(KeyError, match=r"no manifest for dataset 'nope'.*synthetic"): f('nope')
    with pytest.raises(FileNotFoundError, match=r'run `nucbook fetch conic` \(`--from DIR` for a copy you have\), or set \$NUCBOOK_DATA to the folder that holds it \(in Python: root=\)'):
        load_dataset('conic', root=tmp_path)
