import os
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_root():
    "The real datasets (`$NUCBOOK_DATA`, e.g. ../shared/data); tests using it are skipped when it is unset."
    d = os.environ.get('NUCBOOK_DATA')
    if not d or not Path(d).is_dir():
        pytest.skip('NUCBOOK_DATA is not set (real-data test)')
    return Path(d)
