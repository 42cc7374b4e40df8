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

from datahelpers import REAL, needs_real, _cache, img  # noqa: F401 (_cache is an autouse fixture)

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
                          'dsb2018', 'generic', 'pannuke', 'conic', 'lizard'}
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

def test_glysac_distributed_format_merged_to_three_classes(tmp_path):
    "GLySAC as distributed: Train|Test/Images/*.tif (RGB) + Labels/*.mat with HoVer-Net's four keys as MATLAB doubles."
    base = tmp_path / 'glysac'
    raw = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 4, 3]  # one nucleus per raw type, then two more
    merged = {1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3}
    for split, stems in (('Train', ['EGC1_0_0', 'EGC1_0_1']), ('Test', ['AGC_x'])):
        for k, stem in enumerate(stems):
            save(base / split / 'Images' / f'{stem}.tif', img(40, 40, k))
            inst = np.zeros((40, 40)); cen = []
            for i in range(1, len(raw) + 1):
                y, x = 12 * ((i - 1) // 4) + 2, 9 * ((i - 1) % 4) + 2
                inst[y:y + 4, x:x + 5] = i; cen.append([x + 2.0, y + 1.5])
            type_map = np.array([0] + raw, float)[inst.astype(int)]
            (base / split / 'Labels').mkdir(parents=True, exist_ok=True)
            sio.savemat(base / split / 'Labels' / f'{stem}.mat', {'inst_map': inst, 'type_map': type_map,
                        'inst_type': np.array(raw, float)[:, None], 'inst_centroid': np.array(cen)})
    tr = load_dataset('glysac', 'train', root=tmp_path)
    assert [s.meta['image_id'] for s in tr] == ['EGC1_0_0', 'EGC1_0_1'] and tr[0].image.shape == (40, 40, 3)
    assert tr[0].inst_types.tolist() == [merged[t] for t in raw] == [1, 1, 3, 2, 2, 2, 2, 3, 1, 1, 2, 3]
    assert np.array_equal(tr[0].type_map, type_map_from_types(tr[0].inst_map, tr[0].inst_types)) and tr[0].type_map.max() == 3
    assert tr[0].n_instances == 12 and tr[0].meta['mpp'] == 0.25
    raw_s = load_dataset('glysac', 'test', root=tmp_path, merge=False)[0]
    assert raw_s.inst_types.tolist() == raw and raw_s.meta['image_id'] == 'AGC_x'
    assert D.class_map('glysac')[1] == 'other' and D.rare_types('glysac') == [1]
    from nucbook.bench import load_splits, class_count_table
    sp = load_splits('glysac', root=tmp_path)
    assert sp.record['split']['method'] == 'manifest' and (len(sp.train), len(sp.test)) == (2, 1)
    t = class_count_table({'Original': sp.train}, sp.classes)
    assert t.loc['Original'].tolist() == [8, 10, 6, 24]  # per image: 4 other, 5 lymphocyte, 3 epithelial

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

# ---------------------------------------------------------------- own data: any folder in the own-data layout

def make_own(root, n=8, split=None, types=False, label_dtype=np.uint16, ext='png', yaml_text=None):
    "n images with 16-bit instance maps (two nuclei each, ids 5 + k and 900) in [split/]images + labels."
    d = root / split if split else root
    rows = ['image_id,instance_id,type']
    for k in range(n):
        save(d / 'images' / f'im{k:02d}.png', img(16, 16, seed=k))
        lab = np.zeros((16, 16), label_dtype); lab[1:5, 1:5] = 5 + k; lab[9:13, 8:14] = 900
        if ext == 'npy': (d / 'labels').mkdir(parents=True, exist_ok=True); np.save(d / 'labels' / f'im{k:02d}.npy', lab)
        elif ext == 'tif': (d / 'labels').mkdir(parents=True, exist_ok=True); Image.fromarray(lab).save(d / 'labels' / f'im{k:02d}.tif')
        else: save(d / 'labels' / f'im{k:02d}.png', lab)
        rows += [f'im{k:02d},{5 + k},2', f'im{k:02d},900,1']
    if types: (d / 'types.csv').write_text('\n'.join(rows) + '\n')
    if yaml_text is not None: (root / 'dataset.yaml').write_text(yaml_text)
    return root

def test_resolve_dataset_names_and_folders(tmp_path, monkeypatch):
    assert D.resolve_dataset('synthetic') == ('synthetic', 'synthetic')
    assert D.resolve_dataset('kumar') == ('manifest', 'kumar')
    make_own(tmp_path / 'mine', 2)
    assert D.resolve_dataset(tmp_path / 'mine') == ('folder', str((tmp_path / 'mine').resolve()))
    monkeypatch.chdir(tmp_path)
    assert D.resolve_dataset('mine') == ('folder', str((tmp_path / 'mine').resolve())) # a bare name that is a folder here
    assert D.resolve_dataset('./mine')[1] == str((tmp_path / 'mine').resolve())
    make_own(tmp_path / 'kumar', 2)
    assert D.resolve_dataset('kumar') == ('manifest', 'kumar')            # a registered name wins...
    assert D.resolve_dataset('./kumar')[0] == 'folder'                    # ...unless written as a path
    with pytest.raises(KeyError, match="no manifest for dataset 'nope'"): D.resolve_dataset('nope')
    with pytest.raises(ValueError, match="pass the folder's path"): D.resolve_dataset('generic')
    with pytest.raises(FileNotFoundError, match='gone: dataset folder not found'): D.resolve_dataset('./gone')
    (tmp_path / 'f.txt').write_text('x')
    with pytest.raises(NotADirectoryError, match='f.txt: a dataset is a folder'): D.resolve_dataset('./f.txt')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r'empty/images: image folder not found'): D.resolve_dataset('./empty')

def test_own_folder_with_split_folders(tmp_path):
    for sp, n in (('train', 3), ('val', 1), ('test', 2)): make_own(tmp_path / 'd', n, split=sp)
    s = D.load_own_folder(tmp_path / 'd')
    assert {k: len(v) for k, v in s.items()} == {'test': 2, 'train': 3, 'val': 1}
    assert {x.meta['split'] for x in s['val']} == {'val'} and {x.meta['split_method'] for x in s['train']} == {'folders'}
    assert s['train'][0].n_instances == 2 and s['train'][0].meta['mpp'] is None and s['train'][0].meta['dataset'] == 'd'
    assert D.split_summary(s)['train'] == {'images': 3, 'nuclei': 6, 'image_ids': ['im00', 'im01', 'im02']}
    # images/ at the top and split folders at once is ambiguous
    make_own(tmp_path / 'd', 1)
    with pytest.raises(ValueError, match='has both images/ and split folders'): D.load_own_folder(tmp_path / 'd')

def test_own_folder_seeded_split_is_reproducible_sorted_disjoint(tmp_path):
    make_own(tmp_path / 'd', 10)
    a = D.load_own_folder(tmp_path / 'd', test_share=0.25, val_share=0.2, seed=0)
    ids = {k: [x.meta['image_id'] for x in v] for k, v in a.items()}
    assert list(ids) == ['train', 'val', 'test']
    assert {k: len(v) for k, v in ids.items()} == {'train': 5, 'val': 2, 'test': 3} # 2.5 -> 3 (half up), 2.0 -> 2
    assert sorted(sum(ids.values(), [])) == [f'im{k:02d}' for k in range(10)]          # disjoint, complete
    assert all(v == sorted(v) for v in ids.values())
    assert ids == {'train': ['im00', 'im01', 'im05', 'im08', 'im09'], 'val': ['im03', 'im07'], 'test': ['im02', 'im04', 'im06']} # pinned
    b = D.load_own_folder(tmp_path / 'd', test_share=0.25, val_share=0.2, seed=0)
    assert ids == {k: [x.meta['image_id'] for x in v] for k, v in b.items()}
    assert any(D.seeded_split(sum(ids.values(), []), 0.25, 0.2, s) != ids for s in (1, 2, 3))
    assert {x.meta['split_method'] for x in a['test']} == {'seeded'} and {x.meta['split'] for x in a['test']} == {'test'}
    assert set(D.load_own_folder(tmp_path / 'd')) == {'train', 'test'} # no val split unless asked for

def test_seeded_split_rules():
    names = [f'n{k}' for k in range(20)]
    for n, share, want in ((12, 0.25, 3), (10, 0.25, 3), (6, 0.25, 2), (4, 0.1, 1), (2, 0.25, 1), (20, 0.33, 7)):
        assert len(D.seeded_split(names[:n], share)['test']) == want, (n, share)
    names = names[:12]
    s = D.seeded_split(names, 0.25, 0.25, seed=4)
    assert (len(s['train']), len(s['val']), len(s['test'])) == (6, 3, 3)
    assert D.seeded_split(names[::-1], 0.25, 0.25, seed=4) == s       # sorted before shuffling: file order is irrelevant
    assert D.seeded_split(names + names[:3], 0.25, 0.25, seed=4) == s  # duplicates collapse
    with pytest.raises(ValueError, match='3 images cannot give 2 test and 1 validation'): D.seeded_split(names[:3], 0.5, 0.1)
    with pytest.raises(ValueError, match=r'val_share must be in \[0, 1\)'): D.seeded_split(names, 0.2, -0.1)
    assert D.seeded_split(names, 0.0) == {'train': sorted(names), 'test': []}

def test_own_folder_types_csv(tmp_path):
    make_own(tmp_path / 'd', 4, types=True)
    s = D.load_own_folder(tmp_path / 'd', test_share=0.25)
    x = s['train'][0]
    assert x.has_types and x.inst_types.tolist() == [2, 1] # ids 5+k (type 2) and 900 (type 1), renumbered in id order
    # split folders with one types.csv at the top: it serves every split
    for sp in ('train', 'test'): make_own(tmp_path / 'e', 2, split=sp)
    (tmp_path / 'd' / 'types.csv').rename(tmp_path / 'e' / 'types.csv')
    with pytest.warns(UserWarning, match=r"types.csv: rows for 2 images that are not in any split folder .* \(line 6: 'im02', line 8: 'im03'\)"):
        ok = D.load_own_folder(tmp_path / 'e') # the rows of the 4-image folder's im02, im03 are not used
    assert all(y.has_types for y in ok['train'] + ok['test'])
    (tmp_path / 'e' / 'types.csv').write_text('image_id,instance_id,type\nim00,5,2\n')
    with pytest.raises(LabelError, match=r'types.csv: no type for instances \[900\] of image im00'): D.load_own_folder(tmp_path / 'e')
    (tmp_path / 'e' / 'types.csv').write_text('image_id,instance_id,type\nim00,5,0\n')
    with pytest.raises(LabelError, match=r'types.csv: line 2: type 0; types are > 0'): D.load_own_folder(tmp_path / 'e')
    (tmp_path / 'e' / 'types.csv').write_text('image,id,class\n')
    with pytest.raises(LabelError, match='types.csv: expected columns image_id,instance_id,type'): D.load_own_folder(tmp_path / 'e')

@pytest.mark.parametrize('kind', ['png255', 'png01', 'npybool'])
def test_binary_mask_is_split_with_a_warning_naming_the_file(tmp_path, kind):
    d = tmp_path / 'b'
    make_own(d, 4)
    m = np.zeros((16, 16), np.uint8); m[1:4, 1:4] = 1; m[6:9, 6:9] = 1; m[12:15, 1:15] = 1 # three separate nuclei
    bad = d / 'labels' / 'im02.png'
    if kind == 'png255': save(bad, m * 255)
    elif kind == 'png01': save(bad, m)
    else: bad.unlink(); bad = d / 'labels' / 'im02.npy'; np.save(bad, m.astype(bool))
    with pytest.warns(UserWarning, match=rf'{bad.name}: label map is a binary mask .* 3 separate regions.* split into 3 nuclei'):
        s = D.load_own_folder(d, test_share=0.25)
    x = next(y for y in s['train'] + s['test'] if y.meta['image_id'] == 'im02')
    assert x.n_instances == 3 and x.meta['label_stats'] == {'binary_mask': True, 'value': 1 if kind != 'png255' else 255, 'n_components': 3}
    with pytest.raises(LabelError, match=rf'{bad.name}: label map is a binary mask'): D.load_own_folder(d, binary='error')
    (d / 'types.csv').write_text('image_id,instance_id,type\n' + ''.join(f'im{k:02d},{5 + k},1\nim{k:02d},900,1\n' for k in range(4)))
    with pytest.raises(LabelError, match=rf'types.csv: gives nucleus types, but .*{bad.name} is a binary mask'):
        with pytest.warns(UserWarning): D.load_own_folder(d)

def test_single_nucleus_and_real_instance_maps_load_without_warning(tmp_path):
    import warnings
    d = make_own(tmp_path / 'd', 2)
    one = np.zeros((16, 16), np.uint16); one[3:9, 3:9] = 255 # one nucleus labelled 255: not a mask problem
    save(d / 'labels' / 'im00.png', one)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        s = D.load_own_folder(d, test_share=0.5)
    assert sorted(y.n_instances for y in s['train'] + s['test']) == [1, 2]

def test_own_folder_mpp_from_yaml_argument_or_unknown(tmp_path):
    make_own(tmp_path / 'd', 4, yaml_text='name: lab-x\nmpp: 0.5\nmagnification: 20\nclasses: {1: tumour, 2: immune}\n')
    s = D.load_own_folder(tmp_path / 'd')
    every = s['train'] + s['test']
    assert {(x.meta['mpp'], x.meta['magnification'], x.meta['dataset']) for x in every} == {(0.5, 20.0, 'lab-x')}
    assert {x.meta['mpp'] for v in D.load_own_folder(tmp_path / 'd', mpp=0.25).values() for x in v} == {0.25}
    assert D.own_folder_config(tmp_path / 'd')['classes'] == {0: 'background', 1: 'tumour', 2: 'immune'}
    assert D.mpp_summary(every) == {'mpp': 0.5, 'values': [0.5], 'n_unknown': 0, 'uniform': True}
    (tmp_path / 'd' / 'dataset.yaml').unlink()
    assert {x.meta['mpp'] for v in D.load_own_folder(tmp_path / 'd').values() for x in v} == {None}
    for text, err in (('mpp: -1\n', 'mpp must be a positive number'), ('mpp: [1]\n', 'mpp must be a positive number'),
                      ('resolution: 3\n', r"unknown keys \['resolution'\]"), ('- a\n', 'expected a mapping'),
                      ('classes: {a: b}\n', 'classes must map integer ids'), ('mpp: [\n', 'not valid YAML')):
        (tmp_path / 'd' / 'dataset.yaml').write_text(text)
        with pytest.raises(ValueError, match=rf'dataset.yaml: .*{err}'): D.load_own_folder(tmp_path / 'd')
    (tmp_path / 'd' / 'dataset.yaml').unlink()
    with pytest.raises(ValueError, match='mpp must be a positive number'): D.load_own_folder(tmp_path / 'd', mpp=0)

def test_mpp_summary_and_manifest_mpp():
    from nucbook.data.sample import Sample
    mk = lambda v: Sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), meta={'mpp': v})
    assert D.mpp_summary([mk(0.25), mk(0.2527)])['uniform'] # within 5 %
    assert D.mpp_summary([mk(0.25), mk(0.5)]) == {'mpp': None, 'values': [0.25, 0.5], 'n_unknown': 0, 'uniform': False}
    assert D.mpp_summary([mk(0.25), mk(None)])['n_unknown'] == 1 and not D.mpp_summary([mk(0.25), mk(None)])['uniform']
    assert load_manifest('monusac')['mpp'] == 0.19448 and load_manifest('kumar')['mpp'] == 0.25
    assert all('mpp' in load_manifest(n) for n in list_datasets()[:-1]) # every manifest states its magnification

def test_own_folder_bad_input_names_the_file(tmp_path):
    d = make_own(tmp_path / 'd', 3)
    (d / 'labels' / 'im01.png').unlink()
    with pytest.raises(FileNotFoundError, match=r'labels/im01.png: label map not found'): D.load_own_folder(d)
    make_own(d, 3)
    save(d / 'labels' / 'im02.png', np.zeros((15, 16), np.uint16))
    with pytest.raises(LabelError, match=r'im02.png: label map size 16x15 \(WxH\) differs from the image size 16x16'): D.load_own_folder(d)
    make_own(d, 3)
    save(d / 'images' / 'im00.jpg', img(16, 16))
    with pytest.raises(LabelError, match=r"images .*im00.jpg and im00.png share the name 'im00'|images .*im00.png and im00.jpg share"):
        D.load_own_folder(d)
    (d / 'images' / 'im00.jpg').unlink()
    np.save(d / 'labels' / 'im01.npy', np.zeros((16, 16), np.float32)); (d / 'labels' / 'im01.png').unlink()
    with pytest.raises(LabelError, match=r'im01.npy: label map has dtype float32'): D.load_own_folder(d)

@pytest.mark.parametrize('ext', ['tif', 'npy'])
def test_own_folder_32bit_labels(tmp_path, ext):
    d = make_own(tmp_path / 'd', 4, label_dtype=np.int32, ext=ext)
    lab = np.zeros((16, 16), np.int32); lab[2:6, 2:6] = 70000; lab[8:12, 8:12] = 3
    if ext == 'npy': np.save(d / 'labels' / 'im00.npy', lab)
    else: Image.fromarray(lab).save(d / 'labels' / 'im00.tif')
    s = D.load_own_folder(d, test_share=0.25)
    x = next(y for y in s['train'] + s['test'] if y.meta['image_id'] == 'im00')
    assert x.n_instances == 2 and x.inst_map[3, 3] == 2

def test_load_dataset_takes_an_own_folder_and_save_own_folder_roundtrips(tmp_path):
    from nucbook.data.synth import synth_dataset
    tiles = synth_dataset(4, 'train', seed=0, size=32)
    d = D.save_own_folder(tiles, tmp_path / 'rt')
    got = load_dataset(str(d), None, test_share=0.25)
    assert sorted(x.meta['image_id'] for x in got) == sorted(t.meta['image_id'] for t in tiles)
    by = {x.meta['image_id']: x for x in got}
    for t in tiles: assert np.array_equal(by[t.meta['image_id']].inst_map, t.inst_map) and np.array_equal(by[t.meta['image_id']].inst_types, t.inst_types)
    assert len(load_dataset(str(d), 'test')) == 1 and len(load_dataset(d, ['train', 'test'], limit=2)) == 3
    with pytest.raises(KeyError, match="has no split 'val'"): load_dataset(str(d), 'val')

def test_manifests_are_package_data():
    import nucbook
    pkg = Path(nucbook.__file__).resolve().parent
    assert D.manifest_dir() == pkg / 'data' / 'manifests' and (D.manifest_dir() / 'kumar.yaml').exists()
    link = pkg.parent / 'data_manifests' # the project root keeps the documented path as a link
    if link.exists(): assert link.resolve() == D.manifest_dir() and (link / 'schema.json').exists()

def test_manifest_dir_override(tmp_path, monkeypatch):
    (tmp_path / 'm').mkdir()
    for f in ('schema.json', 'generic.yaml'): (tmp_path / 'm' / f).write_text((D.manifest_dir() / f).read_text())
    monkeypatch.setenv('NUCBOOK_MANIFESTS', str(tmp_path / 'm'))
    assert D.manifest_dir() == tmp_path / 'm' and list_datasets() == ['generic', 'synthetic']
