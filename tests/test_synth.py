"Synthetic H&E generator: determinism, label invariants, rare-type share."
import numpy as np
import pytest
from nucbook.data.synth import synth_tile, synth_dataset, RARE_TYPE


@pytest.mark.parametrize('seed', [0, 1, 7, 123])
def test_label_invariants(seed):
    s = synth_tile(seed, size=(200, 240), density=1.5)
    s.validate()
    ids = np.unique(s.inst_map)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, s.n_instances + 1))  # contiguous
    assert (s.type_map[s.inst_map == 0] == 0).all()  # background untyped
    for i in range(1, s.n_instances + 1):  # one type per instance, equal to inst_types
        assert set(np.unique(s.type_map[s.inst_map == i])) == {s.inst_types[i - 1]}
    assert np.bincount(s.inst_map.ravel())[1:].min() >= 12  # min_area
    assert set(np.unique(s.inst_types)) <= {1, 2, 3, 4}


def test_deterministic_and_seed_dependent():
    a, b, c = synth_tile(5), synth_tile(5), synth_tile(6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.inst_map, b.inst_map)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize('share', [0.04, 0.15])
def test_rare_share_within_tolerance(share):
    types = np.concatenate([s.inst_types for s in synth_dataset(40, 'train', seed=3, rare_share=share)])
    assert abs((types == RARE_TYPE).mean() - share) < 0.02 + 0.1 * share


def test_types_differ_in_size():
    tiles = synth_dataset(20, 'val')
    area = {t: [] for t in range(1, 5)}
    for s in tiles:
        a = np.bincount(s.inst_map.ravel())[1:]
        for t, ar in zip(s.inst_types, a): area[t].append(ar)
    med = {t: np.median(v) for t, v in area.items()}
    assert med[1] > med[3] > med[2]  # rare 'other' largest, inflammatory smallest


def test_density_scales_count():
    lo = sum(s.n_instances for s in synth_dataset(10, 'test', density=0.5))
    hi = sum(s.n_instances for s in synth_dataset(10, 'test', density=2.0))
    assert hi > 2.5 * lo


def test_bad_arguments():
    with pytest.raises(ValueError, match='rare_share'): synth_tile(rare_share=-0.1)
    with pytest.raises(ValueError, match='at least 16x16'): synth_tile(size=8)
    with pytest.raises(ValueError, match='unknown split'): synth_dataset(1, 'holdout')
