"Helpers shared by the data-loader tests (test_data.py, test_data_errors.py)."
import os
from pathlib import Path
import numpy as np
import pytest

REAL = os.environ.get('NUCBOOK_DATA')
needs_real = pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason='NUCBOOK_DATA not set (real-data test)')


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    "Parsed-label caches of a test go to its own temporary folder (imported by the modules that use it)."
    monkeypatch.setenv('NUCBOOK_CACHE', str(tmp_path / 'label-cache'))


def img(h=16, w=16, seed=0):
    "A random RGB uint8 image."
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
