"Tests of nucbook.data.fetch against a local HTTP server (127.0.0.1, port 0) serving a fixture archive."
import builtins, email.utils, errno, functools, hashlib, http.server, io, json, os, shutil, threading, warnings, zipfile
from pathlib import Path
import pytest
import yaml

from nucbook.data import fetch as F
from nucbook.data.datasets import load_manifest, manifest_dir, load_dataset, data_root

# fetches of manifests without a sha256 warn that they are unverified; the tests about that use pytest.warns
pytestmark = [pytest.mark.filterwarnings('ignore:.*no published sha256:UserWarning'),
              pytest.mark.filterwarnings('ignore:.*never verified against a published:UserWarning')]

def etag(data:bytes) -> str: return f'"{hashlib.sha256(data).hexdigest()[:16]}"'

class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files with `Range: bytes=N-` support, an ETag and Last-Modified, and `If-Range` (unless the server's
    `honour_if_range` is False); `drops` = number of connections to cut half way."""
    def log_message(self, *a): pass
    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get('Range')))
        srv.if_ranges.append(self.headers.get('If-Range'))
        p = Path(self.directory) / self.path.lstrip('/')
        if not p.is_file(): self.send_error(404); return
        data = p.read_bytes(); rng = self.headers.get('Range'); start = 0
        tag, modified = etag(data), email.utils.formatdate(p.stat().st_mtime, usegmt=True)
        if rng and srv.honour_if_range and self.headers.get('If-Range') not in (None, tag, modified): rng = None
        if rng: start = int(rng.split('=')[1].split('-')[0])
        if rng and start >= len(data): self.send_response(416); self.end_headers(); return
        self.send_response(206 if rng else 200)
        self.send_header('ETag', tag); self.send_header('Last-Modified', modified)
        if rng: self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start)); self.end_headers()
        if srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(data[start:start + (len(data) - start) // 2]); self.wfile.flush()
            self.connection.shutdown(2); return
        self.wfile.write(data[start:])

@pytest.fixture
def server(tmp_path):
    www = tmp_path / 'www'; www.mkdir()
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(www)))
    srv.requests, srv.if_ranges, srv.drops, srv.honour_if_range = [], [], 0, True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, www, f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()

def fixture_zip(www):
    "A generic-format dataset zipped under one top-level folder (stripped on extraction)."
    z = io.BytesIO()
    with zipfile.ZipFile(z, 'w') as zf:
        import numpy as np
        from PIL import Image
        for name, arr in (('images/a.png', np.full((8, 8, 3), 120, np.uint8)), ('labels/a.png', np.pad(np.ones((3, 3), np.uint8), (2, 3)))):
            b = io.BytesIO(); Image.fromarray(arr).save(b, format='PNG'); zf.writestr(f'toy/{name}', b.getvalue())
        zf.writestr('toy/notes.txt', os.urandom(200_000)) # makes the archive big enough to cut mid-way
    (www / 'toy.zip').write_bytes(z.getvalue())
    return z.getvalue()

@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    "Downloads go to `$NUCBOOK_CACHE/downloads`: a temporary folder, never the user's cache."
    monkeypatch.setenv('NUCBOOK_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'

@pytest.fixture
def toy(tmp_path, server, monkeypatch):
    "A manifest 'toy' whose download is served locally; returns (srv, archive bytes, manifest writer)."
    srv, www, url = server
    blob = fixture_zip(www)
    mdir = tmp_path / 'manifests'; (mdir / 'checksums').mkdir(parents=True)
    shutil.copy(manifest_dir() / 'schema.json', mdir)
    monkeypatch.setenv('NUCBOOK_MANIFESTS', str(mdir))
    def write(sha256=None, size=None, url_path='/toy.zip'):
        man = {'name': 'toy', 'title': 'toy data', 'citation': 'a test fixture, no citation', 'licence': 'CC0',
               'homepage': 'http://127.0.0.1/', 'loader': 'generic', 'dirs': ['toy'], 'open_splits': True,
               'download': [{'url': url + url_path, 'filename': 'toy.zip', 'size': size, 'sha256': sha256, 'extract': True}],
               'layout': {'description': 'images/ + labels/', 'markers': ['images/*'],
                          'expect': [{'images/*.png': 1, 'labels/*.png': 1}]},
               'splits': {'all': {'description': 'everything'}}, 'classes': None}
        (mdir / 'toy.yaml').write_text(yaml.safe_dump(man))
    write()
    return srv, blob, write

def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv('NUCBOOK_DATA', str(tmp_path / 'env'))
    assert F.data_root(tmp_path / 'dest') == tmp_path / 'dest'
    assert F.data_root() == tmp_path / 'env'
    monkeypatch.delenv('NUCBOOK_DATA')
    assert F.data_root().parts[-2:] == ('nucbook', 'data')

def test_fetch_success_installs_and_records_lock(tmp_path, toy):
    srv, blob, write = toy
    write(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    root = tmp_path / 'root'
    got = F.fetch('toy', dest=root, progress=False)
    assert got == root / 'toy' and (got / 'images' / 'a.png').is_file() and not (got / 'toy').exists()
    lock = json.loads(F.lock_path('toy', root).read_text())
    assert lock['downloads']['toy.zip']['sha256'] == hashlib.sha256(blob).hexdigest()
    assert lock['downloads']['toy.zip']['source'] == 'manifest'
    assert set(lock['files']) == {'images/a.png', 'labels/a.png', 'notes.txt'}
    assert not list(root.glob('.toy-staging-*')) and not list(F.download_dir('toy').glob('*'))
    s = load_dataset('toy', root=root)
    assert len(s) == 1 and s[0].n_instances == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a published sha256: nothing to warn about
        v = F.verify('toy', root=root)
    assert v['files_checked_lock'] == 3 and v['files_checked'] == 3 and v['path'] == str(got)
    assert v['unverified'] is False and v['warnings'] == [] and lock['unverified'] is False
    assert F.fetch('toy', dest=root, progress=False) == got # already there: verified, not downloaded again
    assert len(srv.requests) == 1

def test_fetch_resumes_after_dropped_connection(tmp_path, toy):
    srv, blob, write = toy
    srv.drops = 1
    got = F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert (got / 'notes.txt').is_file()
    assert srv.requests[0][1] is None and len(srv.requests) == 2
    resumed_at = int(srv.requests[1][1].removeprefix('bytes=').rstrip('-')) # resumed with Range from what was written
    assert 0 < resumed_at <= len(blob) // 2 and srv.if_ranges[1] == etag(blob) # only if the file is still the same
    lock = F.read_lock('toy', tmp_path / 'root')
    assert lock['downloads']['toy.zip']['sha256'] == hashlib.sha256(blob).hexdigest()
    assert lock['downloads']['toy.zip']['source'] == 'first seen' # the manifest had no hash: recorded

def _leftover_part(data:bytes, url:str|None, tag:str|None, size:int|None) -> Path:
    "A `.part` left by an earlier fetch of 'toy', with the record of what it is (when `url` is given)."
    part = F.download_dir('toy') / 'toy.zip.part'
    part.parent.mkdir(parents=True, exist_ok=True); part.write_bytes(data)
    if url: (part.parent / 'toy.zip.part.json').write_text(json.dumps({'url': url, 'size': size, 'etag': tag}))
    return part

def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, toy, server):
    srv, blob, write = toy
    _leftover_part(blob[:1000], server[2] + '/toy.zip', etag(blob), len(blob))
    F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert srv.requests == [('/toy.zip', 'bytes=1000-')] and srv.if_ranges == [etag(blob)]
    assert not list(F.download_dir('toy').iterdir())

def test_partial_file_without_a_record_starts_again(tmp_path, toy):
    "A .part with no record of which version of the file it holds cannot be resumed safely: download from zero."
    srv, blob, write = toy
    _leftover_part(b'x' * 1000, None, None, None)
    F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert srv.requests == [('/toy.zip', None)]
    assert F.read_lock('toy', tmp_path / 'root')['downloads']['toy.zip']['sha256'] == hashlib.sha256(blob).hexdigest()

@pytest.mark.parametrize('honour_if_range', [True, False])
def test_server_file_replaced_between_attempts(tmp_path, server, honour_if_range):
    "A .part of the old file is not spliced onto the new one: with If-Range the server sends the whole new file; a server that ignores If-Range sends a new ETag, and the download restarts."
    srv, www, url = server
    srv.honour_if_range = honour_if_range
    old, new = os.urandom(300_000), os.urandom(300_000)
    (www / 'f.bin').write_bytes(old); srv.drops = 1
    dest = tmp_path / 'dl' / 'f.bin'
    with pytest.raises(F.FetchError, match='partial file .*f.bin.part is kept'):
        F.download(f'{url}/f.bin', dest, progress=False, retries=0)
    assert 0 < (tmp_path / 'dl' / 'f.bin.part').stat().st_size < len(old)
    (www / 'f.bin').write_bytes(new) # upstream replaced the file, same size
    digest = F.download(f'{url}/f.bin', dest, progress=False)
    assert dest.read_bytes() == new and digest == hashlib.sha256(new).hexdigest()
    assert sorted(p.name for p in dest.parent.iterdir()) == ['f.bin']

def test_part_larger_than_the_file_starts_again(tmp_path, server):
    "No sha256 known: the size is still checked against the server's, so a .part with extra bytes is not installed."
    srv, www, url = server
    data = os.urandom(50_000); (www / 'f.bin').write_bytes(data)
    dest = tmp_path / 'dl' / 'f.bin'; dest.parent.mkdir()
    (tmp_path / 'dl' / 'f.bin.part').write_bytes(data + b'appended by a second fetch')
    (tmp_path / 'dl' / 'f.bin.part.json').write_text(json.dumps({'url': f'{url}/f.bin', 'size': len(data), 'etag': etag(data)}))
    assert F.download(f'{url}/f.bin', dest, progress=False) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data

def test_checksum_mismatch_is_clear_and_leaves_nothing(tmp_path, toy):
    srv, blob, write = toy
    write(sha256='0' * 64)
    root = tmp_path / 'root'
    with pytest.raises(F.FetchError, match=r'toy.zip: checksum mismatch, expected sha256 0{64}, got [0-9a-f]{64}'):
        F.fetch('toy', dest=root, progress=False)
    assert not (root / 'toy').exists() and not list(root.glob('.toy-*'))
    assert not list(F.download_dir('toy').glob('*')) and not F.lock_path('toy', root).exists()

def test_hash_in_lock_is_enforced_on_a_later_fetch(tmp_path, toy, server):
    srv, blob, write = toy
    root = tmp_path / 'root'
    F.fetch('toy', dest=root, progress=False)
    shutil.rmtree(root / 'toy')
    (Path(srv.RequestHandlerClass.keywords['directory']) / 'toy.zip').write_bytes(blob[:-10] + b'0123456789') # upstream changed
    with pytest.raises(F.FetchError, match='toy.zip: checksum mismatch'):
        F.fetch('toy', dest=root, progress=False)
    assert not (root / 'toy').exists()

def test_size_mismatch_and_404(tmp_path, toy):
    srv, blob, write = toy
    write(size=len(blob) + 5)
    with pytest.raises(F.FetchError, match='toy.zip: size mismatch'):
        F.fetch('toy', dest=tmp_path / 'r1', progress=False)
    write(url_path='/missing.zip')
    with pytest.raises(F.FetchError, match='missing.zip: not found'):
        F.fetch('toy', dest=tmp_path / 'r2', progress=False)
    assert not (tmp_path / 'r2' / 'toy').exists()

def test_verify_detects_modified_and_missing_files(tmp_path, toy):
    root = tmp_path / 'root'
    got = F.fetch('toy', dest=root, progress=False)
    (got / 'labels' / 'a.png').write_bytes(b'edited')
    with pytest.raises(F.FetchError, match=r'labels/a.png: modified: sha256 [0-9a-f]{64}, expected'):
        F.verify('toy', root=root)
    (got / 'labels' / 'a.png').unlink(); (got / 'labels' / 'b.png').write_bytes(b'x')
    with pytest.raises(F.FetchError, match=r'labels/a.png: missing'):
        F.verify('toy', root=root)

def test_register_existing_copy_with_from_dir(tmp_path, toy):
    srv, blob, write = toy
    copy = tmp_path / 'mine'
    with zipfile.ZipFile(io.BytesIO(blob)) as zf: zf.extractall(copy)
    root = tmp_path / 'root'
    got = F.fetch('toy', dest=root, from_dir=copy)
    assert got == (copy / 'toy').resolve() and srv.requests == [] # nothing downloaded; used in place
    assert json.loads((root / '.nucbook' / 'registry.json').read_text())['toy'] == str(got)
    assert F.verify('toy', root=root)['files_checked_lock'] == 3
    (got / 'notes.txt').write_bytes(b'changed')
    with pytest.raises(F.FetchError, match='notes.txt: modified'):
        F.verify('toy', root=root)
    with pytest.raises(F.FetchError, match='does not look like toy'):
        F.fetch('toy', dest=root, from_dir=tmp_path / 'www')

def test_manual_dataset_explains_what_to_do(tmp_path):
    with pytest.raises(F.FetchError, match=r'glysac has no direct download .*`nucbook fetch glysac --from DIR`'):
        F.fetch('glysac', dest=tmp_path)

def test_shipped_checksums_detect_a_modified_copy(tmp_path):
    "monuseg2018's shipped per-file hashes catch a changed file in a registered copy (no real data needed)."
    lines = F.manifest_checksums('monuseg2018')
    assert len(lines) == 28 and all(len(h) == 64 for h in lines.values())
    d = tmp_path / 'copy' / 'MoNuSegTestData'; d.mkdir(parents=True)
    for rel in lines: (tmp_path / 'copy' / rel).write_bytes(b'not the real file')
    with pytest.raises(F.FetchError, match=r'MoNuSegTestData/TCGA-2Z-A9J9-01A-01-TS1.tif: modified'):
        F.fetch('monuseg2018', dest=tmp_path / 'root', from_dir=tmp_path / 'copy')

@pytest.mark.skipif(not os.environ.get('NUCBOOK_DATA'), reason='NUCBOOK_DATA not set (real-data test)')
def test_real_data_verifies():
    for name in ('monuseg2018', 'kumar', 'monusac', 'dsb2018'):
        r = F.verify(name)
        assert r['files_checked_manifest'] == {'monuseg2018': 28, 'kumar': 43, 'monusac': 9, 'dsb2018': 66}[name]
        assert r['files_checked'] >= r['files_checked_manifest']
    if F.read_lock('consep_tiles'): assert F.verify('consep_tiles')['files_checked'] == 1312 # a registered copy
    else: # no published checksums and no lock: nothing to verify is an error, not a pass
        with pytest.raises(F.FetchError, match='nothing to verify for consep_tiles: 0 files checked'):
            F.verify('consep_tiles')


def test_downloads_stay_out_of_the_data_root(tmp_path, toy, cache):
    "The data root holds the dataset and its lock; a download in progress lives in the cache folder."
    srv, blob, write = toy
    root = tmp_path / 'root'
    write(size=len(blob) + 5) # a failed fetch: nothing of it in the data root
    with pytest.raises(F.FetchError, match='size mismatch'):
        F.fetch('toy', dest=root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == []
    write(); srv.drops = 1
    F.fetch('toy', dest=root, progress=False) # resumed from a .part in the cache
    assert F.download_dir('toy') == cache / 'downloads' / 'toy' and len(srv.requests) == 3
    assert sorted(p.name for p in root.iterdir()) == ['.nucbook', 'toy']
    assert sorted(p.name for p in (root / '.nucbook').iterdir()) == ['locks']

def test_download_without_published_hash_is_marked_unverified(tmp_path, toy):
    "No sha256 in the manifest: the lock records the hash as unverified, with a warning, and `verify` says so."
    srv, blob, write = toy
    root = tmp_path / 'root'
    with pytest.warns(UserWarning, match='toy.zip has no published sha256 in its manifest'):
        F.fetch('toy', dest=root, progress=False)
    lock = F.read_lock('toy', root)
    assert lock['downloads']['toy.zip']['unverified'] is True and lock['unverified'] is True
    with pytest.warns(UserWarning, match='never verified against a published one'):
        v = F.verify('toy', root=root)
    assert v['unverified'] is True and v['files_checked'] == 3
    assert 'first seen (downloaded without a published sha256' in v['warnings'][0]

def test_corrupt_zip_is_a_clear_error_and_is_deleted(tmp_path, toy):
    "A zip whose content is corrupt (Bad CRC-32) gives a FetchError naming it; it is deleted, so the next fetch starts again."
    srv, blob, write = toy
    www = Path(srv.RequestHandlerClass.keywords['directory'])
    i = blob.index(b'toy/notes.txt') + 100 # inside the stored bytes of notes.txt
    (www / 'toy.zip').write_bytes(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:])
    root = tmp_path / 'root'
    with pytest.raises(F.FetchError, match=r'toy.zip: corrupt or unreadable archive: BadZipFile: Bad CRC-32'):
        F.fetch('toy', dest=root, progress=False)
    assert not list(F.download_dir('toy').iterdir()) and not (root / 'toy').exists()
    (www / 'toy.zip').write_bytes(blob)
    assert (F.fetch('toy', dest=root, progress=False) / 'notes.txt').is_file()
    assert srv.requests[-1] == ('/toy.zip', None) # downloaded again from the start

def test_full_disk_while_downloading_names_the_file(tmp_path, toy, monkeypatch):
    "An OSError while writing the download (here EFBIG, 'File too large') names the file being written."
    srv, blob, write = toy
    class Full:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, b): raise OSError(errno.EFBIG, 'File too large')
        def __getattr__(self, k): return getattr(self.f, k)
    def fake_open(path, mode='r', *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return Full(f) if ('w' in mode or 'a' in mode) else f
    monkeypatch.setattr(F, 'open', fake_open, raising=False)
    with pytest.raises(F.FetchError, match=r'^/\S+/toy\.zip\.part: cannot write the download .*\[Errno 27\] File too large'):
        F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert (F.download_dir('toy') / 'toy.zip.part').exists() # kept: the next fetch resumes it
    assert not (tmp_path / 'root' / 'toy').exists()

def test_verify_with_nothing_to_check_is_an_error(tmp_path, toy):
    "No published checksums and no lock file for this copy: verify checked 0 files, and says so instead of passing."
    srv, blob, write = toy
    root = tmp_path / 'root'
    got = F.fetch('toy', dest=root, progress=False)
    assert F.verify('toy', root=root)['files_checked_lock'] == 3
    F.lock_path('toy', root).unlink() # e.g. a copy put in place by hand
    with pytest.raises(F.FetchError, match=r'nothing to verify for toy: 0 files checked.*`nucbook fetch toy --from '):
        F.verify('toy', root=root)
    F.fetch('toy', dest=root, from_dir=got) # recording the hashes makes it verifiable
    assert F.verify('toy', root=root)['files_checked'] == 3
