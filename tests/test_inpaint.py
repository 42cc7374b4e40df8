"""Diffusion inpainting: known pixels bit-identical, exact recovery with a perfect model, seeding, input checks; MCG step
by step against Eqs. 8-11 written out, and against the exact denoiser of a Gaussian prior."""
from contextlib import contextmanager
import numpy as np
import pytest
import torch
from nucbook.engine.diffusion import make_noise_scheduler, make_semantic_unet, make_unet, to_model_range
from nucbook.engine.inpaint import inpaint_image, mcg_inpaint, repaint
from nucbook.models.adm import ADMUNet, adm_config
from nucbook.data.synth import synth_tile

torch.set_num_threads(1)
S = 16


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0); return make_unet('tiny', sample_size=S).eval()


@pytest.fixture(scope='module')
def data():
    y = to_model_range(np.stack([synth_tile(i, size=S).image for i in range(3)]))
    mask = torch.zeros(3, 1, S, S, dtype=torch.bool); mask[:, :, 4:11, 3:9] = True; mask[1, :, 0, :] = True
    return y, mask


@pytest.mark.parametrize('fill,kw', [(mcg_inpaint, dict(alpha=1.0)), (mcg_inpaint, dict(alpha=0.5, squared=True, eta=0.0)),
                                     (mcg_inpaint, dict(alpha=0.0)), (repaint, dict(jump_length=2, jump_n_sample=2)),
                                     (mcg_inpaint, dict(alpha=1.0, sampler='ddpm')), (mcg_inpaint, dict(alpha=0.0, sampler='ddpm'))])
def test_known_pixels_bit_identical(fill, kw, model, data):
    y, mask = data; sched = make_noise_scheduler()
    out = fill(model, sched, y, mask, steps=4, seed=0, batch_size=2, **kw)
    keep = ~mask.expand_as(y)
    assert out.shape == y.shape and torch.equal(out[keep], y[keep])
    assert not torch.equal(out[~keep], y[~keep]) and out.abs().max() <= 1
    assert torch.equal(out, fill(model, sched, y, mask, steps=4, seed=0, batch_size=2, **kw))  # deterministic per seed
    assert not torch.equal(out, fill(model, sched, y, mask, steps=4, seed=9, batch_size=2, **kw))


def test_mcg_gradient_changes_the_fill(model, data):
    y, mask = data; sched = make_noise_scheduler()
    a = mcg_inpaint(model, sched, y, mask, steps=4, alpha=0.0, seed=1)
    b = mcg_inpaint(model, sched, y, mask, steps=4, alpha=2.0, seed=1)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize('fill,kw', [(mcg_inpaint, dict(alpha=1.0, eta=1.0)), (mcg_inpaint, dict(alpha=1.0, eta=0.0)),
                                     (repaint, dict(jump_length=2, jump_n_sample=3)), (mcg_inpaint, dict(alpha=1.0, sampler='ddpm'))])
def test_perfect_model_recovers_the_hole(fill, kw, data, oracle):
    # a noise predictor that is exact for x0 fills the hole with x0 (Tweedie estimate = x0 at every step)
    y, mask = data; sched = make_noise_scheduler()
    x0 = torch.linspace(-0.8, 0.8, S).expand(3, 3, S, S).clone()
    measured = torch.where(mask, torch.zeros_like(x0), x0)  # the hole's content is unknown to the sampler
    out = fill(oracle(x0, sched, S), sched, measured, mask, steps=10, seed=0, **kw)
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)


def test_inpaint_image_tiles_and_keeps_pixels(model):
    img = synth_tile(3, size=(2 * S + 5, S + 3)).image
    mask = np.zeros(img.shape[:2], bool); mask[2:6, 2:7] = True; mask[2 * S + 1:2 * S + 4, S:S + 2] = True
    for method, kw in (('mcg', {}), ('repaint', dict(jump_length=2, jump_n_sample=1))):
        out = inpaint_image(model, make_noise_scheduler(), img, mask, method=method, steps=3, **kw)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.array_equal(out[~mask], img[~mask]) and (out[mask] != img[mask]).any()
    assert np.array_equal(inpaint_image(model, make_noise_scheduler(), img, np.zeros_like(mask)), img)


def test_bad_inputs(model, data):
    y, mask = data; sched = make_noise_scheduler()
    with pytest.raises(ValueError, match='bool'): mcg_inpaint(model, sched, y, mask.float())
    with pytest.raises(ValueError, match='N x 3'): repaint(model, sched, y[:, :2], mask)
    with pytest.raises(ValueError, match='unconditional'): mcg_inpaint(make_semantic_unet('tiny', 2), sched, y, mask)
    img = synth_tile(0, size=S).image
    with pytest.raises(ValueError, match='mask must be bool'): inpaint_image(model, sched, img, np.zeros((S, S), np.uint8))
    with pytest.raises(ValueError, match='unknown method'): inpaint_image(model, sched, img, np.ones((S, S), bool), method='x')
    with pytest.raises(ValueError, match='unknown sampler'): mcg_inpaint(model, sched, y, mask, sampler='euler')


# --- MCG against its equations -------------------------------------------------------------------------------------
# The tests above hold for any sampler that keeps the known pixels; with the exact (oracle) noise predictor x0_hat does
# not depend on x_i, so the MCG gradient is zero. The tests below use models whose x0_hat does depend on x_i: the tiny
# UNet (random weights, non-linear) for exact agreement with a hand-written sampler, and the exact denoiser of a
# Gaussian prior (linear, spatially correlated) for what MCG is for.
T = 1000


def _taus(steps):
    "DDIM timesteps, trailing spacing, for `steps` dividing T: T-1, T-1-T/steps, ..."
    assert T % steps == 0
    return [T - 1 - k * (T // steps) for k in range(steps)]


def _draws(seeds, shape):
    "The samplers' noise, replayed: one generator per patch (seed + i), one standard-normal draw per patch per call."
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])


def _mcg_by_hand(model, abar, y, known, steps, eta, alpha, squared, seed):
    "NucleiMix Eqs. 8-11 written out: returns the output and the x_i fed to the model at every step."
    draw = _draws(range(seed, seed + len(y)), y.shape[1:]); taus = _taus(steps); xs = []
    x = draw()  # x_N ~ N(0, I)
    for k, t in enumerate(taus):
        a, a_prev = abar[t], abar[taus[k + 1]] if k + 1 < steps else torch.tensor(1.0)  # alpha-bar_i, alpha-bar_{i-1}
        xs.append(x); xi = x.clone().requires_grad_(True)
        eps = model(xi, torch.tensor(t)).sample
        x0 = (xi - (1 - a).sqrt() * eps) / a.sqrt()  # Eq. 8
        r = (known * (y - x0)).flatten(1)
        L = (r ** 2).sum(1) if squared else r.norm(dim=1)  # ||y - H x0_hat|| per patch (squared: Eq. 9 as printed)
        g, = torch.autograd.grad(L.sum(), xi)
        # f + g z: the DDIM step (Song et al. Eq. 12) from the clipped x0_hat (ddim_scheduler clips), sigma from eta
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        z = draw() if eta > 0 else 0.0
        x_prev = a_prev.sqrt() * x0.detach().clamp(-1, 1) + (1 - a_prev - sigma ** 2).sqrt() * eps.detach() + sigma * z
        x_prev = x_prev - alpha * g  # Eq. 9: minus alpha times the gradient w.r.t. x_i
        y_prev = a_prev.sqrt() * y + (1 - a_prev).sqrt() * draw()  # Eq. 10: y noised to step i-1 with fresh noise
        x = torch.where(known, y_prev, x_prev)
    return torch.where(known, y, x_prev.clamp(-1, 1)), xs  # Eq. 11


@contextmanager
def _inputs(model):
    "Record (x, t) of every forward call of `model` inside the block."
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append((a[0].detach().clone(), int(torch.as_tensor(a[1]).reshape(-1)[0]))))
    try: yield seen
    finally: h.remove()


@pytest.mark.parametrize('eta,alpha,squared', [(1.0, 0.7, False), (0.0, 1.6, False), (1.0, 0.03, True), (0.5, 0.0, False)])
def test_mcg_equals_hand_computed_sampler(eta, alpha, squared, model, data):
    y, mask = data; sched = make_noise_scheduler(); known = ~mask; steps = 4
    with _inputs(model) as seen: out = mcg_inpaint(model, sched, y, mask, steps=steps, eta=eta, alpha=alpha, squared=squared, seed=5)
    ref, xs = _mcg_by_hand(model, sched.alphas_cumprod, y, known, steps, eta, alpha, squared, seed=5)
    assert [t for _, t in seen] == _taus(steps)
    for k, ((x, _), x_ref) in enumerate(zip(seen, xs)):  # every x_i, before any clipping
        torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-5, msg=f'x_i at step {k}')
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if alpha:  # the gradient term is far above the tolerance: without it the hand-written sampler ends elsewhere
        plain, xs0 = _mcg_by_hand(model, sched.alphas_cumprod, y, known, steps, eta, 0.0, squared, seed=5)
        assert (xs0[-1] - xs[-1])[~known.expand_as(y)].abs().max() > 1e-2 and (plain - ref).abs().max() > 1e-2


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_mcg_data_consistency_noises_y_to_the_next_step(eta, model, data):
    # Eq. 10: the known pixels of x_{i-1} are exactly sqrt(abar_{i-1}) y + sqrt(1 - abar_{i-1}) n, n the fresh draw
    # that follows x_N (and z, when eta > 0) on the patch's generator, and abar_{i-1} belongs to the next model call
    y, mask = data; sched = make_noise_scheduler(); abar = sched.alphas_cumprod; known = ~mask.expand_as(y)
    with _inputs(model) as seen: mcg_inpaint(model, sched, y, mask, steps=5, eta=eta, alpha=1.0, seed=2)
    draw = _draws([2, 3, 4], y.shape[1:]); x_N = draw()
    torch.testing.assert_close(seen[0][0], x_N, atol=0, rtol=0)
    for x, t in seen[1:]:
        if eta > 0: draw()  # z of the DDIM step
        y_i = abar[t].sqrt() * y + (1 - abar[t]).sqrt() * draw()
        torch.testing.assert_close(x[known], y_i[known], atol=1e-6, rtol=0, msg=f'known pixels at t={t}')


class GaussEps(torch.nn.Module):
    """The exact noise predictor of a Gaussian prior: every channel x0 ~ N(0, C), C an RBF kernel on the pixel grid.
    x_t = sqrt(a) x0 + sqrt(1-a) eps is N(0, a C + (1-a) I), so E[eps | x_t] = sqrt(1-a) (a C + (1-a) I)^-1 x_t and
    Tweedie's x0_hat = a^-1/2 (x_t - sqrt(1-a) E[eps | x_t]) = sqrt(a) C (a C + (1-a) I)^-1 x_t is the true posterior
    mean: a model that is right about its data, whose Jacobian couples each pixel to its neighbours."""
    def __init__(self, sched, size, ell=3.0, std=0.4):
        super().__init__()
        g = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij'), -1).reshape(-1, 2).double()
        self.C = std ** 2 * torch.exp(-torch.cdist(g, g) ** 2 / (2 * ell ** 2)) + 1e-6 * torch.eye(size * size, dtype=torch.float64)
        lam, U = torch.linalg.eigh(self.C)
        self.lam, self.U, self.abar = lam.float(), U.float(), sched.alphas_cumprod
        self.w = torch.nn.Parameter(torch.zeros(()))  # for the samplers' device look-up

    def prior_sample(self, n, gen):
        side = int(len(self.lam) ** 0.5)
        return ((torch.randn(n, 3, len(self.lam), generator=gen) * self.lam.sqrt()) @ self.U.T).reshape(n, 3, side, side)

    def forward(self, x, t):
        a = self.abar[torch.as_tensor(t).long().cpu()].float().reshape(-1, 1, 1)
        eps = ((x.flatten(2) @ self.U) * (1 - a).sqrt() / (a * self.lam + 1 - a)) @ self.U.T
        return type('out', (), {'sample': eps.reshape(x.shape) + 0 * self.w})()


def test_gaussian_prior_denoiser_is_exact():
    # the property the next test relies on: GaussEps is E[eps | x_t] (checked against the regression of eps on x_t)
    sched = make_noise_scheduler(); m = GaussEps(sched, 6); g = torch.Generator().manual_seed(0)
    x0 = m.prior_sample(4000, g); eps = torch.randn(x0.shape, generator=g); a = sched.alphas_cumprod[300]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad(): err_model = (m(xt, 300).sample - eps).pow(2).mean()
    B = torch.linalg.lstsq(xt.flatten(2).reshape(-1, 36).double(), eps.flatten(2).reshape(-1, 36).double()).solution
    err_fit = (xt.flatten(2).reshape(-1, 36).double() @ B - eps.flatten(2).reshape(-1, 36)).pow(2).mean()
    assert err_model < 1.01 * err_fit and err_model < 0.9  # as good as the best linear predictor fitted on the data


@pytest.mark.parametrize('eta,sampler', [(0.0, 'ddim'), (1.0, 'ddim'), (1.0, 'ddpm')])
def test_mcg_pulls_the_fill_towards_the_measurement(eta, sampler):
    # What MCG must do, and replacement sampling (alpha=0) does not: make the clean-image estimate agree with the
    # measurement. Replacement only overwrites the known pixels of x_i, so the hole is denoised as if unconditioned;
    # MCG moves x_{i-1} down the gradient of ||y - H x0_hat(x_i)||. With the exact denoiser of a Gaussian prior and y
    # drawn from that prior, for the same seeds (same x_N, z and measurement noise) this shows as
    # (a) x0_hat agrees better with y on the known pixels along the path (late steps, where y_i is not mostly noise),
    # (b) the fill lies closer to the exact conditional mean E[x_hole | y_known] (closed form for a Gaussian).
    sched = make_noise_scheduler(); m = GaussEps(sched, S); abar = sched.alphas_cumprod
    y = m.prior_sample(4, torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 1, S, S, dtype=torch.bool); mask[:, :, 4:11, 3:10] = True; known = ~mask
    k = known[0, 0].flatten(); hole = ~k; C = m.C
    cond_mean = (C[hole][:, k] @ torch.linalg.solve(C[k][:, k], y.flatten(2)[..., k].double().transpose(1, 2))).transpose(1, 2)

    def run(alpha):
        with _inputs(m) as seen: out = mcg_inpaint(m, sched, y, mask, steps=10, eta=eta, alpha=alpha, seed=0, sampler=sampler)
        with torch.no_grad():
            err = torch.stack([((known * (y - (x - (1 - abar[t]).sqrt() * m(x, t).sample) / abar[t].sqrt())).flatten(1)).norm(dim=1)
                               for x, t in seen])  # steps x patches
        fill_err = (out.flatten(2)[..., hole].double() - cond_mean).pow(2).mean((1, 2)).sqrt()
        return err, fill_err
    (e0, f0), (e1, f1) = run(0.0), run(5.0)  # a large step shows the effect within 10 steps
    assert torch.equal(e0[0], e1[0])  # same x_N
    ratio = (e1[5:] / e0[5:]).mean(0)  # per patch, over the second half of the path (0.92-0.98 measured)
    assert (ratio < 1).all() and ratio.mean() < 0.98, ratio
    assert (f1 < 0.85 * f0).all(), (f0, f1)  # 0.42-0.75 measured
    assert (f0 > 0.2).all()  # replacement: about the prior's spread (0.4) away; the conditional spread is 0.02


# --- the ancestral (ddpm) sampler and the ADM UNet -------------------------------------------------------------------
@pytest.fixture(scope='module')
def adm():
    "A tiny ADM with every tensor non-zero (its output convs are zero-initialised), so its eps and v vary with the input."
    torch.manual_seed(0)
    m = ADMUNet(**adm_config('tiny')).eval()
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm'])
def test_adm_known_pixels_bit_identical(sampler, adm, data):
    y, mask = data; sched = make_noise_scheduler(); keep = ~mask.expand_as(y)
    out = mcg_inpaint(adm, sched, y, mask, steps=4, seed=0, batch_size=2, sampler=sampler)
    assert torch.equal(out[keep], y[keep]) and not torch.equal(out[~keep], y[~keep]) and out.abs().max() <= 1
    assert torch.equal(out, mcg_inpaint(adm, sched, y, mask, steps=4, seed=0, batch_size=2, sampler=sampler))


def test_adm_repaint_and_whole_images(adm, data):
    y, mask = data; sched = make_noise_scheduler(); keep = ~mask.expand_as(y)
    out = repaint(adm, sched, y, mask, steps=4, jump_length=2, jump_n_sample=2, seed=1)
    assert torch.equal(out[keep], y[keep]) and not torch.equal(out[~keep], y[~keep])
    img = synth_tile(5, size=(40, 36)).image  # 32 px tiles by default (the model's image_size): 2 x 2 tiles
    m = np.zeros(img.shape[:2], bool); m[3:8, 4:9] = True; m[35:39, 33:35] = True
    res = inpaint_image(adm, sched, img, m, steps=3, sampler='ddpm')
    assert np.array_equal(res[~m], img[~m]) and (res[m] != img[m]).any()


class KnownOut(torch.nn.Module):
    "A hand-made model: the same eps (and variance values v, if given) for every input and timestep."
    def __init__(self, eps, v=None):
        super().__init__(); self.eps, self.v = eps, v; self.w = torch.nn.Parameter(torch.zeros(()))
    def forward(self, x, t):
        out = self.eps.expand(len(x), -1, -1, -1) + 0 * self.w
        return out if self.v is None else torch.cat([out, self.v.expand(len(x), -1, -1, -1)], 1)


@pytest.mark.parametrize('learned', [True, False])
def test_one_ddpm_step_by_hand(learned, data):
    # steps=2: the respaced chain keeps t = 0 and 999. Step i = 1 (model at t = 999), written out with the chain's
    # beta'_1 = 1 - abar_999 / abar_0 and beta_tilde'_1 = (1 - abar_0) / (1 - abar_999) beta'_1:
    #   x'_0 = mu_tilde(clip(x0_hat), x_1) + sigma z - alpha grad,  sigma^2 = exp(f log beta' + (1 - f) log beta_tilde'),
    # f = (v + 1) / 2 (learned) or sigma^2 = beta_tilde' (no v); the known pixels then get sqrt(abar_0) y + sqrt(1 - abar_0) n
    y, mask = data; y, mask = y[:2], mask[:2]; known = ~mask; sched = make_noise_scheduler(); alpha = 0.3
    g = torch.Generator().manual_seed(11)
    E, V = torch.randn(1, 3, S, S, generator=g), torch.rand(1, 3, S, S, generator=g) * 2 - 1
    model = KnownOut(E, V if learned else None)
    with _inputs(model) as seen: out = mcg_inpaint(model, sched, y, mask, steps=2, alpha=alpha, seed=4, sampler='ddpm')
    assert [t for _, t in seen] == [999, 0]
    abar = torch.cumprod(1 - sched.betas.double(), 0); a, ap = abar[999], abar[0]
    b = 1 - a / ap; bt = (1 - ap) / (1 - a) * b
    draw = _draws([4, 5], y.shape[1:]); x = draw().double(); yd = y.double(); Ed = E.double()
    x0_hat = (x - (1 - a).sqrt() * Ed) / a.sqrt()
    r = known * (yd - x0_hat); norm = r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    grad = -r / norm / a.sqrt()  # d/dx ||H (y - x0_hat(x))||, x0_hat linear in x with slope 1/sqrt(a)
    mean = ap.sqrt() * b / (1 - a) * x0_hat.clamp(-1, 1) + (1 - b).sqrt() * (1 - ap) / (1 - a) * x
    f = (V.double() + 1) / 2
    var = torch.exp(f * b.log() + (1 - f) * bt.log()) if learned else bt
    x_prev = mean + var.sqrt() * draw() - alpha * grad
    x1 = torch.where(known, ap.sqrt() * yd + (1 - ap).sqrt() * draw(), x_prev)
    torch.testing.assert_close(seen[1][0].double(), x1, atol=2e-5, rtol=1e-5)
    # the last step (t = 0, abar_prev = 1): mu_tilde = clip(x0_hat) exactly, no noise; the output keeps y where known
    x0_last = ((x1 - (1 - ap).sqrt() * Ed) / ap.sqrt())
    r = known * (yd - x0_last); grad = -r / r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) / ap.sqrt()
    ref = torch.where(known, yd, (x0_last.clamp(-1, 1) - alpha * grad).clamp(-1, 1))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    if learned:  # the learned variance matters: sigma differs from sqrt(beta_tilde') by far more than the tolerance
        assert (var.sqrt() - bt.sqrt()).abs().max() > 1e-2


def _mcg_ddpm_by_hand(model, sched, y, known, steps, alpha, seed):
    "guided-diffusion's p_sample on the chain respaced to `steps` (even spacing, rounded) + MCG (Eqs. 8-11), by hand."
    T = 1000; taus = [round(i * (T - 1) / (steps - 1)) for i in range(steps)][::-1]
    abar = torch.cumprod(1 - sched.betas.double(), 0)
    draw = _draws(range(seed, seed + len(y)), y.shape[1:]); x = draw(); xs = []
    for j, t in enumerate(taus):
        a = abar[t].float(); ap = abar[taus[j + 1]].float() if j + 1 < steps else torch.tensor(1.0)
        b = 1 - a / ap; bt = (1 - ap) / (1 - a) * b
        xs.append(x); xi = x.clone().requires_grad_(True)
        out = model(xi, torch.tensor(t)); eps, v = out[:, :3], out[:, 3:]
        x0 = (xi - (1 - a).sqrt() * eps) / a.sqrt()
        g, = torch.autograd.grad((known * (y - x0)).flatten(1).norm(dim=1).sum(), xi)
        mean = ap.sqrt() * b / (1 - a) * x0.detach().clamp(-1, 1) + (1 - b).sqrt() * (1 - ap) / (1 - a) * x
        f = (v.detach() + 1) / 2
        sigma = (f * b.log() + (1 - f) * bt.log()).exp().sqrt() if j + 1 < steps else 0  # no noise at the last step
        x_prev = mean + sigma * draw() - alpha * g  # (z drawn at every step)
        x = torch.where(known, ap.sqrt() * y + (1 - ap).sqrt() * draw(), x_prev)
    return torch.where(known, y, x_prev.clamp(-1, 1)), xs


@pytest.mark.parametrize('steps,alpha', [(4, 0.5), (5, 0.0)])
def test_mcg_ddpm_equals_hand_computed_sampler(steps, alpha, adm, data):
    y, mask = data; sched = make_noise_scheduler(); known = ~mask
    with _inputs(adm) as seen: out = mcg_inpaint(adm, sched, y, mask, steps=steps, alpha=alpha, seed=8, sampler='ddpm')
    ref, xs = _mcg_ddpm_by_hand(adm, sched, y, known, steps, alpha, seed=8)
    assert [t for _, t in seen] == [round(i * 999 / (steps - 1)) for i in range(steps)][::-1]
    for k, ((x, _), x_ref) in enumerate(zip(seen, xs)):
        torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-5, msg=f'x_i at step {k}')
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
