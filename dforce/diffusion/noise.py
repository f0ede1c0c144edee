"""Gaussian noise schedules indexed by integer level, for videos whose frames sit at different levels.

Level k in 0..K noises a clean frame as x_k = alpha_k * x0 + sigma_k * eps (k = 0 is clean: alpha = 1,
sigma = 0). All tables are float64, gathered by a LongTensor of levels [B, T] and broadcast over the
frame's [C, H, W], so one batch may hold every level at once.

Parameterisations of the network output (all four invert to (x0, eps) for any alpha, sigma):
    eps   eps
    x0    x0
    v     alpha * eps - sigma * x0      (Salimans & Ho 2022)
    flow  eps - x0                      (rectified-flow velocity dx_t/dt when alpha = 1 - t, sigma = t)
Per-level loss weights are kept apart from the parameterisation: each weighting is defined as a weight
on one parameterisation's squared error and carried to the others by the exact linear map between their
errors at fixed x_t (see `loss_weight`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch import Tensor

PARAMETERIZATIONS = ("eps", "x0", "v", "flow")
SCHEDULE_OPTIONS = {
    "cosine": ("zero_terminal_snr",),
    "linear": ("zero_terminal_snr",),
    "sigmoid": ("zero_terminal_snr",),
    "flow": ("shift",),
}
WEIGHTING_OPTIONS = {"simple": (), "elbo": (), "min_snr": ("gamma",), "sigmoid": ("bias",)}
_DIFFUSERS_BETAS = {"cosine": "squaredcos_cap_v2", "linear": "linear", "sigmoid": "sigmoid"}


def _check(kind: str, name: str, valid: Mapping[str, Sequence[str]] | Sequence[str], options=()) -> None:
    """ValueError naming an unknown `name`, or an option that `valid[name]` does not list."""
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")
    unknown = sorted(set(options) - set(valid[name] if isinstance(valid, Mapping) else ()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind} {name!r}; valid: {list(valid[name])}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    alpha: Tensor  # [K+1] float64, alpha[0] = 1
    sigma: Tensor  # [K+1] float64, sigma[0] = 0
    time: Tensor  # [K+1] float64 in [0, 1], time[0] = 0: the model is told 1000 * time (`timesteps`)

    @classmethod
    def from_name(cls, name: str, levels: int = 1000, **options) -> NoiseSchedule:
        """`cosine` | `linear` | `sigmoid` (VP, betas from diffusers) or `flow` (alpha = 1 - t, sigma = t).

        Our level k >= 1 is diffusers' timestep k - 1. Linear and sigmoid betas are scaled by 1000 / K as in
        improved DDPM (capped at 0.999 like the cosine betas), so a small K still ends near pure noise.
        alpha_bar is accumulated in float64 from diffusers' betas (log-space, so sigma_1 keeps its digits).
        Options: `zero_terminal_snr` (VP; diffusers' rescale_betas_zero_snr), `shift` (flow; SD3's
        t' = shift * t / (1 + (shift - 1) * t)). The model's time is k / K, and sigma on a flow schedule.
        """
        _check("noise schedule", name, SCHEDULE_OPTIONS, options)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if name == "flow":
            shift = float(options.get("shift", 1.0))
            if shift <= 0:
                raise ValueError(f"flow shift must be > 0, got {shift}")
            t = torch.arange(levels + 1, dtype=torch.float64) / levels  # [K+1]
            t = shift * t / (1 + (shift - 1) * t)
            return cls(alpha=1 - t, sigma=t, time=t)
        scale = 1000 / levels
        betas = {} if name == "cosine" else {"beta_start": 1e-4 * scale, "beta_end": 0.02 * scale}
        ddpm = DDPMScheduler(
            num_train_timesteps=levels,
            beta_schedule=_DIFFUSERS_BETAS[name],
            rescale_betas_zero_snr=bool(options.get("zero_terminal_snr", False)),
            **{key: min(beta, 0.999) for key, beta in betas.items()},
        )
        log_abar = torch.cumsum(torch.log1p(-ddpm.betas.double()), 0)  # [K], -inf where beta = 1
        log_abar = torch.cat([log_abar.new_zeros(1), log_abar])  # [K+1], level 0 is clean
        time = torch.arange(levels + 1, dtype=torch.float64) / levels  # [K+1]
        return cls(alpha=(0.5 * log_abar).exp(), sigma=(-torch.expm1(log_abar)).sqrt(), time=time)

    @property
    def levels(self) -> int:
        return self.alpha.shape[0] - 1

    def timesteps(self, levels: Tensor) -> Tensor:
        """What the model is told a level is, float32 [B, T] in 0..1000 whatever K is: 1000 * k / K on a VP
        schedule; 1000 * sigma on a flow schedule, after the shift, as diffusers' flow-matching scheduler
        and Wan's pipelines tell their models (so a pretrained Wan starts as it was trained)."""
        return (1000 * self.time[levels]).float()

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Tables on the levels' device, so gathering needs no host sync."""
        return NoiseSchedule(*(table.to(device) for table in (self.alpha, self.sigma, self.time)))

    def _coefs(self, levels: Tensor, ndim: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """alpha_k, sigma_k by level, broadcast to `ndim` dims: [B, T] -> [B, T, 1, 1, 1]."""
        shape = (*levels.shape, *[1] * (ndim - levels.ndim))
        return self.alpha[levels].view(shape).to(dtype), self.sigma[levels].view(shape).to(dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """x_k per frame: x0, noise [B, T, C, H, W], levels [B, T] -> [B, T, C, H, W] in x0's dtype.

        Level-0 frames come back exactly (alpha = 1, sigma = 0).
        """
        a, s = self._coefs(levels, x0.ndim, x0.dtype)
        return a * x0 + s * noise.to(x0.dtype)

    def log_snr(self, levels: Tensor) -> Tensor:
        """lambda = log(alpha^2 / sigma^2), float64 [B, T]: +inf at level 0, -inf where alpha = 0."""
        a, s = self._coefs(levels, levels.ndim)
        return 2 * (a.log() - s.log())

    def snr(self, levels: Tensor) -> Tensor:
        return self.log_snr(levels).exp()

    def neg_dlog_snr_dt(self, levels: Tensor) -> Tensor:
        """-d lambda / dt by level, t = level / K, from finite differences of the lambda table: float64,
        shaped like `levels`.

            D_k = K (lambda_{k-1} - lambda_{k+1}) / 2     1 < k < K (central)
            D_1 = K (lambda_1 - lambda_2)                  (lambda_0 = +inf, so one-sided)
            D_K = K (lambda_{K-1} - lambda_K)
        Where that is not finite (lambda_K = -inf where alpha_K = 0, as in `flow` and `zero_terminal_snr`,
        makes D_{K-1} and D_K inf) it is the nearest finite D (the lower level on a tie), so it is finite and
        > 0 at every level >= 1. With no finite difference at all (K = 1, or K = 2 with alpha_2 = 0) D = 1.
        Level 0 (clean, no noise to differentiate) gets 0. Computed on the tables' device, no host sync.
        """
        lam = 2 * (self.alpha.log() - self.sigma.log())  # [K+1]
        big_k = self.levels
        k = torch.arange(1, big_k + 1, device=lam.device)  # [K]
        prev, after = (k - 1).clamp(min=1), (k + 1).clamp(max=big_k)  # one-sided at the ends; equal if K = 1
        d = big_k * (lam[prev] - lam[after]) / (after - prev)  # [K], nan (0 / 0) if K = 1
        finite = d.isfinite()
        pos = torch.arange(big_k, device=lam.device)
        below = torch.where(finite, pos, -1).cummax(0).values  # nearest finite index <= pos, -1 if none
        above = torch.where(finite, pos, big_k).flip(0).cummin(0).values.flip(0)  # >= pos, K if none
        take_below = (below >= 0) & ((above == big_k) | (pos - below <= above - pos))
        nearest = torch.where(take_below, below, above).clamp(0, big_k - 1)
        d = torch.where(finite.any(), torch.where(finite, d, d[nearest]), 1.0)
        return torch.cat([d.new_zeros(1), d])[levels]

    def target(self, x0: Tensor, eps: Tensor, levels: Tensor, parameterization: str) -> Tensor:
        """What a network with this parameterisation should output: [B, T, C, H, W]."""
        _check("parameterization", parameterization, PARAMETERIZATIONS)
        if parameterization == "eps":
            return eps
        if parameterization == "x0":
            return x0
        if parameterization == "flow":
            return eps - x0
        a, s = self._coefs(levels, x0.ndim, x0.dtype)
        return a * eps - s * x0

    def to_x0_eps(
        self, pred: Tensor, x_t: Tensor, levels: Tensor, parameterization: str
    ) -> tuple[Tensor, Tensor]:
        """Invert a prediction to (x0, eps) given x_t = alpha * x0 + sigma * eps, for any alpha, sigma.

        Undefined only where the parameterisation loses x0 or eps: eps at alpha = 0, x0 at sigma = 0.
        """
        _check("parameterization", parameterization, PARAMETERIZATIONS)
        a, s = self._coefs(levels, pred.ndim, pred.dtype)
        if parameterization == "eps":
            return (x_t - s * pred) / a, pred
        if parameterization == "x0":
            return pred, (x_t - a * pred) / s
        if parameterization == "v":
            norm = a**2 + s**2
            return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
        return (x_t - s * pred) / (a + s), (x_t + a * pred) / (a + s)

    def loss_weight(self, name: str, levels: Tensor, parameterization: str, **options) -> Tensor:
        """Per-frame weight on each element's squared error of `parameterization`: float64 [B, T].

        At fixed x_t an error d in parameterisation p moves x0 by -J_p * d, with J_x0 = 1 (sign aside),
        J_eps = sigma / alpha, J_v = sigma / (alpha^2 + sigma^2), J_flow = sigma / (alpha + sigma); so a
        weight w_x0 on the x0 error is w_x0 * J_p^2 on p's error. Weightings:
            simple   1 on p's own error (L_simple for eps, plain flow matching for flow); no conversion.
            elbo     the DDPM KL: w_x0 = (SNR_{k-1} - SNR_k) / 2 for k >= 2, 1 / (2 sigma_1^2) for k = 1;
                     summed over levels and elements, plus `elbo_constant`, it is -ELBO in nats.
            min_snr  w_x0 = min(SNR, gamma), gamma = 5 (Hang et al. 2023).
            sigmoid  w_eps = sigmoid(bias - lambda) * (-d lambda / dt), with -d lambda / dt from
                     `neg_dlog_snr_dt` (finite everywhere: where lambda = -inf, the nearest finite value),
                     so that uniformly drawn levels give Kingma & Gao's (2023) weighted loss, less its 1/2:
                     E_t~U(0,1)[w(lambda_t) (-d lambda / dt) ||eps_hat - eps||^2], w = sigmoid(b - lambda);
                     w_x0 = SNR * w_eps. bias = 2, but the paper's own default b (and its sign) is unconfirmed
                     here: we could not read the paper's text, and public code citing it disagrees
                     (BayesFlow's noise_schedule.py: sigmoid(-lambda + 2); others use b = -2).
        min_snr and sigmoid are evaluated from their eps weight (w_eps * J_p^2 / J_eps^2), which is finite
        where alpha = 0; the result is inf only where the weight is (eps at alpha = 0 under elbo). Level-0
        frames are clean context and get 0.
        """
        _check("loss weighting", name, WEIGHTING_OPTIONS, options)
        _check("parameterization", parameterization, PARAMETERIZATIONS)
        if name == "simple":
            return torch.where(levels > 0, 1.0, 0.0).to(self.alpha)
        a, s = self._coefs(levels, levels.ndim)
        a2, s2 = a**2, s**2
        # J_p^2 and J_p^2 / J_eps^2 = SNR * J_p^2, each written so that it is never 0 * inf.
        jac2 = {"x0": torch.ones_like(a), "eps": s2 / a2, "v": s2 / (a2 + s2) ** 2, "flow": s2 / (a + s) ** 2}
        snr_jac2 = {
            "x0": a2 / s2,
            "eps": torch.ones_like(a),
            "v": a2 / (a2 + s2) ** 2,
            "flow": a2 / (a + s) ** 2,
        }
        lam = 2 * (a.log() - s.log())
        if name == "elbo":
            lam_prev = self.log_snr((levels - 1).clamp(min=0))
            w_x0 = torch.where(levels == 1, 0.5 / s2, 0.5 * lam_prev.exp() * -torch.expm1(lam - lam_prev))
            w = w_x0 * jac2[parameterization]
        elif name == "min_snr":
            w_eps = torch.clamp(options.get("gamma", 5.0) * s2 / a2, max=1.0)  # min(SNR, gamma) / SNR
            w = w_eps * snr_jac2[parameterization]
        else:
            w_eps = torch.sigmoid(options.get("bias", 2.0) - lam) * self.neg_dlog_snr_dt(levels)
            w = w_eps * snr_jac2[parameterization]
        return torch.where(levels > 0, w, 0.0)

    def elbo_constant(self, x0: Tensor) -> Tensor:
        """The nats of the per-frame bound that no prediction changes: [B, T, ...] -> float64 [B, T].

            -log p(x0) <= E_q sum_{k=1..K} loss_weight("elbo", k, p) * ||pred_p - target_p||^2 + elbo_constant
            elbo_constant = KL(q(x_K | x0) || N(0, I)) + D/2 * log(2 pi sigma_1^2)
                = 1/2 sum(alpha_K^2 x0^2 + sigma_K^2 - 1 - log sigma_K^2) + D/2 log(2 pi sigma_1^2)
        with D the elements of a frame. The k >= 2 terms are KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) with
        the reverse variance set to the posterior variance; the k = 1 term is the Gaussian decoder
        -log N(x0; x0_hat, sigma_1^2 I), whose log-normaliser is the D/2 log(2 pi sigma_1^2) here.
        """
        x0 = x0.double().flatten(2)  # [B, T, D]
        a_end, s_end, s_one = self.alpha[-1], self.sigma[-1], self.sigma[1]
        dim = x0.shape[-1]
        prior = 0.5 * (a_end**2 * x0.square().sum(-1) + dim * (s_end**2 - 1 - 2 * s_end.log()))
        return prior + 0.5 * dim * torch.log(2 * math.pi * s_one**2)


@dataclass
class NoiseConfig:
    """What a trained network's output means: its schedule and parameterisation.

    Saved beside the weights as `noise.json`, so a model directory is all that sampling needs.
    """

    schedule: str = "cosine"
    levels: int = 1000
    schedule_options: dict[str, float] = field(default_factory=dict)
    parameterization: str = "v"

    FILE = "noise.json"

    def __post_init__(self) -> None:  # "key: problem", which a config names as noise.key
        try:
            _check("parameterization", self.parameterization, PARAMETERIZATIONS)
        except ValueError as error:
            raise ValueError(f"parameterization: {error}") from None
        try:
            _check("noise schedule", self.schedule, SCHEDULE_OPTIONS, self.schedule_options)
        except ValueError as error:
            raise ValueError(f"schedule: {error}") from None

    def build(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.levels, **self.schedule_options)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> NoiseConfig:
        path = Path(directory) / cls.FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: missing; is {directory} a model saved by `dforce train`?"
            ) from None
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
