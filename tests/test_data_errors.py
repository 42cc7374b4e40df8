"""Bad input to the data loaders: every case is an error naming the file and the problem, or a warning where the data
is usable. Fixtures are written in the distributed formats: TIFF via tifffile, PNG via Pillow, HoVer-Net .mat via
scipy.io.savemat, Aperio XML as MoNuSeg's."""
import os, warnings
from pathlib import Path
import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from nucbook.data import datasets as D
from nucbook.data.datasets import load_dataset, load_manifest
from nucbook.data.sample import LabelError

from datahelpers import REAL, needs_real, _cache, img  # noqa: F401 (_cache is an autouse fixture)

def png(path, arr):
    Path(path).parent.mkdir(parents=True, exist_ok=True); Image.fromarray(arr).save(path)

def tif(path, arr, **kw):
    Path(path).parent.mkdir(parents=True, exist_ok=True); tifffile.imwrite(path, arr, **kw)

def own(root, n=3, types=False):
    "Flat own-data folder: n RGB PNG images, 16-bit PNG instance maps with ids 5 + k and 900."
    rows = ['image_id,instance_id,type']
    for k in range(n):
        png(root / 'images' / f'im{k}.png', img(seed=k))
        lab = np.zeros((16, 16), np.uint16); lab[1:5, 1:5] = 5 + k; lab[9:13, 8:14] = 900
        png(root / 'labels' / f'im{k}.png', lab)
        rows += [f'im{k},{5 + k},2', f'im{k},900,1']
    if types: (root / 'types.csv').write_text('\n'.join(rows) + '\n')
    return root

def by_id(splits):
    return {s.meta['image_id']: s for v in splits.values() for s in v}

def no_warnings(f, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        return f(*a, **kw)

# ---------------------------------------------------------------- 1. own-folder labels and images

def three_big_ids(dtype=np.int64):
    lab = np.zeros((16, 16), dtype); lab[1:4, 1:4] = 1; lab[6:9, 6:9] = 2**32 + 1; lab[12:15, 1:15] = 2**40
    return lab

def test_int64_ids_above_int32_stay_distinct_instances(tmp_path):
    d = own(tmp_path / 'd')
    (d / 'labels' / 'im0.png').unlink(); np.save(d / 'labels' / 'im0.npy', three_big_ids())
    x = by_id(D.load_own_folder(d, test_share=0.3))['im0']
    assert x.n_instances == 3 and x.inst_map.max() == 3                 # a cast to int32 first made them one instance
    (d / 'types.csv').write_text('image_id,instance_id,type\nim0,1,1\nim0,4294967297,2\nim0,1099511627776,3\n'
                                 + ''.join(f'im{k},{5 + k},2\nim{k},900,1\n' for k in (1, 2)))
    x = by_id(D.load_own_folder(d, test_share=0.3))['im0']             # with types: keyed by the stored ids
    assert x.inst_map[2, 2] == 1 and x.inst_map[7, 7] == 2 and x.inst_map[13, 5] == 3  # ascending stored ids
    assert x.inst_types.tolist() == [1, 2, 3]

def test_uint32_tiff_ids_at_or_above_2_31_load(tmp_path):
    d = own(tmp_path / 'd')
    lab = np.zeros((16, 16), np.uint32); lab[1:4, 1:4] = 2**31; lab[6:9, 6:9] = 2**32 - 1; lab[12:15, 1:15] = 7
    (d / 'labels' / 'im0.png').unlink(); tif(d / 'labels' / 'im0.tif', lab)
    x = by_id(D.load_own_folder(d, test_share=0.3))['im0']            # was refused as "negative ids"
    assert x.n_instances == 3 and x.inst_map[13, 5] == 1 and x.inst_map[2, 2] == 2 and x.inst_map[7, 7] == 3
    assert D.read_label_map(d / 'labels' / 'im0.tif').max() == 2**32 - 1  # read as stored, unsigned

@pytest.mark.parametrize('channels', [3, 1])
def test_12bit_data_in_16bit_tiff_image_is_rescaled_with_a_warning(tmp_path, channels):
    d = own(tmp_path / 'd')
    im = (img(seed=1).astype(np.uint16) * 16 + 15)                     # 12-bit: 15 .. 4095
    im = im if channels == 3 else im[..., 0]
    (d / 'images' / 'im1.png').unlink()
    tif(d / 'images' / 'im1.tif', im, photometric='rgb' if channels == 3 else 'minisblack')
    with pytest.warns(UserWarning, match=r'im1.tif: 16-bit image with maximum 40\d\d <= 4095: read as 12-bit'):
        x = by_id(D.load_own_folder(d, test_share=0.3))['im1']
    assert x.image.max() >= 250                                         # not nearly black (it was <= 15)
    want = np.round(im.astype(float) * 255 / 4095).astype(np.uint8)
    assert np.array_equal(x.image[..., 0], want if channels == 1 else want[..., 0])
    full = (img(seed=2).astype(np.uint16) * 257)                        # real 16-bit data: no warning, // 257
    tif(d / 'images' / 'im1.tif', full, photometric='rgb')
    assert np.array_equal(no_warnings(D.read_image, d / 'images' / 'im1.tif'), img(seed=2))

def test_16bit_tiff_that_only_pillow_decodes_warns(tmp_path, monkeypatch):
    tif(tmp_path / 'c.tif', img().astype(np.uint16) * 16, photometric='rgb')
    monkeypatch.setattr(D, '_tiff_page0', lambda p: None)               # as for LZW/PackBits without imagecodecs
    with pytest.warns(UserWarning, match=r'c.tif: 16-bit TIFF whose samples tifffile cannot decode .* reduced to 8 bits'):
        D.read_image(tmp_path / 'c.tif')

def test_two_images_with_one_name_are_refused_naming_both(tmp_path):
    d = own(tmp_path / 'd')
    Image.fromarray(img(seed=9)).save(d / 'images' / 'im1.jpg')
    with pytest.raises(LabelError, match=r"im1.jpg and im1.png share the name 'im1'"): D.load_own_folder(d)
    with pytest.raises(LabelError, match=r"im1.jpg and im1.png share the name 'im1'"):
        D.load_generic(load_manifest('generic'), d, 'all')

def test_two_label_maps_for_one_image_are_refused_naming_both(tmp_path):
    d = own(tmp_path / 'd')
    lab = np.zeros((16, 16), np.int32); lab[2:6, 2:6] = 3
    np.save(d / 'labels' / 'im2.npy', lab)
    with pytest.raises(LabelError, match=r"label maps im2.png and im2.npy both belong to image 'im2'"): D.load_own_folder(d)
    (d / 'labels' / 'im2.npy').unlink(); tif(d / 'labels' / 'im2.tif', lab)
    with pytest.raises(LabelError, match=r"im2.png and im2.tif both belong"):
        D.load_generic(load_manifest('generic'), d, 'all')

def test_multipage_tiff_is_refused_naming_file_and_pages(tmp_path):
    d = own(tmp_path / 'd')
    lab = np.zeros((16, 16), np.uint16); lab[2:6, 2:6] = 3
    (d / 'labels' / 'im0.png').unlink()
    tif(d / 'labels' / 'im0.tif', np.stack([lab, lab * 2, lab * 3]), photometric='minisblack') # 3 pages
    with pytest.raises(LabelError, match=r'labels/im0.tif: TIFF has 3 pages'): D.load_own_folder(d)
    tif(d / 'labels' / 'im0.tif', lab) # one page: fine
    (d / 'images' / 'im1.png').unlink()
    tif(d / 'images' / 'im1.tif', np.stack([img(seed=1), img(seed=2)]), photometric='rgb') # 2 RGB pages
    with pytest.raises(LabelError, match=r'images/im1.tif: TIFF has 2 pages'): D.load_own_folder(d)
    tif(d / 'images' / 'im1.tif', img(seed=1), photometric='rgb') # one RGB page: fine, silent
    s = no_warnings(D.load_own_folder, d, test_share=0.3)
    assert np.array_equal(by_id(s)['im1'].image, img(seed=1)) and by_id(s)['im0'].n_instances == 1
    pyramid = tmp_path / 'pyr.tif' # a reduced-resolution page (thumbnail) is not a second image
    with tifffile.TiffWriter(pyramid) as w:
        w.write(img(seed=3), photometric='rgb'); w.write(img(8, 8, seed=4), photometric='rgb', subfiletype=1)
    assert np.array_equal(no_warnings(D.read_image, pyramid), img(seed=3))

@needs_real
def test_real_monuseg_and_monusac_tiffs_still_load_silently():
    root = Path(REAL)
    tifs = sorted((root / 'monuseg' / 'MoNuSegTestData').glob('*.tif')) + sorted(root.glob('monusac/**/*.tif'))
    assert len(tifs) == 17
    for p in tifs:
        a = no_warnings(D.read_image, p)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.mean() > 50, p
    s = no_warnings(load_dataset, 'monuseg2018', 'test', cache=False, limit=2)
    assert [x.n_instances for x in s] == [len(D.parse_aperio_xml(x.meta['label_source'])[0]) for x in s] # every region

# ---------------------------------------------------------------- 2. types.csv

def types_csv_error(tmp_path, body, match, exc=LabelError):
    d = own(tmp_path / 'd', types=True)
    (d / 'types.csv').write_text('image_id,instance_id,type\n' + body)
    with pytest.raises(exc, match=match): D.load_own_folder(d)

ALL_OK = ''.join(f'im{k},{5 + k},2\nim{k},900,1\n' for k in range(3)) # lines 2..7

def test_types_csv_negative_and_zero_types_are_errors_naming_the_line(tmp_path):
    types_csv_error(tmp_path, ALL_OK + 'im0,900,-1\n', r'types.csv: line 8: type -1; types are > 0')
    types_csv_error(tmp_path, 'im0,5,0\n' + ALL_OK, r'types.csv: line 2: type 0; types are > 0 \(0 is background\)')

def test_types_csv_instance_id_0_and_empty_image_id_are_errors_naming_the_line(tmp_path):
    types_csv_error(tmp_path, ALL_OK + 'im0,0,1\n', r'types.csv: line 8: instance id 0; ids are > 0')
    types_csv_error(tmp_path, ALL_OK + ',5,1\n', r'types.csv: line 8: image_id is empty')

def test_types_csv_conflicting_duplicate_rows_are_an_error_naming_both_lines(tmp_path):
    types_csv_error(tmp_path, ALL_OK + 'im1,900,2\n',
                    r'types.csv: line 8: instance 900 of image im1 has type 2, but line 5 gives it type 1')

def test_types_csv_identical_duplicate_rows_warn(tmp_path):
    d = own(tmp_path / 'd', types=True)
    (d / 'types.csv').write_text('image_id,instance_id,type\n' + ALL_OK + 'im1,900,1\n')
    with pytest.warns(UserWarning, match=r'types.csv: 1 duplicate rows with the same type \(line 8 repeats line 5\)'):
        s = D.load_own_folder(d, test_share=0.3)
    assert by_id(s)['im1'].inst_types.tolist() == [2, 1]

def test_types_csv_rows_for_missing_instances_are_an_error_naming_the_line(tmp_path):
    types_csv_error(tmp_path, ALL_OK + 'im2,123,1\n',
                    r'types.csv: rows for 1 instances of image im2 that are not in .*im2.png \(line 8: instance 123\)')

def test_types_csv_rows_for_missing_images_warn(tmp_path):
    d = own(tmp_path / 'd', types=True)
    (d / 'types.csv').write_text('image_id,instance_id,type\n' + ALL_OK + 'gone,4,1\n')
    with pytest.warns(UserWarning, match=r"types.csv: rows for 1 images that are not in .*images are not used \(line 8: 'gone'\)"):
        D.load_own_folder(d)

def test_types_csv_types_outside_dataset_yaml_classes_are_an_error(tmp_path):
    d = own(tmp_path / 'd', types=True)
    (d / 'dataset.yaml').write_text('classes: {1: tumour}\n')
    with pytest.raises(LabelError, match=r'types.csv: line 2: type 2 is not one of the classes \[1\] of dataset.yaml'):
        D.load_own_folder(d)

# ---------------------------------------------------------------- 3. MoNuSeg Aperio XML

def monuseg_xml(path, regions, mpp='0.252700', ids=None):
    "Aperio XML exactly as MoNuSeg's: one Annotation, RegionAttributeHeaders, Regions with Vertices (1-based coordinates)."
    s = [f'<Annotations MicronsPerPixel="{mpp}">',
         '\t<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" Type="4" '
         'LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">', '\t\t<Attributes/>', '\t\t<Regions>',
         '\t\t\t<RegionAttributeHeaders>', '\t\t\t\t<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>',
         '\t\t\t</RegionAttributeHeaders>']
    for k, xy in enumerate(regions):
        rid = ids[k] if ids else k + 2
        s += [f'\t\t\t<Region Id="{rid}" Type="0" Zoom="0.999209" Selected="0" ImageLocation="" ImageFocus="-1" Text="" '
              f'NegativeROA="0" InputRegionId="0" Analyze="1" DisplayId="{rid}">', '\t\t\t\t<Attributes/>', '\t\t\t\t<Vertices>']
        s += [f'\t\t\t\t\t<Vertex X="{x}" Y="{y}"/>' for x, y in xy]
        s += ['\t\t\t\t</Vertices>', '\t\t\t</Region>']
    s += ['\t\t</Regions>', '\t\t<Plots/>', '\t</Annotation>', '</Annotations>']
    Path(path).parent.mkdir(parents=True, exist_ok=True); Path(path).write_text('\n'.join(s) + '\n')

def grid(n, step, size=4, start=2):
    "n x n small squares every `step` pixels (1-based coordinates)."
    return [[(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
            for y in range(start, start + n * step, step) for x in range(start, start + n * step, step)]

def make_monuseg_test(root, xml_for_first=None, size=16, mpp='0.252700'):
    "MoNuSeg 2018 test layout (14 RGB TIFFs + XMLs); the first tile's XML can be replaced."
    d = root / 'monuseg' / 'MoNuSegTestData'
    for j, stem in enumerate(load_manifest('monuseg2018')['splits']['test']['ids']):
        tif(d / f'{stem}.tif', img(size, size, seed=j), photometric='rgb')
        monuseg_xml(d / f'{stem}.xml', xml_for_first if (j == 0 and xml_for_first) else grid(2, 7), mpp=mpp)
    return d

def test_xml_for_another_image_size_is_refused_naming_xml_and_size(tmp_path):
    d = make_monuseg_test(tmp_path, xml_for_first=grid(10, 10), size=54) # regions over 100x100, image 54x54
    first = load_manifest('monuseg2018')['splits']['test']['ids'][0]
    with pytest.raises(LabelError, match=rf'{first}.xml: 64 of 100 regions \(64.0%\) lie wholly outside the 54x54 \(WxH\) image '
                                         r'\(region Id 8 \(#7\), .*another image'):
        load_dataset('monuseg2018', 'test', root=tmp_path, limit=1)
    assert D.xml_labels(d / f'{first}.xml', (100, 100), xy_offset=-1)['stats']['n_instances'] == 100 # the right size

def test_xml_with_a_few_regions_outside_warns_naming_them(tmp_path):
    regions = grid(5, 10) + [[(200, 200), (204, 200), (204, 204)]]      # 25 inside 54x54, 1 far outside (4 %)
    monuseg_xml(tmp_path / 'a.xml', regions)
    with pytest.warns(UserWarning, match=r'a.xml: 1 of 26 regions \(3.8%\) lie wholly outside the 54x54 \(WxH\) image '
                                         r'\(region Id 27 \(#26\)\); they are dropped'):
        r = D.xml_labels(tmp_path / 'a.xml', (54, 54), xy_offset=-1)
    assert r['stats']['n_instances'] == 25 and r['stats']['n_outside'] == 1
    with pytest.warns(UserWarning, match='region Id 27'): D.xml_labels(tmp_path / 'a.xml', (54, 54), xy_offset=-1) # cached: again

def test_microns_per_pixel_not_a_number_warns_naming_file_and_attribute(tmp_path):
    monuseg_xml(tmp_path / 'm.xml', grid(2, 7), mpp='abc')
    with pytest.warns(UserWarning, match=r"m.xml: attribute MicronsPerPixel='abc' is not a positive number; mpp set to None"):
        assert D.parse_aperio_xml(tmp_path / 'm.xml')[1] is None
    with pytest.warns(UserWarning, match=r"m.xml: attribute MicronsPerPixel='abc'"):
        assert D.xml_labels(tmp_path / 'm.xml', (16, 16), xy_offset=-1)['mpp'] is None
    make_monuseg_test(tmp_path, mpp='abc') # through the loader: the manifest's mpp is used instead
    with pytest.warns(UserWarning, match=r"MicronsPerPixel='abc'"):
        s = load_dataset('monuseg2018', 'test', root=tmp_path, limit=1)
    assert s[0].meta['mpp'] == load_manifest('monuseg2018')['mpp']

def test_region_messages_give_the_xml_id_and_the_1_based_position(tmp_path):
    sq = [(1, 1), (5, 1), (5, 5), (1, 5)]
    monuseg_xml(tmp_path / 'v.xml', [sq, [(1, 1), ('x', 2), (3, 3)]], ids=[4, 7])
    with pytest.raises(LabelError, match=r'v.xml: region Id 7 \(#2\) has a vertex without numeric X/Y'):
        D.parse_aperio_xml(tmp_path / 'v.xml')
    monuseg_xml(tmp_path / 'f.xml', [sq, [(1, 1), ('inf', 2), (3, 3)]], ids=[4, 7])
    with pytest.raises(LabelError, match=r'f.xml: region Id 7 \(#2\) has non-finite coordinates'):
        D.xml_labels(tmp_path / 'f.xml', (16, 16), xy_offset=-1)
    # MoNuSAC style: one Annotation per class, Ids restart in every Annotation; the position tells them apart
    ann = lambda a, c: (f'<Annotation Id="{a}"><Attributes><Attribute Name="{c}" Id="0" Value=""/></Attributes><Regions>'
                        '<Region Id="1"><Vertices>' + ''.join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in sq) +
                        '</Vertices></Region></Regions></Annotation>')
    (tmp_path / 'c.xml').write_text(f'<Annotations MicronsPerPixel="0.194480">{ann(1, "Epithelial")}{ann(2, "Mitosis")}</Annotations>')
    with pytest.raises(LabelError, match=r"c.xml: region Id 1 \(#2\): annotation class 'Mitosis' is not one of"):
        D.xml_labels(tmp_path / 'c.xml', (16, 16), {'epithelial': 1})

# ---------------------------------------------------------------- 4. HoVer-Net .mat

def tile_inst():
    "consep_tiles-like instance map: non-contiguous original ids 37, 250, 1000."
    inst = np.zeros((16, 16), np.int32); inst[1:4, 1:4] = 250; inst[6:9, 6:9] = 37; inst[12:15, 1:4] = 1000
    return inst

def consep_tile(root, mat):
    "consep_tiles layout, one tile per split, with the given .mat keys (savemat)."
    base = root / 'consep_tiles'
    for split in ('Train', 'Test'):
        png(base / split / 'Images' / f'{split.lower()}_3_005.png', img())
        (base / split / 'Labels').mkdir(parents=True, exist_ok=True)
        sio.savemat(base / split / 'Labels' / f'{split.lower()}_3_005.mat', mat)
    return base / 'Train' / 'Labels' / 'train_3_005.mat'

def painted(inst, types):
    "type_map painted from {id: type}."
    t = np.zeros(inst.shape, np.int32)
    for i, v in types.items(): t[inst == i] = v
    return t

def test_inst_type_length_neither_instances_nor_max_id_is_an_error(tmp_path):
    inst = tile_inst()
    for rows in (4, 1001, 1500): # 3 instances, max id 1000
        f = consep_tile(tmp_path, {'inst_map': inst, 'inst_type': np.ones((rows, 1), np.int32)})
        with pytest.raises(LabelError, match=rf'{f.name}: inst_type has {rows} rows for 3 instances \(max id 1000\)'):
            load_dataset('consep_tiles', 'train', root=tmp_path)

def test_inst_type_one_row_per_instance_is_the_convention_and_max_id_rows_warn(tmp_path):
    inst = tile_inst()
    consep_tile(tmp_path, {'inst_map': inst, 'inst_type': np.array([[2], [1], [4]], np.int32),
                           'type_map': painted(inst, {37: 2, 250: 1, 1000: 4})})
    s = no_warnings(load_dataset, 'consep_tiles', 'train', root=tmp_path)[0]
    assert s.inst_types.tolist() == [2, 1, 4]                           # ascending ids 37, 250, 1000
    t = np.ones((1000, 1), np.int32); t[36] = 2; t[249] = 1; t[999] = 4 # one row per id 1..1000
    f = consep_tile(tmp_path, {'inst_map': inst, 'inst_type': t})
    with pytest.warns(UserWarning, match=rf'{f.name}: inst_type has 1000 rows for 3 instances with max id 1000: read as one row per id'):
        s = load_dataset('consep_tiles', 'train', root=tmp_path)[0]
    assert s.inst_types.tolist() == [2, 1, 4]

def test_type_map_disagreeing_with_inst_type_is_refused_naming_ids(tmp_path):
    inst = tile_inst()
    f = consep_tile(tmp_path, {'inst_map': inst, 'inst_type': np.array([[2], [1], [4]], np.int32),
                               'type_map': painted(inst, {37: 2, 250: 3, 1000: 4})})
    with pytest.raises(LabelError, match=rf'{f.name}: type_map and inst_type disagree for 1 of 3 instances, '
                                         r'ids \(inst_type vs type_map majority\): 250 \(1 vs 3\)'):
        load_dataset('consep_tiles', 'train', root=tmp_path)

def test_type_map_disagreement_within_tolerance_warns(tmp_path):
    inst = np.zeros((16, 16), np.int32)
    for k in range(64): inst[(k // 8) * 2, (k % 8) * 2] = 10 + 3 * k   # 64 one-pixel nuclei, ids 10, 13, ...
    ids = np.unique(inst)[1:]
    types = {int(i): 1 + k % 4 for k, i in enumerate(ids)}
    tm = painted(inst, {**types, int(ids[5]): 2 if types[int(ids[5])] != 2 else 3}) # 1 of 64 (1.6 %) disagrees
    f = consep_tile(tmp_path, {'inst_map': inst, 'type_map': tm, 'inst_type': np.array([types[int(i)] for i in ids])[:, None]})
    with pytest.warns(UserWarning, match=rf'{f.name}: type_map and inst_type disagree for 1 of 64 instances.*{int(ids[5])} .*inst_type used'):
        s = load_dataset('consep_tiles', 'train', root=tmp_path)[0]
    assert s.inst_types.tolist() == [types[int(i)] for i in ids]

def test_type_map_class_outside_the_dataset_classes_is_refused(tmp_path):
    inst = tile_inst()
    tm = painted(inst, {37: 2, 250: 1, 1000: 4}); tm[12, 1] = 9        # one pixel of class 9; majorities still agree
    f = consep_tile(tmp_path, {'inst_map': inst, 'inst_type': np.array([[2], [1], [4]], np.int32), 'type_map': tm})
    with pytest.raises(LabelError, match=rf'{f.name}: type_map has classes \[9\] that are not classes of consep_tiles'):
        load_dataset('consep_tiles', 'train', root=tmp_path)

@pytest.mark.parametrize('kind', ['strings', 'cell'])
def test_inst_type_of_strings_is_an_error_naming_file_and_key(tmp_path, kind):
    t = np.array(['a', 'b', 'c']) if kind == 'strings' else np.array([['a'], [1], [2.5]], dtype=object)
    f = consep_tile(tmp_path, {'inst_map': tile_inst(), 'inst_type': t})
    what = 'strings' if kind == 'strings' else 'a cell array or struct'
    with pytest.raises(LabelError, match=rf'{f.name}: inst_type holds {what}'):
        load_dataset('consep_tiles', 'train', root=tmp_path)

@needs_real
def test_real_consep_tiles_load_without_type_warnings():
    s = no_warnings(load_dataset, 'consep_tiles', 'test', limit=40)
    assert len(s) == 40 and all(x.has_types for x in s)
