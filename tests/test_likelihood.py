"""Likelihoods on Gaussian clips, where the optimal denoiser, the DDPM bound and the ODE's density are
known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dforce.diffusion.likelihood import NLL, elbo, ode_grid, ode_nll
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.trajectory import get_weighting

K = 64
SHAPE = (1, 2, 2)  # [C, H, W] of a frame: D = 4


def covariance(seed: int = 0) -> torch.Tensor:
    """A correlated covariance over a frame's D elements, eigenvalues 0.05..0.8."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor([0.05, 0.2, 0.4, 0.8], dtype=torch.float64)) @ q.T


class GaussianDenoiser(nn.Module):
    """The exact posterior mean E[x0 | x_k] of frames drawn iid from N(0, sigma_data), each at its own
    level: x0_hat = alpha S (alpha^2 S + sigma^2 I)^-1 x, returned as the `x0` parameterisation."""

    def __init__(self, schedule: NoiseSchedule, cov: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.cov = schedule, cov

    def forward(self, sample, timesteps, labels=None, actions=None):
        levels = (timesteps.double() * self.schedule.levels / 1000).round().long()  # [B, T]
        a, s = self.schedule.alpha[levels], self.schedule.sigma[levels]  # [B, T]
        eye = torch.eye(len(self.cov), dtype=torch.float64)
        gain = (
            a[..., None, None]
            * self.cov
            @ torch.linalg.inv(a[..., None, None] ** 2 * self.cov + s[..., None, None] ** 2 * eye)
        )  # [B, T, D, D]
        x = sample.double().flatten(2)  # [B, T, D]
        return (gain @ x[..., None]).squeeze(-1).view(sample.shape).to(sample.dtype)


def gaussian_clips(cov: torch.Tensor, clips: int, frames: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    white = torch.randn(clips, frames, len(cov), generator=generator, dtype=torch.float64)
    return (white @ torch.linalg.cholesky(cov).T).view(clips, frames, *SHAPE).float()


def bound_closed_form(schedule: NoiseSchedule, cov: torch.Tensor) -> float:
    """The DDPM bound of one frame under the optimal denoiser, in expectation over the data (nats):
    sum_k w_k E||x0 - x0_hat||^2 (the posterior variance) + prior KL + decoder normaliser."""
    eig = torch.linalg.eigvalsh(cov)  # [D]
    levels = torch.arange(1, schedule.levels + 1)
    w = schedule.loss_weight("elbo", levels[None], "x0")[0]  # [K]
    a, s = schedule.alpha[levels, None], schedule.sigma[levels, None]  # [K, 1]
    posterior = (eig * s**2 / (a**2 * eig + s**2)).sum(dim=1)  # [K]
    a_end, s_end = schedule.alpha[-1], schedule.sigma[-1]
    prior = 0.5 * (a_end**2 * eig + s_end**2 - 1 - 2 * s_end.log()).sum()
    return float(
        (w * posterior).sum() + prior + 0.5 * len(eig) * torch.log(2 * math.pi * schedule.sigma[1] ** 2)
    )


def gaussian_nll(cov: torch.Tensor) -> float:
    """E[-log N(x; 0, S)] of one frame: the entropy, 1/2 log det(2 pi e S)."""
    return 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))


@pytest.mark.parametrize("weighting", ["sync", "schedule:autoregressive", "paths"])
def test_elbo_of_the_optimal_denoiser_is_the_closed_form(weighting):
    """Frames are independent, so the bound is the same along every path: n times one frame's."""
    schedule, cov, frames = NoiseSchedule.from_name("cosine", K), covariance(), 3
    model = GaussianDenoiser(schedule, cov)
    x0 = gaussian_clips(cov, clips=256, frames=frames)
    nll = elbo(model, schedule, "x0", x0, get_weighting(weighting, frames, K), draws=32, seed=0)
    expected = frames * bound_closed_form(schedule, cov)
    sem = nll.nats.std().item() / math.sqrt(len(nll.nats))
    assert abs(nll.nats.mean().item() - expected) < 4 * sem
    # The check has teeth: the decoder's normaliser alone is 3 * 2 log(2 pi sigma_1^2) = -35 nats.
    assert sem < 2.0
    # A bound: above the exact negative log-likelihood (0.8 nats a dimension for K = 64; the first steps,
    # where sigma^2 grows by large ratios whatever K is, keep it from closing as K grows).
    assert 0 < bound_closed_form(schedule, cov) - gaussian_nll(cov) < len(cov)
    bits, bits_sem = nll.bits_per_dim()
    assert bits == pytest.approx(nll.nats.mean().item() / (x0[0].numel() * math.log(2)))
    assert bits_sem == pytest.approx(sem / (x0[0].numel() * math.log(2)))


def test_elbo_with_the_v_parameterisation_is_the_same_bound():
    """The loss weight is carried to the parameterisation exactly: a v model built from the same posterior
    mean scores the same bound, draw for draw."""
    schedule, cov = NoiseSchedule.from_name("cosine", K), covariance()
    x0_model = GaussianDenoiser(schedule, cov)

    def v_model(sample, timesteps, labels=None, actions=None):
        levels = (timesteps.double() * K / 1000).round().long()
        x0_hat = x0_model(sample, timesteps)
        _, eps = schedule.to_x0_eps(x0_hat, sample, levels, "x0")
        return schedule.target(x0_hat, eps, levels, "v").float()

    x0 = gaussian_clips(cov, clips=16, frames=2)
    weighting = get_weighting("sync", 2, K)
    a = elbo(x0_model, schedule, "x0", x0, weighting, draws=2)
    b = elbo(v_model, schedule, "v", x0, weighting, draws=2)
    torch.testing.assert_close(a.nats, b.nats, rtol=1e-4, atol=1e-3)


def test_elbo_refuses_coarse_paths():
    schedule = NoiseSchedule.from_name("cosine", K)
    x0 = torch.zeros(1, 2, *SHAPE)
    with pytest.raises(ValueError, match="cube_levels=8 < levels=64"):
        elbo(nn.Identity(), schedule, "x0", x0, get_weighting("paths", 2, K, cube_levels=8))
    with pytest.raises(ValueError, match="several levels in one row"):
        elbo(nn.Identity(), schedule, "x0", x0, get_weighting("schedule:pyramid", 2, K, steps=8))


def exact_ode_log_likelihood(schedule: NoiseSchedule, cov: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """log-density of the flow model itself: the exact flow of a Gaussian is linear, M = (V_K / V_1)^(1/2)
    in the eigenbasis of S with V_u = alpha_u^2 S + sigma_u^2 I, carrying x at level 1 to M x at level K,
    where the prior N(0, I) scores it: log N(M x; 0, I) + log det M, per clip [B]."""
    eig, q = torch.linalg.eigh(cov)
    variance = [schedule.alpha[k] ** 2 * eig + schedule.sigma[k] ** 2 for k in (1, schedule.levels)]
    scale = (variance[1] / variance[0]).sqrt()  # [D]
    y = (x0.double().flatten(2) @ q) * scale  # [B, T, D] in the eigenbasis
    per_frame = -0.5 * y.square().sum(-1) - 0.5 * len(eig) * math.log(2 * math.pi) + scale.log().sum()
    return per_frame.sum(dim=1)


@pytest.mark.parametrize(("path", "probe"), [("sync", "gaussian"), ("autoregressive", "rademacher")])
def test_ode_likelihood_of_a_gaussian_is_exact_within_its_error_bar(path, probe):
    schedule, cov = NoiseSchedule.from_name("cosine", K), covariance()
    model = GaussianDenoiser(schedule, cov)
    x0 = gaussian_clips(cov, clips=4, frames=2)
    nll = ode_nll(model, schedule, "x0", x0, path=path, steps=K, probes=128, probe=probe, seed=0)
    exact = -exact_ode_log_likelihood(schedule, cov, x0)
    error = nll.nats - exact  # [B]
    # The Jacobian is not diagonal, so probes disagree; the error bar is small next to the ~10 nats
    # that a clip's value changes by from one clip to the next.
    assert (nll.sem > 0).all() and (nll.sem < (0.25 if probe == "rademacher" else 1.5)).all()
    assert (error.abs() < 4 * nll.sem + 0.02).all(), (error, nll.sem)
    # The flow model is the data's own density up to the prior's small mismatch at level K.
    x = x0.double().flatten(2)  # [B, T, D]
    truth = 0.5 * (x @ torch.linalg.inv(cov) * x).sum(-1) + 0.5 * torch.logdet(2 * math.pi * cov)
    torch.testing.assert_close(exact, truth.sum(dim=1), atol=0.05, rtol=0)


def test_ode_grid_is_even_in_log_snr_from_level_1_to_K():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    grid = ode_grid(schedule, 50)
    assert grid[0] == 1 and grid[-1] == 1000 and (grid.diff() > 0).all()
    assert 30 <= len(grid) <= 51  # levels are integers: near both ends several targets share one
    # Each step moves log SNR by about (lambda_1 - lambda_K) / 50, or is a single level.
    log_snr = schedule.log_snr(grid)
    spacing = (log_snr[0] - log_snr[-1]) / 50
    assert ((-log_snr.diff() < 2 * spacing) | (grid.diff() == 1)).all()


def test_ode_on_a_flow_schedule_ends_at_pure_noise():
    """alpha_K = 0 on a rectified-flow schedule: the last piece interpolates alpha linearly."""
    schedule, cov = NoiseSchedule.from_name("flow", K), covariance()
    model = GaussianDenoiser(schedule, cov)
    x0 = gaussian_clips(cov, clips=4, frames=1)
    nll = ode_nll(model, schedule, "x0", x0, steps=K, probes=128)
    exact = -exact_ode_log_likelihood(schedule, cov, x0)
    assert ((nll.nats - exact).abs() < 4 * nll.sem + 0.02).all(), (nll.nats - exact, nll.sem)


def test_bits_per_dim_of_one_clip_uses_the_estimator_error():
    nll = NLL(nats=torch.tensor([8 * math.log(2)], dtype=torch.float64), sem=torch.tensor([0.5]), dims=4)
    bits, sem = nll.bits_per_dim(offset=1.0)
    assert bits == pytest.approx(3.0) and sem == pytest.approx(0.5 / (4 * math.log(2)))
