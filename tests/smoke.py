"A paper notebook's smoke profile run end to end with `nucbook run`, as `make demo` does (the smoke-run tests)."
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(name:str, out) -> dict:
    "Run notebook `name` (smoke profile) into `out`; fail with the end of its output unless it succeeds; its metrics.json."
    r = subprocess.run([str(Path(sys.executable).parent/'nucbook'), 'run', name, '--profile', 'smoke', '--out', str(out),
                        '--no-progress'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((Path(out)/'metrics.json').read_text())
