"Project wiring: pins mirrored, nbdev settings, notebook hygiene."
import json, re, tomllib
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT/'pyproject.toml').read_text())


def test_environment_yml_mirrors_pins():
    env = yaml.safe_load((ROOT/'environment.yml').read_text())
    pip = next(d['pip'] for d in env['dependencies'] if isinstance(d, dict))
    deps = PYPROJECT['project']['dependencies'] + PYPROJECT['project']['optional-dependencies']['dev']
    assert sorted(pip) == sorted(deps)
    assert all(re.fullmatch(r'[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*', d) for d in deps), 'every dependency is pinned'
    assert 'torch==2.13.0' in deps


def test_nbdev_settings():
    nb = PYPROJECT['tool']['nbdev']
    assert set(nb['tst_flags'].split()) >= {'slow', 'gpu'}
    assert 'tags' in nb['allowed_cell_metadata_keys']
    assert not (ROOT/'settings.ini').exists()


def test_notebooks_are_small_and_have_one_default_exp():
    for p in sorted((ROOT/'nbs').glob('*.ipynb')):
        assert p.stat().st_size < 1_000_000, f'{p.name} is over 1 MB'
        nb = json.loads(p.read_text())
        exps = [c for c in nb['cells'] if c['cell_type'] == 'code' and '#| default_exp' in ''.join(c['source'])]
        assert len(exps) <= 1, f'{p.name} has {len(exps)} default_exp cells'
        params = [c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
        assert len(params) <= 1, f'{p.name} has several parameters cells'


def test_runnable_notebooks_default_to_smoke_profile():
    import papermill as pm
    for p in sorted((ROOT/'nbs').glob('1*_*.ipynb')):
        params = pm.inspect_notebook(str(p))
        assert 'profile' in params, f'{p.name} has no profile parameter'
        assert params['profile']['default'].strip('\'"') == 'smoke', p.name


def test_import_touches_no_gpu_or_network():
    import subprocess, sys
    code = ("import sys, socket\n"
            "def _no(*a, **k): raise RuntimeError('network used at import')\n"
            "socket.socket.connect = _no\n"
            "import nucbook, nucbook.core, nucbook.data.sample, nucbook.data.synth, nucbook.cli\n"
            "import importlib, pkgutil\n"
            "for m in pkgutil.iter_modules(nucbook.__path__):\n"
            "    importlib.import_module('nucbook.' + m.name)\n"
            "t = sys.modules.get('torch')\n"
            "assert t is None or not t.cuda.is_initialized(), 'CUDA initialised at import'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr


def test_imports_only_in_import_cells():
    "The docs build (nbdev-proc-nbs) executes every cell that imports something: such cells must hold imports only."
    import ast
    bad = []
    for p in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, c in enumerate(json.loads(p.read_text())['cells']):
            src = ''.join(c['source'])
            if c['cell_type'] != 'code' or re.search(r'^#\|\s*export', src, re.M): continue
            try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!'))))
            except SyntaxError: continue
            imports = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
            other = any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)
            if imports and other: bad.append(f'{p.name} cell {i}: {src.splitlines()[0][:60]}')
    assert not bad, 'cells mixing imports and code:\n' + '\n'.join(bad)
