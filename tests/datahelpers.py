"Helpers shared by the tests: data loaders (test_data.py, test_data_errors.py), random samples (test_augment.py, test_standard_aug.py)."
import os
from pathlib import Path
import cv2
import numpy as np
import pytest
from nucbook.data.sample import make_sample

REAL = os.environ.get('NUCBOOK_DATA')
needs_real = pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason='NUCBOOK_DATA not set (real-data test)')


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    "Parsed-label caches of a test go to its own temporary folder (imported by the modules that use it)."
    monkeypatch.setenv('NUCBOOK_CACHE', str(tmp_path / 'label-cache'))


def img(h=16, w=16, seed=0):
    "A random RGB uint8 image."
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def random_sample(seed, shape=(48, 48), typed=True, n_max=14, rare_share=0.3):
    "Random ellipses painted in order (later ones occlude), random image, random types (type 1 = rare)."
    rng = np.random.default_rng(seed); h, w = shape
    inst = np.zeros(shape, np.int32); n = int(rng.integers(0, n_max + 1))
    for i in range(1, n + 1):
        cv2.ellipse(inst, (int(rng.integers(0, w)), int(rng.integers(0, h))), (int(rng.integers(2, 9)), int(rng.integers(2, 9))),
                    float(rng.uniform(0, 180)), 0, 360, i, -1)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    types = {i: int(1 if rng.random() < rare_share else rng.integers(2, 5)) for i in range(1, n + 1)} if typed else None
    return make_sample(img, inst, inst_types=types, meta={'image_id': f'r{seed}'})
