"""Sampling steps: one denoising step for every frame at once, each frame at its own level.

The step functions are pure. Each moves every frame of x [B, T, C, H, W] from its level `levels` [B, T] to
`next_levels` [B, T], given the denoiser's estimate of the clean frames and of the noise (`x0`, `eps`, from
`NoiseSchedule.to_x0_eps`), so one call serves a batch in which every frame sits at its own level. A frame
whose level does not change comes back bitwise unchanged, so clean context stays clean. For k -> j < k:

    ddim   x_j = alpha_j x0 + sqrt(sigma_j^2 - c^2) eps + c z,  c = eta * std   (Song et al. 2021)
    ddpm   x_j ~ q(x_j | x_k, x0), the Gaussian posterior             (Ho et al. 2020; ddim with eta = 1)
    euler  x_j = x_k + (t_j - t_k)(eps - x0), rectified flow, t = sigma   (ddim on a flow schedule)
    renoise  x_j = alpha_j x0 + sigma_j z, the x0 estimate noised afresh  (a few-step generator's step:
             Self-Forcing's and CausVid's, consistency models' multistep sampling; from a plain denoiser
             it under-disperses, its last step returning a posterior mean)

with std^2 = sigma_j^2 sigma_kj^2 / sigma_k^2 the posterior variance, sigma_kj^2 = sigma_k^2 -
(alpha_k / alpha_j)^2 sigma_j^2 the variance of x_k given x_j; all of it holds for any alpha, sigma.
Rollouts along scheduling matrices are `dforce.diffusion.rollout`; the guided denoiser they call,
`dforce.diffusion.history`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from dforce.diffusion.noise import NoiseSchedule


def _coefficients(
    schedule: NoiseSchedule, levels: Tensor, next_levels: Tensor, ndim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """moving [B, T, 1, 1, 1] and float64 alpha_k, sigma_k, alpha_j, sigma_j broadcast to `ndim` dims.

    Frames that do not move get the stand-in step 1 -> 0, so that no inf or nan (which `torch.where` would
    hide in the values but not in the gradients) is ever computed for them.
    """
    moving = next_levels != levels
    a_k, s_k = schedule._coefs(torch.where(moving, levels, 1), ndim)
    a_j, s_j = schedule._coefs(torch.where(moving, next_levels, 0), ndim)
    return moving.view(a_k.shape), a_k, s_k, a_j, s_j


def _posterior_variance(a_k: Tensor, s_k: Tensor, a_j: Tensor, s_j: Tensor) -> tuple[Tensor, Tensor]:
    """sigma_kj^2 (variance of x_k given x_j) and the variance of q(x_j | x_k, x0), float64."""
    var_kj = (s_k**2 - (a_k / a_j) ** 2 * s_j**2).clamp(min=0)
    return var_kj, s_j**2 * var_kj / s_k**2


def ddim_step(
    schedule: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    levels: Tensor,
    next_levels: Tensor,
    noise: Tensor | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM: re-noise the clean estimate to the next level with the predicted noise; eta = 0 is
    deterministic, eta = 1 is the ancestral (DDPM) step. x, x0, eps, noise [B, T, C, H, W]."""
    if eta and noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    moving, a_k, s_k, a_j, s_j = _coefficients(schedule, levels, next_levels, x.ndim)
    std = eta * _posterior_variance(a_k, s_k, a_j, s_j)[1].sqrt()
    new = a_j.to(x.dtype) * x0 + (s_j**2 - std**2).clamp(min=0).sqrt().to(x.dtype) * eps
    if eta:
        new = new + std.to(x.dtype) * noise
    return torch.where(moving, new, x)


def ddpm_step(
    schedule: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    levels: Tensor,
    next_levels: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """Ancestral sampling: draw x_j from the Gaussian posterior q(x_j | x_k, x0) with x0 the estimate.
    `eps` is not used (the posterior needs x_k and x0 only); `noise` [B, T, C, H, W] is required."""
    if noise is None:
        raise ValueError("ddpm_step needs noise")
    moving, a_k, s_k, a_j, s_j = _coefficients(schedule, levels, next_levels, x.ndim)
    var_kj, var = _posterior_variance(a_k, s_k, a_j, s_j)
    coef_x = a_k / a_j * s_j**2 / s_k**2
    coef_x0 = a_j * var_kj / s_k**2
    new = coef_x.to(x.dtype) * x + coef_x0.to(x.dtype) * x0 + var.sqrt().to(x.dtype) * noise
    return torch.where(moving, new, x)


def euler_step(
    schedule: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    levels: Tensor,
    next_levels: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """Euler on the rectified-flow ODE dx/dt = eps - x0 with t = sigma; only meaningful for a flow
    schedule (alpha = 1 - sigma), where it equals DDIM with eta = 0. `noise` is not used."""
    moving, _, s_k, _, s_j = _coefficients(schedule, levels, next_levels, x.ndim)
    return torch.where(moving, x + (s_j - s_k).to(x.dtype) * (eps - x0), x)


def renoise_step(
    schedule: NoiseSchedule,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    levels: Tensor,
    next_levels: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """The clean estimate noised to the next level with fresh `noise` (required), keeping nothing of x or
    eps: how Self-Forcing's and CausVid's generators step between their few levels."""
    if noise is None:
        raise ValueError("renoise_step needs noise")
    moving, _, _, a_j, s_j = _coefficients(schedule, levels, next_levels, x.ndim)
    return torch.where(moving, a_j.to(x.dtype) * x0 + s_j.to(x.dtype) * noise, x)


SAMPLERS = {"ddim": ddim_step, "ddpm": ddpm_step, "euler": euler_step, "renoise": renoise_step}


def is_flow(schedule: NoiseSchedule) -> bool:
    """Whether alpha + sigma = 1 at every level (rectified flow), where the Euler step is defined."""
    return torch.allclose(schedule.alpha + schedule.sigma, torch.ones_like(schedule.alpha))


@dataclass(frozen=True)
class Sampler:
    """A step function by name, drawing the noise it needs from a generator: `ddim` (with `eta`),
    `ddpm`, `euler` or `renoise`."""

    name: str = "ddim"
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose from {', '.join(SAMPLERS)}")
        if self.eta and self.name != "ddim":
            raise ValueError(f"eta is a ddim option; sampler {self.name!r} got eta={self.eta}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.name in ("ddpm", "renoise") or self.eta > 0

    def check(self, schedule: NoiseSchedule) -> None:
        if self.name == "euler" and not is_flow(schedule):
            raise ValueError(
                "sampler 'euler' needs a rectified-flow schedule (alpha + sigma = 1); use 'ddim'"
            )

    def __call__(
        self,
        schedule: NoiseSchedule,
        x: Tensor,
        x0: Tensor,
        eps: Tensor,
        levels: Tensor,
        next_levels: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        noise = randn(x, generator) if self.stochastic else None
        step = functools.partial(ddim_step, eta=self.eta) if self.name == "ddim" else SAMPLERS[self.name]
        return step(schedule, x, x0, eps, levels, next_levels, noise)


def randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped, placed and typed like `like`, from `generator`."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
