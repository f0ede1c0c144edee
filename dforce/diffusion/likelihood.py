"""Likelihoods of clips under a trained model, in nats per clip and bits per dimension.

`elbo`: the discrete-time DDPM bound (seeds 001/002) along the paths of a trajectory weighting. Along one
monotone path through the cube, -log p(x) <= sum over the path's edges of the edge KLs + the prior KL at
(K..K) + the decoders' normalisers; an edge that lowers frame j from k to k-1 costs the `elbo` loss weight
times frame j's squared error. A weighting's `sample` is normalised so that E[sum_j w_j KL_j] is the mean
KL per edge, so the bound is n*K times the `elbo`-weighted loss, plus `NoiseSchedule.elbo_constant`. It is
estimated by Monte Carlo over states and noise ("over levels"), with its standard error; the rows of a
scheduling matrix (the path a rollout takes) are drawn by importance, since low-noise rows hold most of it.

`ode_nll`: the exact log-likelihood of the probability-flow ODE (seed 003): x_0 is carried to level K by
dx/du = alpha'(u) x0_hat + sigma'(u) eps_hat, and log p(x_0) = log N(x_K; 0, I) + int div f du, the
divergence from Hutchinson's estimator z^T (df/dx) z with one vector-Jacobian product per step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dforce.data.text import Text
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.trajectory import Schedule, Weighting

PROBES = ("rademacher", "gaussian")


@dataclass
class NLL:
    """Negative log-likelihoods of clips, in nats, with the Monte Carlo error of each."""

    nats: Tensor  # [B] float64, -log p(clip) (or its upper bound)
    sem: Tensor  # [B] float64, standard error of each clip's estimate (over draws or probes)
    dims: int  # elements per clip

    def bits_per_dim(self, offset: float = 0.0) -> tuple[float, float]:
        """Mean over clips and its standard error, in bits per dimension plus `offset`.

        Over several clips the error is their spread (data and estimator noise together); for one clip,
        the estimator's own. Pixels in [-1, 1] read in 8-bit units take `offset=math.log2(127.5)`.
        """
        scale = self.dims * math.log(2)
        many = len(self.nats) > 1
        sem = self.nats.std().item() / math.sqrt(len(self.nats)) if many else self.sem.item()
        return self.nats.mean().item() / scale + offset, sem / scale


def _mean_sem(samples: Tensor) -> tuple[Tensor, Tensor]:
    """[B, S] -> mean [B] and its standard error [B] (nan for S = 1)."""
    count = samples.shape[1]
    sem = samples.std(dim=1) / math.sqrt(count) if count > 1 else torch.full_like(samples[:, 0], math.nan)
    return samples.mean(dim=1), sem


def check_unit_steps(weighting: Weighting) -> None:
    """The bound needs paths of one-level steps: a full-resolution cube and, for a scheduling matrix,
    rows that lower each frame by at most one level."""
    if weighting.cube_levels != weighting.levels:
        raise ValueError(
            f"the ELBO needs one-level steps: {weighting!r} has cube_levels={weighting.cube_levels} < "
            f"levels={weighting.levels}; build it with cube_levels=None"
        )
    if isinstance(weighting, Schedule) and (weighting.matrix[:-1] - weighting.matrix[1:]).max() > 1:
        raise ValueError(
            f"the ELBO needs one-level steps: {weighting!r} lowers a frame by several levels in one row; "
            "build it with steps=levels"
        )


def _row_proposal(weighting: Schedule, schedule: NoiseSchedule) -> Tensor:
    """Probabilities [S] of drawing each row of a one-level-step scheduling matrix: half uniform, half in
    proportion to the row's bound for unit-variance Gaussian data, sum_j drop_j w(k_j) / (1 + SNR(k_j))
    (w the `elbo` x0 weight, 1 / (1 + SNR) that data's posterior variance). Nearly all of a bound lies in
    the few rows of low noise, which uniform rows rarely hit; half uniform keeps every importance weight
    below 2."""
    matrix = weighting.matrix  # [S+1, n]
    levels = matrix[:-1]
    kl = schedule.loss_weight("elbo", levels, "x0") / (1 + schedule.snr(levels))  # [S, n]
    mass = ((matrix[:-1] - matrix[1:]) * kl).sum(dim=1)  # [S]
    return 0.5 / len(mass) + 0.5 * mass / mass.sum()


def _draw_states(
    weighting: Weighting, batch: int, generator: torch.Generator, proposal: Tensor | None
) -> tuple[Tensor, Tensor]:
    """States and per-frame weights [B, T] with E[sum_j weights_j KL_j] the mean KL per edge: the
    weighting's own `sample`, or rows of its matrix from `proposal`, importance-weighted."""
    if proposal is None:
        return weighting.sample(batch, generator)
    matrix = weighting.matrix
    rows = torch.multinomial(proposal, batch, replacement=True, generator=generator)  # [B]
    drop = (matrix[rows] - matrix[rows + 1]).double()  # [B, n]
    return matrix[rows], drop / (weighting.decrements * proposal[rows, None])


def _conditions(
    labels: Tensor | None, actions: Tensor | None, text: Text | None, frames: int, repeats: int = 1
) -> dict[str, Tensor | None]:
    """The model's keyword arguments besides the frames, for the first `frames` frames: labels [B],
    actions [B, T, A], the text; each clip's `repeats` times in a row."""
    conditions = {"labels": labels, "actions": None if actions is None else actions[:, :frames]}
    conditions |= {} if text is None else text.kwargs()
    return {
        key: None if value is None else value.repeat_interleave(repeats, dim=0)
        for key, value in conditions.items()
    }


@torch.no_grad()
def elbo(
    model: nn.Module,
    schedule: NoiseSchedule,
    parameterization: str,
    x0: Tensor,
    weighting: Weighting,
    *,
    draws: int = 8,
    seed: int = 0,
    labels: Tensor | None = None,
    actions: Tensor | None = None,
    text: Text | None = None,
) -> NLL:
    """The DDPM bound -ELBO >= -log p(x0) of clips x0 [B, T, C, H, W] along `weighting`'s paths.

    Each clip is scored at `draws` states with fresh noise, from `seed` (the same for every model, so
    that models are compared on the same draws). The states of a scheduling-matrix weighting (a path of
    rows, as a rollout takes) are drawn by importance (`_row_proposal`); others from the weighting.
    labels [B], actions [B, T, A], text (of the B clips) if the model takes them.
    """
    if x0.shape[1] != weighting.frames:
        raise ValueError(f"clips have {x0.shape[1]} frames, the weighting {weighting!r} {weighting.frames}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    check_unit_steps(weighting)
    device = x0.device
    proposal = _row_proposal(weighting, schedule) if isinstance(weighting, Schedule) else None
    schedule = schedule.to(device)
    generator = torch.Generator().manual_seed(seed)  # states, on the CPU like the weightings' draws
    noise_generator = torch.Generator(device).manual_seed(seed)
    constant = schedule.elbo_constant(x0).sum(dim=1)  # [B]
    conditions = _conditions(labels, actions, text, x0.shape[1])
    samples = []
    for _ in range(draws):
        levels, weights = _draw_states(weighting, len(x0), generator, proposal)
        levels, weights = levels.to(device), weights.to(device)  # [B, T] each
        noise = torch.randn(x0.shape, generator=noise_generator, device=device, dtype=x0.dtype)
        x_t = schedule.add_noise(x0, noise, levels)
        pred = model(x_t, schedule.timesteps(levels), **conditions)  # [B, T, C, H, W]
        target = schedule.target(x0, noise, levels, parameterization)
        error = (pred.double() - target.double()).square().sum(dim=(2, 3, 4))  # [B, T], summed over elements
        kl = weights.double() * schedule.loss_weight("elbo", levels, parameterization) * error
        samples.append(kl.sum(dim=1) * weighting.decrements + constant)  # [B] nats
    nats, sem = _mean_sem(torch.stack(samples, dim=1))
    return NLL(nats=nats.cpu(), sem=sem.cpu(), dims=x0[0].numel())


def ode_grid(schedule: NoiseSchedule, steps: int) -> Tensor:
    """Levels 1 = u_0 < ... < u_S = K at which the ODE is evaluated, even in log SNR (so the steps near
    the data, where sigma changes fastest, are short): LongTensor [<= steps + 1]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    log_snr = schedule.log_snr(torch.arange(1, schedule.levels + 1)).clamp(min=-40.0)  # [K], decreasing
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), steps + 1, dtype=torch.float64)
    index = torch.searchsorted(-log_snr, -targets).clamp(max=schedule.levels - 1)
    return torch.unique(torch.cat([torch.tensor([0]), index, torch.tensor([schedule.levels - 1])])) + 1


def ode_nll(
    model: nn.Module,
    schedule: NoiseSchedule,
    parameterization: str,
    x0: Tensor,
    *,
    path: str = "sync",
    block: int = 1,
    steps: int = 100,
    probes: int = 4,
    probe: str = "rademacher",
    seed: int = 0,
    labels: Tensor | None = None,
    actions: Tensor | None = None,
    text: Text | None = None,
) -> NLL:
    """-log p(x0) of clips x0 [B, T, C, H, W] under the probability-flow ODE, in nats, per clip.

    `path="sync"` moves all frames together (the full-sequence model); `"autoregressive"` scores
    log p(x) = sum_i log p(block i | earlier blocks), each block's ODE run with the earlier frames clean
    (a causal model needs nothing later). The ODE runs from level 1 (x_1 is taken to be x0, the usual
    small-time cut-off) to K on `ode_grid(schedule, steps)` with Heun's method; `probes` Hutchinson
    vectors per clip (rademacher or gaussian, fixed along each solve) give the estimate and its standard
    error. labels [B], actions [B, T, A], text (of the B clips) if the model takes them.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if path not in ("sync", "autoregressive"):
        raise ValueError(f"path must be sync or autoregressive, got {path!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    frames = x0.shape[1]
    if frames % block:
        raise ValueError(f"clips have {frames} frames, not a multiple of block={block}")
    starts = range(0, frames, block) if path == "autoregressive" else [0]
    generator = torch.Generator(x0.device).manual_seed(seed)
    total = 0
    for start in starts:
        stop = start + block if path == "autoregressive" else frames
        clip, conditions = x0[:, :stop], _conditions(labels, actions, text, stop, probes)
        total = total + _ode_samples(
            model, schedule, parameterization, clip, start, steps, probes, probe, generator, conditions
        )
    nats, sem = _mean_sem(-total)
    return NLL(nats=nats.cpu(), sem=sem.cpu(), dims=x0[0].numel())


def _ode_samples(
    model: nn.Module,
    schedule: NoiseSchedule,
    parameterization: str,
    x0: Tensor,
    context: int,
    steps: int,
    probes: int,
    probe: str,
    generator: torch.Generator,
    conditions: dict[str, Tensor | None],
) -> Tensor:
    """log p(x0[:, context:] | x0[:, :context]) for each clip and probe: float64 [B, probes], the model
    also given `conditions` (`_conditions`, each clip's repeated for its probes).

    Between two grid levels alpha and sigma are interpolated log-linearly in u (alpha linearly where it
    ends at 0), so each Heun step sees one smooth piece; the model is only asked at grid levels.
    """
    schedule = schedule.to(x0.device)
    x = x0.repeat_interleave(probes, dim=0)  # [B*P, T, C, H, W]
    past, y = x[:, :context], x[:, context:].clone()  # y: the frames that move
    if probe == "rademacher":
        z = torch.randint(0, 2, y.shape, generator=generator, device=y.device).to(y.dtype) * 2 - 1
    else:
        z = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    dims = y[0].numel()
    past_levels = torch.zeros(len(x), context, dtype=torch.long, device=x.device)

    def velocity(y: Tensor, level: int, d_alpha: float, d_sigma: float) -> tuple[Tensor, Tensor]:
        """f(y, u) = (s'/s) y + (a' - s' a / s) x0_hat and z^T (df/dy) z at grid level `level`, [B*P]."""
        levels = torch.full(y.shape[:2], level, device=y.device)  # [B*P, n]
        a, s = schedule.alpha[level].item(), schedule.sigma[level].item()
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            timesteps = schedule.timesteps(torch.cat([past_levels, levels], dim=1))
            pred = model(torch.cat([past, y], dim=1), timesteps, **conditions)
            x0_hat, _ = schedule.to_x0_eps(pred[:, context:], y, levels, parameterization)
            (vjp,) = torch.autograd.grad(x0_hat, y, z)
        c = d_alpha - d_sigma * a / s
        div = dims * d_sigma / s + c * (vjp * z).double().flatten(1).sum(dim=1)
        return d_sigma / s * y.detach() + c * x0_hat.detach(), div

    def rates(level: int, lo: int, hi: int) -> tuple[float, float]:
        """alpha', sigma' at `level` on the piece between grid levels lo < hi."""
        a, s, h = schedule.alpha, schedule.sigma, hi - lo
        d_sigma = s[level] * (s[hi] / s[lo]).log() / h
        d_alpha = a[level] * (a[hi] / a[lo]).log() / h if a[hi] > 0 else (a[hi] - a[lo]) / h
        return float(d_alpha), float(d_sigma)

    integral = torch.zeros(len(y), dtype=torch.float64, device=y.device)
    for lo, hi in itertools.pairwise(ode_grid(schedule, steps).tolist()):
        f1, div1 = velocity(y, lo, *rates(lo, lo, hi))
        f2, div2 = velocity(y + (hi - lo) * f1, hi, *rates(hi, lo, hi))
        y = y + (hi - lo) / 2 * (f1 + f2)
        integral += (hi - lo) / 2 * (div1 + div2)
    prior = -0.5 * y.double().square().flatten(1).sum(dim=1) - 0.5 * dims * math.log(2 * math.pi)
    return (prior + integral).view(-1, probes)
