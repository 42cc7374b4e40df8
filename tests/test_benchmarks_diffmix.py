"The DiffMix sampling benchmark (benchmarks/bench_diffmix.py): its CPU smoke run, the no-GPU exit, the schedule choice and the label-fidelity proxy."
import importlib.util, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'bench_diffmix.py'


def _load():
    spec = importlib.util.spec_from_file_location('bench_diffmix', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bd = _load()


def _run(*args, timeout=180):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1',
           'NO_ALBUMENTATIONS_UPDATE': '1', 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_prints_a_row_per_schedule_with_the_papers_reference_first():
    r = _run('--smoke')
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    table = out[out.index('\n solver') + 1:].splitlines()
    rows = [line.split() for line in table[1:5]]
    # solver, steps, schedule "start/K", "t=..", NFE, s/patch, speed-up, MAE ref, FID, KID, clip%, lab-fid
    assert [(c[0], c[1], c[2], c[3], c[4]) for c in rows] == [
        ('ddim', '55', '54/100', 't=549', '110'), ('dpm++', '20', '19/36', 't=555', '40'),
        ('dpm++', '10', '9/18', 't=555', '20'), ('ddim', '20', '19/36', 't=555', '40')]
    ref = rows[0]
    assert ref[6] == '1.00x' and float(ref[7]) == 0.0  # the reference against itself
    for c in rows:
        sec, speedup = float(c[5]), float(c[6].rstrip('x'))
        assert sec > 0 and speedup == pytest.approx(float(ref[5]) / sec, rel=0.01, abs=0.01)
        assert np.isfinite([float(v) for v in c[7:]]).all() and 0 <= float(c[-1]) <= 1
    assert re.search(r'^GOAL .*: (MET by \S+ \d+ steps|NOT MET)', out, re.M), out
    assert 'NOT comparable' in out and out.rstrip().splitlines()[-1].startswith('NOTE: random weights')


def test_without_gpu_the_paper_run_exits_2_and_says_so(monkeypatch, capsys):
    "In process, with torch told there is no GPU (so this runs on GPU machines too)."
    monkeypatch.setattr(bd.torch.cuda, 'is_available', lambda: False)
    assert bd.main(['--device', 'cuda']) == 2
    out, err = capsys.readouterr()
    assert 'no GPU available' in err and 'solver' not in out


def test_schedule_keeps_the_start_noise_level_of_step_54_of_100():
    from nucbook.engine.diffusion import make_noise_scheduler
    sched = make_noise_scheduler()
    assert bd.schedule(55, sched, 549) == (100, 54, 549)  # the reference itself (trailing spacing: t = 1000 - 45 * 10 - 1)
    # 20 steps: K = 36 starts at t = round(20 * 1000 / 36) - 1 = 555, K = 37 at 540: 555 is nearer 549
    assert bd.schedule(20, sched, 549) == (36, 19, 555)
    assert bd.schedule(10, sched, 549) == (18, 9, 555)


def test_stain_dice_scores_dark_nuclei_against_the_label_map():
    img = np.full((32, 32, 3), (235, 190, 215), np.uint8)  # eosin-pink background
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 10) ** 2 + (xx - 12) ** 2 <= 36
    img[disc] = (60, 40, 120)  # hematoxylin-dark nucleus
    inst = disc.astype(np.int32)
    assert bd.stain_dice(img, inst) == pytest.approx(1.0)
    moved = np.roll(inst, 16, axis=1)  # the label says the nucleus is elsewhere
    assert bd.stain_dice(img, moved) == pytest.approx(0.0)
    assert bd.stain_dice(np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.int32)) == 0.0  # flat image, no nuclei
