"`make lab`: JupyterLab from .venv serves /lab and runs a notebook cell with the widget browser on loopback."
import asyncio, base64, http.client, json, os, re, secrets, signal, socket, subprocess, time, tomllib, uuid
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB_SH = ROOT/'tools'/'lab.sh'
VENV = ROOT/'.venv'
WIDGET_MIME = 'application/vnd.jupyter.widget-view+json'
MARK = 'NUCBOOK-LAB-TEST '
CELL = f'''
import json, os, sys, matplotlib, nucbook
from nucbook.data.synth import synth_dataset
from nucbook.eval.viz import browse
w = browse(synth_dataset(2, size=48))
print({MARK!r} + json.dumps(dict(prefix=sys.prefix, pid=os.getpid(), nucbook=nucbook.__file__, model_id=w.model_id,
      cls=type(w).__module__ + '.' + type(w).__name__, backend=matplotlib.get_backend(), cwd=os.getcwd())))
'''


def test_make_lab_runs_the_launcher_and_jupyterlab_is_pinned():
    "The `lab` target starts tools/lab.sh (what the server test below runs); jupyterlab is a pinned dependency."
    make = (ROOT/'Makefile').read_text()
    recipe = re.search(r'^lab: venv\n((?:\t.*\n)+)', make, re.M)
    assert recipe, 'Makefile has no `lab: venv` target'
    assert 'tools/lab.sh' in recipe.group(1)
    assert re.search(r'^\.PHONY:.*\blab\b', make, re.M) and 'make lab' in make, '`lab` is not phony or not in `make help`'
    deps = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['dependencies']
    assert any(re.fullmatch(r'jupyterlab==[0-9.]+', d) for d in deps), 'jupyterlab is not a pinned dependency'


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _get(port, path, token):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    try:
        c.request('GET', path, headers={'Authorization': f'token {token}'})
        r = c.getresponse(); return r.status, dict(r.getheaders()), r.read()
    finally: c.close()


def _call(port, method, path, token, body=None):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={'Authorization': f'token {token}', 'Content-Type': 'application/json'})
        r = c.getresponse(); return r.status, r.read()
    finally: c.close()


def _alive(pid):
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    return True


async def _execute(port, token, kernel_id, code, timeout=60):
    "Run `code` over the kernel websocket; return (execute_reply content, iopub messages of that request)."
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect
    session = uuid.uuid4().hex
    ws = await websocket_connect(HTTPRequest(f'ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?session_id={session}',
                                             headers={'Authorization': f'token {token}'}))
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        'header': dict(msg_id=msg_id, msg_type='execute_request', session=session, username='test', version='5.3',
                       date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())),
        'parent_header': {}, 'metadata': {}, 'channel': 'shell', 'buffers': [],
        'content': dict(code=code, silent=False, store_history=False, user_expressions={}, allow_stdin=False,
                        stop_on_error=True)}))
    reply, iopub, idle = None, [], False
    async def pump():
        nonlocal reply, idle
        while reply is None or not idle:
            raw = await ws.read_message()
            assert raw is not None, 'the kernel websocket closed before the cell finished'
            m = json.loads(raw)
            if m.get('parent_header', {}).get('msg_id') != msg_id: continue
            if m['channel'] == 'shell' and m['msg_type'] == 'execute_reply': reply = m['content']
            elif m['channel'] == 'iopub':
                iopub.append(m)
                if m['msg_type'] == 'status' and m['content']['execution_state'] == 'idle': idle = True
    try: await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f'the cell did not finish in {timeout} s; iopub so far: {[m["msg_type"] for m in iopub]}')
    finally: ws.close()
    return reply, iopub


def test_lab_serves_lab_and_runs_browse_in_a_kernel(tmp_path):
    "Start what `make lab` starts (tools/lab.sh) on loopback, GET /lab, run `browse(...)` in a kernel, stop it all."
    assert (VENV/'bin'/'jupyter-lab').exists(), 'jupyterlab is not installed in .venv (a pinned dependency): run make venv'
    port, token = _free_port(), secrets.token_hex(16)
    dirs = {k: tmp_path/k.lower() for k in ('JUPYTER_RUNTIME_DIR', 'JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'IPYTHONDIR')}
    for d in [*dirs.values(), tmp_path/'root']: d.mkdir()
    # MPLBACKEND=Agg (set by conftest and the Makefile) stays in the environment: the launcher must drop it
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, 'MPLBACKEND': 'Agg'}
    log = tmp_path/'server.log'
    cmd = ['bash', str(LAB_SH), '--no-browser', f'--port={port}', '--ServerApp.port_retries=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path/"root"}']
    with open(log, 'wb') as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    tail = lambda: '\n'.join(log.read_text(errors='replace').splitlines()[-25:])
    kernel_pid = None
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the server
            if proc.poll() is not None:
                pytest.fail(f'tools/lab.sh exited with {proc.returncode} before serving; log tail:\n{tail()}')
            try:
                if _get(port, '/api', token)[0] == 200: break
            except OSError: pass
            if time.monotonic() > deadline: pytest.fail(f'JupyterLab did not answer /api within 60 s; log tail:\n{tail()}')
            time.sleep(0.2)

        st, hdr, _ = _get(port, '/', token)  # `make lab` opens nbs/
        assert st == 302 and hdr['Location'].startswith('/lab/tree/nbs'), (st, hdr.get('Location'))
        st, _, html = _get(port, '/lab', token)
        html = html.decode()
        assert st == 200 and '<title>JupyterLab</title>' in html, f'GET /lab: {st}\n{html[:500]}'
        assert '@jupyter-widgets/jupyterlab-manager' in html, 'the ipywidgets lab extension (jupyterlab_widgets) is not served'
        st, _, body = _get(port, '/api/kernelspecs', token)
        assert json.loads(body)['default'] == 'python3'  # the kernel every notebook names

        st, body = _call(port, 'POST', '/api/kernels', token, {'name': 'python3', 'path': ''})  # cwd: the root
        assert st == 201, f'POST /api/kernels: {st} {body[:300]!r}; log tail:\n{tail()}'
        kernel_id = json.loads(body)['id']
        reply, iopub = asyncio.run(_execute(port, token, kernel_id, CELL))
        errors = [m['content'] for m in iopub if m['msg_type'] == 'error']
        assert reply['status'] == 'ok', f"cell failed: {reply.get('ename')}: {reply.get('evalue')}\n{errors}"
        out = ''.join(m['content']['text'] for m in iopub if m['msg_type'] == 'stream')
        info = json.loads(out.split(MARK, 1)[1].splitlines()[0])
        kernel_pid = info['pid']
        assert Path(info['prefix']).resolve() == VENV.resolve(), f"the kernel runs {info['prefix']}, not .venv"
        assert Path(info['nucbook']).resolve().is_relative_to(ROOT), info['nucbook']
        assert Path(info['cwd']).resolve() == (tmp_path/'root').resolve()
        assert info['cls'] == 'ipywidgets.widgets.widget_box.VBox'
        assert 'inline' in info['backend'], f"figures would not show in the lab: matplotlib backend {info['backend']}"
        shown = [m['content']['data'] for m in iopub if m['msg_type'] == 'display_data']
        views = [d[WIDGET_MIME]['model_id'] for d in shown if WIDGET_MIME in d]
        assert views == [info['model_id']], f'widget views displayed: {views}, browse() returned {info["model_id"]}'
        opened = {m['content']['comm_id']: m['content']['data']['state'].get('_model_name') for m in iopub
                  if m['msg_type'] == 'comm_open' and m['content']['target_name'] == 'jupyter.widget'}
        assert opened.get(info['model_id']) == 'VBoxModel', 'the browser widget model was not opened on the frontend comm'
        assert {'IntSliderModel', 'ToggleButtonsModel', 'OutputModel'} <= set(opened.values()), sorted(opened.values())
        pngs = [base64.b64decode(d['image/png']) for d in shown if 'image/png' in d]
        assert len(pngs) == 1 and pngs[0][:8] == b'\x89PNG\r\n\x1a\n', 'browse() drew no inline figure'

        st, _ = _call(port, 'DELETE', f'/api/kernels/{kernel_id}', token)
        assert st == 204, f'DELETE kernel: {st}'
    finally:
        if proc.poll() is None: proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down and exits
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
            pytest.fail(f'JupyterLab did not stop on SIGTERM within 20 s; log tail:\n{tail()}')
        if kernel_pid is not None:
            for _ in range(50):
                if not _alive(kernel_pid): break
                time.sleep(0.1)
            else:
                os.kill(kernel_pid, signal.SIGKILL); pytest.fail(f'kernel {kernel_pid} outlived the server')
    assert proc.returncode is not None
