"""InsMix's benchmark row (issue 19, `bench_rows`): kind and record, valid typed and untyped outputs, determinism,
read-back without retraining, exact resume after a crash, refusal of changed settings."""
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from nucbook.augment.canvas import InstanceBank, check_record
from nucbook.core import load_checkpoint
from nucbook.data.crops import random_crop
from nucbook.engine.loop import SettingsMismatch
import nucbook.methods.insmix as insmix_module
from nucbook.methods.insmix import (BENCH_GAN, BENCH_ROWS, InsMix, bench_rows, insmix_from_checkpoint, load_generator,
                                    pasted_mask, smooth)

torch.set_num_threads(1)
KINDS = ('augmentation', 'synthetic', 'train', 'skip')


@pytest.fixture(scope='module')
def first(bench_train, tmp_path_factory):
    "The row trained once (seed 0, smoke) into a folder: (rows, folder)."
    work = tmp_path_factory.mktemp('insmix-seed0')
    return bench_rows(bench_train, 0, work, n_synthetic=4, profile='smoke', rare=1), work


def weights(work) -> dict: return load_generator(Path(work)/'smooth_gan.pt').state_dict()


def outputs(row, samples, n=6) -> list:
    "The row's augmentation applied to 96 px crops of the first `n` samples (seeded), with `samples` as the pool."
    aug = row['augmentation']()
    return [aug(random_crop(s, 96, i), rng=i, pool=samples) for i, s in enumerate(samples[:n])]


def test_row_kind_and_record(first, bench_train):
    rows, work = first
    assert list(rows) == list(BENCH_ROWS) == ['InsMix']
    row = rows['InsMix']
    assert [k for k in KINDS if k in row] == ['augmentation'] and row['synthesises'] is True
    g = json.loads(json.dumps(row['generator']))  # JSON-serialisable
    assert g == row['generator'] and g['profile'] == 'smoke' and g['seed'] == 0
    assert {k: g[k] for k in BENCH_GAN['smoke']} == BENCH_GAN['smoke']
    G = load_generator(g['weights'])
    assert Path(g['weights']) == work/'smooth_gan.pt' and g['n_params'] == sum(p.numel() for p in G.parameters())
    assert g['seconds'] > 0 and g['n_params'] > 0 and g['discriminator_params'] > 0
    a, b = row['augmentation'](), row['augmentation']()  # a zero-argument factory: a new InsMix each call
    assert isinstance(a, InsMix) and a is not b and a.parts == ['paste:ssd', 'smooth', 'bgp']
    assert len(a.bank) == len(InstanceBank.from_samples(bench_train)) and a.bank.typed
    for (n, p), q in zip(a.generator.state_dict().items(), G.state_dict().values()): assert torch.equal(p, q), n
    assert json.loads((work/'bench.json').read_text())['seed'] == 0


def test_outputs_are_insmix_of_the_trained_generator(first, bench_train):
    "Valid typed Samples; exactly the unsmoothed InsMix with the same draws, but with S(u) of the trained G on the pastes."
    row = first[0]['InsMix']
    G = load_generator(first[1]/'smooth_gan.pt')
    plain = InsMix(InstanceBank.from_samples(bench_train), paste='ssd', bgp=True)  # same draws, no smoothing
    n_smoothed = 0
    for i, s in enumerate(bench_train):
        crop = random_crop(s, 96, i)
        out = row['augmentation']()(crop, rng=i, pool=bench_train)
        ref = plain(crop, rng=i, pool=bench_train)
        out.sample.validate(); check_record(out.record)
        assert out.sample.inst_types is not None
        assert set(out.sample.inst_types.tolist()) <= {int(t) for t_ in bench_train for t in t_.inst_types}
        assert [st['op'] for st in out.record['steps']] == ['ssd_copy_paste', 'smooth', 'background_perturbation']
        np.testing.assert_array_equal(out.sample.inst_map, ref.sample.inst_map)
        M = pasted_mask(out.sample, out.record)
        np.testing.assert_array_equal(out.sample.image[~M], ref.sample.image[~M])
        # background perturbation moves only nucleus-free patches, so smoothing the unsmoothed result's pastes gives ours
        np.testing.assert_array_equal(out.sample.image, smooth(G, ref.sample.image, M, (ref.sample.inst_map > 0) & ~M))
        n_smoothed += int(M.sum())
    assert n_smoothed > 0  # some crops got pastes, and they were smoothed


def test_same_seed_same_outputs_other_seed_other_weights(first, bench_train, tmp_path):
    rows, work = first
    again = bench_rows(bench_train, 0, tmp_path/'a', n_synthetic=4, profile='smoke', rare=1)['InsMix']
    for (n, p), q in zip(weights(work).items(), weights(tmp_path/'a').values()): assert torch.equal(p, q), n
    for x, y in zip(outputs(rows['InsMix'], bench_train), outputs(again, bench_train)):
        np.testing.assert_array_equal(x.sample.image, y.sample.image)
        np.testing.assert_array_equal(x.sample.inst_map, y.sample.inst_map)
        np.testing.assert_array_equal(x.sample.inst_types, y.sample.inst_types)
    bench_rows(bench_train, 1, tmp_path/'b', n_synthetic=4, profile='smoke', rare=1)
    assert any(not torch.equal(p, q) for p, q in zip(weights(work).values(), weights(tmp_path/'b').values()))


def test_read_back_does_not_retrain(first, bench_train, monkeypatch):
    rows, work = first
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    def no_training(*a, **kw): raise AssertionError('train_smooth_gan called on a finished folder')
    monkeypatch.setattr(insmix_module, 'train_smooth_gan', no_training)
    # n_synthetic, k and rare do not shape this row: other values read the same folder back
    back = bench_rows(bench_train, 0, work, n_synthetic=100, profile='smoke', k=7, rare=None)['InsMix']
    assert back['generator'] == rows['InsMix']['generator']
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before
    np.testing.assert_array_equal(outputs(back, bench_train, 2)[1].sample.image, outputs(rows['InsMix'], bench_train, 2)[1].sample.image)


def test_resume_after_a_crash_gives_the_uninterrupted_weights(first, bench_train, tmp_path, monkeypatch):
    real = insmix_module.train_smooth_gan
    def crash(*a, **kw):  # trains a first chunk (stopped with a checkpoint after the first step), then the process "dies"
        real(*a, **{**kw, 'max_seconds': 1e-9}); raise KeyboardInterrupt('killed')
    monkeypatch.setattr(insmix_module, 'train_smooth_gan', crash)
    with pytest.raises(KeyboardInterrupt): bench_rows(bench_train, 0, tmp_path, n_synthetic=4)
    assert not (tmp_path/'generator.json').exists()
    assert 0 < load_checkpoint(tmp_path/'smooth_gan.pt')['step'] < BENCH_GAN['smoke']['steps']  # stopped part-way
    monkeypatch.setattr(insmix_module, 'train_smooth_gan', real)
    rec = bench_rows(bench_train, 0, tmp_path, n_synthetic=4)['InsMix']['generator']
    assert rec['steps'] == BENCH_GAN['smoke']['steps'] and (tmp_path/'generator.json').exists()
    for (n, p), q in zip(weights(first[1]).items(), weights(tmp_path).values()): torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize('change, key', [(dict(seed=1), 'seed'), (dict(profile='full'), 'gan.steps'),
                                         (dict(train=slice(0, 5)), 'data.n')])
def test_changed_settings_are_refused(first, bench_train, change, key):
    work = first[1]
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    args = dict(train=bench_train, seed=0, work=work, n_synthetic=4, profile='smoke', rare=1)
    if 'train' in change: change = dict(train=bench_train[change['train']])
    with pytest.raises(SettingsMismatch, match=key) as e: bench_rows(**{**args, **change})
    assert str(work) in str(e.value) and 'another folder' in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before  # nothing trained or rewritten


def test_unreadable_settings_file(bench_train, tmp_path):
    (tmp_path/'bench.json').write_text('{not json')
    with pytest.raises(ValueError, match='bench.json: not readable JSON'): bench_rows(bench_train, 0, tmp_path, 4)


def test_untyped_data(bench_untyped, tmp_path):
    "The row works on untyped data (it is not a rare-class row): untyped bank, untyped outputs."
    rows = bench_rows(bench_untyped, 0, tmp_path, n_synthetic=4, profile='smoke', rare=None)
    assert list(rows) == ['InsMix'] and 'skip' not in rows['InsMix'] and 'augmentation' in rows['InsMix']
    aug = rows['InsMix']['augmentation']()
    assert not aug.bank.typed
    for o in outputs(rows['InsMix'], bench_untyped):
        o.sample.validate(); assert o.sample.inst_types is None and o.sample.type_map is None


def test_arguments(bench_train, tmp_path):
    assert bench_rows(bench_train, 0, tmp_path/'none', 4, rows=[]) == {} and not (tmp_path/'none').exists()  # nothing trained
    with pytest.raises(ValueError, match=r"unknown rows \['\+SSD'\]"): bench_rows(bench_train, 0, tmp_path, 4, rows=['+SSD'])
    with pytest.raises(ValueError, match="profile must be one of"): bench_rows(bench_train, 0, tmp_path, 4, profile='paper')
    with pytest.raises(ValueError, match='needs the training Samples'): bench_rows([], 0, tmp_path, 4)
    assert not any(tmp_path.iterdir())


def test_factory_helper(first, bench_train):
    bank = InstanceBank.from_samples(bench_train)
    a = insmix_from_checkpoint(bank, first[1]/'smooth_gan.pt')
    assert a.parts == ['paste:ssd', 'smooth', 'bgp'] and a.bank is bank
    assert insmix_from_checkpoint(bank, first[1]/'smooth_gan.pt', bgp=False).parts == ['paste:ssd', 'smooth']
