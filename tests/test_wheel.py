"The manifests are package data: a wheel built from the repo, installed into a fresh venv, lists and loads them."
import json, os, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _copy_sources(dst:Path):
    "What a build needs (pyproject.toml, README.md, the package), so that building leaves the repo untouched."
    dst.mkdir()
    for f in ('pyproject.toml', 'README.md'): shutil.copy2(ROOT / f, dst / f)
    shutil.copytree(ROOT / 'nucbook', dst / 'nucbook', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))

@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'; _copy_sources(src)
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    r = subprocess.run([sys.executable, '-c', code, str(tmp / 'dist')], cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / 'dist' / r.stdout.strip().splitlines()[-1]

def test_wheel_contains_the_manifests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ('kumar.yaml', 'generic.yaml', 'monusac.yaml', 'pannuke.yaml', 'conic.yaml', 'lizard.yaml', 'schema.json',
              'checksums/kumar.sha256'):
        assert f'nucbook/data/manifests/{f}' in names, f
    assert 'nucbook/bench/protocol.py' in names and 'nucbook/data/datasets.py' in names and 'nucbook/data/formats.py' in names

def test_installed_wheel_lists_and_loads_manifests(wheel, tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    site = Path(subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    zipfile.ZipFile(wheel).extractall(site) # installing a pure wheel = unpacking it into site-packages
    # third-party packages from the project's venv; its .pth files (the editable nucbook) are NOT processed this way
    (site / 'deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    code = r'''
import json, os, sys
import nucbook
from nucbook.data.datasets import list_datasets, load_manifest, manifest_dir, LOADERS
from nucbook.data.fetch import manifest_checksums
print(json.dumps(dict(file=nucbook.__file__, names=list_datasets(), kumar=load_manifest('kumar')['splits']['train']['count'],
                      mdir=str(manifest_dir()), sums=len(manifest_checksums('kumar')), mpp=load_manifest('monusac')['mpp'],
                      loaders=sorted(LOADERS))))
'''
    elsewhere = tmp_path / 'elsewhere'; elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('NUCBOOK_MANIFESTS', 'PYTHONPATH', 'PYTHONHOME')}
    r = subprocess.run([py, '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out['file']).resolve().is_relative_to(site.resolve()), out['file'] # the installed wheel, not the repo
    assert not Path(out['file']).resolve().is_relative_to(ROOT)
    assert Path(out['mdir']).resolve() == (site / 'nucbook' / 'data' / 'manifests').resolve()
    assert 'kumar' in out['names'] and 'synthetic' in out['names'] and out['kumar'] == 16
    assert {'pannuke', 'conic', 'lizard'} <= set(out['names']) & set(out['loaders']) # formats' loaders register on import
    assert out['sums'] > 0 and out['mpp'] == 0.19448
