"nucbook.core: checkpoints on a full disk, stray temporary files of killed writers, file permissions, profile names."
import errno, os, subprocess, sys, time
from pathlib import Path
import pytest
import torch

from nucbook.core import atomic_write, atomic_write_text, load_checkpoint, save_checkpoint


@pytest.mark.parametrize('exc, cause', [
    (RuntimeError('[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: '
                  'file write failed'), 'no space left on device'),
    (OSError(errno.ENOSPC, 'No space left on device'), 'no space left on device ('),
    (OSError(errno.EFBIG, 'File too large'), 'file too large'),
])
def test_save_checkpoint_on_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch, exc, cause):
    ckpt = tmp_path / 'run' / 'last.pt'
    save_checkpoint(ckpt, {'step': 1})
    def full(*a, **k): raise exc
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(OSError) as info:  # an OSError (and a RuntimeError, as torch's own error was)
        save_checkpoint(ckpt, {'step': 2})
    msg = str(info.value)
    assert msg.startswith(f'{ckpt}: cannot write checkpoint: ') and cause in msg, msg
    assert 'previous checkpoint is unchanged' in msg and isinstance(info.value, RuntimeError)
    monkeypatch.undo()
    assert load_checkpoint(ckpt)['step'] == 1 and os.listdir(ckpt.parent) == ['last.pt']


_WRITER = ("import sys, time\nfrom nucbook.core import atomic_write\n"
           "with atomic_write(sys.argv[1]) as f:\n"
           "    f.write('half written'); f.flush(); print('writing', flush=True); time.sleep(120)\n")

def _writer(dest):
    "A process in the middle of `atomic_write(dest)`; returns it once its temporary file exists."
    p = subprocess.Popen([sys.executable, '-c', _WRITER, str(dest)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'writing'
    return p


def test_stray_tmp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / 'metrics.json'
    killed = _writer(dest)
    stray = set(tmp_path.glob('.metrics.json.*.tmp'))
    killed.kill(); killed.wait()  # kill -9 in the middle of the write: nothing can clean up
    assert len(stray) == 1 and all(p.exists() for p in stray)
    alive = _writer(dest)  # a writer still running: its file must stay
    try:
        live = set(tmp_path.glob('.metrics.json.*.tmp')) - stray
        old = tmp_path / '.metrics.json.k3j4h5g6.tmp'; old.write_text('x')  # an old-style name (no pid), from before
        os.utime(old, (time.time() - 3600,) * 2)
        other = tmp_path / '.other.json.1.abcdefgh.tmp'; other.write_text('x')  # another destination's file
        atomic_write_text(dest, 'new')
        assert dest.read_text() == 'new'
        assert not any(p.exists() for p in stray) and not old.exists()
        assert all(p.exists() for p in live) and len(live) == 1 and other.exists()
    finally:
        alive.kill(); alive.wait()


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / 'a.txt', 'x')
        with atomic_write(tmp_path / 'b.bin', 'wb') as f: f.write(b'x')
    finally:
        os.umask(old)
    assert oct((tmp_path / 'a.txt').stat().st_mode & 0o777) == oct(mode)
    assert oct((tmp_path / 'b.bin').stat().st_mode & 0o777) == oct(mode)


def test_profile_names_are_one_constant():
    from nucbook.core import PROFILES
    assert PROFILES == ('smoke', 'paper')
