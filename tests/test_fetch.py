"Tests of nucbook.data.fetch against a local HTTP server (127.0.0.1, port 0) serving a fixture archive."
import functools, hashlib, http.server, io, json, os, shutil, threading, zipfile
from pathlib import Path
import pytest
import yaml

from nucbook.data import fetch as F
from nucbook.data.datasets import load_manifest, manifest_dir, load_dataset, data_root

class Handler(http.server.SimpleHTTPRequestHandler):
    "Serves files with `Range: bytes=N-` support; `drops` = number of connections to cut half way."
    def log_message(self, *a): pass
    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get('Range')))
        p = Path(self.directory) / self.path.lstrip('/')
        if not p.is_file(): self.send_error(404); return
        data = p.read_bytes(); rng = self.headers.get('Range'); start = 0
        if rng: start = int(rng.split('=')[1].split('-')[0])
        if rng and start >= len(data): self.send_response(416); self.end_headers(); return
        self.send_response(206 if rng else 200)
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
    srv.requests, srv.drops = [], 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, www, f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()

def fixture_zip(www):
    "A generic-format dataset zipped under one top-level folder (stripped on extraction)."
    z = io.BytesIO()
    with zipfile.ZipFile(z, 'w') as zf:
        import numpy as np
        from PIL import Image
        for name, arr in (('images/a.png', np.full((8, 8, 3), 120, np.uint8)), ('labels/a.png', np.eye(8, dtype=np.uint8))):
            b = io.BytesIO(); Image.fromarray(arr).save(b, format='PNG'); zf.writestr(f'toy/{name}', b.getvalue())
        zf.writestr('toy/notes.txt', os.urandom(200_000)) # makes the archive big enough to cut mid-way
    (www / 'toy.zip').write_bytes(z.getvalue())
    return z.getvalue()

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
    assert not list(root.glob('.toy-staging-*')) and not list((root / '.nucbook' / 'downloads').glob('*'))
    s = load_dataset('toy', root=root)
    assert len(s) == 1 and s[0].n_instances == 1
    v = F.verify('toy', root=root)
    assert v['files_checked_lock'] == 3 and v['path'] == str(got)
    assert F.fetch('toy', dest=root, progress=False) == got # already there: verified, not downloaded again
    assert len(srv.requests) == 1

def test_fetch_resumes_after_dropped_connection(tmp_path, toy):
    srv, blob, write = toy
    srv.drops = 1
    got = F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert (got / 'notes.txt').is_file()
    assert srv.requests[0][1] is None and len(srv.requests) == 2
    resumed_at = int(srv.requests[1][1].removeprefix('bytes=').rstrip('-')) # resumed with Range from what was written
    assert 0 < resumed_at <= len(blob) // 2
    lock = F.read_lock('toy', tmp_path / 'root')
    assert lock['downloads']['toy.zip']['sha256'] == hashlib.sha256(blob).hexdigest()
    assert lock['downloads']['toy.zip']['source'] == 'first seen' # the manifest had no hash: recorded

def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, toy):
    srv, blob, write = toy
    part = tmp_path / 'root' / '.nucbook' / 'downloads' / 'toy.zip.part'
    part.parent.mkdir(parents=True); part.write_bytes(blob[:1000])
    F.fetch('toy', dest=tmp_path / 'root', progress=False)
    assert srv.requests == [('/toy.zip', 'bytes=1000-')]

def test_checksum_mismatch_is_clear_and_leaves_nothing(tmp_path, toy):
    srv, blob, write = toy
    write(sha256='0' * 64)
    root = tmp_path / 'root'
    with pytest.raises(F.FetchError, match=r'toy.zip: checksum mismatch, expected sha256 0{64}, got [0-9a-f]{64}'):
        F.fetch('toy', dest=root, progress=False)
    assert not (root / 'toy').exists() and not list(root.glob('.toy-*'))
    assert not list((root / '.nucbook' / 'downloads').glob('*')) and not F.lock_path('toy', root).exists()

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
    for name in ('monuseg2018', 'kumar', 'monusac', 'dsb2018', 'consep_tiles'):
        r = F.verify(name)
        assert r['files_checked_manifest'] == {'monuseg2018': 28, 'kumar': 43, 'monusac': 9, 'dsb2018': 66, 'consep_tiles': 0}[name]
