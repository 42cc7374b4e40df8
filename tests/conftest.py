import os
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

ROOT = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run (CI must not turn red by the luck of a draw); a failing example is
# printed with its seed. `HYPOTHESIS_PROFILE=explore` draws new examples each run, to look for cases the fixed ones miss.
from hypothesis import settings as _hypothesis_settings
_hypothesis_settings.register_profile('nucbook', derandomize=True, print_blob=True)
_hypothesis_settings.register_profile('explore', derandomize=False, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'nucbook'))


def _skip_reason(report) -> str:
    r = report.longrepr
    return str(r[2] if isinstance(r, tuple) and len(r) == 3 else r)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    "Say how many real-data tests were skipped (NUCBOOK_DATA unset) and how to run them: a skip is not a pass."
    n = sum('NUCBOOK_DATA' in _skip_reason(r) for r in terminalreporter.stats.get('skipped', []))
    if n:
        terminalreporter.write_line(
            f'{n} real-data test{"s" if n > 1 else ""} skipped: NUCBOOK_DATA is not set. Run them with '
            '`NUCBOOK_DATA=/path/to/data make test` (CI sets it to ../shared/data when that folder exists).',
            yellow=True, bold=True)


@pytest.fixture
def data_root():
    "The real datasets (`$NUCBOOK_DATA`, e.g. ../shared/data); tests using it are skipped when it is unset."
    d = os.environ.get('NUCBOOK_DATA')
    if not d or not Path(d).is_dir():
        pytest.skip('NUCBOOK_DATA is not set (real-data test)')
    return Path(d)


@pytest.fixture(scope='module')
def bench_train():
    "The benchmark's smoke training set, as `nucbook.bench` gives it to a method's `bench_rows`: 6 typed synthetic tiles of 128 px."
    from nucbook.bench.protocol import load_splits
    return load_splits('synthetic', n_train=6, n_test=2, tile_size=128).train


@pytest.fixture(scope='module')
def bench_untyped(bench_train):
    "The same tiles without types."
    from dataclasses import replace
    return [replace(s, type_map=None, inst_types=None) for s in bench_train]


class OracleEps:
    "A perfect noise predictor for a known clean image x0: eps = (y_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."
    def __new__(cls, x0, sched, sample_size):
        import torch

        class _Oracle(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.x0 = x0; self.abar = sched.alphas_cumprod
                self.w = torch.nn.Parameter(torch.zeros(()))  # gives the samplers a parameter to read the device from
                self.config = type('cfg', (), {'sample_size': sample_size})()
            def forward(self, y, t):
                a = self.abar[torch.as_tensor(t).long().cpu()].float().reshape(-1, 1, 1, 1)
                return type('out', (), {'sample': (y - a.sqrt() * self.x0) / (1 - a).sqrt() + 0 * self.w})()
        return _Oracle()


@pytest.fixture
def oracle():
    "Factory of exact noise predictors for diffusion sampler tests: `oracle(x0, sched, sample_size)`."
    return OracleEps
