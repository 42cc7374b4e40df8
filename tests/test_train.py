"""Trainer: resume after a real SIGKILL ends with the same state as an uninterrupted run; DDP (gloo, 2 processes);
the papers' schedules; the baseline notebook's smoke profile through `nucbook run`. (The loop itself, refusals of
changed settings and `extend`: tests/test_loop.py.)"""
import json, os, signal, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
from nucbook.core import load_checkpoint
from nucbook.engine.train import TrainConfig, epoch_batches, lr_curve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'NO_ALBUMENTATIONS_UPDATE': '1', 'MPLBACKEND': 'Agg'}

RUN = textwrap.dedent('''
    import os, signal, sys, torch
    from nucbook.models.hovernet import HoVerNet
    from nucbook.engine.train import fit
    from nucbook.data.synth import synth_dataset
    from nucbook.core import seed_everything
    out, kill_at = sys.argv[1], int(sys.argv[2])
    def killer(t):
        if t.global_step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
    seed_everything(int(sys.argv[3]))  # Python, NumPy and torch
    tr = fit(HoVerNet('tiny', n_types=4), synth_dataset(4, 'train', seed=0, size=96), None, out, epochs=2, batch_size=2,
             crop_size=64, crops_per_image=2, T_0=1, ckpt_every=2, callbacks=[killer], progress=False, threads=1)
    torch.save(tr.state_dict(), os.path.join(out, 'final.pt'))
''')


def _run(script, *args, cwd, timeout=240):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _assert_same(a, b, path='state'):
    "Recursive exact equality of nested checkpoint states (tensors, arrays, numbers, containers)."
    if isinstance(a, torch.Tensor): assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray): assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a: _assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)): _assert_same(x, y, f'{path}[{i}]')
    else: assert a == b or (a != a and b != b), f'{path}: {a} != {b}'


def test_killed_run_resumes_to_identical_state(tmp_path):
    script = tmp_path/'run.py'; script.write_text(RUN)
    full, killed = tmp_path/'full', tmp_path/'killed'
    p = _run(script, full, 0, 0, cwd=tmp_path); assert p.returncode == 0, p.stderr
    p = _run(script, killed, 7, 0, cwd=tmp_path)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)  # really killed, no clean-up ran
    ck = load_checkpoint(killed/'last.pt')
    assert ck['step'] == 6 and ck['state']['epochs']['n'] == 2  # mid-epoch checkpoint: the epoch's loss sums kept
    assert not (killed/'final.pt').exists() and not list(killed.glob('.*.tmp'))
    p = _run(script, killed, 0, 99, cwd=tmp_path); assert p.returncode == 0, p.stderr  # other init seed: overridden
    assert 'resumed from' in p.stderr
    a, b = torch.load(full/'final.pt', weights_only=False), torch.load(killed/'final.pt', weights_only=False)
    for k in ('model', 'optimizer', 'scheduler', 'scaler'): _assert_same(a['state'][k], b['state'][k], k)
    for k in ('step', 'steps', 'settings', 'history', 'rng'): _assert_same(a[k], b[k], k)  # rng: Python, NumPy, torch
    drop = lambda h: [{k: v for k, v in r.items() if k not in ('time_s', 'images_per_s')} for r in h]
    assert drop(a['state']['epochs']['rows']) == drop(b['state']['epochs']['rows'])
    assert a['step'] == 8 and len(a['state']['epochs']['rows']) == 2
    assert not all(torch.equal(ck['state']['model'][k], a['state']['model'][k]) for k in ck['state']['model'])  # 7-8 trained


DDP = textwrap.dedent('''
    import os, sys, torch
    from nucbook.models.hovernet import HoVerNet
    from nucbook.engine.train import fit
    from nucbook.data.synth import synth_dataset
    out = sys.argv[1]
    torch.manual_seed(0)
    tr = fit(HoVerNet('tiny'), synth_dataset(4, 'train', seed=0, size=96), None, out, epochs=2, batch_size=2,
             crop_size=64, crops_per_image=2, progress=False, threads=1)
    torch.save({'params': dict(tr.raw_model.named_parameters()), 'rank': tr.rank, 'world': tr.world,
                'steps': tr.global_step}, os.path.join(out, f'rank{tr.rank}.pt'))
''')


def test_ddp_gloo_two_processes(tmp_path):
    script = tmp_path/'ddp.py'; script.write_text(DDP)
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(out/f'rank{r}.pt', weights_only=False) for r in (0, 1))
    assert (r0['rank'], r1['rank'], r0['world']) == (0, 1, 2)
    assert r0['steps'] == r1['steps'] == 4  # 8 items per epoch shared by 2 processes, batches of 2, 2 epochs
    for k in r0['params']: assert torch.equal(r0['params'][k], r1['params'][k]), k  # gradients were all-reduced
    ck = load_checkpoint(out/'last.pt')
    assert ck['settings']['world'] == 2 and ck['step'] == 4 and len(ck['state']['epochs']['rows']) == 2
    assert json.loads((out/'train_log.json').read_text())[-1]['epoch'] == 2


def test_ddp_shares_are_disjoint_and_equal():
    shares = [epoch_batches(37, 4, seed=3, epoch=5, rank=r, world=3) for r in range(3)]
    keys = [{k for b in s for k in b} for s in shares]
    assert len({len(s) for s in shares}) == 1 and not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])
    assert all(len(b) == 4 for s in shares for b in s)


def test_schedules():
    insmix = dict(epochs=300, lr=1e-3, weight_decay=1e-4, T_0=50, T_mult=1, eta_min=0.0)
    nucleimix = dict(epochs=100, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, T_0=25, T_mult=1, eta_min=1e-5)
    ins = lr_curve(TrainConfig(**insmix), steps_per_epoch=2)
    assert ins[0] == pytest.approx(1e-3) and ins[100] == pytest.approx(1e-3) and ins[50] == pytest.approx(5e-4)
    nm = lr_curve(TrainConfig(**nucleimix))
    assert nm[0] == pytest.approx(1e-4) and nm[25] == pytest.approx(1e-4) and nm[24] == pytest.approx(1e-5 + 4.5e-5 * (1 + np.cos(np.pi * 24 / 25)))


def test_smoke_notebook_beats_untrained(tmp_path):
    nucbook = Path(sys.executable).parent/'nucbook'
    cmd = [str(nucbook), 'run', '10a_baseline', '--profile', 'smoke', '--out', str(tmp_path/'run'), '--no-progress']
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert m['dataset'] == 'synthetic' and m['profile'] == 'smoke' and m['model_size'] == 'tiny'
    assert m['aji'] > m['untrained_aji'] + 0.2 and m['aji'] > 0.3, m
    assert m['dice1'] > 0.8 and 0 <= m['classification']['F_d'] <= 1
    assert (tmp_path/'run'/'predictions.png').exists() and (tmp_path/'run'/'train'/'last.pt').exists()
    # a re-run into the same folder with other settings is refused, and the records keep saying what ran
    before = (tmp_path/'run'/'metrics.json').read_text()
    p = subprocess.run(cmd + ['-p', 'epochs', '10'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'epochs' in p.stderr and 'cannot be shortened' in p.stderr, p.stderr[-3000:]
    rec = json.loads((tmp_path/'run'/'params.json').read_text())
    assert rec['status'] == 'failed' and 'epochs' in rec['error']
    assert (tmp_path/'run'/'metrics.json').read_text() == before  # the finished run's metrics are not relabelled
    # training on is explicit: one more epoch with extend, and the records say 21
    p = subprocess.run(cmd + ['-p', 'epochs', '21', '-p', 'extend', 'true'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    m2 = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert m2['epochs'] == 21 and json.loads((tmp_path/'run'/'params.json').read_text())['resolved']['epochs'] == 21


def test_baseline_notebook_on_an_own_folder_records_what_ran(tmp_path):
    "`nucbook run 10a_baseline -p dataset <folder>` on plain images/ + labels/: a seeded split, recorded with the folder."
    from nucbook.data.synth import synth_dataset
    from nucbook.data.datasets import save_own_folder
    folder = tmp_path/'mydata'
    save_own_folder(synth_dataset(8, 'train', seed=5, size=128), folder, types=False)
    assert sorted(p.name for p in folder.iterdir()) == ['images', 'labels']
    cmd = [str(Path(sys.executable).parent/'nucbook'), 'run', '10a_baseline', '-p', 'dataset', 'mydata', '-p', 'epochs', '1',
           '--out', str(tmp_path/'run'), '--no-progress']
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)  # a relative folder name
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rec = json.loads((tmp_path/'run'/'params.json').read_text())['resolved']
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    for d in (rec, m):
        assert d['dataset_resolved'] == str(folder.resolve()) and d['dataset_kind'] == 'folder'
        assert d['split'] == {'method': 'seeded', 'test_share': 0.25, 'val_share': 0.0, 'seed': 0}
        assert (d['counts']['train']['images'], d['counts']['test']['images']) == (6, 2)
        assert d['counts']['train']['nuclei'] + d['counts']['test']['nuclei'] > 0
    assert 'n_train' not in rec and 'n_test' not in rec  # the synthetic sizes are not recorded for an own folder
    nb = (tmp_path/'run'/'10a_baseline.ipynb').read_text()
    assert 'SEEDED split' in nb


def test_snapshot_and_warm_start(tmp_path):
    "snapshot_epochs keeps epoch-n weights (atomically); init_weights starts from them; both are checked settings."
    from nucbook.data.synth import synth_dataset
    from nucbook.engine.loop import SettingsMismatch
    from nucbook.engine.train import fit, weights_path, load_weights, save_weights
    from nucbook.models.hovernet import HoVerNet
    data = synth_dataset(4, 'train', seed=0, size=96)
    kw = dict(batch_size=2, crop_size=64, crops_per_image=2, T_0=2, progress=False, threads=1)
    torch.manual_seed(0)
    base = fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'base', epochs=3, snapshot_epochs=(1, 2), **kw)
    assert sorted(p.name for p in (tmp_path/'base').glob('weights_*')) == ['weights_epoch1.pt', 'weights_epoch2.pt']
    assert not list((tmp_path/'base').glob('.*.tmp'))  # written atomically: no temporary file left
    snap = load_checkpoint(weights_path(tmp_path/'base', 2))
    assert (snap['epoch'], snap['step']) == (2, 8) and snap['model_settings']['class'] == 'HoVerNet'
    torch.manual_seed(0)  # the same run stopped after 2 epochs ends with the snapshot's weights, bit for bit
    ref = fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'ref', epochs=2, **kw)
    assert all(torch.equal(v, snap['model'][k]) for k, v in ref.raw_model.state_dict().items())
    assert not any(torch.equal(v, snap['model'][k]) for k, v in base.raw_model.state_dict().items() if v.is_floating_point() and v.numel() > 1)
    # a warm start with lr 0 keeps the snapshot's parameters exactly: the run started from them, not from its own init
    torch.manual_seed(1)
    warm = fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'warm', epochs=1, init_weights=str(weights_path(tmp_path/'base', 2)),
               **{**kw, 'lr': 0.0})
    assert all(torch.equal(p.detach(), snap['model'][k]) for k, p in warm.raw_model.named_parameters())
    # with lr > 0 it trains on from them: fresh optimiser (step counts from 0) and schedule (lr back at its peak)
    warm2 = fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'warm2', epochs=1, init_weights=str(weights_path(tmp_path/'base', 2)), **kw)
    assert warm2.history[0]['epoch'] == 1 and warm2.global_step == 4
    st = warm2.state_dict()['state']['optimizer']['state'][0]['step']
    assert float(st) == 4.0
    # refusals on resume: another init file, none, changed snapshot epochs, the init file's content changed
    w = str(weights_path(tmp_path/'base', 2))
    with pytest.raises(SettingsMismatch, match='init_weights'):
        fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'warm2', epochs=1, init_weights=str(weights_path(tmp_path/'base', 1)), **kw)
    with pytest.raises(SettingsMismatch, match='init_weights'): fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'warm2', epochs=1, **kw)
    with pytest.raises(SettingsMismatch, match='snapshot_epochs'):
        fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'base', epochs=3, snapshot_epochs=(1,), **kw)
    save_weights(w, HoVerNet('tiny', n_types=4), epoch=2, step=8)  # same path, other weights
    with pytest.raises(SettingsMismatch, match='init_weights_sha1'):
        fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'warm2', epochs=1, init_weights=w, **kw)
    again = fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'base', epochs=3, snapshot_epochs=(1, 2), **kw)  # same settings: finished
    assert again.global_step == 12
    with pytest.raises(ValueError, match=r'snapshot_epochs must be a tuple of epochs in 1\.\.3'):
        fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'x', epochs=3, snapshot_epochs=(0,), **kw)
    with pytest.raises(FileNotFoundError, match='missing.pt: init_weights file not found'):
        fit(HoVerNet('tiny', n_types=4), data, None, tmp_path/'x', epochs=1, init_weights=str(tmp_path/'missing.pt'), **kw)
    with pytest.raises(ValueError, match=r'do not fit the HoVerNet: shapes \(file vs model\) decoder.tp.u0.conv.weight \(5, 8, 1, 1\) vs \(6, 8, 1, 1\)'):
        load_weights(HoVerNet('tiny', n_types=5), w)
