"""The resumable loop (`nucbook.engine.loop`) and the trainers on it: exact resume after SIGKILL, a failed save, a
`max_seconds` stop or an exception; refusal of changed settings; `extend`; rank-0-only writing. CPU, one thread."""
import importlib.util, json, os, re, signal, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
from nucbook.core import load_checkpoint
from nucbook.data.synth import synth_dataset
from nucbook.engine import loop as loop_mod
from nucbook.engine.loop import (LossHistory, ResumableLoop, SettingsMismatch, checkpoint_state, claim_settings, describe,
                                 settings_diff, step_seed)

torch.set_num_threads(1)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'NO_ALBUMENTATIONS_UPDATE': '1'}

# A toy regression whose step data is a function of (seed, step); dropout and the `aux` term draw from the global
# torch generator, so an exact resume also needs the random state of the checkpoint.
TOY = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import torch
    from nucbook.engine.loop import ResumableLoop, step_seed
    torch.set_num_threads(1)

    def toy_loop(folder, steps=12, lr=0.05, batch_size=16, crop_size=32, seed=0, init_seed=0, width=16, data=(),
                 calls=None, callbacks=(), **kw):
        torch.manual_seed(init_seed)
        net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1))
        opt = torch.optim.Adam(net.parameters(), lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
        def step_fn(step):
            if calls is not None: calls.append(step)
            g = torch.Generator().manual_seed(step_seed(seed, step))
            x = torch.rand(batch_size, 1, generator=g); y = 3 * x - 1 + 0.1 * torch.randn(batch_size, 1, generator=g)
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
            return {'loss': loss.item(), 'aux': float(torch.rand(()))}
        settings = dict(lr=lr, batch_size=batch_size, crop_size=crop_size, seed=seed, model=net, data=list(data))
        return ResumableLoop(Path(folder)/'ckpt.pt', {'net': net, 'opt': opt, 'sched': sched}, settings, steps, step_fn,
                             callbacks=callbacks, progress=False, **kw)

    if __name__ == '__main__':
        folder, kill_at = sys.argv[1], int(sys.argv[2])
        def killer(loop, terms):
            if loop.step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        toy_loop(folder, ckpt_every=3, callbacks=[killer]).run()
''')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "The toy module (also run as a script by the SIGKILL test)."
    path = tmp_path_factory.mktemp('toy')/'toy.py'; path.write_text(TOY)
    spec = importlib.util.spec_from_file_location('toy', path); mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod); mod.path = path
    return mod


@pytest.fixture(scope='module')
def full(toy, tmp_path_factory):
    "The uninterrupted 12-step toy run."
    return toy.toy_loop(tmp_path_factory.mktemp('full')).run()


class Stop(Exception): pass


def stop_at(k):
    def cb(loop, terms):
        if loop.step == k: raise Stop
    return cb


def assert_same(a, b, path='state'):
    "Recursive exact equality of nested states (tensors, arrays, numbers, containers)."
    if isinstance(a, torch.Tensor): assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray): assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a: assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f'{path}[{i}]')
    else: assert a == b or (a != a and b != b), f'{path}: {a} != {b}'


def assert_same_run(a, b):
    "Two loops ended in the same state: weights, optimiser, scheduler, random state, history, step."
    ca, cb = a.checkpoint(), b.checkpoint()
    for k in ('state', 'rng', 'history', 'step', 'steps', 'settings'): assert_same(ca[k], cb[k], k)


def test_sigkill_mid_run_resumes_bit_identical(toy, full, tmp_path):
    p = subprocess.run([sys.executable, str(toy.path), str(tmp_path), '7'], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])  # really killed: no clean-up ran
    assert load_checkpoint(tmp_path/'ckpt.pt')['step'] == 6 and not list(tmp_path.glob('.*tmp'))
    calls = []
    resumed = toy.toy_loop(tmp_path, init_seed=99, calls=calls).run()  # another initialisation: the checkpoint wins
    assert calls == list(range(6, 12)) and resumed.resumed_from == 6 and resumed.finished
    assert_same_run(full, resumed)
    # the equality is not trivial: a run that ignored the checkpoint (from init 99) ends elsewhere
    fresh = toy.toy_loop(tmp_path/'fresh', init_seed=99).run()
    assert not torch.equal(fresh.state['net'][0].weight, full.state['net'][0].weight)


def test_exception_then_resume_and_finished_run_is_returned(toy, full, tmp_path):
    with pytest.raises(Stop): toy.toy_loop(tmp_path, ckpt_every=4, callbacks=[stop_at(10)]).run()
    assert load_checkpoint(tmp_path/'ckpt.pt')['step'] == 8
    assert_same_run(full, toy.toy_loop(tmp_path, ckpt_every=4).run())
    calls = []
    again = toy.toy_loop(tmp_path, calls=calls).run()  # finished: loaded, nothing trained
    assert calls == [] and again.resumed_from == 12
    assert_same_run(full, again)


def test_max_seconds_chunks_and_clean_stop(toy, full, tmp_path):
    n = 0
    while True:
        chunk = toy.toy_loop(tmp_path, max_seconds=0).run(); n += 1  # one step per call
        if chunk.finished: break
        assert chunk.stopped and load_checkpoint(tmp_path/'ckpt.pt')['step'] == n
    assert n == 12
    assert_same_run(full, chunk)
    def stop5(loop, terms):
        if loop.step == 5: loop.stop()
    lp = toy.toy_loop(tmp_path/'stop', callbacks=[stop5]).run()
    assert lp.stopped and lp.step == 5 and load_checkpoint(tmp_path/'stop'/'ckpt.pt')['step'] == 5
    assert_same_run(full, lp.run())  # calling run again on the same loop goes on


def test_checkpoint_every_n_seconds(toy, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(loop_mod, 'save_checkpoint', lambda path, st: saved.append(st['step']))
    toy.toy_loop(tmp_path, steps=4, ckpt_seconds=0).run()
    assert saved == [1, 2, 3, 4]
    saved.clear(); toy.toy_loop(tmp_path/'b', steps=5, ckpt_every=2).run()
    assert saved == [2, 4, 5]  # and always at the end


def test_failed_save_keeps_the_previous_checkpoint(toy, full, tmp_path, monkeypatch):
    real_save, n = torch.save, []
    def flaky(obj, f, *a, **k):
        n.append(1)
        if len(n) == 2:  # the second save dies half-way
            if isinstance(f, (str, os.PathLike)): f = open(f, 'wb')
            f.write(b'half a checkpoint'); f.flush(); raise OSError('disk full')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', flaky)
    with pytest.raises(OSError, match='disk full'): toy.toy_loop(tmp_path, ckpt_every=5).run()
    monkeypatch.setattr(torch, 'save', real_save)
    assert load_checkpoint(tmp_path/'ckpt.pt')['step'] == 5  # the first checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']  # no temporary file left
    assert_same_run(full, toy.toy_loop(tmp_path, ckpt_every=5).run())


@pytest.mark.parametrize('change,contains', [
    (dict(lr=0.1), 'lr: 0.05 in the checkpoint, 0.1 now'),
    (dict(batch_size=8), 'batch_size: 16 in the checkpoint, 8 now'),
    (dict(crop_size=64), 'crop_size: 32 in the checkpoint, 64 now'),
    (dict(width=8), 'model.parameters: 49 in the checkpoint, 25 now'),
    (dict(data='other'), 'data.ids'),
    (dict(steps=20), 'pass extend=True'),
    (dict(steps=8), 'cannot be shortened'),
    (dict(steps=8, extend=True), 'cannot be shortened'),
])
def test_refuses_other_settings(toy, change, contains, tmp_path):
    tiles = synth_dataset(3, 'train', seed=0, size=32)
    change = {**change, 'data': tiles[:2] if change.get('data') == 'other' else tiles}
    toy.toy_loop(tmp_path, data=tiles, steps=12, ckpt_every=100).run()
    with pytest.raises(SettingsMismatch) as e: toy.toy_loop(tmp_path, **change).run()
    msg = str(e.value)
    assert contains in msg and str(tmp_path/'ckpt.pt') in msg, msg
    if 'data' in contains: assert 'data.n: 3 in the checkpoint, 2 now' in msg
    assert load_checkpoint(tmp_path/'ckpt.pt')['step'] == 12  # untouched
    fresh = toy.toy_loop(tmp_path, resume=False, **{k: v for k, v in change.items() if k != 'extend'}).run()
    assert fresh.resumed_from == 0 and fresh.finished  # resume=False starts over with the new settings


def test_extend_equals_a_straight_run(toy, full, tmp_path):
    toy.toy_loop(tmp_path).run()
    longer = toy.toy_loop(tmp_path, steps=16, extend=True).run()
    assert longer.resumed_from == 12 and longer.step == 16
    assert_same_run(toy.toy_loop(tmp_path/'straight', steps=16).run(), longer)


def test_other_state_names_refused_and_checkpoint_state(toy, full, tmp_path):
    lp = toy.toy_loop(tmp_path, steps=2).run()
    net = lp.state['net']
    odd = ResumableLoop(tmp_path/'ckpt.pt', {'model': net}, lp.settings, 2, lambda s: {}, progress=False)
    with pytest.raises(ValueError, match="holds the states"): odd.run()
    w = checkpoint_state(tmp_path/'ckpt.pt', 'net')
    assert all(torch.equal(w[k], v) for k, v in net.state_dict().items())
    with pytest.raises(KeyError, match='no state'): checkpoint_state(tmp_path/'ckpt.pt', 'model')
    torch.save({'model': net.state_dict()}, tmp_path/'old.pt')
    with pytest.raises(ValueError, match='older format'):
        ResumableLoop(tmp_path/'old.pt', {'net': net}, {}, 2, lambda s: {}, progress=False).run()


def test_only_rank_zero_writes(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, 'world_info', lambda: (1, 1))  # a rank-1 process (collectives not needed here)
    lp = toy.toy_loop(tmp_path, steps=3, ckpt_every=1).run()
    lp.save_copy(tmp_path/'best.pt')
    assert lp.finished and not list(tmp_path.iterdir())


def test_history_is_bounded_and_exact():
    h = LossHistory(every=1, max_records=8)
    for s in range(1, 101): h.add(s, {'loss': float(s)})
    assert len(h) <= 8 and h.every == 16 and h['step'] == [16, 32, 48, 64, 80, 96]
    assert h['loss'] == [np.mean(np.arange(a - 15, a + 1)) for a in (16, 32, 48, 64, 80, 96)]
    with pytest.raises(ValueError, match='even'): LossHistory(max_records=5)
    h = LossHistory(every=3)
    for s in range(1, 5): h.add(s, {'loss': float(s)})  # one block done, one step pending
    h2 = LossHistory(); h2.load_state_dict(h.state_dict())  # as a resumed run does
    for x in (h, h2): x.add(5, {'loss': 5.0}); x.add(6, {'loss': 6.0})
    assert h2.records == h.records == {'step': [3, 6], 'loss': [2.0, 5.0]}


def test_settings_describe_online_plugins_and_models():
    from nucbook.augment.mix import CutOut, as_transform
    from nucbook.models.hovernet import HoVerNet
    a = describe({'online': [as_transform(CutOut(), p=0.5)], 'model': HoVerNet('tiny')})
    b = describe({'online': [as_transform(CutOut(side=(0.1, 0.2)), p=0.3)], 'model': HoVerNet('tiny', n_types=2)})
    d = settings_diff(a, b)
    assert {'online', 'model.n_types', 'model.parameters', 'model.shapes'} <= set(d), d
    assert d['online'][0][0]['captured']['p'] == 0.5 and step_seed(1, 2) != step_seed(2, 1)


# --- the segmenter Trainer on the loop

@pytest.fixture(scope='module')
def seg_train():
    return synth_dataset(4, 'train', seed=0, size=64)


def _fit(folder, train, stop=None, init_seed=0, extend=False, **kw):
    from nucbook.models.hovernet import HoVerNet
    from nucbook.engine.train import fit
    def stopper(t):
        if t.global_step == stop: raise Stop
    torch.manual_seed(init_seed)
    args = dict(epochs=2, batch_size=2, crop_size=32, crops_per_image=2, T_0=1, ckpt_every=3, progress=False, threads=1)
    model = HoVerNet('tiny', n_types=kw.pop('n_types', 4))
    return fit(model, train, None, folder, extend=extend, callbacks=[stopper], **{**args, **kw})


def test_trainer_resumes_exactly_and_refuses_other_settings(seg_train, tmp_path):
    full = _fit(tmp_path/'full', seg_train)
    assert full.global_step == 8 and len(full.history) == 2
    with pytest.raises(Stop): _fit(tmp_path/'cut', seg_train, stop=7)
    ck = load_checkpoint(tmp_path/'cut'/'last.pt')
    assert ck['step'] == 6 and ck['state']['epochs']['n'] == 2 and len(ck['state']['epochs']['rows']) == 1
    resumed = _fit(tmp_path/'cut', seg_train, init_seed=5)
    assert resumed.loop.resumed_from == 6
    a, b = full.state_dict(), resumed.state_dict()
    for k in ('model', 'optimizer', 'scheduler', 'scaler'): assert_same(a['state'][k], b['state'][k], k)
    assert_same(a['rng'], b['rng']); assert_same(a['history'], b['history'])
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ('time_s', 'images_per_s')} for r in rows]
    assert drop(full.history) == drop(resumed.history)
    out = tmp_path/'full'
    for kw, key in [(dict(lr=2e-3), 'lr: 0.001 in the checkpoint, 0.002 now'), (dict(batch_size=4), 'batch_size'),
                    (dict(crop_size=48), 'crop_size: 32 in the checkpoint, 48 now'), (dict(n_types=3), 'model.n_types'),
                    (dict(loss_weights={'np_dice': 2.0}), 'loss_weights'), (dict(seed=1), 'seed'),
                    (dict(epochs=3), 'extend=True')]:
        with pytest.raises(SettingsMismatch, match=key.replace('(', r'\(')) as e: _fit(out, seg_train, **kw)
        assert str(out/'last.pt') in str(e.value)
    with pytest.raises(SettingsMismatch, match='data.train.n: 4 in the checkpoint, 3 now'): _fit(out, seg_train[:3])
    with pytest.raises(SettingsMismatch, match='data.extra_train.n: 0 in the checkpoint, 1 now'):
        _fit(out, seg_train, extra_train=seg_train[:1])
    from nucbook.augment.mix import CutOut, as_transform
    with pytest.raises(SettingsMismatch, match='online'): _fit(out, seg_train, online=[as_transform(CutOut(), p=0.5)])
    again = _fit(out, seg_train, progress=True, ckpt_every=0, threads=1)  # how-to-run fields may change
    assert again.loop.resumed_from == 8 and again.global_step == 8
    more = _fit(out, seg_train, epochs=3, extend=True)
    assert (more.loop.resumed_from, more.global_step, [r['epoch'] for r in more.history]) == (8, 12, [1, 2, 3])


def test_trainer_max_seconds(seg_train, tmp_path):
    tr = _fit(tmp_path, seg_train, epochs=1, max_seconds=0)
    assert not tr.finished and tr.global_step == 1 and load_checkpoint(tmp_path/'last.pt')['step'] == 1
    tr = _fit(tmp_path, seg_train, epochs=1)
    assert tr.finished and tr.global_step == 4 and tr.loop.resumed_from == 1 and len(tr.history) == 1


# --- diffusion on the loop

def test_diffusion_chunks_refusal_extend(tmp_path):
    from nucbook.engine.diffusion import make_unet, train_diffusion
    tiles = synth_dataset(3, 'train', seed=0, size=32)
    def unet(): torch.manual_seed(0); return make_unet('tiny', sample_size=16)
    kw = dict(steps=4, batch_size=2, patch_size=16, lr=1e-3, ckpt_every=100, ema_decay=0.9, seed=1, save_final=False)
    full = train_diffusion(unet(), tiles, tmp_path/'full', **kw)
    n = 0
    while True:
        run = train_diffusion(unet(), tiles, tmp_path/'chunks', max_seconds=0, **kw); n += 1
        if run.finished: break
    assert n == 4 and run.losses == full.losses and run.step == 4
    for (k, a), b in zip(full.model.state_dict().items(), run.model.state_dict().values()): assert torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, run.ema.shadow_params): assert torch.equal(a, b)
    for change, key in [(dict(lr=2e-3), 'lr'), (dict(patch_size=8), 'patch_size'), (dict(ema_decay=0.99), 'ema_decay'),
                        (dict(batch_size=3), 'batch_size'), (dict(steps=6), 'extend=True')]:
        with pytest.raises(SettingsMismatch, match=key): train_diffusion(unet(), tiles, tmp_path/'full', **{**kw, **change})
    with pytest.raises(SettingsMismatch, match='data.n'): train_diffusion(unet(), tiles[:2], tmp_path/'full', **kw)
    longer = train_diffusion(unet(), tiles, tmp_path/'full', **{**kw, 'steps': 6}, extend=True)
    straight = train_diffusion(unet(), tiles, tmp_path/'straight', **{**kw, 'steps': 6})
    assert longer.resumed_from == 4 and longer.losses == straight.losses
    for (k, a), b in zip(straight.model.state_dict().items(), longer.model.state_dict().values()): assert torch.equal(a, b), k


# --- progress lines (what `nucbook run` shows)

def test_every_trainer_writes_progress_lines_when_asked(seg_train, tmp_path, monkeypatch):
    "With $NUCBOOK_PROGRESS set, Trainer and train_diffusion write lines even with progress=False (that flag is the bar)."
    from nucbook.engine.diffusion import make_unet, train_diffusion
    log = tmp_path/'progress.log'
    monkeypatch.setenv('NUCBOOK_PROGRESS', str(log)); monkeypatch.setenv('NUCBOOK_PROGRESS_EVERY', '0')
    _fit(tmp_path/'seg', seg_train, epochs=1)  # 4 steps
    torch.manual_seed(0)
    train_diffusion(make_unet('tiny', sample_size=16), synth_dataset(2, 'train', seed=0, size=32), tmp_path/'diff', steps=2,
                    batch_size=2, patch_size=16, save_final=False)
    got = [l.split(', ')[0] for l in log.read_text().splitlines()]
    assert got == [f'[train seg] step {s}/4 ({25 * s}%)' for s in range(1, 5)] + ['[train seg] done at step 4/4'] + \
                  ['[diffusion] step 1/2 (50%)', '[diffusion] step 2/2 (100%)', '[diffusion] done at step 2/2'], got
    assert all(' elapsed' in l for l in log.read_text().splitlines())


def test_progress_lines_rank_zero_stderr_and_bad_settings(toy, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv('NUCBOOK_PROGRESS', '1'); monkeypatch.setenv('NUCBOOK_PROGRESS_EVERY', '0')
    toy.toy_loop(tmp_path/'a', steps=2, desc='toy').run()
    err = capfd.readouterr().err.splitlines()
    assert [l.split(', ')[0] for l in err] == ['[toy] step 1/2 (50%)', '[toy] step 2/2 (100%)', '[toy] done at step 2/2'], err
    assert re.fullmatch(r'\[toy\] step 1/2 \(50%\), loss [0-9.e-]+ aux [0-9.e-]+, \d+s elapsed, ETA \d+s', err[0]), err[0]
    monkeypatch.setattr(loop_mod, 'world_info', lambda: (1, 1))  # another rank: silent
    toy.toy_loop(tmp_path/'b', steps=2).run()
    assert capfd.readouterr().err == ''
    monkeypatch.setattr(loop_mod, 'world_info', lambda: (0, 1))
    monkeypatch.setenv('NUCBOOK_PROGRESS_EVERY', 'often')
    with pytest.raises(ValueError, match=r"\$NUCBOOK_PROGRESS_EVERY='often': expected a number of seconds >= 0"):
        toy.toy_loop(tmp_path/'c', steps=2).run()
    monkeypatch.setenv('NUCBOOK_PROGRESS_EVERY', '0'); monkeypatch.setenv('NUCBOOK_PROGRESS', str(tmp_path))  # a folder
    assert toy.toy_loop(tmp_path/'d', steps=2).run().finished  # cannot write the lines: warned, trained all the same


def test_claim_settings_writes_once_and_refuses_others(tmp_path):
    "A folder's settings file: written atomically by the first claim, the same settings accepted, others refused by name."
    f = tmp_path/'work'/'bench.json'
    first = claim_settings(f, {'seed': np.int64(3), 'steps': (10, 5), 'lr': float('nan'), 'root': Path('a/b')}, 'delete it')
    assert json.dumps(first) == json.dumps(json.loads(f.read_text()))  # what the file holds
    assert (first['seed'], first['steps'], first['root']) == (3, [10, 5], 'a/b')
    assert [p.name for p in f.parent.iterdir()] == ['bench.json']  # no temporary file left
    stamp = f.stat().st_mtime_ns
    again = claim_settings(f, {'seed': 3, 'steps': [10, 5], 'lr': float('nan'), 'root': 'a/b'})  # NaN equals NaN
    assert json.dumps(again) == json.dumps(first) and f.stat().st_mtime_ns == stamp
    with pytest.raises(SettingsMismatch, match=r'bench\.json was written by a run with other settings \(seed, steps, extra\)') as e:
        claim_settings(f, {'seed': 4, 'steps': [10, 6], 'lr': float('nan'), 'root': 'a/b', 'extra': 1}, 'use another folder')
    assert e.value.path == f and list(e.value.diffs) == ['seed', 'steps', 'extra'] and str(e.value).endswith('use another folder')
    for other, key in (({'steps': [10, 6]}, 'steps'), ({'root': None}, 'root'), ({'lr': 0.1}, 'lr')):  # any one key
        with pytest.raises(SettingsMismatch, match=rf'other settings \({key}\)'):
            claim_settings(f, {'seed': 3, 'steps': [10, 5], 'lr': float('nan'), 'root': 'a/b', **other})
    with pytest.raises(SettingsMismatch, match=r'other settings \(root\)'):  # a key less
        claim_settings(f, {'seed': 3, 'steps': [10, 5], 'lr': float('nan')})
    assert json.loads(f.read_text())['seed'] == 3  # a refusal rewrites nothing
    for text, msg in (('{"seed": 3', 'not readable JSON'), ('"seed"', 'holds a JSON str, not settings')):
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f'{f}: {msg}')): claim_settings(f, {'seed': 3})
