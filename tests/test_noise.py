import functools
import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from dforce.diffusion.noise import PARAMETERIZATIONS, WEIGHTING_OPTIONS, NoiseConfig, NoiseSchedule

SCHEDULES = {
    "cosine": ("cosine", {}),
    "linear": ("linear", {}),
    "sigmoid": ("sigmoid", {}),
    "flow": ("flow", {}),
    "cosine-ztsnr": ("cosine", {"zero_terminal_snr": True}),
    "linear-ztsnr": ("linear", {"zero_terminal_snr": True}),
    "flow-shift3": ("flow", {"shift": 3.0}),
}
VP = ["cosine", "linear", "sigmoid", "cosine-ztsnr", "linear-ztsnr"]


@functools.cache
def schedule(key: str, levels: int = 1000) -> NoiseSchedule:
    name, options = SCHEDULES[key]
    return NoiseSchedule.from_name(name, levels, **options)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("levels", [1000, 10, 2])
@pytest.mark.parametrize("key", SCHEDULES)
def test_tables(key, levels):
    sched = schedule(key, levels)
    assert sched.levels == levels
    assert sched.alpha.shape == sched.sigma.shape == (levels + 1,)
    assert sched.alpha.dtype == sched.sigma.dtype == torch.float64
    assert sched.alpha[0] == 1 and sched.sigma[0] == 0
    lam = sched.log_snr(torch.arange(levels + 1)[None])[0]
    assert lam.dtype == torch.float64 and lam[0] == math.inf
    assert (lam[1:] < lam[:-1]).all()
    assert sched.sigma[-1] > 0.99  # ends (nearly) at pure noise, even for small K
    if key in VP:
        torch.testing.assert_close(sched.alpha**2 + sched.sigma**2, torch.ones_like(sched.alpha))
    if "ztsnr" in key or "flow" in key:
        assert sched.alpha[-1] == 0 and lam[-1] == -math.inf


def test_vp_tables_match_diffusers():
    # Level k >= 1 is diffusers' timestep k - 1; alpha_bar is accumulated in float64 from its betas.
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    abar = schedule("cosine").alpha[1:] ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - ddpm.betas.double(), 0), rtol=1e-12, atol=0)
    torch.testing.assert_close(abar, ddpm.alphas_cumprod.double(), rtol=1e-5, atol=0)
    # Linear betas are scaled by 1000 / K (improved DDPM): K = 100 gives 1e-3 .. 0.2.
    betas = 1 - schedule("linear", 100).alpha[1:] ** 2 / schedule("linear", 100).alpha[:-1] ** 2
    torch.testing.assert_close(betas, torch.linspace(1e-3, 0.2, 100, dtype=torch.float64), rtol=1e-6, atol=0)


def test_flow_shift():
    t = torch.arange(11, dtype=torch.float64) / 10
    torch.testing.assert_close(schedule("flow", 10).sigma, t)
    torch.testing.assert_close(schedule("flow-shift3", 10).sigma, 3 * t / (1 + 2 * t))
    torch.testing.assert_close(schedule("flow-shift3", 10).alpha, 1 - 3 * t / (1 + 2 * t))


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_timesteps_are_diffusers_after_the_shift(shift):
    # diffusers' flow-matching scheduler (and Wan's pipelines) tell the model 1000 * sigma, sigma shifted.
    sched = NoiseSchedule.from_name("flow", 1000, shift=shift)
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    levels = torch.arange(1000, 0, -1)[None]  # its training table runs from t = 1 down to 1 / 1000
    torch.testing.assert_close(sched.sigma[levels[0]].float(), flow.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.timesteps(levels)[0], flow.timesteps, rtol=1e-6, atol=0)
    flow.set_timesteps(10)  # and at inference, between its table's levels: 1000 * sigma too
    torch.testing.assert_close(flow.timesteps, 1000 * flow.sigmas[:-1])
    # Whatever K is, the model sees the same range; VP schedules keep 1000 * k / K.
    coarse = NoiseSchedule.from_name("flow", 50, shift=shift)
    torch.testing.assert_close(coarse.timesteps(torch.arange(51)[None])[0], (1000 * coarse.sigma).float())
    assert schedule("cosine", 50).timesteps(torch.tensor([[0, 25, 50]])).tolist() == [[0, 500, 1000]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_per_frame(dtype):
    sched = schedule("cosine")
    x0 = torch.randn(3, 5, 2, 4, 4, generator=gen(0)).to(dtype)  # [B, T, C, H, W]
    noise = torch.randn(3, 5, 2, 4, 4, generator=gen(1)).to(dtype)
    levels = torch.randint(0, 1001, (3, 5), generator=gen(2))
    levels[0, :2] = 0
    x_t = sched.add_noise(x0, noise, levels)
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    for b in range(3):
        for t in range(5):
            a, s = sched.alpha[levels[b, t]].to(dtype), sched.sigma[levels[b, t]].to(dtype)
            assert torch.equal(x_t[b, t], a * x0[b, t] + s * noise[b, t])
    assert torch.equal(x_t[levels == 0], x0[levels == 0])


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("key", SCHEDULES)
def test_round_trip(key, parameterization):
    sched = schedule(key, 100)
    levels = torch.arange(1, 101).view(4, 25)  # every level >= 1
    if parameterization == "eps":  # x0 is lost where alpha = 0
        levels = levels.clamp(max=sched.levels - int(sched.alpha[-1] == 0))
    x0 = torch.randn(4, 25, 3, 2, 2, generator=gen(0), dtype=torch.float64)
    eps = torch.randn(4, 25, 3, 2, 2, generator=gen(1), dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, levels)
    x0_hat, eps_hat = sched.to_x0_eps(
        sched.target(x0, eps, levels, parameterization), x_t, levels, parameterization
    )
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("weighting", ["elbo", "min_snr", "sigmoid"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("key", SCHEDULES)
def test_weight_conversion_is_exact(key, parameterization, weighting):
    # weight_p * ||d pred_p||^2 == weight_x0 * ||d x0||^2 for any perturbation at fixed x_t.
    sched = schedule(key, 50)
    levels = torch.arange(1, 50).view(7, 7)  # levels 1..K-1, where every weight is finite
    x0 = torch.randn(7, 7, 3, 2, 2, generator=gen(0), dtype=torch.float64)
    eps = torch.randn(7, 7, 3, 2, 2, generator=gen(1), dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, levels)
    delta = 0.1 * torch.randn(7, 7, 3, 2, 2, generator=gen(2), dtype=torch.float64)
    pred = sched.target(x0, eps, levels, parameterization) + delta
    x0_hat, _ = sched.to_x0_eps(pred, x_t, levels, parameterization)
    lhs = sched.loss_weight(weighting, levels, parameterization) * delta.square().sum((2, 3, 4))
    rhs = sched.loss_weight(weighting, levels, "x0") * (x0_hat - x0).square().sum((2, 3, 4))
    torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=0)


def test_published_closed_forms():
    sched, levels = schedule("cosine"), torch.arange(1, 1001).view(10, 100)
    snr = sched.snr(levels)
    for gamma in (5.0, 1.0):
        clipped = snr.clamp(max=gamma)
        torch.testing.assert_close(sched.loss_weight("min_snr", levels, "eps", gamma=gamma), clipped / snr)
        torch.testing.assert_close(
            sched.loss_weight("min_snr", levels, "v", gamma=gamma), clipped / (snr + 1)
        )
        torch.testing.assert_close(sched.loss_weight("min_snr", levels, "x0", gamma=gamma), clipped)
    levels0 = torch.tensor([[0, 1, 1000]])
    for p in PARAMETERIZATIONS:
        assert sched.loss_weight("simple", levels0, p).tolist() == [[0.0, 1.0, 1.0]]


def kingma_gao(sched: NoiseSchedule, bias: float) -> tuple[list[float], list[float], list[float]]:
    """lambda_0..K, -d lambda / dt at k = 1..K (t = k / K; central differences, one-sided at the ends) and the
    eps weight sigmoid(b - lambda_k) * (-d lambda / dt)_k, in plain math from the alpha, sigma tables."""
    big_k = sched.levels
    pairs = zip(sched.alpha.tolist()[1:], sched.sigma.tolist()[1:], strict=True)
    lam = [math.inf] + [2 * (math.log(a) - math.log(s)) for a, s in pairs]
    rate = [big_k * (lam[1] - lam[2])]
    rate += [big_k * (lam[k - 1] - lam[k + 1]) / 2 for k in range(2, big_k)]
    rate += [big_k * (lam[big_k - 1] - lam[big_k])]
    w_eps = [r / (1 + math.exp(lam_k - bias)) for r, lam_k in zip(rate, lam[1:], strict=True)]
    return lam, rate, w_eps


@pytest.mark.parametrize("bias", [2.0, -1.0])
@pytest.mark.parametrize("levels", [1000, 16])
def test_sigmoid_weight_is_kingma_gao(levels, bias):
    # Kingma & Gao (2023): 1/2 E_t~U(0,1)[w(lambda_t) (-d lambda / dt) ||eps_hat - eps||^2],
    # w(lambda) = sigmoid(b - lambda).
    sched = schedule("cosine", levels)
    lam, rate, w_eps = kingma_gao(sched, bias)
    k = torch.arange(1, levels + 1)[None]
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    torch.testing.assert_close(sched.neg_dlog_snr_dt(k), f64([rate]), rtol=1e-12, atol=0)
    expected = f64([w_eps])
    torch.testing.assert_close(
        sched.loss_weight("sigmoid", k, "eps", bias=bias), expected, rtol=1e-10, atol=0
    )
    # The other parameterisations by the Jacobian relation: w_x0 = SNR w_eps, w_v = w_x0 / (1 + SNR) (VP),
    # w_flow = w_x0 sigma^2 / (alpha + sigma)^2.
    snr = f64([[math.exp(x) for x in lam[1:]]])
    a, s = sched.alpha[1:][None], sched.sigma[1:][None]
    for p, jac in [("x0", snr), ("v", snr / (1 + snr)), ("flow", snr * s**2 / (a + s) ** 2)]:
        torch.testing.assert_close(
            sched.loss_weight("sigmoid", k, p, bias=bias), jac * expected, rtol=1e-9, atol=0
        )
    if bias == 2.0:  # the default
        assert torch.equal(
            sched.loss_weight("sigmoid", k, "eps"), sched.loss_weight("sigmoid", k, "eps", bias=2.0)
        )
    assert sched.loss_weight("sigmoid", torch.zeros(1, 3, dtype=torch.long), "eps").tolist() == [[0.0] * 3]


@pytest.mark.parametrize("levels", [1000, 16])
@pytest.mark.parametrize("key", ["flow", "flow-shift3", "cosine-ztsnr", "linear-ztsnr"])
def test_sigmoid_weight_finite_at_zero_terminal_snr(key, levels):
    sched = schedule(key, levels)
    k = torch.arange(levels + 1)[None]
    lam = sched.log_snr(k)[0]
    rate = sched.neg_dlog_snr_dt(k)[0]
    assert lam[-1] == -math.inf and rate[0] == 0
    assert rate[1:].isfinite().all() and (rate[1:] > 0).all()
    # lambda_K = -inf makes D_{K-1} and D_K inf; both take the nearest finite one, D_{K-2}.
    big_k = levels
    torch.testing.assert_close(
        rate[big_k - 2], big_k * (lam[big_k - 3] - lam[big_k - 1]) / 2, rtol=1e-12, atol=0
    )
    assert rate[big_k - 1] == rate[big_k] == rate[big_k - 2]
    for p in PARAMETERIZATIONS:
        w = sched.loss_weight("sigmoid", k, p)
        assert w.isfinite().all() and (w >= 0).all() and w[0, 0] == 0
    assert sched.loss_weight("sigmoid", k, "eps")[0, -1] == rate[big_k - 2]  # sigmoid(b + inf) = 1


@pytest.mark.parametrize("key", ["cosine", "flow"])
def test_neg_dlog_snr_dt_few_levels(key):
    # K = 1 has no difference to take, nor K = 2 when lambda_2 = -inf: D = 1, so w_eps = sigmoid(b - lambda).
    assert schedule(key, 1).neg_dlog_snr_dt(torch.tensor([[0, 1]])).tolist() == [[0.0, 1.0]]
    two = schedule(key, 2)
    lam = two.log_snr(torch.arange(3)[None])[0]
    rate = two.neg_dlog_snr_dt(torch.tensor([[0, 1, 2]]))[0]
    expected = 2 * (lam[1] - lam[2]) if key == "cosine" else 1.0  # one-sided at both ends
    assert rate[0] == 0 and rate[1] == rate[2] == expected
    for levels in (1, 2):
        w = schedule(key, levels).loss_weight("sigmoid", torch.arange(levels + 1)[None], "x0")
        assert w.isfinite().all() and w[0, 0] == 0


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@pytest.mark.parametrize("bias", [2.0, -1.0, 5.0])
@pytest.mark.parametrize(("levels", "rtol"), [(1000, 1e-4), (16, 1e-2)])
def test_uniform_levels_integrate_sigmoid_over_log_snr(levels, rtol, bias):
    # Levels drawn uniformly weight the eps error by E_k[w_eps] = sum_k w_eps / K
    # = sum_k sigmoid(b - lambda_k) (lambda_{k-1} - lambda_{k+1}) / 2: a Riemann sum for
    # int sigmoid(b - lambda) d lambda = softplus(b - lo) - softplus(b - hi) over the lambda range the levels
    # cover, each level's cell reaching halfway to its neighbours; the one-sided end differences take the end
    # cells half a step past lambda_1 and lambda_K. That half step is not small here: diffusers caps the
    # cosine schedule's last beta at 0.999, so lambda_K - lambda_{K-1} ~ -6.9 (sum 25.3 at K = 1000, b = 2,
    # against 21.8 over [lambda_K, lambda_1]).
    sched = schedule("cosine", levels)
    lam, _, w_eps = kingma_gao(sched, bias)
    lo = lam[levels] - (lam[levels - 1] - lam[levels]) / 2
    hi = lam[1] + (lam[1] - lam[2]) / 2
    integral = softplus(bias - lo) - softplus(bias - hi)
    mean = sched.loss_weight("sigmoid", torch.arange(1, levels + 1)[None], "eps", bias=bias).mean().item()
    assert mean == pytest.approx(sum(w_eps) / levels, rel=1e-10)
    assert mean == pytest.approx(integral, rel=rtol)


@pytest.mark.parametrize("key", VP)
def test_elbo_weight_is_ddpm_kl(key):
    # Per sample and level: elbo weight * ||eps - eps_hat||^2 == KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))
    # from DDPM's formulas (Ho et al. 2020, eqs 6-7, 11), p's variance = the posterior variance.
    sched = schedule(key)
    abar = sched.alpha**2  # [K+1]
    levels = torch.tensor([[1, 2, 3, 10], [100, 500, 999, 1000]])  # [B, T]
    x0 = torch.randn(2, 4, 3, 4, 4, generator=gen(0), dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 4, 4, generator=gen(1), dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(2, 4, 3, 4, 4, generator=gen(2), dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, levels)
    weighted = sched.loss_weight("elbo", levels, "eps") * (eps - eps_hat).square().sum((2, 3, 4))
    decoder_const = 0.5 * 48 * torch.log(2 * math.pi * sched.sigma[1] ** 2)
    for b, t in torch.cartesian_prod(torch.arange(2), torch.arange(4)).tolist():
        k = int(levels[b, t])
        ab, ab_prev = abar[k], abar[k - 1]
        beta = 1 - ab / ab_prev
        mean_p = (x_t[b, t] - beta / (1 - ab).sqrt() * eps_hat[b, t]) / (1 - beta).sqrt()
        if k == 1:  # decoder -log N(x0; x0_hat, sigma_1^2 I), DDPM's L_0 with a Gaussian decoder
            nll = -Normal(mean_p, sched.sigma[1]).log_prob(x0[b, t]).sum()
            torch.testing.assert_close(weighted[b, t], nll - decoder_const, rtol=1e-10, atol=0)
            continue
        mean_q = (
            ab_prev.sqrt() * beta / (1 - ab) * x0[b, t]
            + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t[b, t]
        )
        std = ((1 - ab_prev) / (1 - ab) * beta).sqrt()
        kl = kl_divergence(Normal(mean_q, std), Normal(mean_p, std)).sum()
        torch.testing.assert_close(weighted[b, t], kl, rtol=1e-9, atol=0)
    prior = kl_divergence(Normal(sched.alpha[-1] * x0, sched.sigma[-1]), Normal(0.0, 1.0)).sum((2, 3, 4))
    torch.testing.assert_close(sched.elbo_constant(x0), prior + decoder_const)


def gaussian_model(sched: NoiseSchedule, c: float):
    """Optimal linear denoiser for x0 ~ N(0, c^2) in 1-D, and the Gaussian chains of q and p_theta.

    Returns the expected bound from `loss_weight` + `elbo_constant`, and the covariances of (x_0..x_K)
    under q and under p_theta (reverse variance = posterior variance).
    """
    a, s, K = sched.alpha, sched.sigma, sched.levels
    gain = a * c**2 / (a**2 * c**2 + s**2)  # x0_hat = gain_k * x_k, i.e. eps_hat = s x_k / (a^2 c^2 + s^2)
    err_x0 = s**2 * c**2 / (a**2 * c**2 + s**2)  # E (x0 - x0_hat)^2
    levels = torch.arange(1, K + 1)[None]
    bound = (sched.loss_weight("elbo", levels, "x0") * err_x0[1:]).sum()
    bound = bound + sched.elbo_constant(torch.full((1, 1, 1), c, dtype=torch.float64)).squeeze()
    ratio = a[1:] / a[:-1]  # [K], x_k = ratio_k x_{k-1} + N(0, var_step_k)
    var_step = s[1:] ** 2 - ratio**2 * s[:-1] ** 2
    post_x0 = a[:-1] * var_step / s[1:] ** 2  # posterior mean = post_x0 * x0 + post_xt * x_k
    post_xt = ratio * s[:-1] ** 2 / s[1:] ** 2
    post_var = var_step * s[:-1] ** 2 / s[1:] ** 2
    lq, lp = torch.zeros(K + 1, K + 1, dtype=torch.float64), torch.zeros(K + 1, K + 1, dtype=torch.float64)
    lq[0, 0], lp[K, K] = c, 1.0  # x = L z with z ~ N(0, I)
    for k in range(1, K + 1):  # q runs forward from x0
        lq[k] = ratio[k - 1] * lq[k - 1]
        lq[k, k] = var_step[k - 1].sqrt()
    for k in range(K, 1, -1):  # p runs backward from x_K, its mean the posterior mean at x0_hat
        lp[k - 1] = (post_x0[k - 1] * gain[k] + post_xt[k - 1]) * lp[k]
        lp[k - 1, k - 1] = post_var[k - 1].sqrt()
    lp[0] = gain[1] * lp[1]  # decoder N(x0; x0_hat(x_1), sigma_1^2)
    lp[0, 0] = s[1]
    return bound, lq @ lq.T, lp @ lp.T


@pytest.mark.parametrize("key", SCHEDULES)
def test_elbo_is_exact_bound_on_gaussian_data(key):
    # -ELBO = H(x0) + KL(q(x_0..x_K) || p_theta(x_0..x_K)), both sides in closed form for small K.
    c = 0.7
    bound, cov_q, cov_p = gaussian_model(schedule(key, 6), c)
    zero = torch.zeros(7, dtype=torch.float64)
    joint_kl = kl_divergence(MultivariateNormal(zero, cov_q), MultivariateNormal(zero, cov_p))
    entropy = 0.5 * math.log(2 * math.pi * math.e * c**2)
    torch.testing.assert_close(bound, entropy + joint_kl, rtol=1e-10, atol=1e-12)


def test_elbo_bounds_entropy_at_k1000():
    # The bound sits above the model's cross-entropy, which sits above the data entropy. The model is
    # nearly exact, but the bound stays ~0.4 nats loose: with the reverse variance tied to the posterior
    # variance, the first steps (SNR_{k-1} / SNR_k ~ k / (k - 1)) cost ~0.5 * Euler's gamma however big K is.
    c = 1.0
    bound, _, cov_p = gaussian_model(schedule("cosine"), c)
    var0 = cov_p[0, 0]
    cross_entropy = 0.5 * math.log(2 * math.pi * var0) + c**2 / (2 * var0)
    entropy = 0.5 * math.log(2 * math.pi * math.e * c**2)
    assert bound >= cross_entropy >= entropy
    assert cross_entropy - entropy < 1e-4
    assert bound - entropy < 0.5


@pytest.mark.parametrize("levels", [1000, 8])
@pytest.mark.parametrize("key", SCHEDULES)
def test_weights_finite(key, levels):
    sched = schedule(key, levels)
    k = torch.arange(levels + 1)[None]
    for weighting in WEIGHTING_OPTIONS:
        for p in PARAMETERIZATIONS:
            w = sched.loss_weight(weighting, k, p)
            assert w.shape == k.shape and w.dtype == torch.float64
            assert not w.isnan().any() and (w >= 0).all() and w[0, 0] == 0
            infinite = (weighting, p) == ("elbo", "eps") and sched.alpha[-1] == 0
            assert w[0, 1:-1].isfinite().all() and w[0, -1].isinf() == infinite


def test_to_device():
    sched = schedule("cosine").to("meta")
    assert sched.alpha.device.type == sched.sigma.device.type == "meta"
    if torch.cuda.is_available():  # gathering by CUDA levels must not sync with the host
        sched = schedule("cosine").to("cuda")
        levels = torch.randint(0, 1001, (2, 3), device="cuda")
        x0 = torch.randn(2, 3, 1, 2, 2, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            w = sched.loss_weight("elbo", levels, "v")
            x_t = sched.add_noise(x0, torch.randn_like(x0), levels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert w.device.type == x_t.device.type == "cuda"


def test_unknown_names():
    sched = schedule("cosine")
    levels, x = torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, 1)
    with pytest.raises(ValueError, match=r"'cosin'.*cosine, linear, sigmoid, flow"):
        NoiseSchedule.from_name("cosin")
    with pytest.raises(ValueError, match=r"'shift'.*'cosine'"):
        NoiseSchedule.from_name("cosine", shift=3.0)
    with pytest.raises(ValueError, match="'elb'"):
        sched.loss_weight("elb", levels, "eps")
    with pytest.raises(ValueError, match=r"'gama'.*'min_snr'"):
        sched.loss_weight("min_snr", levels, "eps", gama=5.0)
    with pytest.raises(ValueError, match=r"'score'.*eps, x0, v, flow"):
        sched.loss_weight("simple", levels, "score")
    with pytest.raises(ValueError, match="'score'"):
        sched.target(x, x, levels, "score")
    with pytest.raises(ValueError, match="'score'"):
        sched.to_x0_eps(x, x, levels, "score")


def test_noise_config_round_trip(tmp_path):
    config = NoiseConfig("flow", levels=50, schedule_options={"shift": 3.0}, parameterization="flow")
    config.save(tmp_path)
    loaded = NoiseConfig.load(tmp_path)
    assert loaded == config
    assert torch.equal(loaded.build().sigma, NoiseSchedule.from_name("flow", 50, shift=3.0).sigma)
    assert torch.equal(
        loaded.build().timesteps(torch.tensor([[0, 25, 50]])), torch.tensor([[0, 750, 1000.0]])
    )  # 1000 * sigma, sigma = 3 t / (1 + 2 t) at t = 1/2


def test_noise_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"noise\.json"):
        NoiseConfig.load(tmp_path)
    (tmp_path / "noise.json").write_text('{"schedule": "cosine", "bogus": 1}')
    with pytest.raises(ValueError, match=r"noise\.json.*bogus"):
        NoiseConfig.load(tmp_path)
    with pytest.raises(ValueError, match="parameterization"):
        NoiseConfig(parameterization="score")
