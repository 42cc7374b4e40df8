"The test suite says when real-data tests were skipped, and how to run them (tests/conftest.py)."
import os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = '''import pytest
from datahelpers import needs_real

def test_a(data_root): pass
def test_b(data_root): pass
@needs_real
def test_c(): pass
def test_other():
    pytest.skip('no GPU')
def test_plain(): pass
'''


def _pytest(tmp_path, data, *extra):
    "Run pytest on a copy of conftest.py and three real-data tests, with NUCBOOK_DATA set to `data` (None: unset)."
    for f in ('conftest.py', 'datahelpers.py'): shutil.copy(ROOT/'tests'/f, tmp_path/f)
    (tmp_path/'test_x.py').write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != 'NUCBOOK_DATA'}
    if data: env['NUCBOOK_DATA'] = str(data)
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *extra,
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_summary_counts_skipped_real_data_tests(tmp_path):
    "Under xdist too (`make test` runs pytest -n 2): the workers' skips reach the summary; none when the data is there."
    p = _pytest(tmp_path, None, '-n', '2')
    assert p.returncode == 0, p.stdout
    assert ('3 real-data tests skipped: NUCBOOK_DATA is not set. Run them with `NUCBOOK_DATA=/path/to/data make test` '
            '(CI sets it to ../shared/data when that folder exists).') in p.stdout, p.stdout
    (tmp_path/'data').mkdir()
    p = _pytest(tmp_path, tmp_path/'data')
    assert p.returncode == 0 and 'real-data test' not in p.stdout and '4 passed, 1 skipped' in p.stdout, p.stdout
