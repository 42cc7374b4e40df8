"The GPU check script (benchmarks/gpu_check.py): its CPU smoke run, the no-GPU exit, FLOP counting and TFLOP/s arithmetic."
import importlib.util, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.py'


def _load():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules['gpu_check'] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _run(*args, hide_gpu=False, timeout=120):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1',
           'NO_ALBUMENTATIONS_UPDATE': '1', 'MPLBACKEND': 'Agg'}
    if hide_gpu: env['CUDA_VISIBLE_DEVICES'] = ''
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cpu_smoke_gives_a_row_per_model_and_a_summary():
    r = _run('--cpu-smoke', '--threads', '1')
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    table = out[out.rindex('\nmodel ') + 1:]
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:] if line and not line.startswith((' ', 'SUMMARY'))}
    names = [e.name for e in gc.REGISTRY]
    assert len(names) >= 11 and {'hovernet', 'smooth-gan', 'unet', 'semantic-unet', 'ddim-sample', 'adm-256', 'adm-mcg',
                                 'sdm-256', 'sdm-ddim', 'adain-256', 'vgg19-enc'} <= set(names)
    for name in names: assert rows.get(name) == 'ok', (name, out, r.stderr)
    last = out.strip().splitlines()[-1]
    assert last.startswith('SUMMARY: PASS'), out
    assert f'{len(names)}/{len(names)} models ok' in last


def test_without_gpu_exits_2_and_says_so():
    "CUDA_VISIBLE_DEVICES='' hides any GPU, so this runs on GPU machines too."
    r = _run(hide_gpu=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'no GPU available' in r.stderr
    assert 'SUMMARY' not in r.stdout


def test_flop_counter_on_a_linear_layer_matches_a_hand_count():
    torch.manual_seed(0)
    b, n_in, n_out = 16, 32, 8
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(b, n_in, requires_grad=True)
    flops = gc.count_flops(lambda: lin(x).sum().backward())
    # forward: one b x in @ in x out product = 2*b*in*out; backward: grad of the input and of the weight, the same each
    assert flops == 3 * 2 * b * n_in * n_out


def test_flop_counter_survives_autograd_grad_on_a_leaf():
    "MCG takes torch.autograd.grad of a loss w.r.t. its input: FlopCounterMode's module tracker cannot follow that."
    lin = torch.nn.Linear(32, 8)
    def step():
        x = torch.randn(4, 32, requires_grad=True)
        torch.autograd.grad(lin(x).square().sum(), x)
    # forward product + the input-gradient product (no weight gradient asked for)
    assert gc.count_flops(step) == 2 * (2 * 4 * 32 * 8)


def test_tflops_arithmetic():
    assert gc.achieved_tflops(4e12, 0.01) == pytest.approx(400.0)
    assert gc.achieved_tflops(1.5e15, 3.0) == pytest.approx(500.0)
    assert gc.utilisation(494.5, 989.0) == pytest.approx(50.0)
    assert gc.utilisation(378.0, 756.0) == pytest.approx(50.0)
    assert gc.utilisation(100.0, None) is None and gc.utilisation(None, 989.0) is None


@pytest.mark.parametrize('name,label,peak', [
    ('NVIDIA H200', 'H200', 989.0),
    ('NVIDIA H100 80GB HBM3', 'H100 SXM', 989.0),
    ('NVIDIA H100 SXM5 80GB', 'H100 SXM', 989.0),
    ('NVIDIA H100 PCIe', 'H100 PCIe', 756.0),
    ('NVIDIA H100 NVL', None, None),
    ('NVIDIA A10G', None, None),
])
def test_peak_table(name, label, peak):
    assert gc.peak_bf16_tflops(name) == (label, peak)


def test_summary_and_table_mark_failures():
    rows = [dict(name='a', status='ok', fp32_ok=True, bf16_ok=True),
            dict(name='b', status='FAILED', error='build: ImportError: cannot import X')]
    ok, line = gc.summary(rows, 12.0, 'cpu')
    assert not ok and line.startswith('SUMMARY: FAIL') and 'b (FAILED)' in line and '1/2 models ok' in line
    table = gc.format_table(rows)
    assert 'FAILED' in table and 'build: ImportError' in table
    assert gc.summary(rows[:1], 1.0, 'cpu')[0]


def test_a_failing_model_gives_a_failed_row_not_a_crash():
    ctx = gc.Ctx(torch.device('cpu'), smoke=True)
    def build(ctx): gc.need('NoSuchModel', 'nucbook.models.no_such_module', 'nucbook.models.hovernet')
    row = gc.run_entry(gc.Entry('broken', build), ctx, None, 10.0)
    assert row['status'] == 'FAILED'
    assert 'ImportError' in row['error'] and 'nucbook.models.no_such_module' in row['error']


def test_adm_entries_use_the_paper_network_and_tiny_in_the_smoke_run():
    from nucbook.models.adm import ADMUNet, adm_config
    paper_preset, smoke_preset = gc.ADM_PRESETS
    with torch.device('meta'): paper = ADMUNet(**adm_config(paper_preset))
    assert sum(p.numel() for p in paper.parameters()) == 552_814_086 and paper.image_size == 256
    tiny = gc._adm_setup(gc.Ctx(torch.device('cpu'), smoke=True))
    assert tiny.args == adm_config(smoke_preset) == adm_config('tiny')
    # the zero-initialised convs were re-initialised, so the equality probes compare non-zero outputs
    assert all(m.weight.any() for m in tiny.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    with torch.no_grad(): assert tiny(torch.randn(1, 3, 32, 32), torch.tensor([3])).abs().min() > 0


def test_sdm_entries_use_the_paper_network_and_tiny_in_the_smoke_run():
    from nucbook.models.sdm import SDMUNet, sdm_config
    paper_preset, smoke_preset = gc.SDM_PRESETS_GC
    with torch.device('meta'): paper = SDMUNet(**sdm_config(paper_preset))
    assert sum(p.numel() for p in paper.parameters()) == 652_256_518 and paper.image_size == 256 and paper.label_channels == 6
    tiny = gc._sdm_setup(gc.Ctx(torch.device('cpu'), smoke=True))
    assert tiny.args == sdm_config(smoke_preset) == sdm_config('tiny')
    # the zero-initialised convs were re-initialised, so the equality probes compare non-zero outputs that depend on the label
    assert all(m.weight.any() for m in tiny.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    x, t, lab = torch.randn(1, 3, 32, 32), torch.tensor([3]), gc._label_maps(1, 32, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny(x, t, lab)
        assert out.abs().min() > 0 and (out - tiny(x, t)).abs().max() > 1e-3


def test_adain_entries_use_the_paper_generator_and_tiny_in_the_smoke_run():
    "adain-256 / vgg19-enc: VGG-19 to relu4_1 (frozen) + SkipDecoder and D of the 'paper' preset on the GPU, 'tiny' in the smoke run."
    from nucbook.models.adain import ADAIN_PRESETS, ImageDiscriminator, SkipDecoder
    paper_preset, smoke_preset = gc.ADAIN_PRESETS_GC
    assert (paper_preset, smoke_preset) == ('paper', 'tiny')
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(SkipDecoder(**ADAIN_PRESETS[paper_preset]['decoder'])) == 4_279_363  # AdaIN's decoder (3,505,219) + skip inputs
    assert n(ImageDiscriminator(**ADAIN_PRESETS[paper_preset]['discriminator'])) == 5_215_425
    G, D = gc._adain_setup(gc.Ctx(torch.device('cpu'), smoke=True))
    assert G.decoder.config['width'] == ADAIN_PRESETS[smoke_preset]['decoder']['width'] and D.config == {
        **ADAIN_PRESETS[smoke_preset]['discriminator'], 'hidden': 1024, 'in_channels': 3}
    assert n(G.encoder) == 3_505_728  # conv1_1..conv4_1, weights and biases
    assert not any(p.requires_grad for p in G.encoder.parameters()) and 'not pretrained' in G.encoder.name

