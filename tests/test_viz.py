"Tests of nucbook.eval.viz: figures legible at their saved size (outline width, zoom rows, colour key), on synthetic and real tiles."
import numpy as np
import pytest
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from PIL import Image
from skimage.segmentation import find_boundaries

from nucbook.data.sample import Sample
from nucbook.data.synth import synth_dataset, SYNTH_CLASSES
from nucbook.eval.viz import (show_samples, show_sample_grid, image_grid, save_figure, overlay, instance_edges, outline_width,
                              panel_scale, zoom_box, type_key, type_colour)


def _scale(ax) -> float:
    "Display px per image px of the image drawn in `ax` (its axes box over its array's width)."
    return ax.get_window_extent().width / ax.images[0].get_array().shape[1]


def _check_legible(fig, side:int):
    "Every tile of side `side` is drawn at >= 0.5 display px per image px, or a zoom panel shows part of it at >= 1."
    big = [ax for ax in fig.axes if ax.images and ax.images[0].get_array().shape[1] == side]
    assert big, 'no panel draws the whole tile'
    for ax in big:
        if _scale(ax) >= 0.5: continue
        zooms = [z for z in fig.axes if z.images and z.images[0].get_array().shape[1] < side and _scale(z) >= 1]
        assert zooms, f'tile drawn at {_scale(ax):.2f} px per px and no zoom panel'
    # outlines at least one display px wide wherever a panel is below 1 px per px
    for ax in big:
        s = _scale(ax)
        assert outline_width(s) * s >= 1 - 1e-9


def test_large_tile_gets_a_zoom_row_at_exact_scales(tmp_path):
    b = synth_dataset(1, 'train', seed=4, size=1000)[0]
    flip = lambda a: np.ascontiguousarray(a[::-1])
    big = [b, Sample(flip(b.image), flip(b.inst_map), flip(b.type_map), b.inst_types.copy(), {'image_id': 'flipped'})]
    fig = show_samples(big, class_names=SYNTH_CLASSES, title='two 1000-px tiles')
    _check_legible(fig, 1000)
    ov = [ax for ax in fig.axes if ax.images[0].get_array().shape[:2] == (1000, 1000)]
    zm = [ax for ax in fig.axes if ax.images[0].get_array().shape[:2] == (213, 213)]
    assert len(ov) == 2 and len(zm) == 2
    assert all(abs(_scale(a) - 0.32) < 1e-3 for a in ov) and all(abs(_scale(a) - 1.5) < 1e-2 for a in zm)
    for ax, s in zip(zm, big):  # each zoom shows its own tile's densest typed window, outlines 1 px
        y, x = zoom_box(s, 213)
        assert np.array_equal(np.asarray(ax.images[0].get_array()), overlay(s, 1)[y:y + 213, x:x + 213])
    # the overview outlines are 4 image px (1.28 display px); zoom windows are marked on the overview
    assert np.array_equal(np.asarray(ov[0].images[0].get_array()), overlay(big[0], 4)) and ov[0].patches
    p = save_figure(fig, tmp_path / 'big.png')
    W, H = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert Image.open(p).size == (W, H) and W <= 2 * 320 + 3 * 10 + 1  # sized to the content, not a fixed canvas
    plt.close(fig)


def test_small_tiles_are_drawn_at_least_one_to_one_without_zoom():
    tiles = synth_dataset(3, 'train', seed=0, size=256)
    fig = show_samples(tiles, class_names=SYNTH_CLASSES)
    assert len(fig.axes) == 3 and all(abs(_scale(a) - 1.25) < 1e-2 for a in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(SYNTH_CLASSES.values())[1:]
    plt.close(fig)


def test_key_names_types_without_class_names_and_untyped_predictions():
    t = synth_dataset(1, 'train', seed=0, size=64)[0]
    untyped = Sample(t.image, t.inst_map, meta=t.meta)
    fig = show_sample_grid([[t, untyped]])
    present = sorted(set(t.inst_types.tolist()))
    assert [x.get_text() for x in fig.legends[0].get_texts()] == [f'type {k}' for k in present] + ['nucleus (untyped)']
    plt.close(fig)


def test_outline_width_rule_and_edges():
    assert [outline_width(s) for s in (1.5, 1.0, 0.5, 0.32)] == [1, 1, 2, 4]
    assert panel_scale((1000, 1000), 320) == pytest.approx(0.32) and panel_scale((64, 64), 320) == 2.0
    im = np.zeros((12, 12), np.int32); im[2:10, 2:10] = 1  # an 8x8 nucleus: w-px outlines leave (8 - 2w)^2 inside
    assert [int((~instance_edges(im, w) & (im > 0)).sum()) for w in (1, 2, 3)] == [36, 16, 4]
    im[2:10, 6:10] = 2  # now two touching 8x4 nuclei: the shared border is outlined on both sides
    assert np.array_equal(instance_edges(im), find_boundaries(im, mode='inner'))
    assert instance_edges(im)[5, 5] and instance_edges(im)[5, 6] and not instance_edges(im)[5, 4]
    assert not instance_edges(im, 2)[im == 0].any()  # outlines stay inside the nuclei


def test_image_grid_rejects_bad_layouts():
    a = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match='no images to draw'): image_grid([[None]])
    with pytest.raises(ValueError, match='scales must be positive'): image_grid([[a]], scale=0)
    with pytest.raises(ValueError, match='no samples to show'): show_sample_grid([[]])


@pytest.mark.realdata
def test_monuseg_tiles_legible(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv('NUCBOOK_DATA', str(data_root))
    from nucbook.data.datasets import load_dataset
    tiles = load_dataset('monuseg2018', 'test', limit=2)
    assert all(s.shape == (1000, 1000) for s in tiles)
    fig = show_samples(tiles, title='MoNuSeg 2018 test tiles')
    _check_legible(fig, 1000)
    assert [x.get_text() for x in fig.legends[0].get_texts()] == ['nucleus (untyped)']
    p = save_figure(fig, tmp_path / 'monuseg.png')
    assert p.stat().st_size < 700_000  # palette PNG: small on disk
    plt.close(fig)


@pytest.mark.realdata
def test_consep_tiles_typed_key(data_root, monkeypatch):
    monkeypatch.setenv('NUCBOOK_DATA', str(data_root))
    from nucbook.data.datasets import load_dataset, class_map
    tiles = load_dataset('consep_tiles', 'test', limit=3)
    names = class_map('consep_tiles')
    fig = show_samples(tiles, class_names=names)
    assert len(fig.axes) == 3 and all(_scale(a) >= 1 for a in fig.axes)  # 256-px tiles: 1.25 px per px, no zoom
    assert [x.get_text() for x in fig.legends[0].get_texts()] == [v for k, v in sorted(names.items()) if k > 0]
    # a nucleus outline pixel carries its type's colour
    s, ax = tiles[0], fig.axes[0]
    edge = find_boundaries(s.inst_map, mode='inner') & (s.inst_map > 0)
    y, x = np.argwhere(edge)[0]
    assert np.array_equal(np.asarray(ax.images[0].get_array())[y, x], type_colour(int(s.inst_types[s.inst_map[y, x] - 1])))
    plt.close(fig)


def test_non_square_tiles_scale_by_their_longer_side():
    t = synth_dataset(1, 'train', seed=2, size=(260, 348))[0]  # DSB-like 260 x 348: s = 320 / 348
    fig = show_samples([t], panel=320, zoom=False)
    ax = fig.axes[0]
    assert round(ax.get_window_extent().width) == 320 and round(ax.get_window_extent().height) == round(260 * 320 / 348)
    plt.close(fig)


def test_zoom_box_prefers_more_types_then_more_nuclei():
    im = np.zeros((100, 100), np.int32)
    for k, (y, x) in enumerate([(5, 5), (10, 20), (80, 80), (85, 90), (90, 82)], start=1): im[y:y + 4, x:x + 4] = k
    blank = np.zeros((100, 100, 3), np.uint8)
    assert zoom_box(Sample(blank, im), 40) == (60, 60)  # most nuclei
    assert zoom_box(Sample(blank, im, np.zeros_like(im), np.array([1, 2, 3, 3, 3], np.int32)), 40) == (0, 0)  # most types


def test_saved_palette_png_keeps_rare_key_colours_exactly(tmp_path):
    "A key colour drawn on a few dozen pixels only (no nucleus of that type) survives the palette exactly."
    # 400 colours in 20x20 blocks: more colours than the palette, each far more frequent than a key colour
    photo = np.repeat(np.repeat(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8), 20, 0), 20, 1)
    fig, _ = image_grid([[photo]], handles=type_key({1: 'a', 2: 'b', 3: 'c', 4: 'd'}))
    a = np.asarray(Image.open(save_figure(fig, tmp_path / 'k.png')).convert('RGB')).reshape(-1, 3)
    for k in (1, 2, 3, 4): assert (a == type_colour(k)).all(1).sum() >= 10, k
    plt.close(fig)
