"`nucbook run` and `nucbook batch` on tiny notebooks written by the tests."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import nbformat
import pandas as pd
import pytest
from nucbook.cli import RunError, config_hash, load_grid, lock_holder, run_batch, run_notebook, main

NUCBOOK = [sys.executable, '-c', 'from nucbook.cli import main; main()']


def _nb(path, param_src, body_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(param_src); p.metadata['tags'] = ['parameters']
    nb.cells = [nbformat.v4.new_code_cell('import json, os\nfrom nucbook.core import current_run_dir, atomic_write_json'),
                p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def square_nb(tmp_path):
    return _nb(tmp_path/'01_square.ipynb', "profile = 'smoke'\nseed = 0\nx = 2\nlabel = 'a'",
               "atomic_write_json(current_run_dir()/'metrics.json', {'square': x * x, 'label': label, 'seed': seed,\n"
               "    'profile': profile, 'cwd': os.getcwd()})")


def test_run_injects_parameters(square_nb, tmp_path):
    out = tmp_path/'run'
    p = subprocess.run(NUCBOOK + ['run', str(square_nb), '-p', 'x', '7', '-p', 'label', 'kumar', '--profile', 'paper',
                                  '--out', str(out), '--no-progress'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = json.loads((out/'metrics.json').read_text())
    assert m == {'square': 49, 'label': 'kumar', 'seed': 0, 'profile': 'paper', 'cwd': str(tmp_path)}
    rec = json.loads((out/'params.json').read_text())
    assert rec['status'] == 'ok' and rec['parameters'] == {'profile': 'paper', 'seed': 0, 'x': 7, 'label': 'kumar'}
    assert rec['injected'] == {'x': 7, 'label': 'kumar', 'profile': 'paper'}
    assert rec['environment']['packages']['numpy'] and 'commit' in rec['git']
    executed = nbformat.read(str(out/'01_square.ipynb'), as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in executed.cells)


def test_run_default_folder_is_timestamped(square_nb, tmp_path):
    d = run_notebook(square_nb, runs_root=tmp_path/'runs', progress=False)
    assert d.parent == (tmp_path/'runs').resolve() and d.name.startswith('01_square-')
    assert json.loads((d/'metrics.json').read_text())['square'] == 4


def test_unknown_parameter_is_an_error(square_nb, tmp_path):
    p = subprocess.run(NUCBOOK + ['run', str(square_nb), '-p', 'epochs', '3', '--out', str(tmp_path/'r')],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert 'unknown parameter epochs' in p.stderr and 'profile, seed, x, label' in p.stderr
    assert not (tmp_path/'r').exists()  # nothing ran


def test_failing_cell_reports_error_and_partial_notebook(tmp_path):
    nb = _nb(tmp_path/'bad.ipynb', 'n = 1', "raise ValueError(f'broken input {n}')")
    out = tmp_path/'r'
    p = subprocess.run(NUCBOOK + ['run', str(nb), '--out', str(out), '--no-progress'], capture_output=True, text=True)
    assert p.returncode == 1
    assert 'ValueError: broken input 1' in p.stderr
    assert f'partial output notebook: {out.resolve()/"bad.ipynb"}' in p.stderr
    assert (out/'bad.ipynb').exists()
    assert json.loads((out/'params.json').read_text())['status'] == 'failed'


def test_missing_notebook_lists_available(tmp_path):
    with pytest.raises(RunError, match='no notebook'):
        run_notebook(tmp_path/'nope', progress=False)


def test_batch_resumes_without_rerunning(square_nb, tmp_path):
    grid = tmp_path/'grid.yaml'
    grid.write_text(f"notebook: {square_nb}\nout: {tmp_path/'b'}\nparameters: {{label: z}}\ngrid:\n  x: [1, 2, 3]\n")
    runs = load_grid(grid)['runs']
    h = config_hash({'label': 'z'})  # the fixed parameters (and profile) are part of each run's folder name
    assert [r['name'] for r in runs] == [f'01_square-x={x}-cfg={h}' for x in (1, 2, 3)]
    # simulate an interrupted batch: only the first run finished, the second died half-way
    first = run_notebook(square_nb, {'x': 1, 'label': 'z'}, out=tmp_path/'b'/runs[0]['name'], progress=False)
    half = tmp_path/'b'/runs[1]['name']; half.mkdir()
    (half/'params.json').write_text(json.dumps({'status': 'running'}))
    stamp = (first/'metrics.json').stat().st_mtime_ns
    lines = []
    df = run_batch(grid, jobs=2, log=lines.append)
    assert '3 runs' in lines[0] and '1 already done, 2 to run' in lines[0]
    assert (first/'metrics.json').stat().st_mtime_ns == stamp  # not re-run
    assert list(df['square']) == [1, 4, 9] and set(df['status']) == {'ok'}
    assert list(pd.read_csv(tmp_path/'b'/'results.csv')['param.x']) == [1, 2, 3]
    lines.clear(); run_batch(grid, log=lines.append)
    assert '3 already done, 0 to run' in lines[0]


def test_batch_reports_failures(tmp_path):
    nb = _nb(tmp_path/'f.ipynb', 'x = 1', "assert x != 2, 'x must not be 2'\natomic_write_json(current_run_dir()/'metrics.json', {'x': x})")
    grid = tmp_path/'g.yaml'
    grid.write_text(f"notebook: {nb}\nout: {tmp_path/'o'}\ngrid:\n  x: [1, 2]\n")
    with pytest.raises(RunError, match=r"1 run\(s\) failed: f-x=2"):
        run_batch(grid, log=lambda *a: None)
    df = pd.read_csv(tmp_path/'o'/'results.csv')
    assert list(df['status']) == ['ok', 'failed']


def test_bad_grid_file(tmp_path):
    g = tmp_path/'g.yaml'; g.write_text('notebook: x\nseeds: [1]\n')
    with pytest.raises(RunError, match='unknown keys'):
        load_grid(g)


def test_fetch_and_verify_report_unknown_dataset(tmp_path):
    for cmd in (['verify', 'nope', '--root', str(tmp_path)], ['fetch', 'nope', '--dest', str(tmp_path)]):
        p = subprocess.run(NUCBOOK + cmd, capture_output=True, text=True)
        assert p.returncode == 1 and 'Traceback' not in p.stderr
        assert "no manifest for dataset 'nope'" in p.stderr and 'kumar' in p.stderr


def test_verify_real_dataset(data_root):
    p = subprocess.run(NUCBOOK + ['verify', 'monuseg2018', '--root', str(data_root)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)['dataset'] == 'monuseg2018'


def test_parameter_types_are_checked_before_a_kernel_starts(square_nb, tmp_path):
    "x's default is 2: a string or a bool is refused at once, naming the notebook, parameter, value, its type and the expected type."
    for value, shown in [('abc', "'abc' of type str"), ('true', 'True of type bool'), ('2.5', '2.5 of type float')]:
        p = subprocess.run(NUCBOOK + ['run', str(square_nb), '-p', 'x', value, '--out', str(tmp_path/'r'), '--no-progress'],
                           capture_output=True, text=True)
        assert p.returncode == 1 and 'Traceback' not in p.stderr
        assert f"01_square.ipynb: parameter 'x' was given {shown}, expected int (its default is 2)" in p.stderr, p.stderr
        assert not (tmp_path/'r').exists()  # nothing ran
    with pytest.raises(RunError, match=r"parameter 'label' was given 3 of type int, expected str .*quote it"):
        run_notebook(square_nb, {'label': 3}, out=tmp_path/'r', progress=False)
    d = run_notebook(square_nb, {'x': 3, 'seed': 1, 'label': 'b'}, out=tmp_path/'ok', progress=False)
    assert json.loads((d/'metrics.json').read_text())['square'] == 9


def test_profile_names_are_checked_for_every_notebook(square_nb, tmp_path):
    "The square notebook itself would accept any profile; `nucbook run` accepts only nucbook.core.PROFILES."
    p = subprocess.run(NUCBOOK + ['run', str(square_nb), '-p', 'profile', 'fast', '--out', str(tmp_path/'r')],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "01_square.ipynb: profile 'fast' is not one of smoke, paper" in p.stderr, p.stderr
    assert not (tmp_path/'r').exists()
    with pytest.raises(RunError, match="profile 'full' is not one of smoke, paper"):
        run_notebook(square_nb, profile='full', out=tmp_path/'r', progress=False)
    p = subprocess.run(NUCBOOK + ['run', str(square_nb), '--profile', 'fast'], capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice: 'fast' (choose from 'smoke', 'paper')" in p.stderr


def test_failing_cell_is_named_as_the_notebook_counts_it(tmp_path):
    "Markdown cells count, papermill's injected cell does not; the message shows the cell's first line."
    import nbformat
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('n = 3'); p.metadata['tags'] = ['parameters']
    nb.cells = [nbformat.v4.new_markdown_cell('# A notebook'), nbformat.v4.new_code_cell('import os'),
                nbformat.v4.new_markdown_cell('## Parameters'), p, nbformat.v4.new_markdown_cell('## Work'),
                nbformat.v4.new_code_cell('y = n + 1'),
                nbformat.v4.new_code_cell("# check the input\nassert n < 2, f'n too large: {n}'")]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, str(tmp_path/'cells.ipynb'))
    for extra, out in [([], 'a'), (['-p', 'n', '5'], 'b')]:  # without and with an injected parameters cell
        p = subprocess.run(NUCBOOK + ['run', str(tmp_path/'cells.ipynb'), '--out', str(tmp_path/out), '--no-progress', *extra],
                           capture_output=True, text=True)
        assert p.returncode == 1
        assert 'cells.ipynb failed in cell 6 (counting all cells from 0): `# check the input`' in p.stderr, p.stderr
        assert 'AssertionError: n too large' in p.stderr
        rec = json.loads((tmp_path/out/'params.json').read_text())
        assert rec['failed_cell'] == 6 and rec['failed_cell_source'] == '# check the input'


def test_out_naming_an_existing_file_is_not_a_folder(square_nb, tmp_path):
    f = tmp_path/'results.txt'; f.write_text('not a folder')
    p = subprocess.run(NUCBOOK + ['run', str(square_nb), '--out', str(f), '--no-progress'], capture_output=True, text=True)
    assert p.returncode == 1 and f'nucbook run: error: {f} is not a folder' in p.stderr and 'File exists' not in p.stderr
    with pytest.raises(RunError, match=f'{f} is not a folder'):
        run_notebook(square_nb, out=f/'sub', progress=False)
    assert f.read_text() == 'not a folder'


def test_batch_checks_every_run_before_starting_any(square_nb, tmp_path):
    grid = tmp_path/'grid.yaml'
    grid.write_text(f"notebook: {square_nb}\nout: {tmp_path/'b'}\ngrid:\n  x: [1, abc]\n")
    with pytest.raises(RunError, match=r"1 run\(s\) cannot start:\n01_square-x=abc-cfg=[0-9a-f]{8}: 01_square.ipynb: parameter 'x' was given 'abc'"):
        run_batch(grid, log=lambda *a: None)
    assert list((tmp_path/'b').iterdir()) == []  # not even the valid run started


def _toy_dataset(tmp_path):
    "A manifest 'toy' without published checksums (env for a subprocess) and a copy of it put in place by hand."
    import shutil, yaml
    from nucbook.data.datasets import manifest_dir
    mdir = tmp_path/'manifests'; (mdir/'checksums').mkdir(parents=True)
    shutil.copy(manifest_dir()/'schema.json', mdir)
    man = {'name': 'toy', 'title': 'toy data', 'citation': 'a test fixture, no citation', 'licence': 'CC0',
           'homepage': 'http://127.0.0.1/', 'loader': 'generic', 'dirs': ['toy'], 'open_splits': True,
           'download': [{'url': 'http://127.0.0.1:9/toy.zip', 'filename': 'toy.zip', 'size': None, 'sha256': None, 'extract': True}],
           'layout': {'description': 'images/ + labels/', 'markers': ['images/*'], 'expect': [{'images/*': 1, 'labels/*': 1}]},
           'splits': {'all': {'description': 'everything'}}, 'classes': None}
    (mdir/'toy.yaml').write_text(yaml.safe_dump(man))
    root = tmp_path/'root'
    for f in ('images/a.png', 'labels/a.png'): (root/'toy'/f).parent.mkdir(parents=True, exist_ok=True); (root/'toy'/f).write_bytes(b'x')
    import os
    return root, {**os.environ, 'NUCBOOK_MANIFESTS': str(mdir), 'NUCBOOK_CACHE': str(tmp_path/'cache')}


def test_verify_with_nothing_to_check_fails_and_says_how_many_files(tmp_path):
    "No published checksums and no lock: 0 files checked is an error (exit 1), not a pass; a registered copy says its count."
    root, env = _toy_dataset(tmp_path)
    p = subprocess.run(NUCBOOK + ['verify', 'toy', '--root', str(root)], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert 'nothing to verify for toy: 0 files checked' in p.stderr and f'nucbook fetch toy --from {root/"toy"}' in p.stderr
    p = subprocess.run(NUCBOOK + ['fetch', 'toy', '--dest', str(root), '--from', str(root/'toy')], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(NUCBOOK + ['verify', 'toy', '--root', str(root)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)['files_checked'] == 2
    assert 'nucbook verify: toy: 2 files checked (0 against published checksums, 2 against the lock file)' in p.stderr
    assert 'nucbook verify: warning: toy: 2 of the 2 files checked were compared only with hashes recorded' in p.stderr


# --- progress on the command line (issue 13, item 4) and small fixes (item 6)

LOOP_BODY = """import time
from nucbook.engine.loop import ResumableLoop
print('NOISE from the notebook')  # stays in the output notebook
ResumableLoop(None, {}, {}, steps, lambda s: (time.sleep(pause), {'loss': 1 / (s + 1)})[1], desc='toy').run()
time.sleep(after)"""

# what a training loop does under `nucbook run`, without importing torch (two kernels at once on 2 CPUs)
FAKE_LOOP_BODY = """import time
for s in range(1, 4):
    time.sleep(0.3)
    with open(os.environ['NUCBOOK_PROGRESS'], 'a') as f: f.write(f'[toy{x}] step {s}/3' + chr(10))
atomic_write_json(current_run_dir()/'metrics.json', {'count': x - 1, 'per_type': {'a': 0, **({'b': 2} if x == 2 else {})},
                                                    'every': os.environ['NUCBOOK_PROGRESS_EVERY']})"""


def test_run_streams_progress_lines_while_the_notebook_runs(tmp_path):
    "A real loop (2 s) in the kernel: its lines reach the terminal while it trains, the notebook's own output does not."
    nb = _nb(tmp_path/'loop.ipynb', 'steps = 20\npause = 0.1\nafter = 1.5', LOOP_BODY)
    out = tmp_path/'r'
    with open(tmp_path/'stderr.txt', 'w') as err:
        p = subprocess.Popen(NUCBOOK + ['run', str(nb), '--out', str(out), '--progress-every', '0.4'],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        got = [(time.monotonic(), line.rstrip('\n')) for line in p.stdout]  # each line with the time it arrived
        assert p.wait(timeout=120) == 0
    assert 'IPKernelApp' not in (tmp_path/'stderr.txt').read_text()  # the kernel's start-up warnings stay quiet
    t_end = time.monotonic()
    lines = [l for _, l in got]
    assert lines[0] == f'running loop.ipynb in {out.resolve()}' and lines[-1] == f'run folder: {out.resolve()}'
    steps = [(t, l) for t, l in got if l.startswith('[toy] step ')]
    done = [(t, l) for t, l in got if l.startswith('[toy] done at step 20/20, ')]
    assert len(steps) >= 2 and len(done) == 1, lines
    assert re.fullmatch(r'\[toy\] step \d+/20 \(\d+%\), loss [0-9.e-]+, \d+s elapsed, ETA \d+s', steps[0][1]), steps[0][1]
    assert done[0][0] - steps[0][0] >= 0.8  # the lines came during the 2 s loop, not all at once
    assert t_end - done[0][0] >= 1.0  # and before the run ended (its last cell waits 1.5 s)
    assert not any('NOISE' in l for l in lines)  # the notebook's own output stays in the output notebook
    assert (out/'progress.log').read_text().splitlines() == [l for l in lines if l.startswith('[')]


def test_batch_prints_one_line_per_event_with_two_jobs(tmp_path):
    nb = _nb(tmp_path/'fake.ipynb', 'x = 1', FAKE_LOOP_BODY)
    grid = tmp_path/'g.yaml'
    grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\ngrid:\n  x: [1, 2]\n")
    p = subprocess.run(NUCBOOK + ['batch', str(grid), '--jobs', '2', '--progress-every', '7'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith('2 runs in ') and lines[-1].startswith('results: ')
    names = [r['name'] for r in load_grid(grid)['runs']]
    assert names == [f'fake-x={x}-cfg={config_hash({})}' for x in (1, 2)]
    assert {lines[1], lines[2]} == {f'{n}: started' for n in names}  # both run at once
    for i, n in enumerate(names, 1):
        mine = [l for l in lines if l.startswith(f'{n}: ') or re.match(rf'\[\d/2\] {n}: ', l)]
        assert mine[:-1] == [f'{n}: started'] + [f'{n}: [toy{i}] step {s}/3' for s in (1, 2, 3)], mine
        assert re.fullmatch(rf'\[\d/2\] {n}: ok in \d+s', mine[-1]), mine
    # results.csv: a 0 in metrics.json is 0, an integer stays an integer, blank only where a run has no value
    csv = (tmp_path/'b'/'results.csv').read_text().splitlines()
    assert csv[0].endswith('param.x,count,per_type.a,every,per_type.b'), csv[0]
    assert csv[1].endswith(',1,0,0,7.0,') and csv[2].endswith(',2,1,0,7.0,2'), csv  # --progress-every reached the kernels


def test_fetch_and_verify_help_list_the_datasets(capsys):
    from nucbook.data.datasets import list_datasets
    names = [n for n in list_datasets() if n not in ('synthetic', 'generic')]
    assert 'kumar' in names and 'tnbc' in names
    for cmd in ('fetch', 'verify'):
        with pytest.raises(SystemExit) as e: main([cmd, '--help'])
        assert e.value.code == 0
        h = ' '.join(capsys.readouterr().out.split())
        assert [n for n in names if not re.search(rf' {n}[,.]', h)] == [] and 'synthetic' not in h and 'generic' not in h, h
    with pytest.raises(SystemExit): main(['run', 'x', '--progress-every', 'soon'])
    assert "--progress-every: expected a number of seconds >= 0, got 'soon'" in capsys.readouterr().err


# --- `nucbook batch` fixes (issue 19): run identity, one process per run folder, stopping, progress while it runs

def test_batch_run_identity_includes_fixed_parameters_and_profile(square_nb, tmp_path):
    "Changing a fixed parameter or the profile makes new run folders: old runs are not 'done', and the table shows what each run used."
    grid, out = tmp_path/'grid.yaml', tmp_path/'b'
    def write(extra): grid.write_text(f"notebook: {square_nb}\nout: {out}\n{extra}grid:\n  x: [3]\n")
    write('parameters: {label: a}\n')
    lines = []; df_a = run_batch(grid, log=lines.append)
    assert '0 already done, 1 to run' in lines[0]
    old = {d.name: (d/'metrics.json').read_text() for d in out.iterdir() if d.is_dir()}
    assert len(old) == 1 and all('"label": "a"' in m for m in old.values())
    write('parameters: {label: b}\n')  # a fixed parameter changed: nothing is done yet
    lines = []; df = run_batch(grid, log=lines.append)
    assert '0 already done, 1 to run' in lines[0], lines[0]
    assert list(df['param.label']) == ['b'] and list(df['label']) == ['b'] and list(df['square']) == [9]
    assert set(df['run']).isdisjoint(df_a['run'])
    assert {d.name: (d/'metrics.json').read_text() for d in out.iterdir() if d.name in old} == old  # left alone
    assert set(pd.read_csv(out/'results.csv')['run']) == set(df['run'])  # the table reports only this grid's runs
    write('profile: paper\nparameters: {label: b}\n')  # the profile too
    lines = []; df_p = run_batch(grid, log=lines.append)
    assert '0 already done, 1 to run' in lines[0] and list(df_p['param.profile']) == ['paper']
    assert list(df_p['profile']) == ['paper'] and set(df_p['run']).isdisjoint(df['run'])
    lines = []; run_batch(grid, log=lines.append)
    assert '1 already done, 0 to run' in lines[0]
    # a folder recording other parameters than its run's (never made by the batch itself): stop before anything runs
    rec = json.loads((out/df_p['run'][0]/'params.json').read_text())
    rec['injected']['label'] = 'c'; (out/df_p['run'][0]/'params.json').write_text(json.dumps(rec))
    with pytest.raises(RunError, match=r"1 run folder\(s\) hold a run made with other parameters.*\n.*label: 'c' in the folder, 'b' in the grid"):
        run_batch(grid, log=lambda *a: None)


SLOW_BODY = """import time
atomic_write_json(current_run_dir()/'kernel.json', {'pid': os.getpid()})
t0 = time.time()
while not os.path.exists(release) and time.time() - t0 < 90: time.sleep(0.1)
atomic_write_json(current_run_dir()/'metrics.json', {'x': x})"""


def _alive(pid: int) -> bool:
    "The process exists and is not a zombie."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (FileNotFoundError, IndexError): return False


def _wait_for(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: raise AssertionError(f'{what}: not after {timeout} s')
        time.sleep(0.1)


def _slow_grid(tmp_path, xs):
    nb = _nb(tmp_path/'slow.ipynb', "x = 1\nrelease = ''", SLOW_BODY)
    grid, release = tmp_path/'g.yaml', tmp_path/'release'
    grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\nparameters: {{release: {json.dumps(str(release))}}}\ngrid:\n  x: {xs}\n")
    runs = [tmp_path/'b'/r['name'] for r in load_grid(grid)['runs']]
    return nb, grid, release, runs


def _run_pids(run: Path) -> tuple[int, int]:
    "(pid of the `nucbook run` working in `run`, pid of its kernel)."
    m = re.match(r'pid (\d+) on ', lock_holder(run) or '')
    assert m, lock_holder(run)
    return int(m[1]), json.loads((run/'kernel.json').read_text())['pid']


def test_killed_batch_leaves_its_run_locked_and_a_restart_skips_it(tmp_path):
    "kill -9 of the batch: its run goes on holding its folder's lock; a new batch (or nucbook run) starts no second process there."
    nb, grid, release, (run,) = _slow_grid(tmp_path, [1])
    b1 = subprocess.Popen(NUCBOOK + ['batch', str(grid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pid = kernel = None
    try:
        _wait_for(lambda: (run/'kernel.json').exists(), 90, 'the run started')
        pid, kernel = _run_pids(run)
        os.kill(b1.pid, 9); b1.wait(timeout=10)
        time.sleep(1)
        assert _alive(pid) and _alive(kernel)  # the run outlives its batch ...
        started = json.loads((run/'params.json').read_text())['started']
        p = subprocess.run(NUCBOOK + ['batch', str(grid)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].endswith(': 0 already done, 1 busy, 0 to run with 1 job(s)'), lines
        assert lines[1].startswith(f'{run.name}: busy, skipped: nucbook run pid {pid} on '), lines
        assert lines[-1].endswith('(0 ok, 0 failed, 1 still running in another process)'), lines
        assert pd.read_csv(tmp_path/'b'/'results.csv')['status'].tolist() == ['running']
        # ... and `nucbook run` itself refuses the folder (exit 75), so does a batch that raced past its look
        p = subprocess.run(NUCBOOK + ['run', str(nb), '--out', str(run), '-p', 'release', json.dumps(str(release))],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 75 and f'is busy: nucbook run pid {pid} on ' in p.stderr and 'Traceback' not in p.stderr, p.stderr
        assert json.loads((run/'params.json').read_text())['started'] == started and _run_pids(run) == (pid, kernel)
        release.touch()  # the orphaned run ends by itself; then the batch finds it done
        _wait_for(lambda: lock_holder(run) is None, 60, 'the orphaned run ended')
        assert json.loads((run/'params.json').read_text())['status'] == 'ok'
        p = subprocess.run(NUCBOOK + ['batch', str(grid)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and ': 1 already done, 0 to run' in p.stdout.splitlines()[0], p.stdout
    finally:
        release.touch()
        for q in (pid, b1.pid):
            try: os.killpg(q, 9)
            except (ProcessLookupError, TypeError): pass


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_stopping_the_batch_stops_its_runs(tmp_path, sig):
    "SIGTERM or Ctrl-C (SIGINT) to the batch: each run's process group ends, then the batch, with one line and no traceback."
    xs = [1, 2] if sig == 'SIGTERM' else [1]
    nb, grid, release, runs = _slow_grid(tmp_path, xs)
    # SIGINT comes in ignored, as for a command started with `&` by a non-interactive shell: Ctrl-C must still stop it
    ignore_int = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sig == 'SIGINT' else None
    b = subprocess.Popen(NUCBOOK + ['batch', str(grid), '--jobs', '2'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=ignore_int)
    try:
        _wait_for(lambda: all((r/'kernel.json').exists() for r in runs), 90, 'the runs started')
        pids = [p for r in runs for p in _run_pids(r)]
        t0 = time.monotonic()
        b.send_signal(getattr(signal, sig))
        _, err = b.communicate(timeout=60)
        assert b.returncode == 128 + getattr(signal, sig), (b.returncode, err)
        how = 'Ctrl-C' if sig == 'SIGINT' else sig
        names = ', '.join(r.name for r in runs)
        assert err == f'nucbook batch: stopped ({how}): stopped {len(runs)} run(s): {names}; the same command resumes the batch\n', err
        _wait_for(lambda: not any(_alive(p) for p in pids), 5, 'the runs and their kernels ended')
        assert time.monotonic() - t0 < 20
        assert [json.loads((r/'params.json').read_text())['status'] for r in runs] == ['stopped'] * len(runs)
        assert [lock_holder(r) for r in runs] == [None] * len(runs)
    finally:
        release.touch()
        if b.poll() is None: os.killpg(b.pid, 9)


def test_batch_shows_a_runs_progress_while_it_runs(tmp_path):
    "The run's start and its progress lines reach the batch's stdout as they happen, seconds before the run ends."
    body = ("import time\nfor s in (1, 2):\n    with open(os.environ['NUCBOOK_PROGRESS'], 'a') as f: f.write(f'[slow] step {s}/2' + chr(10))\n"
            "    time.sleep(2)\natomic_write_json(current_run_dir()/'metrics.json', {'x': x})")
    nb = _nb(tmp_path/'p.ipynb', 'x = 1', body)
    grid = tmp_path/'g.yaml'; grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\ngrid:\n  x: [1]\n")
    name = load_grid(grid)['runs'][0]['name']
    p = subprocess.Popen(NUCBOOK + ['batch', str(grid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = {line.rstrip('\n'): time.monotonic() for line in p.stdout}
    assert p.wait(timeout=120) == 0, p.stderr.read()
    end = next(t for l, t in got.items() if re.fullmatch(rf'\[1/1\] {name}: ok in \d+s', l))
    assert end - got[f'{name}: started'] >= 4 and end - got[f'{name}: [slow] step 1/2'] >= 3.5, got
    assert got[f'{name}: [slow] step 2/2'] - got[f'{name}: [slow] step 1/2'] >= 1.5, got  # each as it came


def test_a_kernel_that_dies_while_starting_is_replaced(square_nb, tmp_path, monkeypatch):
    "Two kernels started at once can draw the same port: a kernel that dies before running anything is started again, up to KERNEL_START_TRIES."
    import papermill, nucbook.cli as cli
    real, calls, said = papermill.execute_notebook, [], []
    def flaky(*a, **k):
        calls.append(1)
        if len(calls) < 2: raise RuntimeError('Kernel died before replying to kernel_info')
        return real(*a, **k)
    monkeypatch.setattr(papermill, 'execute_notebook', flaky)
    d = run_notebook(square_nb, out=tmp_path/'r', progress=False, log=said.append)
    assert len(calls) == 2 and json.loads((d/'params.json').read_text())['status'] == 'ok'
    assert any('starting a new one (2/3)' in s for s in said), said
    calls.clear()
    def dead(*a, **k):
        calls.append(1); raise RuntimeError('Kernel died before replying to kernel_info')
    monkeypatch.setattr(papermill, 'execute_notebook', dead)
    with pytest.raises(RunError, match='Kernel died'): run_notebook(square_nb, out=tmp_path/'r2', progress=False, log=said.append)
    assert len(calls) == cli.KERNEL_START_TRIES
    calls.clear()
    def other(*a, **k):
        calls.append(1); raise RuntimeError('something else')
    monkeypatch.setattr(papermill, 'execute_notebook', other)
    with pytest.raises(RunError, match='something else'): run_notebook(square_nb, out=tmp_path/'r3', progress=False, log=said.append)
    assert len(calls) == 1  # only a kernel that died while starting is replaced
