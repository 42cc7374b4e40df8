"""`nucbook batch --executor slurm` against a real single-node SLURM cluster on this machine (tools/slurm/cluster.sh:
Debian's slurm-wlm and munge, loopback only), started once per test session and stopped afterwards."""
import fcntl, json, os, re, signal, subprocess, sys, threading, time
from contextlib import contextmanager
from pathlib import Path
import nbformat
import pandas as pd
import pytest
from nucbook.cli import load_grid, lock_holder

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT/'tools'/'slurm'/'cluster.sh'
STATE = Path(os.environ.get('NUCBOOK_SLURM_DIR', '/tmp/nucbook-slurm'))
NUCBOOK = [sys.executable, '-c', 'from nucbook.cli import main; main()']


@contextmanager
def _flock(path: Path):
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (FileNotFoundError, IndexError): return False


@pytest.fixture(scope='session')
def slurm_cluster():
    """The test cluster, started (and slurm-wlm/munge installed) when this session needs it. pytest-xdist workers share
    it: each registers in a users file; the last one out stops it, unless it was running before the tests."""
    users, lockf = Path(f'{STATE}.users.json'), Path(f'{STATE}.lock')
    STATE.parent.mkdir(parents=True, exist_ok=True)
    with _flock(lockf):
        t0 = time.monotonic()
        p = subprocess.run(['bash', str(CLUSTER), 'start'], capture_output=True, text=True, timeout=900)
        if p.returncode:
            pytest.skip(f'the SLURM test cluster cannot start (tools/slurm/cluster.sh start): {(p.stdout + p.stderr).strip()[-1500:]}')
        print(f'SLURM test cluster ready in {time.monotonic() - t0:.0f} s:\n{p.stdout}')
        try: st = json.loads(users.read_text())
        except (OSError, ValueError): st = {}
        pids = [q for q in st.get('pids', []) if _alive(q)]
        stop = st.get('stop', True) if pids else 'already running' not in p.stdout  # never stop a cluster we did not start
        users.write_text(json.dumps({'pids': pids + [os.getpid()], 'stop': stop}))
    before = os.environ.get('SLURM_CONF')
    os.environ['SLURM_CONF'] = str(STATE/'slurm.conf')  # sbatch, squeue, scancel (ours and submitit's) read it
    yield STATE/'slurm.conf'
    if before is None: os.environ.pop('SLURM_CONF', None)
    else: os.environ['SLURM_CONF'] = before
    with _flock(lockf):
        st = json.loads(users.read_text())
        st['pids'] = [q for q in st['pids'] if q != os.getpid() and _alive(q)]
        users.write_text(json.dumps(st))
        if not st['pids'] and st['stop']: subprocess.run(['bash', str(CLUSTER), 'stop'], capture_output=True, timeout=120)


def _nb(path, param_src, body_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(param_src); p.metadata['tags'] = ['parameters']
    nb.cells = [nbformat.v4.new_code_cell('import json, os\nfrom nucbook.core import current_run_dir, atomic_write_json'),
                p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, str(path))
    return path


class _Batch:
    "`nucbook batch` in the background, its stdout lines collected as they come."
    def __init__(self, *args):
        self.p = subprocess.Popen(NUCBOOK + ['batch', *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.lines = []
        self._t = threading.Thread(target=lambda: self.lines.extend(l.rstrip('\n') for l in self.p.stdout), daemon=True)
        self._t.start()
    def wait(self, timeout):
        err = self.p.stderr.read() if self.p.wait(timeout=timeout) is not None else ''
        self._t.join(timeout=10)
        return self.p.returncode, err
    def kill(self):
        if self.p.poll() is None: os.killpg(self.p.pid, 9)


def _wait_for(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: raise AssertionError(f'{what}: not after {timeout} s')
        time.sleep(0.2)


def _jobs(out: Path) -> dict:
    return json.loads((out/'.slurm'/'jobs.json').read_text())


# a short training loop: progress lines, metrics; where.json says where it ran (not in metrics: the results must match)
FAKE_BODY = """import time
atomic_write_json(current_run_dir()/'where.json', {'job': os.environ.get('SLURM_JOB_ID'), 'array': os.environ.get('SLURM_ARRAY_JOB_ID')})
for s in range(1, 4):
    time.sleep(0.5)
    with open(os.environ['NUCBOOK_PROGRESS'], 'a') as f: f.write(f'[toy{x}] step {s}/3' + chr(10))
atomic_write_json(current_run_dir()/'metrics.json', {'square': x * x, 'per_type': {'a': x - 1}, 'label': label})"""


def test_slurm_batch_is_one_job_array_with_the_results_of_a_local_batch(slurm_cluster, tmp_path):
    nb = _nb(tmp_path/'toy.ipynb', "x = 1\nlabel = 'a'", FAKE_BODY)
    grid = tmp_path/'g.yaml'
    grid.write_text(f"notebook: {nb}\nparameters: {{label: z}}\ngrid:\n  x: [1, 2]\n"
                    "slurm:\n  cpus_per_run: 1\n  mem: 300M\n  time: 0:10:00\n")  # 10 minutes; the command line wins below
    names = [r['name'] for r in load_grid(grid)['runs']]
    local = subprocess.run(NUCBOOK + ['batch', str(grid), '--out', str(tmp_path/'local'), '--jobs', '2'],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    b = _Batch(grid, '--out', tmp_path/'slurm', '--executor', 'slurm', '--time', '5', '--array-parallelism', '2')
    rc, err = b.wait(timeout=300)
    assert rc == 0 and 'Traceback' not in err, (rc, err, b.lines)
    jobs = _jobs(tmp_path/'slurm')
    array = jobs[names[0]].split('_')[0]
    assert jobs == {n: f'{array}_{i}' for i, n in enumerate(names)}  # one job array, one task per run
    assert b.lines[0].endswith(': 0 already done, 2 to run as SLURM jobs'), b.lines
    assert b.lines[1] == f"submitted 2 run(s) as SLURM job {array} (an array); submitit's logs: {tmp_path/'slurm'/'.slurm'}", b.lines
    for i, n in enumerate(names, 1):  # per run: its job's states, its progress lines while it runs, then its end
        mine = [l for l in b.lines if l.startswith(f'{n}: ') or re.match(rf'\[\d/2\] {n}: ', l)]
        running = mine.index(f'{n}: job {jobs[n]} RUNNING')
        steps = [mine.index(f'{n}: [toy{i}] step {s}/3') for s in (1, 2, 3)]
        assert running < steps[0] < steps[1] < steps[2] < len(mine) - 1, mine
        assert f'{n}: job {jobs[n]} COMPLETED' in mine and re.fullmatch(rf'\[\d/2\] {n}: ok in \d+s', mine[-1]), mine
        assert json.loads((tmp_path/'slurm'/n/'where.json').read_text())['array'] == array
        assert json.loads((tmp_path/'local'/n/'where.json').read_text())['array'] is None
    # the same results as a local batch: same runs, parameters, statuses and metrics
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path/'slurm'/'results.csv'), pd.read_csv(tmp_path/'local'/'results.csv'))
    script = (tmp_path/'slurm'/'.slurm'/f'{array}_submission.sh').read_text()
    for line in ('#SBATCH --array=0-1%2', '#SBATCH --cpus-per-task=1', '#SBATCH --mem=300M', '#SBATCH --time=5',
                 '#SBATCH --job-name=nucbook-g', '#SBATCH --signal=USR2@75'):
        assert line in script.splitlines(), (line, script)
    b2 = _Batch(grid, '--out', tmp_path/'slurm', '--executor', 'slurm')  # started again: nothing to submit
    assert b2.wait(timeout=120)[0] == 0 and b2.lines[0].endswith(': 2 already done, 0 to run as SLURM jobs'), b2.lines


# a resumable loop: it saves its step after each one and starts from the saved step; starts.json lists where each start began
RESUME_BODY = """import time
ck, st = current_run_dir()/'ckpt.json', current_run_dir()/'starts.json'
start = json.loads(ck.read_text())['step'] if ck.exists() else 0
starts = (json.loads(st.read_text()) if st.exists() else []) + [start]
atomic_write_json(st, starts)
for s in range(start + 1, steps + 1):
    time.sleep(pause)
    atomic_write_json(ck, {'step': s})
    with open(os.environ['NUCBOOK_PROGRESS'], 'a') as f: f.write(f'[train] step {s}/{steps}' + chr(10))
atomic_write_json(current_run_dir()/'metrics.json', {'steps': s, 'starts': starts, 'job': os.environ.get('SLURM_JOB_ID')})"""


def test_a_requeued_job_resumes_its_run_and_a_new_batch_watches_it(slurm_cluster, tmp_path):
    """SIGUSR2 to the running job, the signal SLURM sends before the time limit (`--signal=USR2@...`, set by submitit)
    and on pre-emption: the job stops its run, requeues itself, starts again and the run resumes from its checkpoint.
    The batch that submitted it is killed (kill -9) meanwhile: a new batch watches the queued job instead of resubmitting."""
    nb = _nb(tmp_path/'train.ipynb', 'steps = 12\npause = 0.5', RESUME_BODY)
    grid = tmp_path/'g.yaml'; grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\ngrid:\n  steps: [12]\n")
    name = load_grid(grid)['runs'][0]['name']
    run = tmp_path/'b'/name
    b = _Batch(grid, '--executor', 'slurm', '--time', '10')
    b2 = None
    try:
        _wait_for(lambda: (run/'ckpt.json').exists() and json.loads((run/'ckpt.json').read_text())['step'] >= 3, 120, 'step 3 saved')
        job = _jobs(tmp_path/'b')[name]
        subprocess.run(['scancel', '--signal=USR2', job], check=True, capture_output=True)
        requeued = f'{name}: job {job} PENDING (requeued: the run goes on from its checkpoints when it starts again)'
        _wait_for(lambda: requeued in b.lines, 60, 'the batch saw the requeue')
        b.kill(); b.wait(timeout=10)
        b2 = _Batch(grid, '--executor', 'slurm', '--time', '10')
        rc, err = b2.wait(timeout=240)
    finally:
        b.kill()
        if b2: b2.kill()
    assert rc == 0 and 'Traceback' not in err, (rc, err, b2.lines)
    m = json.loads((run/'metrics.json').read_text())
    assert m['steps'] == 12 and len(m['starts']) == 2 and m['starts'][0] == 0 and 3 <= m['starts'][1] < 12, m
    assert b2.lines[0].endswith(': 0 already done, 1 to run as SLURM jobs'), b2.lines
    assert b2.lines[1] == f'{name}: already queued as SLURM job {job} by an earlier batch; watching it', b2.lines
    states = [[l.split(f'{name}: job {job} ')[1].split()[0] for l in b_.lines if l.startswith(f'{name}: job {job} ')] for b_ in (b, b2)]
    assert 'PENDING' in states[0][states[0].index('RUNNING'):], states  # the first batch saw it run, then wait again
    assert states[1][0] in ('PENDING', 'RUNNING') and 'RUNNING' in states[1] and states[1][-1] == 'COMPLETED', states  # the second
    steps = [int(re.fullmatch(rf'{name}: \[train\] step (\d+)/12', l)[1]) for l in b2.lines if '[train] step' in l]
    assert steps[-1] == 12 and set(range(m['starts'][1] + 1, 13)) <= set(steps), steps  # the second attempt's lines
    assert re.fullmatch(rf'\[1/1\] {name}: ok in \d+s', [l for l in b2.lines if name in l][-1]), b2.lines
    log = ''.join((tmp_path/'b'/'.slurm'/f'{job}_0_log.{e}').read_text() for e in ('out', 'err'))  # submitit's, the job's
    for said in ('Caught signal SIGUSR2', 'stopping the run to requeue it', f'Requeued job {job}'): assert said in log, (said, log[-3000:])
    assert pd.read_csv(tmp_path/'b'/'results.csv')['status'].tolist() == ['ok']


SLOW_BODY = """import time
atomic_write_json(current_run_dir()/'kernel.json', {'pid': os.getpid()})
t0 = time.time()
while time.time() - t0 < 120: time.sleep(0.1)"""


def test_ctrl_c_cancels_the_jobs(slurm_cluster, tmp_path):
    nb = _nb(tmp_path/'slow.ipynb', 'x = 1', SLOW_BODY)
    grid = tmp_path/'g.yaml'; grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\ngrid:\n  x: [1]\n")
    run = tmp_path/'b'/load_grid(grid)['runs'][0]['name']
    b = _Batch(grid, '--executor', 'slurm')
    try:
        _wait_for(lambda: (run/'kernel.json').exists() and lock_holder(run), 120, 'the run started')
        pids = [int(re.match(r'pid (\d+)', lock_holder(run))[1]), json.loads((run/'kernel.json').read_text())['pid']]
        job = _jobs(tmp_path/'b')[run.name]
        b.p.send_signal(signal.SIGINT)
        rc, err = b.wait(timeout=60)
    finally: b.kill()
    assert rc == 130 and err == (f'nucbook batch: stopped (Ctrl-C): cancelled SLURM job(s) {job} (1 run(s)); '
                                 'the same command resumes the batch\n'), (rc, err)
    def state():
        return subprocess.run(['squeue', '-h', '--states=all', '-j', job, '-o', '%T'], capture_output=True, text=True).stdout.strip()
    _wait_for(lambda: state() == 'CANCELLED', 30, 'the job cancelled')
    _wait_for(lambda: not any(_alive(p) for p in pids), 30, "the job's run and kernel ended")


def test_a_request_the_cluster_cannot_meet_is_one_clear_error(slurm_cluster, tmp_path):
    "--gpus-per-run reaches sbatch as a GPU request; the test cluster has no GPUs, so sbatch refuses: one error line, nothing submitted."
    nb = _nb(tmp_path/'toy.ipynb', 'x = 1', 'pass')
    grid = tmp_path/'g.yaml'; grid.write_text(f"notebook: {nb}\nout: {tmp_path/'b'}\ngrid:\n  x: [1, 2]\n")
    p = subprocess.run(NUCBOOK + ['batch', str(grid), '--executor', 'slurm', '--gpus-per-run', '1'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert ('nucbook batch: error: sbatch did not take the jobs: FailedJobError: sbatch: error: Invalid generic resource (gres) '
            'specification') in p.stderr, p.stderr
    assert not (tmp_path/'b'/'.slurm'/'jobs.json').exists()
