"Tests of nucbook.data.datasets: manifests, class maps, every native format (fixtures written here), bad input, real data."
import csv, json, os
from pathlib import Path
import numpy as np
import pytest
import scipy.io as sio
import yaml, jsonschema
from PIL import Image

from nucbook.data import datasets as D
from nucbook.data.datasets import load_dataset, load_manifest, list_datasets
from nucbook.data.sample import LabelError, type_map_from_types

REAL = os.environ.get('NUCBOOK_DATA')
needs_real = pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason='NUCBOOK_DATA not set (real-data test)')

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv('NUCBOOK_CACHE', str(tmp_path / 'label-cache'))

def img(h=16, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)

def sq(x, y, s): return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]

def write_xml(path, regions, mpp=0.25):
    "Aperio XML, one <Annotation> per class (class None = MoNuSeg style, no attribute)."
    by = {}
    for c, xy in regions: by.setdefault(c, []).append(xy)
    s = [f'<Annotations MicronsPerPixel="{mpp}">']
    for a, (c, regs) in enumerate(by.items(), 1):
        attrs = f'<Attributes><Attribute Name="{c}" Id="0" Value=""/></Attributes>' if c else '<Attributes/>'
        s.append(f'<Annotation Id="{a}" Type="4">{attrs}<Regions><RegionAttributeHeaders/>')
        for r, xy in enumerate(regs, 1):
            s.append(f'<Region Id="{r}"><Attributes/><Vertices>' +
                     ''.join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in xy) + '</Vertices></Region>')
        s.append('</Regions></Annotation>')
    s.append('</Annotations>')
    Path(path).parent.mkdir(parents=True, exist_ok=True); Path(path).write_text('\n'.join(s))

def save(path, arr):
    Path(path).parent.mkdir(parents=True, exist_ok=True); Image.fromarray(arr).save(path)

# ---------------------------------------------------------------- manifests

def test_every_manifest_satisfies_the_schema():
    schema = json.loads((D.manifest_dir() / 'schema.json').read_text())
    names = [p.stem for p in D.manifest_dir().glob('*.yaml')]
    assert set(names) == {'kumar', 'monuseg2018', 'cps', 'cpm17', 'tnbc', 'consep', 'consep_tiles', 'glysac', 'monusac',
                          'dsb2018', 'generic'}
    for n in names:
        m = json.loads(json.dumps(yaml.safe_load((D.manifest_dir() / f'{n}.yaml').read_text())))
        jsonschema.validate(m, schema)
        assert m['name'] == n
        for d in m['download']: # a hash given must come with nothing fake: 64 hex or null
            assert d['sha256'] is None or len(d['sha256']) == 64
    assert 'synthetic' in list_datasets()

def test_manifest_splits_match_the_papers():
    sizes = lambda n: {s: v.get('count') for s, v in load_manifest(n)['splits'].items()}
    assert sizes('kumar') == {'train': 16, 'test_seen': 8, 'test_unseen': 6, 'test': 14}
    assert sizes('monuseg2018') == {'train': 30, 'test': 14}
    assert sizes('consep') == {'train': 27, 'test': 14}
    assert sizes('glysac') == {'train': 34, 'test': 25}
    assert sizes('cpm17') == {'train': 32, 'test': 32}
    assert sizes('consep_tiles') == {'train': 432, 'test': 224}
    assert list(load_manifest('cps')['splits']) == [f'fold{k}' for k in range(1, 6)]
    assert len(load_manifest('tnbc')['splits']) == 11
    assert set(load_manifest('monusac')['splits']) == {'train', 'test'}
    k = load_manifest('kumar')['splits']
    assert not set(k['train']['ids']) & (set(k['test_seen']['ids']) | set(k['test_unseen']['ids']))

def test_bad_manifest_is_rejected_naming_file_and_field(tmp_path, monkeypatch):
    d = tmp_path / 'm'; d.mkdir()
    (d / 'schema.json').write_text((D.manifest_dir() / 'schema.json').read_text())
    m = load_manifest('tnbc'); m['download'][0]['sha256'] = 'abc'
    (d / 'broken.yaml').write_text(yaml.safe_dump(m))
    monkeypatch.setenv('NUCBOOK_MANIFESTS', str(d))
    with pytest.raises(ValueError, match=r'broken.yaml: invalid manifest at download/0/sha256'):
        load_manifest('broken')

def test_class_maps_and_merges():
    assert D.class_map('consep') == {0: 'background', 1: 'other', 2: 'inflammatory', 3: 'epithelial', 4: 'spindle'}
    assert D.class_merge('consep') == {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
    assert D.class_merge('glysac') == {0: 0, 1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3}
    assert D.class_map('glysac') == {0: 'background', 1: 'other', 2: 'lymphocyte', 3: 'epithelial'}
    assert D.class_map('monusac') == {0: 'background', 1: 'epithelial', 2: 'lymphocyte', 3: 'macrophage', 4: 'neutrophil'}
    assert D.class_merge('monusac') is None and D.class_merge('consep_tiles') is None
    assert D.rare_types('consep') == [1] and D.rare_types('glysac') == [1] and D.rare_types('monusac') == [4]
    assert D.class_map('synthetic')[1] == 'other' and D.rare_types('synthetic') == [1]

# ---------------------------------------------------------------- rasterisation and XML

def test_polygon_rules_overlap_degenerate_outside():
    polys = [sq(1, 1, 4), sq(3, 3, 4), [(0, 0), (5, 5)], [(0, 0), (2, 2), (4, 4)], sq(-10, -10, 3), sq(8, 8, 6),
             [(1, 1), (1, 1), (1, 1), (2, 2)]]
    m, idx, st = D.rasterise_polygons([np.array(p, float) for p in polys], (12, 12))
    assert st == dict(n_regions=7, n_degenerate=3, n_outside=1, n_empty=0, n_overlapping=1, n_covered=0, n_instances=3)
    assert idx.tolist() == [0, 1, 5]
    assert m[4, 4] == 2 and m[1, 1] == 1 # the later polygon wins shared pixels
    assert (m == 3).sum() == 16 # clipped at the image border
    assert m.dtype == np.int32 and set(np.unique(m)) == {0, 1, 2, 3}

def test_xml_parse_error_names_file(tmp_path):
    p = tmp_path / 'x.xml'; p.write_text('<Annotations><Annotation><Regions><Region>')
    with pytest.raises(LabelError, match=r'x.xml: XML does not parse'):
        D.parse_aperio_xml(p)
    p.write_text('<NotAperio/>')
    with pytest.raises(LabelError, match=r'x.xml: not an Aperio annotation file'):
        D.parse_aperio_xml(p)

def test_label_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    p = tmp_path / 'a.xml'; write_xml(p, [(None, sq(1, 1, 4)), (None, sq(6, 6, 3))])
    r1 = D.xml_labels(p, (12, 12))
    assert len(list((tmp_path / 'label-cache').glob('*.npz'))) == 1
    calls = []
    real = D.rasterise_polygons
    monkeypatch.setattr(D, 'rasterise_polygons', lambda *a, **k: calls.append(1) or real(*a, **k))
    r2 = D.xml_labels(p, (12, 12))
    assert calls == [] and np.array_equal(r1['inst_map'], r2['inst_map']) and r2['stats'] == r1['stats']
    write_xml(p, [(None, sq(1, 1, 4))]) # content changed: new key, recomputed
    r3 = D.xml_labels(p, (12, 12))
    assert calls == [1] and r3['inst_map'].max() == 1
    for f in (tmp_path / 'label-cache').glob('*.npz'): f.write_bytes(b'garbage') # unreadable entry: recomputed
    assert D.xml_labels(p, (12, 12))['inst_map'].max() == 1 and len(calls) == 2
    assert not list((tmp_path / 'label-cache').glob('.*.tmp')) # atomic writes leave no temp files

# ---------------------------------------------------------------- MoNuSeg / Kumar

KUMAR = load_manifest('kumar')['splits']
def kumar_stem(short): return f'TCGA-{short}-01Z-00-DX1'

def make_monuseg(root, xml_for=(), skip=()):
    "MoNuSeg layout: all 30 training tiles (XML for `xml_for`, Instance_Maps for the rest) + 14 test tiles."
    tr = root / 'monuseg' / 'MoNuSegTrainingData'
    for i, short in enumerate(KUMAR['train']['ids'] + KUMAR['test_seen']['ids'] + KUMAR['test_unseen']['ids']):
        if short in skip: continue
        stem = kumar_stem(short)
        save(tr / 'Tissue_Images' / f'{stem}.tif', img(seed=i))
        if short in xml_for: write_xml(tr / 'Annotations' / f'{stem}.xml', [(None, sq(2, 2, 3)), (None, sq(8, 8, 4))], 0.2527)
        lab = np.zeros((16, 16), np.uint16); lab[1:4, 1:4] = 9; lab[10:14, 2:6] = 700; lab[7, 7] = 3
        save(tr / 'Instance_Maps' / f'{stem}.png', lab)
    te = root / 'monuseg' / 'MoNuSegTestData'
    for j, stem in enumerate(load_manifest('monuseg2018')['splits']['test']['ids']):
        save(te / f'{stem}.tif', img(seed=100 + j))
        write_xml(te / f'{stem}.xml', [(None, sq(1, 1, 4)), (None, sq(3, 3, 4)), (None, [(0, 0), (3, 3)]),
                                       (None, sq(9, 9, 10))], 0.2468)
    return root

def test_kumar_splits_groups_and_label_sources(tmp_path):
    make_monuseg(tmp_path, xml_for=['21-5784', 'AY-A8YK'])
    tr = load_dataset('kumar', 'train', root=tmp_path)
    assert len(tr) == 16 and all('group' not in s.meta for s in tr)
    te = load_dataset('kumar', 'test', root=tmp_path)
    assert len(te) == 14 and [s.meta['group'] for s in te] == ['seen'] * 8 + ['unseen'] * 6
    assert len(load_dataset('kumar', 'test_seen', root=tmp_path)) == 8
    by = {s.meta['image_id']: s for s in te}
    x = by[kumar_stem('21-5784')] # XML: 2 squares, mpp from the XML
    assert x.meta['label_source'].endswith('.xml') and x.n_instances == 2 and x.meta['mpp'] == pytest.approx(0.2527)
    assert x.meta['label_stats']['n_regions'] == 2
    # 1-based XML coordinates: the square (2,2)-(5,5) covers pixels 1..4
    assert x.inst_map[1, 1] == 1 and x.inst_map[4, 4] == 1 and x.inst_map[5, 5] == 0
    p = by[kumar_stem('B0-5698')] # Instance_Maps png: ids 3, 9, 700 -> 1, 2, 3
    assert p.meta['label_source'].endswith('.png') and p.n_instances == 3 and p.inst_map[7, 7] == 1
    assert p.meta['organ'] == 'kidney' and by[kumar_stem('AY-A8YK')].meta['organ'] == 'colon'
    for s in te:
        s.validate()
        assert {'dataset', 'image_id', 'split', 'organ', 'mpp', 'magnification', 'source'} <= set(s.meta)
        assert s.meta['dataset'] == 'kumar' and s.meta['magnification'] == 40
    few = load_dataset('kumar', 'test', root=tmp_path, limit=3) # only the first 3 ids are read
    assert [s.meta['group'] for s in few] == ['seen'] * 3 and len(load_dataset('kumar', root=tmp_path, limit=2)) == 6
    png = load_dataset('kumar', 'test_seen', root=tmp_path, prefer='png')
    assert {s.meta['label_source'][-4:] for s in png} == {'.png'}

def test_kumar_missing_file_named_in_split(tmp_path):
    make_monuseg(tmp_path, skip=['HE-7130'])
    with pytest.raises(FileNotFoundError, match=r'TCGA-HE-7130-\*\.tif: image named in split .train. not found'):
        load_dataset('kumar', 'train', root=tmp_path)
    assert len(load_dataset('kumar', 'test', root=tmp_path)) == 14

def test_corrupt_and_truncated_images_are_named(tmp_path):
    make_monuseg(tmp_path)
    bad = tmp_path / 'monuseg' / 'MoNuSegTrainingData' / 'Tissue_Images' / f'{kumar_stem("AY-A8YK")}.tif'
    bad.write_bytes(bad.read_bytes()[:200]) # truncated
    with pytest.raises(LabelError, match=r'TCGA-AY-A8YK-01Z-00-DX1.tif: cannot read image'):
        load_dataset('kumar', 'test_unseen', root=tmp_path)
    bad.write_bytes(b'not an image at all')
    with pytest.raises(LabelError, match=r'TCGA-AY-A8YK-01Z-00-DX1.tif: cannot read image'):
        load_dataset('kumar', 'test_unseen', root=tmp_path)

def test_monuseg2018_test_and_train(tmp_path):
    make_monuseg(tmp_path)
    te = load_dataset('monuseg2018', 'test', root=tmp_path)
    assert len(te) == 14
    st = te[0].meta['label_stats']
    # 4 regions: 1 degenerate, 1 overlapping an earlier one, 1 partly outside (clipped)
    assert (st['n_regions'], st['n_degenerate'], st['n_overlapping'], st['n_instances']) == (4, 1, 1, 3)
    assert te[0].n_instances == 3
    groups = {s.meta['organ']: s.meta['group'] for s in te}
    assert groups['lung'] == 'unseen' and groups['brain'] == 'unseen' and groups['breast'] == 'seen'
    assert len(load_dataset('monuseg2018', 'train', root=tmp_path)) == 30

def test_kumar_hovernet_layout(tmp_path):
    base = tmp_path / 'kumar'
    for i, short in enumerate(KUMAR['test_unseen']['ids']):
        save(base / 'test_diff' / 'Images' / f'{kumar_stem(short)}.tif', img(seed=i))
        inst = np.zeros((16, 16), np.int32); inst[2:6, 2:6] = 1; inst[9:12, 9:12] = 2
        (base / 'test_diff' / 'Labels').mkdir(parents=True, exist_ok=True)
        sio.savemat(base / 'test_diff' / 'Labels' / f'{kumar_stem(short)}.mat', {'inst_map': inst})
    (base / 'train' / 'Labels').mkdir(parents=True); (base / 'train' / 'Labels' / 'x.mat').touch() # marker
    s = load_dataset('kumar', 'test_unseen', root=tmp_path)
    assert len(s) == 6 and s[0].n_instances == 2 and s[0].meta['group'] == 'unseen' and s[0].inst_types is None

# ---------------------------------------------------------------- HoVer-Net .mat datasets

def test_consep_raw_classes_are_merged(tmp_path):
    base = tmp_path / 'consep' / 'CoNSeP'
    for split, n in (('Train', 2), ('Test', 1)):
        for k in range(1, n + 1):
            save(base / split / 'Images' / f'{split.lower()}_{k}.png', img(20, 20, k))
            inst = np.zeros((20, 20)); types = []
            for i in range(1, 8): inst[i * 2:i * 2 + 2, 2:8] = i; types.append(i) # one nucleus per raw class
            (base / split / 'Labels').mkdir(parents=True, exist_ok=True)
            sio.savemat(base / split / 'Labels' / f'{split.lower()}_{k}.mat',
                        {'inst_map': inst, 'type_map': np.array(types + [0])[np.where(inst > 0, inst - 1, 7).astype(int)],
                         'inst_type': np.array(types, float)[:, None], 'inst_centroid': np.zeros((7, 2))})
    tr = load_dataset('consep', 'train', root=tmp_path)
    assert len(tr) == 2 and tr[0].inst_types.tolist() == [1, 2, 3, 3, 4, 4, 4]
    raw = load_dataset('consep', 'test', root=tmp_path, merge=False)
    assert raw[0].inst_types.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert np.array_equal(tr[0].type_map, type_map_from_types(tr[0].inst_map, tr[0].inst_types))

def test_consep_tiles_noncontiguous_ids_keep_their_types(tmp_path):
    base = tmp_path / 'consep_tiles'
    for split in ('Train', 'Test'):
        save(base / split / 'Images' / f'{split.lower()}_3_005.jpg', img(16, 16))
        inst = np.zeros((16, 16), np.int32); inst[1:4, 1:4] = 250; inst[6:9, 6:9] = 37; inst[12:15, 1:4] = 1000
        (base / split / 'Labels').mkdir(parents=True)
        sio.savemat(base / split / 'Labels' / f'{split.lower()}_3_005.mat',
                    {'inst_map': inst, 'type_map': np.zeros((16, 16), np.int32),
                     'inst_type': np.array([[2], [1], [4]], np.int32), 'inst_centroid': np.zeros((3, 2))})
    s = load_dataset('consep_tiles', 'train', root=tmp_path)[0]
    # ascending original ids 37, 250, 1000 -> types 2, 1, 4; renumbered in the same order; NOT merged again (4 stays 4)
    assert s.inst_types.tolist() == [2, 1, 4] and s.inst_map[7, 7] == 1 and s.inst_map[2, 2] == 2
    assert s.meta['parent_image'] == 'train_3' and s.meta['split'] == 'train'
    assert len(load_dataset('consep_tiles', root=tmp_path)) == 2

def test_glysac_merge_and_unknown_type(tmp_path):
    base = tmp_path / 'glysac'
    for split in ('Train', 'Test'):
        save(base / split / 'Images' / 'g1.tif', img(12, 12))
        inst = np.zeros((12, 12), np.int32)
        for i in range(1, 11): inst[i, 1:5] = i
        (base / split / 'Labels').mkdir(parents=True)
        sio.savemat(base / split / 'Labels' / 'g1.mat', {'inst_map': inst, 'inst_type': np.arange(1, 11)[:, None]})
    s = load_dataset('glysac', 'train', root=tmp_path)[0]
    assert s.inst_types.tolist() == [1, 1, 3, 2, 2, 2, 2, 3, 1, 1]
    inst = np.zeros((12, 12), np.int32); inst[1, 1:5] = 1
    sio.savemat(base / 'Test' / 'Labels' / 'g1.mat', {'inst_map': inst, 'inst_type': np.array([[12]])})
    with pytest.raises(LabelError, match=r'g1.mat: type ids \[12\] are not in the class merge'):
        load_dataset('glysac', 'test', root=tmp_path)

def test_cpm17_untyped_and_label_size_mismatch(tmp_path):
    base = tmp_path / 'cpm17'
    for split in ('train', 'test'):
        save(base / split / 'Images' / 'image_00.png', img(10, 12))
        inst = np.zeros((10, 12), np.int32); inst[2:5, 2:5] = 4
        (base / split / 'Labels').mkdir(parents=True)
        sio.savemat(base / split / 'Labels' / 'image_00.mat', {'inst_map': inst})
    s = load_dataset('cpm17', 'train', root=tmp_path)
    assert len(s) == 1 and s[0].n_instances == 1 and s[0].inst_types is None
    sio.savemat(base / 'test' / 'Labels' / 'image_00.mat', {'inst_map': np.zeros((10, 10), np.int32)})
    with pytest.raises(LabelError, match=r'image_00.mat: label map size 10x10 \(WxH\) differs from the image size 12x10'):
        load_dataset('cpm17', 'test', root=tmp_path)

# ---------------------------------------------------------------- MoNuSAC

def test_monusac_two_classes_and_ambiguous(tmp_path):
    d = tmp_path / 'monusac' / 'MoNuSAC_images_and_annotations' / 'TCGA-5P-A9K0-01Z-00-DX1'
    rgba = np.dstack([img(20, 20), np.full((20, 20), 255, np.uint8)])
    save(d / 'TCGA-5P-A9K0-01Z-00-DX1_1.tif', rgba)
    write_xml(d / 'TCGA-5P-A9K0-01Z-00-DX1_1.xml',
              [('Epithelial', sq(1, 1, 5)), ('Epithelial', sq(10, 10, 3)), ('Lymphocyte', sq(4, 4, 3)),
               ('Lymphocyte', [(1, 1), (2, 2)]), ('Ambiguous', sq(15, 1, 3))], mpp=0.19448)
    s = load_dataset('monusac', 'train', root=tmp_path)
    assert len(s) == 1
    s = s[0]
    assert s.inst_types.tolist() == [1, 1, 2] and s.inst_map[5, 5] == 3 # the later lymphocyte wins the overlap
    st = s.meta['label_stats']
    assert (st['n_regions'], st['n_degenerate'], st['n_ambiguous'], st['n_instances']) == (5, 1, 1, 3)
    assert st['regions_per_class'] == {'epithelial': 2, 'lymphocyte': 2, 'macrophage': 0, 'neutrophil': 0}
    assert s.meta['organ'] == 'kidney' and s.meta['mpp'] == pytest.approx(0.19448) and s.meta['patient'] == d.name

# ---------------------------------------------------------------- TNBC, CPS

def test_tnbc_binary_masks_per_patient(tmp_path):
    d = tmp_path / 'tnbc' / 'TNBC_NucleiSegmentation'
    for p in ('01', '02'):
        save(d / f'Slide_{p}' / f'{p}_1.png', img(16, 16))
        gt = np.zeros((16, 16), np.uint8); gt[1:4, 1:4] = 255; gt[4:6, 4:6] = 255; gt[10:14, 10:14] = 255
        save(d / f'GT_{p}' / f'{p}_1.png', gt)
    s = load_dataset('tnbc', 'patient01', root=tmp_path)
    assert len(s) == 1 and s[0].n_instances == 3 # diagonal touch is not 4-connected: two instances
    assert s[0].meta['patient'] == '01'
    assert len(load_dataset('tnbc', ['patient01', 'patient02'], root=tmp_path)) == 2
    gt = np.zeros((16, 16), np.uint8); gt[0, 0] = 1; gt[1, 1] = 2; gt[2, 2] = 3
    save(d / 'GT_02' / '02_1.png', gt)
    with pytest.raises(LabelError, match=r'02_1.png: expected a binary mask'):
        load_dataset('tnbc', 'patient02', root=tmp_path)

def test_cps_folds(tmp_path):
    base = tmp_path / 'cps'
    for i in range(7):
        save(base / 'Images' / f'c{i}.png', img(12, 12, i))
        lab = np.zeros((12, 12), np.uint16); lab[2:6, 2:6] = i + 1
        save(base / 'Labels' / f'c{i}.png', lab)
    assert [s.meta['image_id'] for s in load_dataset('cps', 'fold1', root=tmp_path)] == ['c0', 'c5']
    assert len(load_dataset('cps', root=tmp_path)) == 7
    (base / 'folds.csv').write_text('image_id,fold\n' + '\n'.join(f'c{i},{1 + (i > 3)}' for i in range(7)))
    f2 = load_dataset('cps', 'fold2', root=tmp_path)
    assert [s.meta['image_id'] for s in f2] == ['c4', 'c5', 'c6'] and f2[0].meta['fold'] == 2

# ---------------------------------------------------------------- DSB 2018

def test_dsb_masks_and_rle_agree(tmp_path):
    base = tmp_path / 'dsb2018'
    rows = [['ImageId', 'EncodedPixels', 'Height', 'Width', 'Usage']]
    for k, (h, w) in enumerate([(10, 12), (8, 8)]):
        cid = f'id{k}'
        rgba = np.dstack([img(h, w, k), np.full((h, w), 255, np.uint8)])
        save(base / 'stage1_test' / cid / 'images' / f'{cid}.png', rgba)
        for j, (y, x) in enumerate([(1, 1), (4, 5)]):
            m = np.zeros((h, w), np.uint8); m[y:y + 3, x:x + 2] = 255
            save(base / 'stage1_test' / cid / 'masks' / f'm{j}.png', m)
            rows.append([cid, D.rle_encode(m > 0), h, w, 'Public'])
    with open(base / 'stage1_solution.csv', 'w', newline='') as f: csv.writer(f).writerows(rows)
    a = load_dataset('dsb2018', 'stage1_test', root=tmp_path)
    b = load_dataset('dsb2018', 'stage1_test', root=tmp_path, labels='rle')
    assert [s.n_instances for s in a] == [2, 2] and [s.shape for s in a] == [(10, 12), (8, 8)]
    for x, y in zip(a, b): assert np.array_equal(x.inst_map, y.inst_map)
    assert a[0].meta['label_stats']['n_masks'] == 2
    rows[1][2] = 99 # wrong height in the CSV
    with open(base / 'stage1_solution.csv', 'w', newline='') as f: csv.writer(f).writerows(rows)
    with pytest.raises(LabelError, match=r'stage1_solution.csv: id0 is 99x12 in the CSV'):
        load_dataset('dsb2018', 'stage1_test', root=tmp_path, labels='rle')

def test_rle_roundtrip_column_major():
    m = np.zeros((4, 3), bool); m[1:3, 0] = True; m[0, 2] = True; m[3, 2] = True
    assert D.rle_encode(m) == '2 2 9 1 12 1'
    assert np.array_equal(D.rle_decode('2 2 9 1 12 1', (4, 3)), m)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.random((7, 5)) > 0.6
        assert np.array_equal(D.rle_decode(D.rle_encode(x), x.shape), x)
    with pytest.raises(LabelError, match='odd number'): D.rle_decode('1 2 3', (4, 3), 's.csv')

# ---------------------------------------------------------------- generic folder

def make_generic(root, label_kind='png'):
    for sp in ('train', 'test'):
        (root / sp / 'images').mkdir(parents=True); (root / sp / 'labels').mkdir(parents=True)
        save(root / sp / 'images' / 'a.png', img(12, 14))
        lab = np.zeros((12, 14), np.uint16); lab[1:4, 1:4] = 500; lab[6:9, 6:12] = 2
        if label_kind == 'png': save(root / sp / 'labels' / 'a.png', lab)
        elif label_kind == 'tif': Image.fromarray(lab).save(root / sp / 'labels' / 'a.tif')
        else: np.save(root / sp / 'labels' / 'a.npy', lab.astype(np.int64))
        (root / sp / 'types.csv').write_text('image_id,instance_id,type\na,500,3\na,2,1\n')

@pytest.mark.parametrize('kind', ['png', 'tif', 'npy'])
def test_generic_label_formats_and_types(tmp_path, kind):
    make_generic(tmp_path / 'g', kind)
    s = load_dataset('generic', 'train', root=tmp_path / 'g')
    assert len(s) == 1 and s[0].inst_types.tolist() == [1, 3] and s[0].inst_map[2, 2] == 2
    assert {x.meta['split'] for x in load_dataset('generic', root=tmp_path / 'g')} == {'train', 'test'}

def test_generic_bad_label_maps(tmp_path):
    make_generic(tmp_path / 'g', 'npy')
    lab = tmp_path / 'g' / 'train' / 'labels' / 'a.npy'
    np.save(lab, np.zeros((12, 14), np.float32))
    with pytest.raises(LabelError, match=r'a.npy: label map has dtype float32'):
        load_dataset('generic', 'train', root=tmp_path / 'g')
    np.save(lab, -np.ones((12, 14), np.int32))
    with pytest.raises(LabelError, match=r'a.npy: label map has negative ids'):
        load_dataset('generic', 'train', root=tmp_path / 'g')
    np.save(lab, np.zeros((11, 14), np.int32))
    with pytest.raises(LabelError, match=r'a.npy: label map size 14x11 \(WxH\) differs from the image size 14x12'):
        load_dataset('generic', 'train', root=tmp_path / 'g')
    np.save(lab, np.ones((12, 14), np.int32) * 7)
    with pytest.raises(LabelError, match=r'types.csv: no type for instances \[7\] of image a'):
        load_dataset('generic', 'train', root=tmp_path / 'g')
    with pytest.raises(FileNotFoundError, match=r'nosplit: split folder not found'):
        load_dataset('generic', 'nosplit', root=tmp_path / 'g')

def test_synthetic_delegates_to_synth():
    from nucbook.data.synth import synth_dataset
    a = load_dataset('synthetic', 'test', n=2, seed=5, size=48)
    b = synth_dataset(2, 'test', seed=5, size=48)
    assert [x.meta['image_id'] for x in a] == [x.meta['image_id'] for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))

def test_unknown_dataset_split_and_missing_folder(tmp_path):
    with pytest.raises(KeyError, match="no manifest for dataset 'nope'"): load_dataset('nope')
    make_monuseg(tmp_path)
    with pytest.raises(KeyError, match="kumar has no split 'val'"): load_dataset('kumar', 'val', root=tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset 'consep' not found under"): load_dataset('consep', root=tmp_path)

# ---------------------------------------------------------------- real data (NUCBOOK_DATA)

@needs_real
def test_real_monuseg2018_test_region_counts():
    d = Path(REAL) / 'monuseg' / 'MoNuSegTestData'
    per = {p.stem: len(D.parse_aperio_xml(p)[0]) for p in sorted(d.glob('*.xml'))}
    assert len(per) == 14 and sum(per.values()) == 6697
    two = [D.xml_labels(d / f'{stem}.xml', (1000, 1000), xy_offset=-1, cache=False) for stem in list(per)[:2]]
    for stem, r in zip(per, two): # no degenerate polygons in the test XMLs; every region becomes a nucleus
        assert r['stats']['n_degenerate'] == 0 and r['inst_map'].max() == per[stem] == r['stats']['n_instances']

@needs_real
def test_real_kumar_splits():
    for split, n in (('train', 16), ('test_seen', 8), ('test_unseen', 6)):
        m = load_manifest('kumar')
        base = D.dataset_dir('kumar')
        for short in m['splits'][split]['ids']:
            assert list((base / 'MoNuSegTrainingData' / 'Tissue_Images').glob(f'TCGA-{short}-*.tif')), short
    s = load_dataset('kumar', 'test_unseen')
    assert len(s) == 6 and {x.meta['group'] for x in s} == {'unseen'}
    assert sum(x.n_instances for x in s) == 4025

@needs_real
def test_real_xml_matches_distributed_instance_map():
    base = D.dataset_dir('kumar') / 'MoNuSegTrainingData'
    stem = 'TCGA-21-5784-01Z-00-DX1'
    ours = D.xml_labels(base / 'Annotations' / f'{stem}.xml', (1000, 1000), xy_offset=-1, cache=False)['inst_map'] > 0
    theirs = D.read_label_map(base / 'Instance_Maps' / f'{stem}.png') > 0
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.97

@needs_real
def test_real_consep_tiles_counts_and_types():
    tr = load_dataset('consep_tiles', 'train')
    assert len(tr) == 432 and len({s.meta['parent_image'] for s in tr}) == 27
    t = np.bincount(np.concatenate([s.inst_types for s in tr]), minlength=5)
    assert t[0] == 0 and t[1:].tolist() == [432, 4507, 6609, 6668]
    assert 0.02 < t[1] / t.sum() < 0.03 # the rare 'other' type

@needs_real
def test_real_monusac_classes():
    s = load_dataset('monusac', 'train')
    assert len(s) == 3
    counts = np.bincount(np.concatenate([x.inst_types for x in s]), minlength=5)[1:]
    assert counts.tolist() == [329, 299, 7, 5] and sum(x.meta['label_stats']['n_regions'] for x in s) == 640

@needs_real
def test_real_dsb2018_stage1_test():
    base = D.dataset_dir('dsb2018')
    assert sum(1 for _ in base.glob('stage1_test/*/masks/*.png')) == 4152
    rle = load_dataset('dsb2018', 'stage1_test', labels='rle')
    assert len(rle) == 65 and sum(s.n_instances for s in rle) == 4152
    case = rle[0].meta['image_id'] # masks and RLE describe the same nuclei
    m = D.dsb_mask_labels(base / 'stage1_test' / case / 'masks', rle[0].shape, cache=False)['inst_map']
    assert np.array_equal(m > 0, rle[0].inst_map > 0) and m.max() == rle[0].n_instances
