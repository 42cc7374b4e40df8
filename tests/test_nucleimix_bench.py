"""NucleiMix's benchmark row (issue 19, `nucbook.methods.nucleimix.bench_rows`): kind and counts, label validity,
determinism, read-back and resumption without retraining, refusal of changed settings, skips, and agreement with
`NucleiMix.augment(..., inpaint=...)`. The smoke profile runs with 2 ADM training steps and 2 MCG steps here (the
notebook runs the real smoke profile and times it)."""
import json, shutil, time
from dataclasses import replace
import numpy as np
import pytest
import torch
import nucbook.methods.nucleimix as nmx
from nucbook.methods.nucleimix import bench_rows, NucleiMix, NUCLEIMIX_BENCH_PROFILES
from nucbook.core import load_checkpoint
from nucbook.bench.protocol import label_fidelity
from nucbook.data.sample import LabelError, check_sample
from nucbook.engine.loop import SettingsMismatch
from nucbook.engine.diffusion import train_diffusion, make_noise_scheduler
from nucbook.models.adm import ADMUNet, adm_config

pytestmark = pytest.mark.filterwarnings('ignore:fit_context_model')  # 9 rare nuclei: PCA's p capped to 8

FAST = dict(NUCLEIMIX_BENCH_PROFILES['smoke'], diff_steps=2, inpaint_steps=2)  # the smoke profile with fewer steps


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread, as the bench's smoke measurements (and faster than two under `pytest -n 2` on 2 cores)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def first(bench_train, tmp_path_factory):
    "(work, row, seconds) of one call into a fresh folder."
    work = tmp_path_factory.mktemp('nucleimix-a')
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(NUCLEIMIX_BENCH_PROFILES, 'smoke', FAST)
        t0 = time.perf_counter(); r = bench_rows(bench_train, 0, work, n_synthetic=5, rare=1)
    return work, r['NucleiMix'], time.perf_counter() - t0


@pytest.fixture
def fast(monkeypatch): monkeypatch.setitem(NUCLEIMIX_BENCH_PROFILES, 'smoke', FAST)


def same_rows(a, b):
    assert a['inserted'] == b['inserted']
    assert len(a['train']) == len(b['train'])
    for x, y in zip(a['train'], b['train']):
        for f in ('image', 'inst_map', 'type_map', 'inst_types'): np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        assert x.meta.get('image_id') == y.meta.get('image_id')


def test_row_kind_counts_and_labels(bench_train, first):
    work, row, _ = first
    assert sorted(row) == ['generator', 'inserted', 'note', 'synthesises', 'train'] and row['synthesises'] is True
    out, ins = row['train'], row['inserted']
    assert len(out) == len(bench_train) and len(ins) == 3  # k = 3 reached on this set
    assert all(isinstance(p, tuple) and len(p) == 2 for p in ins) and len(set(ins)) == 3
    changed = sorted({i for i, _ in ins})
    for i, (a, b) in enumerate(zip(bench_train, out)):
        check_sample(b, f'row[{i}]')
        if i not in changed: assert b is a; continue
        assert b.meta['method'] == 'NucleiMix' and b.meta['image_id'] == f'NucleiMix-seed0-{i:04d}'
        assert b.meta['source'][0] == a.meta['image_id'] and set(b.meta['source']) <= {s.meta['image_id'] for s in bench_train}
        assert b.inst_types is not None and b.shape == a.shape and not np.array_equal(b.image, a.image)
        # the listed ids are exactly the nuclei the canvas placed (replaced a major one or pasted), all of the rare type
        placed = {r['id'] for r in b.meta['augment'][-1]['instances'] if r['op'] in ('replaced', 'pasted')}
        assert {iid for j, iid in ins if j == i} == placed
        assert all(int(b.inst_types[iid - 1]) == 1 for iid in placed)
    assert len({s.meta['image_id'] for s in out}) == len(out)
    fid = label_fidelity(None, out, ins, predict=lambda s: s)  # what the bench passes them to; a perfect predictor finds all
    assert (fid['n_inserted'], fid['found'], fid['found_typed']) == (3, 1.0, 1.0)
    g = row['generator']
    json.dumps(g)
    assert g['profile'] == 'smoke' and g['steps'] == 2 and g['n_params'] > 0 and g['weights'] == 'random-init'
    assert g['extractor'].startswith('offline') and g['seconds'] > 0 and g['inpaint_tile'] == 48
    assert '3 of k = 3' in row['note']
    assert sorted(p.name for p in work.iterdir()) == ['bench.json', 'diffusion', 'generator.json', 'inpainted', 'plan.npz']


def test_deterministic(bench_train, first, fast, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345); torch.rand(7)  # whatever torch's global generator holds: `seed` alone decides
        same_rows(bench_rows(bench_train, 0, tmp_path, n_synthetic=5, rare=1)['NucleiMix'], first[1])
    a, b = (load_checkpoint(w/'diffusion'/'checkpoint.pt')['state']['model'] for w in (first[0], tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # the same generator, weight for weight


def test_read_back_trains_nothing(bench_train, first, fast, monkeypatch):
    work = first[0]
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob('*') if p.is_file()}
    def boom(*a, **kw): raise AssertionError('recomputed on read-back')
    for name in ('train_diffusion', 'progressive_inpaint'): monkeypatch.setattr(nmx, name, boom)
    monkeypatch.setattr(NucleiMix, 'fit', boom)
    again = bench_rows(bench_train, 0, work, n_synthetic=50, rare=1)['NucleiMix']  # n_synthetic is unused: not a setting
    same_rows(again, first[1])
    assert {p: p.stat().st_mtime_ns for p in work.rglob('*') if p.is_file()} == stamps


def test_resumes_a_stopped_call(bench_train, first, fast, tmp_path, monkeypatch):
    work = tmp_path/'w'; shutil.copytree(first[0], work)
    (work/'generator.json').unlink(); gone = sorted((work/'inpainted').iterdir())[-1]; gone.unlink()
    monkeypatch.setattr(NucleiMix, 'fit', lambda *a, **kw: pytest.fail('the plan was recomputed'))
    calls = []
    real = nmx.progressive_inpaint
    monkeypatch.setattr(nmx, 'progressive_inpaint', lambda *a, **kw: calls.append(1) or real(*a, **kw))
    row = bench_rows(bench_train, 0, work, n_synthetic=5, rare=1)['NucleiMix']
    assert len(calls) == 1 and gone.exists()  # only the missing image is inpainted again
    assert row['generator']['resumed_from'] == FAST['diff_steps']  # the finished diffusion checkpoint, not retrained
    same_rows(row, first[1])


@pytest.mark.parametrize('change, keys', [(dict(k=4), ['k']), (dict(seed=1), ['seed']), (dict(major=[2]), ['nucleimix.major']),
                                          (dict(train=slice(0, 5)), ['data.n', 'data.ids', 'data.pixels'])])
def test_refuses_changed_settings(bench_train, first, fast, change, keys):
    work = first[0]
    args = dict(train=bench_train, seed=0, work=work, n_synthetic=5, rare=1)
    if 'train' in change: change = dict(train=bench_train[change['train']])
    with pytest.raises(SettingsMismatch) as e: bench_rows(**{**args, **change})
    assert sorted(e.value.diffs) == sorted(keys) and str(work) in str(e.value)


def test_refuses_another_profile(bench_train, first, fast):
    with pytest.raises(SettingsMismatch, match='diff_steps'): bench_rows(bench_train, 0, first[0], 5, profile='full', rare=1)


def test_skips_and_bad_arguments(bench_train, tmp_path):
    work = tmp_path/'never'
    untyped = [replace(s, type_map=None, inst_types=None) for s in bench_train]
    for kw in (dict(train=untyped, rare=None), dict(train=untyped, rare=1), dict(train=bench_train, rare=None),
               dict(train=bench_train, rare=9)):  # no types, no rare type, no nucleus of the rare type
        r = bench_rows(kw['train'], 0, work, 5, rare=kw['rare'])
        assert list(r) == ['NucleiMix'] and list(r['NucleiMix']) == ['skip'] and r['NucleiMix']['skip'].endswith('.')
    assert '0 nuclei of the rare types [9]' in bench_rows(bench_train, 0, work, 5, rare=9)['NucleiMix']['skip']
    assert bench_rows(bench_train, 0, work, 5, rare=1, rows=[]) == {}
    assert not work.exists()  # no skip writes anything
    with pytest.raises(ValueError, match=r"unknown rows \['DiffMix'\]"): bench_rows(bench_train, 0, work, 5, rare=1, rows=['DiffMix'])
    with pytest.raises(ValueError, match="unknown profile 'paper'"): bench_rows(bench_train, 0, work, 5, profile='paper', rare=1)
    with pytest.raises(ValueError, match='k must be a whole number'): bench_rows(bench_train, 0, work, 5, k=-1, rare=1)
    with pytest.raises(ValueError, match='no training samples'): bench_rows([], 0, work, 5, rare=1)
    with pytest.raises(LabelError, match='some training samples are typed'): bench_rows(bench_train[:2] + untyped[2:], 0, work, 5, rare=1)


def test_same_as_augment_with_inpainting(bench_train, first, tmp_path):
    "Image-by-image inpainting from the plan gives exactly `NucleiMix.augment(..., inpaint=...)`'s set."
    work, row, _ = first
    shutil.copytree(work/'diffusion', tmp_path/'diffusion')
    ns = make_noise_scheduler()
    drun = train_diffusion(ADMUNet(**adm_config('tiny', image_size=48)), bench_train, tmp_path/'diffusion', steps=FAST['diff_steps'],
                           batch_size=FAST['diff_batch'], patch_size=48, lr=1e-4, seed=0, ckpt_every=10, noise_scheduler=ns)
    assert drun.resumed_from == FAST['diff_steps']
    nm = NucleiMix([1], [2, 3, 4], exclusion=FAST['exclusion']).fit(bench_train, seed=0)
    res = nm.augment(bench_train, 3, seed=0, inpaint=dict(model=drun.ema_model(), noise_scheduler=ns, steps=FAST['inpaint_steps'],
                                                     tile=48, sampler=FAST['sampler']))
    assert sorted((e.image, e.record['id']) for e in res.insertions) == row['inserted']
    for a, b in zip(res.samples, row['train']):
        for f in ('image', 'inst_map', 'inst_types'): np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
