"""Diffusion core: objective, schedulers, guidance, null labels, save/load, seeded sampling (against DDIM written out, and
the start from a noised image against its closed form), resumable training."""
from contextlib import contextmanager
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from nucbook.engine.diffusion import (cfg_combine, ddim_sample, ddim_scheduler, diffusion_loss, drop_labels, label_channels,
                               load_diffusion, make_noise_scheduler, make_semantic_unet, make_unet, predict_eps,
                               patch_batch, save_diffusion, train_diffusion, ADM_WEIGHTS, discretized_gaussian_log_likelihood,
                               gaussian_terms, learned_log_variance, model_side, normal_kl, p_mean_variance, q_posterior,
                               respace, schedule_terms, split_output, vlb_bits, GUIDANCE_CONVENTIONS, SDM_WEIGHTS,
                               model_label_channels, start_timestep)
from nucbook.engine.loop import SettingsMismatch
from nucbook.models.adm import ADMUNet, adm_config, load_adm, save_adm
from nucbook.models.sdm import SDMUNet, sdm_config, load_sdm, save_sdm
from nucbook.data.synth import synth_dataset

torch.set_num_threads(1)  # pytest -n 2 on 2 cores
S = 32  # patch side of the test models


@pytest.fixture(scope='module')
def tiles():
    return synth_dataset(4, 'train', seed=0, size=64)


@pytest.fixture(scope='module')
def batch(tiles):
    return patch_batch(tiles, 4, S, 0, n_classes=4)


def _unet(seed=0):
    torch.manual_seed(seed); return make_unet('tiny', sample_size=S).eval()


def _sem(seed=0):
    torch.manual_seed(seed); return make_semantic_unet('tiny', n_classes=4, sample_size=S).eval()


@pytest.mark.parametrize('make', [_unet, _sem])
def test_loss_decreases_on_fixed_batch(make, batch):
    x0, lab = batch
    model = make().train(); sched = make_noise_scheduler()
    g = torch.Generator().manual_seed(1)
    t, eps = torch.randint(50, 950, (4,), generator=g), torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model, sched, x0, t, eps, lab if make is _sem else None)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_scheduler_round_trip(batch):
    x0 = batch[0]; sched = make_noise_scheduler(); ddim = ddim_scheduler(sched, 100)
    for t in (0, 10, 549, 999):  # noising, then one exact denoise with the true noise: x0 back
        eps = torch.randn_like(x0); yt = sched.add_noise(x0, eps, torch.tensor([t]))
        torch.testing.assert_close(ddim.step(eps, t, yt, eta=0.0).pred_original_sample, x0, atol=2e-4, rtol=0)
    one = ddim_scheduler(sched, 1); eps = torch.randn_like(x0)
    assert one.timesteps.tolist() == [999]
    torch.testing.assert_close(one.step(eps, 999, sched.add_noise(x0, eps, torch.tensor([999]))).prev_sample, x0, atol=2e-4, rtol=0)


def test_diffmix_start_step_runs_55_steps_from_t549(batch):
    x0, lab = batch; model = _sem(); sched = make_noise_scheduler()
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    out = ddim_sample(model, sched, y0=x0[:2], start_step=54, steps=100, x=lab[:2], s=1.5, seed=0)
    h.remove()
    assert out.shape == (2, 3, S, S) and len(seen) == 55 and seen[0] == 549 and seen[-1] == 9
    seen.clear(); h = model.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    ddim_sample(model, sched, y0=x0[:1], start_step=54, steps=100, x=lab[:1], s=1.5, seed=0, solver='dpm++')
    h.remove()
    assert len(seen) == 55 and seen[0] == 549
    with pytest.raises(ValueError, match='start_step'): ddim_sample(model, sched, y0=x0, start_step=100, steps=100, x=lab)
    with pytest.raises(ValueError, match='deterministic'): ddim_sample(model, sched, y0=x0, start_step=5, steps=10, x=lab, eta=1.0, solver='dpm++')
    with pytest.raises(ValueError, match='start_step'): ddim_sample(model, sched, y0=x0, steps=100, x=lab)


def test_ddim_with_exact_model_returns_its_image(oracle):
    sched = make_noise_scheduler(); c = 0.25
    for steps, eta, solver in ((1, 0.0, 'ddim'), (10, 0.0, 'ddim'), (10, 1.0, 'ddim'), (10, 0.0, 'dpm++'), (3, 0.0, 'dpm++')):
        out = ddim_sample(oracle(c, sched, S), sched, 2, steps=steps, eta=eta, seed=0, solver=solver)
        torch.testing.assert_close(out, torch.full_like(out, c), atol=1e-3, rtol=0)


def test_guidance_scale_zero_is_unconditional_one_is_conditional(batch):
    # eps_hat = eps_u + s (eps_c - eps_u): s = 0 -> unconditional, s = 1 -> conditional, s = 1.5 -> DiffMix
    x, lab = batch; model = _sem(); t = torch.tensor([5, 300, 600, 990])
    with torch.no_grad():
        eps_c, eps_u = model(x, t, lab).sample, model(x, t, None).sample
        assert (eps_c - eps_u).abs().max() > 1e-4
        torch.testing.assert_close(predict_eps(model, x, t, lab, s=0.0), eps_u, atol=1e-5, rtol=0)
        torch.testing.assert_close(predict_eps(model, x, t, lab, s=1.0), eps_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(predict_eps(model, x, t, lab, s=1.5), eps_u + 1.5 * (eps_c - eps_u), atol=1e-4, rtol=0)
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert cfg_combine(a, b, 0).tolist() == [1.0, 1.0] and cfg_combine(a, b, 1).tolist() == [2.0, -1.0]
    assert cfg_combine(a, b, 1.5).tolist() == [2.5, -2.0]
    with pytest.raises(ValueError, match='no label'): predict_eps(_unet(), x, t, lab)


def test_null_label_dropout_rate():
    x = torch.ones(20000, 2, 1, 1)
    xd, dropped = drop_labels(x, 0.2, torch.Generator().manual_seed(0))
    assert abs(dropped.float().mean().item() - 0.2) < 0.015
    assert (xd[dropped] == 0).all() and (xd[~dropped] == 1).all()
    assert not drop_labels(x, 0.0, torch.Generator())[1].any() and drop_labels(x, 1.0, torch.Generator())[1].all()
    with pytest.raises(ValueError, match='p_uncond'): drop_labels(x, -0.1, torch.Generator())


def test_label_channels_hand_built():
    inst = np.zeros((4, 5), np.int32); inst[1:3, 1:3] = 1; inst[:, 4] = 2
    typ = np.where(inst == 2, 2, inst)
    lab = label_channels(inst, typ, 2)
    assert lab.shape == (4, 4, 5) and lab.dtype == np.float32
    np.testing.assert_array_equal(lab[0], inst == 0); np.testing.assert_array_equal(lab[1], inst == 1)
    np.testing.assert_array_equal(lab[2], inst == 2)
    edge = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], np.float32)
    np.testing.assert_array_equal(lab[3], edge)
    np.testing.assert_array_equal(label_channels(inst, None, 1)[1], inst > 0)
    with pytest.raises(ValueError, match='0..1'): label_channels(inst, typ, 1)


def test_patch_batch_deterministic(tiles):
    a, la = patch_batch(tiles, 3, S, 7, n_classes=4)
    b, lb = patch_batch(tiles, 3, S, torch.Generator().manual_seed(7), n_classes=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert la[:, :5].sum(1).eq(1).all()  # one class per pixel
    with pytest.raises(ValueError, match='no samples'): patch_batch([], 1, S, 0)


@pytest.mark.parametrize('make', [_unet, _sem])
def test_save_load_round_trip(make, batch, tmp_path):
    x, lab = batch; model = make(); sched = make_noise_scheduler(); t = torch.tensor([1, 200, 500, 999])
    save_diffusion(tmp_path/'m', model, sched)
    save_diffusion(tmp_path/'m', model, sched)  # overwriting an existing folder works
    m2, s2 = load_diffusion(tmp_path/'m')
    args = (x, t, lab) if make is _sem else (x, t)
    with torch.no_grad(): assert torch.equal(model(*args).sample, m2(*args).sample)
    assert torch.equal(s2.alphas_cumprod, sched.alphas_cumprod) and type(m2) is type(model)
    if make is _unet:  # stock diffusers loads the unconditional model
        assert isinstance(DDPMPipeline.from_pretrained(tmp_path/'m').unet, type(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']  # no temporary folders left
    with pytest.raises(FileNotFoundError, match='config.json'): load_diffusion(tmp_path/'nothing')


def test_sampling_deterministic_per_seed():
    model = _unet(); sched = make_noise_scheduler()
    a = ddim_sample(model, sched, 3, steps=4, eta=1.0, seed=[3, 4, 5])
    assert torch.equal(a, ddim_sample(model, sched, 3, steps=4, eta=1.0, seed=[3, 4, 5]))
    torch.testing.assert_close(a, ddim_sample(model, sched, 3, steps=4, eta=1.0, seed=[3, 4, 5], batch_size=1), atol=1e-4, rtol=0)
    torch.testing.assert_close(a[1:], ddim_sample(model, sched, 2, steps=4, eta=1.0, seed=4), atol=1e-4, rtol=0)  # seed + i
    assert not torch.allclose(a[0], a[1])
    with pytest.raises(ValueError, match='seeds'): ddim_sample(model, sched, 3, steps=4, seed=[1, 2])


class Stop(Exception): pass


def test_resume_after_stopped_run(tiles, tmp_path):
    kw = dict(steps=6, batch_size=2, patch_size=S, lr=1e-3, ckpt_every=2, ema_decay=0.9, seed=3)
    full = train_diffusion(_sem(), tiles, tmp_path/'full', **kw)

    def stop_at_5(step, loss):
        if step == 5: raise Stop
    with pytest.raises(Stop): train_diffusion(_sem(), tiles, tmp_path/'cut', callback=stop_at_5, **kw)
    assert not (tmp_path/'cut'/'model').exists()  # stopped before the end
    resumed = train_diffusion(_sem(), tiles, tmp_path/'cut', **kw)  # picks up the step-4 checkpoint
    assert resumed.resumed_from == 4 and resumed.step == 6
    assert resumed.losses == full.losses
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params): assert torch.equal(a, b)
    assert (tmp_path/'cut'/'model'/'unet'/'config.json').exists()
    with pytest.raises(ValueError, match='other settings'):
        train_diffusion(_sem(), tiles, tmp_path/'cut', **{**kw, 'seed': 4})


def test_training_rejects_bad_setup(tiles, tmp_path):
    with pytest.raises(ValueError, match='label channels'):
        train_diffusion(_sem(), tiles, tmp_path, steps=1, n_classes=2, patch_size=S)
    with pytest.raises(ValueError, match='no training samples'):
        train_diffusion(_unet(), [], tmp_path, steps=1)


# --- DDIM against its equations -------------------------------------------------------------------------------------
@contextmanager
def _seen_inputs(model):
    "Record (y_t, t) of every forward call of `model` inside the block."
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append((a[0].detach().clone(), int(torch.as_tensor(a[1]).reshape(-1)[0]))))
    try: yield seen
    finally: h.remove()


def _noise(seeds, shape):
    "The samplers' noise, replayed: one generator per patch, one standard-normal draw per patch per call."
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])


@pytest.mark.parametrize('steps,start_step,spacing', [(100, 54, 'trailing'), (10, 0, 'trailing'), (10, 9, 'trailing'),
                                                       (5, 2, 'trailing'), (100, 54, 'leading'), (10, 9, 'leading')])
def test_start_from_image_noise_level(steps, start_step, spacing, batch, oracle):
    # DiffMix starts at step k of an N-step schedule: trailing t = (k + 1) T / N - 1 (54 of 100: t = 549), leading (the
    # authors' ddim100) t = k T / N (540); from y_t = sqrt(abar_t) y0 + sqrt(1 - abar_t) eps, eps the first draw of each
    # patch's generator (seed + i)
    x0 = batch[0][:2]; sched = make_noise_scheduler(); abar = sched.alphas_cumprod; T = 1000
    t = (start_step + 1) * T // steps - 1 if spacing == 'trailing' else start_step * T // steps
    assert start_timestep(sched, steps, start_step, spacing) == t
    eps = _noise([7, 8], x0.shape[1:])()
    closed = lambda t: abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    ora = oracle(x0, sched, S)
    with _seen_inputs(ora) as seen:
        out = ddim_sample(ora, sched, y0=x0, start_step=start_step, steps=steps, seed=7, eta=0.0, spacing=spacing)
    assert [u for _, u in seen] == [t - j * (T // steps) for j in range(start_step + 1)]
    torch.testing.assert_close(seen[0][0], closed(t), atol=1e-6, rtol=0)
    # the exact noise predictor of x0 with eta = 0: every latent is the closed form with the same eps, the end is x0
    for y_t, u in seen: torch.testing.assert_close(y_t, closed(u), atol=1e-4, rtol=0, msg=f'latent at t={u}')
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def _ddim_by_hand(eps_fn, abar, y_T, taus, eta, draw):
    "Song et al. Eq. 12 from the clipped x0_hat (ddim_scheduler clips), sigma = eta sqrt((1-a')/(1-a)) sqrt(1-a/a')."
    y = y_T
    for k, t in enumerate(taus):
        a, a_prev = abar[t], abar[taus[k + 1]] if k + 1 < len(taus) else torch.tensor(1.0)  # alpha-bar at t and the next step
        eps = eps_fn(y, t)
        x0 = ((y - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        y = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + (sigma * draw() if eta > 0 else 0)
    return y.clamp(-1, 1)


@pytest.mark.parametrize('semantic,eta,start_step', [(False, 1.0, None), (False, 0.0, None), (False, 1.0, 2), (True, 0.5, 3)])
def test_ddim_sample_equals_hand_computed_steps(semantic, eta, start_step, batch):
    # a real (random-weight) model, so every term of the step matters; guided eps = eps_u + s (eps_c - eps_u)
    x0, lab = batch; x0, lab = x0[:2], lab[:2]; sched = make_noise_scheduler(); abar = sched.alphas_cumprod
    steps, s = 5, 1.5; taus = [999, 799, 599, 399, 199]
    model = _sem() if semantic else _unet()
    def eps_fn(y, t):
        tt = torch.full((len(y),), t)
        with torch.no_grad():
            if not semantic: return model(y, tt).sample
            e_c, e_u = model(y, tt, lab).sample, model(y, tt, torch.zeros_like(lab)).sample
            return e_u + s * (e_c - e_u)
    draw = _noise([3, 4], x0.shape[1:]); y_T = draw()
    if start_step is not None:
        taus = taus[steps - 1 - start_step:]
        y_T = abar[taus[0]].sqrt() * x0 + (1 - abar[taus[0]]).sqrt() * y_T
    kw = dict(y0=x0, start_step=start_step) if start_step is not None else dict(n=2)
    out = ddim_sample(model, sched, steps=steps, eta=eta, seed=3, x=lab if semantic else None, s=s, **kw)
    ref = _ddim_by_hand(eps_fn, abar, y_T, taus, eta, draw)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert ((out - x0).abs() > 1e-2).float().mean() > 0.5  # a real sample, not a copy of the start image


# --- learned variance (ADMUNet): the hybrid objective against its equations ---------------------------------------
import math
import json
import torch.nn.functional as F


def _adm(seed=0, **overrides):
    "A tiny ADM with every tensor non-zero (its output convs are zero-initialised), so eps and v depend on the input."
    torch.manual_seed(seed)
    m = ADMUNet(**adm_config('tiny', **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p) * 0.05)
    return m


def test_posterior_terms_by_hand():
    # betas 0.02, 0.1, 0.5: alpha-bar 0.98, 0.882, 0.441
    g = gaussian_terms([0.02, 0.1, 0.5]); ab = [0.98, 0.882, 0.441]
    assert torch.allclose(g.abar, torch.tensor(ab, dtype=torch.float64), atol=1e-12)
    bt1, bt2 = (1 - 0.98) / (1 - 0.882) * 0.1, (1 - 0.882) / (1 - 0.441) * 0.5
    assert g.beta_tilde[0] == 0 and math.isclose(g.beta_tilde[1], bt1) and math.isclose(g.beta_tilde[2], bt2)
    assert torch.allclose(g.log_beta_tilde, torch.tensor([math.log(bt1), math.log(bt1), math.log(bt2)], dtype=torch.float64))
    x0, xt = torch.full((1, 1, 1, 1), 0.6), torch.full((1, 1, 1, 1), -0.4)
    mean, logvar = q_posterior(g, x0, xt, 2)
    hand = math.sqrt(0.882) * 0.5 / (1 - 0.441) * 0.6 + math.sqrt(0.5) * (1 - 0.882) / (1 - 0.441) * -0.4
    assert math.isclose(mean.item(), hand, abs_tol=1e-6) and math.isclose(logvar.item(), math.log(bt2), abs_tol=1e-6)
    assert math.isclose(q_posterior(g, x0, xt, 0)[0].item(), 0.6, abs_tol=1e-7)  # step 0: the mean is x0 itself
    with pytest.raises(ValueError, match='timesteps'): gaussian_terms([0.1, 0.2], [0])


def test_learned_range_endpoints_are_beta_tilde_and_beta():
    g = schedule_terms(make_noise_scheduler())
    t = torch.tensor([1, 10, 500, 999])
    v = torch.ones(4, 3, 2, 2)
    torch.testing.assert_close(learned_log_variance(-v, g, t)[:, 0, 0, 0], g.beta_tilde[t].log().float())
    torch.testing.assert_close(learned_log_variance(v, g, t)[:, 0, 0, 0], g.beta[t].log().float())
    torch.testing.assert_close(learned_log_variance(0 * v, g, t)[:, 0, 0, 0], (g.beta[t] * g.beta_tilde[t]).sqrt().log().float())
    assert math.isclose(learned_log_variance(-v[:1], g, 0)[0, 0, 0, 0].item(), math.log(g.beta_tilde[1]), rel_tol=1e-6)  # clipped
    # no v: p_theta's variance is beta_tilde (guided-diffusion's FIXED_SMALL)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(p_mean_variance(g, t, x, torch.zeros_like(x))[1], learned_log_variance(-v, g, t))


def test_normal_kl_known_values():
    z, o = torch.zeros(()), torch.ones(())
    assert normal_kl(o * 0.7, o * 0.3, o * 0.7, o * 0.3).item() == 0
    # KL(N(1, 1/4) || N(0, 1)) = (1/4 + 1 - 1 - ln(1/4)) / 2
    assert math.isclose(normal_kl(o, math.log(0.25) * o, z, z).item(), 0.5 * (0.25 + math.log(4)), rel_tol=1e-6)
    assert math.isclose(normal_kl(z, z, o, 2 * o).item(), 0.5 * (1 + 2 * math.exp(-2)), rel_tol=1e-6)


def test_discretized_gaussian_bins_sum_to_one_and_edges():
    levels = (torch.arange(256.) / 127.5 - 1)[None]
    for mu, s in ((0.1, 0.02), (-0.95, 0.4), (2.0, 1.0)):
        p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mu), torch.tensor(math.log(s))).exp()
        assert math.isclose(p.sum().item(), 1.0, abs_tol=1e-5), (mu, s)
    Phi = lambda u: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    x, mu, s = torch.tensor([[-1.0, 1.0, 0.0]]), torch.tensor([[-0.98, 0.9, 0.01]]), torch.tensor(math.log(0.05))
    got = discretized_gaussian_log_likelihood(x, mu, s)[0].tolist()
    hand = [math.log(Phi((-1 + 1 / 255 + 0.98) / 0.05)), math.log(1 - Phi((1 - 1 / 255 - 0.9) / 0.05)),
            math.log(Phi((1 / 255 - 0.01) / 0.05) - Phi((-1 / 255 - 0.01) / 0.05))]
    assert np.allclose(got, hand, atol=1e-5)
    with pytest.raises(ValueError, match='differ'): discretized_gaussian_log_likelihood(x, mu[:, :2], s)


def test_vlb_bits_by_hand_one_pixel():
    # one pixel, x0 = 0.2, eps_true = 0.5, model eps = 0.3 and v = 0.4, at t = 0 (decoder NLL) and t = 7 (KL)
    sched = make_noise_scheduler(); g = schedule_terms(sched)
    x0, e_true, e, v = 0.2, 0.5, 0.3, 0.4
    def hand(t):
        a, ap, b, bt = g.abar[t].item(), g.abar_prev[t].item(), g.beta[t].item(), g.beta_tilde[t].item()
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * e_true
        post = lambda x_0: math.sqrt(ap) * b / (1 - a) * x_0 + math.sqrt(1 - b) * (1 - ap) / (1 - a) * xt
        x0_hat = (xt - math.sqrt(1 - a) * e) / math.sqrt(a)
        f = (v + 1) / 2; lv = f * math.log(b) + (1 - f) * math.log(bt if t else g.beta_tilde[1].item())
        if t:
            lq = math.log(bt)
            return 0.5 * (-1 + lv - lq + math.exp(lq - lv) + (post(x0) - post(x0_hat)) ** 2 * math.exp(-lv)) / math.log(2)
        Phi = lambda u: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        m, sd = post(x0_hat), math.exp(0.5 * lv)
        return -math.log(Phi((x0 + 1 / 255 - m) / sd) - Phi((x0 - 1 / 255 - m) / sd)) / math.log(2)
    t = torch.tensor([0, 7])
    X0 = torch.full((2, 1, 1, 1), x0); xt = sched.add_noise(X0, torch.full_like(X0, e_true), t)
    got = vlb_bits(g, X0, xt, t, torch.full_like(X0, e), torch.full_like(X0, v))
    assert np.allclose(got.tolist(), [hand(0), hand(7)], rtol=1e-4), (got, hand(0), hand(7))
    # the true noise and v = -1: p_theta is the true posterior, nothing to pay for t > 0
    assert vlb_bits(g, X0, xt, t, torch.full_like(X0, e_true), -torch.ones_like(X0))[1].abs().item() < 1e-5


class _FixedOut(torch.nn.Module):
    "A 'model' whose output (eps in channels 0-2, v in 3-5) is a parameter, whatever its input."
    def __init__(self, out): super().__init__(); self.out = torch.nn.Parameter(out.clone())
    def forward(self, x, t): return self.out


@pytest.mark.parametrize('T', [1000, 250])
def test_hybrid_loss_terms_and_stop_gradient(T, batch):
    x0 = batch[0]; sched = make_noise_scheduler(T); g = torch.Generator().manual_seed(4)
    t, eps = torch.tensor([0, 3, T // 2, T - 1]), torch.randn(x0.shape, generator=g)
    m = _FixedOut(torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1))
    loss, terms = diffusion_loss(m, sched, x0, t, eps, return_terms=True)
    mse = F.mse_loss(m.out[:, :3], eps)
    vlb = vlb_bits(schedule_terms(sched), x0, sched.add_noise(x0, eps, t), t, m.out[:, :3], m.out[:, 3:]).mean()
    assert math.isclose(terms['mse'], mse.item(), rel_tol=1e-6) and math.isclose(terms['vlb'], T / 1000 * vlb.item(), rel_tol=1e-5)
    assert math.isclose(loss.item(), mse.item() + T / 1000 * vlb.item(), rel_tol=1e-5)
    grad, = torch.autograd.grad(loss, m.out)
    g_mse, = torch.autograd.grad(mse, m.out)
    assert torch.equal(grad[:, :3], g_mse[:, :3])  # L_vlb sends nothing to the eps channels (stop-gradient)
    g_vlb, = torch.autograd.grad(T / 1000 * vlb, m.out)
    torch.testing.assert_close(grad[:, 3:], g_vlb[:, 3:])
    assert (g_vlb[:, 3:] != 0).float().mean() > 0.99 and (g_vlb[:, :3] != 0).any()  # (without the stop the eps channels move)


def test_loss_without_learned_variance_is_plain_mse(batch):
    x0 = batch[0]; model = _unet(); sched = make_noise_scheduler(); t = torch.tensor([3, 300, 600, 999])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    loss, terms = diffusion_loss(model, sched, x0, t, eps, return_terms=True)
    assert list(terms) == ['mse'] and torch.equal(loss, F.mse_loss(model(sched.add_noise(x0, eps, t), t).sample, eps))


def test_model_side_and_split_output():
    assert model_side(_unet()) == S and model_side(_adm()) == 32 and model_side(_adm(image_size=64)) == 64
    with pytest.raises(ValueError, match='no patch side'): model_side(torch.nn.Linear(2, 2))
    out = torch.randn(2, 6, 4, 4)
    e, v = split_output(out); assert torch.equal(e, out[:, :3]) and torch.equal(v, out[:, 3:])
    assert split_output(out[:, :3])[1] is None
    with pytest.raises(ValueError, match='N x 3 x H x W'): split_output(torch.zeros(1, 5, 2, 2))


def test_adm_save_load_round_trip(batch, tmp_path):
    x = batch[0][:2, :, :16, :16]; t = torch.tensor([0, 640]); model = _adm(); sched = make_noise_scheduler()
    save_diffusion(tmp_path/'m', model, sched)
    conf = json.loads((tmp_path/'m'/'unet'/'config.json').read_text())
    assert conf == {'_class_name': 'ADMUNet', **{k: list(v) if isinstance(v, tuple) else v for k, v in adm_config('tiny').items()}}
    assert sorted(p.name for p in (tmp_path/'m').iterdir()) == ['scheduler', 'unet']  # no DDPMPipeline index: not diffusers'
    m2, s2 = load_diffusion(tmp_path/'m')
    assert type(m2) is ADMUNet and m2.args == model.args and torch.equal(s2.alphas_cumprod, sched.alphas_cumprod)
    with torch.no_grad():
        assert torch.equal(m2(x, t), model(x, t))
        # the weights file is a plain guided-diffusion state dict
        assert torch.equal(load_adm(tmp_path/'m'/'unet'/ADM_WEIGHTS, 'tiny')(x, t), model(x, t))
    assert set(torch.load(tmp_path/'m'/'unet'/ADM_WEIGHTS, weights_only=True)) == set(model.state_dict())


def test_adm_resume_in_time_limited_chunks(tiles, tmp_path):
    kw = dict(steps=4, batch_size=2, patch_size=16, lr=1e-3, ckpt_every=2, ema_decay=0.9, seed=5)
    full = train_diffusion(_adm(), tiles, tmp_path/'full', **kw)
    first = train_diffusion(_adm(), tiles, tmp_path/'cut', max_seconds=0, **kw)  # stops after one step, with a checkpoint
    assert not first.finished and first.step == 1 and not (tmp_path/'cut'/'model').exists()
    rest = train_diffusion(_adm(), tiles, tmp_path/'cut', **kw)
    assert rest.resumed_from == 1 and rest.finished and rest.losses == full.losses
    for (k, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()): assert torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, rest.ema.shadow_params): assert torch.equal(a, b)
    hist = torch.load(tmp_path/'cut'/'checkpoint.pt', weights_only=False)['history']
    rec = hist['records']  # the hybrid terms are logged every step, and add up to the loss
    assert len(rec['vlb']) == 4 and np.allclose(rec['loss'], rec['mse'] + rec['vlb'], rtol=1e-5) and (rec['vlb'] > 0).all()
    m, _ = load_diffusion(tmp_path/'cut'/'model')
    xx = torch.randn(1, 3, 16, 16)
    with torch.no_grad(): assert torch.equal(m(xx, torch.tensor([3])), rest.ema_model()(xx, torch.tensor([3])))


def test_train_from_a_guided_diffusion_checkpoint(tiles, tmp_path):
    src = _adm(seed=7); ck = save_adm(src, tmp_path/'256x256_diffusion_uncond.pt')
    kw = dict(steps=1, batch_size=2, patch_size=16, lr=0.0, ema_decay=0.9, seed=0)  # lr 0: the weights stay the file's
    run = train_diffusion(ADMUNet(**adm_config('tiny')), tiles, tmp_path/'run', init_from=ck, **kw)
    for (k, a), b in zip(src.state_dict().items(), run.model.state_dict().values()): assert torch.equal(a, b), k
    assert run.losses[0] > 0
    with pytest.raises(SettingsMismatch, match='init_from'):
        train_diffusion(ADMUNet(**adm_config('tiny')), tiles, tmp_path/'run', init_from=tmp_path/'other.pt', **kw)
    with pytest.raises(ValueError, match='ADMUNet'): train_diffusion(_unet(), tiles, tmp_path/'u', init_from=ck, **kw)
    with pytest.raises(ValueError, match='does not match the ADM config'):  # a checkpoint of another size
        train_diffusion(ADMUNet(**adm_config('tiny', model_channels=64)), tiles, tmp_path/'v', init_from=ck, **kw)


def test_ddim_sample_with_adm_equals_hand_computed_steps():
    model = _adm(); sched = make_noise_scheduler(); abar = sched.alphas_cumprod; taus = [999, 799, 599, 399, 199]
    def eps_fn(y, t):
        with torch.no_grad(): return model(y, torch.full((len(y),), t))[:, :3]
    draw = _noise([3, 4], (3, 16, 16)); y_T = draw()
    out = ddim_sample(model, sched, 2, steps=5, eta=1.0, seed=3)  # patch side from the model: 32
    assert out.shape == (2, 3, 32, 32)
    out = ddim_sample(model, sched, 2, steps=5, eta=1.0, seed=3, size=16)
    torch.testing.assert_close(out, _ddim_by_hand(eps_fn, abar, y_T, taus, 1.0, draw), atol=1e-4, rtol=0)
    assert torch.equal(predict_eps(model, y_T, 5), model(y_T, torch.tensor([5, 5]))[:, :3].detach())


def test_respaced_chain():
    sched = make_noise_scheduler(); full = schedule_terms(sched)
    r = respace(sched, 4)
    assert r.timesteps.tolist() == [0, 333, 666, 999]
    torch.testing.assert_close(r.abar, full.abar[r.timesteps], atol=1e-12, rtol=0)
    torch.testing.assert_close(r.beta[1:], 1 - full.abar[r.timesteps[1:]] / full.abar[r.timesteps[:-1]], atol=1e-12, rtol=0)
    assert respace(sched, 250).timesteps[:3].tolist() == [0, 4, 8] and respace(sched, 1).timesteps.tolist() == [999]
    with pytest.raises(ValueError, match='1..1000'): respace(sched, 0)


# --- classifier-free guidance conventions (DiffMix Eq. 7 as printed vs the authors' code) ----------------------------
def test_guidance_conventions_on_hand_built_predictions(batch):
    ec, eu = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5])
    # authors: eps_u + s (eps_c - eps_u); paper (Eq. 7): eps_c + s (eps_c - eps_u)
    assert cfg_combine(ec, eu, 1.5).tolist() == [4.0, -1.75, 0.5]
    assert cfg_combine(ec, eu, 1.5, 'authors').tolist() == [4.0, -1.75, 0.5]
    assert cfg_combine(ec, eu, 1.5, 'paper').tolist() == [6.0, -3.25, 0.5]
    assert torch.equal(cfg_combine(ec, eu, 1.5, 'paper'), cfg_combine(ec, eu, 2.5, 'authors'))  # printed s = authors' s + 1
    assert torch.equal(cfg_combine(ec, eu, 0, 'paper'), ec) and torch.equal(cfg_combine(ec, eu, 0, 'authors'), eu)
    assert GUIDANCE_CONVENTIONS == ('authors', 'paper')
    with pytest.raises(ValueError, match="unknown guidance convention 'eq7'"): cfg_combine(ec, eu, 1.5, 'eq7')
    # a real (tiny, random) model: predict_eps's batched pass equals the manual combination, shortcuts included
    x, lab = batch; t = torch.tensor([5, 300, 600, 990])
    for model, eps_of in ((_sem(), lambda o: o.sample), (_sdm(), lambda o: o[:, :3])):
        xx, ll = (x[:, :, :16, :16], lab[:, :, :16, :16]) if isinstance(model, SDMUNet) else (x, lab)  # SDM: smaller, faster
        with torch.no_grad():
            e_c, e_u = eps_of(model(xx, t, ll)), eps_of(model(xx, t, None))
            assert (e_c - e_u).abs().max() > 1e-4
            for s, conv, want in ((0.0, 'authors', e_u), (1.0, 'authors', e_c), (0.0, 'paper', e_c), (-1.0, 'paper', e_u),
                                  (1.5, 'authors', e_u + 1.5 * (e_c - e_u)), (1.5, 'paper', e_c + 1.5 * (e_c - e_u))):
                torch.testing.assert_close(predict_eps(model, xx, t, ll, s=s, convention=conv), want, atol=1e-5, rtol=0,
                                           msg=f'{type(model).__name__} s={s} {conv}')
            torch.testing.assert_close(predict_eps(model, xx, t, None, s=1.5, convention='paper'), e_u, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match='unknown guidance convention'): predict_eps(model, xx, t, ll, s=1.5, convention='code')


def test_ddim_sample_passes_the_convention_through(batch):
    x0, lab = batch; x0, lab = x0[:2], lab[:2]; model = _sem(); sched = make_noise_scheduler()
    kw = dict(y0=x0, start_step=3, steps=5, x=lab, seed=0)
    paper = ddim_sample(model, sched, s=1.5, convention='paper', **kw)
    torch.testing.assert_close(paper, ddim_sample(model, sched, s=2.5, convention='authors', **kw), atol=1e-3, rtol=0)  # rounding only
    assert (paper - ddim_sample(model, sched, s=1.5, **kw)).abs().max() > 0.05  # the default is the authors' form
    with pytest.raises(ValueError, match='unknown guidance convention'): ddim_sample(model, sched, s=1.5, convention='Paper', **kw)


# --- the authors' SDM network (nucbook.models.sdm) in the engine ----------------------------------------------------
def _sdm(seed=0, **overrides):
    "A tiny SDMUNet with every tensor non-zero (its output convs are zero-initialised), so eps and v depend on the input."
    torch.manual_seed(seed)
    m = SDMUNet(**sdm_config('tiny', **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p) * 0.05)
    return m


def test_null_label_dropout_is_binomial_and_zeroes_the_whole_map():
    # n maps of 6 channels (classes, background, edge), non-zero in every pixel of every channel, so that a channel left
    # over shows; the dropped count is Binomial(n, 0.2), given 4 standard deviations of tolerance
    n = 5000
    x = torch.rand(n, 6, 3, 3, generator=torch.Generator().manual_seed(10)) + 0.5
    xd, dropped = drop_labels(x, 0.2, torch.Generator().manual_seed(11))
    k = int(dropped.sum()); sd = (n * 0.2 * 0.8) ** 0.5
    assert abs(k - 0.2 * n) < 4 * sd, (k, 0.2 * n, sd)
    assert (xd[dropped] == 0).all()  # every channel of a dropped map: classes, background and edge
    assert torch.equal(xd[~dropped], x[~dropped])  # the others untouched
    # another seed draws another subset at the same rate
    d2 = drop_labels(x, 0.2, torch.Generator().manual_seed(12))[1]
    assert not torch.equal(d2, dropped) and abs(int(d2.sum()) - 0.2 * n) < 4 * sd


def test_training_feeds_whole_or_null_label_maps(tiles, tmp_path):
    # what an SDMUNet sees while training: each label map either a full one-hot + edge map or all zeros, none half-dropped
    def seen_labels(p_uncond, out):
        model = _sdm(); maps = []
        h = model.register_forward_hook(lambda m, a, o: maps.append(a[2].detach().clone()))
        train_diffusion(model, tiles, tmp_path/out, steps=3, batch_size=4, patch_size=16, lr=1e-4, ema_decay=0.9,
                        p_uncond=p_uncond, seed=1, save_final=False)
        h.remove()
        return torch.cat(maps)
    for p, out in ((0.0, 'none'), (1.0, 'all'), (0.5, 'half')):
        y = seen_labels(p, out)
        null = y.flatten(1).abs().sum(1) == 0
        assert y.shape == (12, 6, 16, 16)
        assert (y[~null][:, :5].sum(1) == 1).all()  # kept maps: exactly one class per pixel (background included)
        if p == 0.0: assert not null.any()
        if p == 1.0: assert null.all()
        if p == 0.5: assert 0 < int(null.sum()) < 12


def test_sdm_model_helpers(batch):
    m = _sdm()
    assert model_side(m) == 64 and model_label_channels(m) == 6 and model_label_channels(_sem()) == 6
    with pytest.raises(ValueError, match='takes no label map'): model_label_channels(_unet())
    x, lab = batch
    out = m(x[:, :, :16, :16], torch.tensor([1, 2, 3, 4]), lab[:, :, :16, :16])
    e, v = split_output(out); assert e.shape == v.shape == (4, 3, 16, 16)


def test_sdm_trains_with_hybrid_loss_and_resumes_in_chunks(tiles, tmp_path):
    kw = dict(steps=4, batch_size=2, patch_size=16, lr=1e-3, ckpt_every=2, ema_decay=0.9, p_uncond=0.5, seed=5)
    full = train_diffusion(_sdm(), tiles, tmp_path/'full', **kw)
    assert all(np.isfinite(full.losses)) and len(full.losses) == 4
    first = train_diffusion(_sdm(), tiles, tmp_path/'cut', max_seconds=0, **kw)  # stops after one step, with a checkpoint
    assert not first.finished and first.step == 1 and not (tmp_path/'cut'/'model').exists()
    rest = train_diffusion(_sdm(), tiles, tmp_path/'cut', **kw)
    assert rest.resumed_from == 1 and rest.finished and rest.losses == full.losses
    for (k, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()): assert torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, rest.ema.shadow_params): assert torch.equal(a, b)
    ck = torch.load(tmp_path/'cut'/'checkpoint.pt', weights_only=False)
    rec = ck['history']['records']  # the hybrid terms are logged every step, and add up to the loss
    assert len(rec['vlb']) == 4 and np.allclose(rec['loss'], rec['mse'] + rec['vlb'], rtol=1e-5) and (rec['vlb'] > 0).all()
    with pytest.raises(SettingsMismatch, match='sdm'):  # the SDM arguments are part of the run's settings
        train_diffusion(_sdm(model_channels=64), tiles, tmp_path/'cut', **kw)
    with pytest.raises(ValueError, match='2 classes give 4 label channels, the model has 6'):
        train_diffusion(_sdm(), tiles, tmp_path/'bad', n_classes=2, **kw)


def test_sdm_save_load_round_trip(batch, tmp_path):
    x, lab = batch[0][:2, :, :16, :16], batch[1][:2, :, :16, :16]; t = torch.tensor([0, 640])
    model = _sdm(); sched = make_noise_scheduler()
    save_diffusion(tmp_path/'m', model, sched)
    conf = json.loads((tmp_path/'m'/'unet'/'config.json').read_text())
    assert conf == {'_class_name': 'SDMUNet', **{k: list(v) if isinstance(v, tuple) else v for k, v in sdm_config('tiny').items()}}
    assert sorted(p.name for p in (tmp_path/'m').iterdir()) == ['scheduler', 'unet']
    assert sorted(p.name for p in (tmp_path/'m'/'unet').iterdir()) == ['config.json', SDM_WEIGHTS]
    m2, s2 = load_diffusion(tmp_path/'m')
    assert type(m2) is SDMUNet and m2.args == model.args and torch.equal(s2.alphas_cumprod, sched.alphas_cumprod)
    with torch.no_grad():
        assert torch.equal(m2(x, t, lab), model(x, t, lab))
        assert torch.equal(load_sdm(tmp_path/'m'/'unet'/SDM_WEIGHTS, 'tiny')(x, t, lab), model(x, t, lab))  # the authors' layout
    assert set(torch.load(tmp_path/'m'/'unet'/SDM_WEIGHTS, weights_only=True)) == set(model.state_dict())


def test_train_sdm_from_the_authors_checkpoint(tiles, tmp_path):
    src = _sdm(seed=7); ck = save_sdm(src, tmp_path/'ema_0.9999_010000.pt')
    kw = dict(steps=1, batch_size=2, patch_size=16, lr=0.0, ema_decay=0.9, seed=0)  # lr 0: the weights stay the file's
    run = train_diffusion(SDMUNet(**sdm_config('tiny')), tiles, tmp_path/'run', init_from=ck, **kw)
    for (k, a), b in zip(src.state_dict().items(), run.model.state_dict().values()): assert torch.equal(a, b), k
    assert np.isfinite(run.losses[0])
    resumed = train_diffusion(SDMUNet(**sdm_config('tiny')), tiles, tmp_path/'run', init_from=ck, **{**kw, 'steps': 2}, extend=True)
    assert resumed.resumed_from == 1  # a resumed run continues from its own checkpoint, the file is not read again
    with pytest.raises(SettingsMismatch, match='init_from'):
        train_diffusion(SDMUNet(**sdm_config('tiny')), tiles, tmp_path/'run', init_from=tmp_path/'other.pt', **kw)
    with pytest.raises(ValueError, match='does not match the SDM config'):  # a checkpoint of another label set
        train_diffusion(SDMUNet(**sdm_config('tiny', label_channels=5)), tiles, tmp_path/'v', init_from=ck, n_classes=3, **kw)
    with pytest.raises(ValueError, match='SDMUNet'): train_diffusion(_sem(), tiles, tmp_path/'s', init_from=ck, **kw)


def test_sdm_guided_ddim_from_start_step_equals_hand_steps_and_is_seeded(batch):
    # DiffMix's sampler on the tiny SDM: real patches noised to step 3 of 5 (authors' leading spacing: t = 600), 4 steps
    # of DDIM (eta 0) under guidance s = 1.5 (authors' form), against the steps written out; deterministic per seed
    x0, lab = batch[0][:2, :, :16, :16], batch[1][:2, :, :16, :16]
    model = _sdm(); sched = make_noise_scheduler(); abar = sched.alphas_cumprod; s = 1.5
    taus = [600, 400, 200, 0]
    assert start_timestep(sched, 5, 3, 'leading') == 600
    def eps_fn(y, t):
        tt = torch.full((len(y),), t)
        with torch.no_grad():
            e_c, e_u = model(y, tt, lab)[:, :3], model(y, tt, torch.zeros_like(lab))[:, :3]
        return e_u + s * (e_c - e_u)
    draw = _noise([3, 4], x0.shape[1:]); y_T = draw()
    y_T = abar[taus[0]].sqrt() * x0 + (1 - abar[taus[0]]).sqrt() * y_T
    out = ddim_sample(model, sched, y0=x0, start_step=3, steps=5, x=lab, s=s, seed=3, spacing='leading')
    torch.testing.assert_close(out, _ddim_by_hand(eps_fn, abar, y_T, taus, 0.0, draw), atol=1e-4, rtol=0)
    assert torch.equal(out, ddim_sample(model, sched, y0=x0, start_step=3, steps=5, x=lab, s=s, seed=3, spacing='leading'))
    torch.testing.assert_close(out[1:], ddim_sample(model, sched, y0=x0[1:], start_step=3, steps=5, x=lab[1:], s=s, seed=4,
                                                    spacing='leading'), atol=1e-5, rtol=0)  # a patch depends on its seed only
    other = ddim_sample(model, sched, y0=x0, start_step=3, steps=5, x=lab, s=s, seed=5, spacing='leading')
    assert (other - out).abs().max() > 1e-3
    # the DiffMix schedule itself: 55 guided steps (2 x 55 network evaluations) from t = 540 on the authors' spacing
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    ddim_sample(model, sched, y0=x0[:1], start_step=54, steps=100, x=lab[:1], s=s, seed=0, spacing='leading')
    h.remove()
    assert len(seen) == 55 and seen[0] == 540 and seen[-1] == 0
    with pytest.raises(ValueError, match="'dpm\\+\\+' runs with 'trailing'"):
        ddim_sample(model, sched, y0=x0, start_step=3, steps=5, x=lab, solver='dpm++', spacing='leading')
