"""Diffusion core: objective, schedulers, guidance, null labels, save/load, seeded sampling (against DDIM written out, and
the start from a noised image against its closed form), resumable training."""
from contextlib import contextmanager
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from nucbook.engine.diffusion import (cfg_combine, ddim_sample, ddim_scheduler, diffusion_loss, drop_labels, label_channels,
                               load_diffusion, make_noise_scheduler, make_semantic_unet, make_unet, predict_eps,
                               patch_batch, save_diffusion, train_diffusion)
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


@pytest.mark.parametrize('steps,start_step', [(100, 54), (10, 0), (10, 9), (5, 2)])
def test_start_from_image_noise_level(steps, start_step, batch, oracle):
    # DiffMix starts at step k of an N-step trailing schedule, t = (k + 1) T / N - 1 (54 of 100: t = 549), from
    # y_t = sqrt(abar_t) y0 + sqrt(1 - abar_t) eps; eps is the first draw of each patch's generator (seed + i)
    x0 = batch[0][:2]; sched = make_noise_scheduler(); abar = sched.alphas_cumprod; T = 1000
    t = (start_step + 1) * T // steps - 1
    eps = _noise([7, 8], x0.shape[1:])()
    closed = lambda t: abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    ora = oracle(x0, sched, S)
    with _seen_inputs(ora) as seen: out = ddim_sample(ora, sched, y0=x0, start_step=start_step, steps=steps, seed=7, eta=0.0)
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
