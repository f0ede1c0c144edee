"""Sampling: one denoising step for every frame at once, and rollouts along a scheduling matrix.

The step functions are pure. Each moves every frame of x [B, T, C, H, W] from its level `levels` [B, T] to
`next_levels` [B, T], given the denoiser's estimate of the clean frames and of the noise (`x0`, `eps`, from
`NoiseSchedule.to_x0_eps`), so one call serves a batch in which every frame sits at its own level. A frame
whose level does not change comes back bitwise unchanged, so clean context stays clean. For k -> j < k:

    ddim   x_j = alpha_j x0 + sqrt(sigma_j^2 - c^2) eps + c z,  c = eta * std   (Song et al. 2021)
    ddpm   x_j ~ q(x_j | x_k, x0), the Gaussian posterior             (Ho et al. 2020; ddim with eta = 1)
    euler  x_j = x_k + (t_j - t_k)(eps - x0), rectified flow, t = sigma   (ddim on a flow schedule)

with std^2 = sigma_j^2 sigma_kj^2 / sigma_k^2 the posterior variance, sigma_kj^2 = sigma_k^2 -
(alpha_k / alpha_j)^2 sigma_j^2 the variance of x_k given x_j; all of it holds for any alpha, sigma.

A rollout continues context frames chunk by chunk, each chunk following one scheduling matrix
(`dforce.trajectory.scheduling_matrix`) from pure noise to clean. Finished frames are committed to a
`History` once, at the context-noise level, and the model sees the last `window` of them beside the frames
it denoises, so a video can be many times the training horizon. With the KV cache a finished frame's keys
and values are computed once; without it the window is recomputed at every step (the reference).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor
from tqdm import tqdm

from dforce import DforceError
from dforce.model import CausalVideoTransformer
from dforce.noise import NoiseConfig, NoiseSchedule
from dforce.trajectory import scheduling_matrix

Matrix = str | Sequence[Sequence[int]] | Tensor


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


SAMPLERS = {"ddim": ddim_step, "ddpm": ddpm_step, "euler": euler_step}


def is_flow(schedule: NoiseSchedule) -> bool:
    """Whether alpha + sigma = 1 at every level (rectified flow), where the Euler step is defined."""
    return torch.allclose(schedule.alpha + schedule.sigma, torch.ones_like(schedule.alpha))


@dataclass(frozen=True)
class Sampler:
    """A step function by name, drawing the noise it needs from a generator: `ddim` (with `eta`),
    `ddpm` or `euler`."""

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
        return self.name == "ddpm" or self.eta > 0

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
        noise = _randn(x, generator) if self.stochastic else None
        step = functools.partial(ddim_step, eta=self.eta) if self.name == "ddim" else SAMPLERS[self.name]
        return step(schedule, x, x0, eps, levels, next_levels, noise)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _per_branch(value: Tensor | None, null: Tensor | None, drops: list[bool]) -> Tensor | None:
    """`value` [B, ...] for each branch, `null` where the branch drops it: [branches * B, ...]."""
    return None if value is None else torch.cat([null if drop else value for drop in drops])


class History:
    """The frames a rollout has finished, as the model sees them, and the guided denoiser that reads them.

    `commit` writes finished clean frames once, at the context-noise level; `denoise` predicts (x0, eps)
    for the frames being generated, placed right after the committed ones. The model sees the last `window`
    committed frames: with `use_cache` through a rolling KV cache (each frame's keys and values computed
    once, by a forward at the context-noise level with `update_cache=True`), otherwise by feeding them again
    with every call (the reference). With the cache, the first `sink` frames stay in the window for good.
    `denoise` may run with gradients; `commit` never keeps them.

    Guidance runs its branches as one batch (and one cache) of `branches * B`:
      history guidance w: the unconditional branch sees every committed frame at level K (pure noise);
      label/action guidance g: the unconditional branch has label `num_classes` ("no label") and zero
      actions (the model has no null action embedding, so zero is what "no action" means);
    pred = c + (g - 1)(c - u_label) + (w - 1)(c - u_history), each term applied only when its scale != 1.

    `model` may be wrapped for distributed training (self-forcing): it is called as given, so that its
    gradients are synchronised, and its attributes are read from the unwrapped `net`.
    """

    def __init__(
        self,
        model: CausalVideoTransformer,
        schedule: NoiseSchedule,
        parameterization: str,
        window: int,
        *,
        labels: Tensor | None = None,
        actions: Tensor | None = None,
        guidance: float = 1.0,
        history_guidance: float = 1.0,
        context_noise: int = 0,
        use_cache: bool = True,
        sink: int = 0,
    ) -> None:
        if sink and not use_cache:
            raise ValueError("a sink (frames kept in the window for good) needs the KV cache")
        if not 0 <= context_noise <= schedule.levels:
            raise ValueError(f"context_noise must be a level in 0..{schedule.levels}, got {context_noise}")
        if guidance != 1 and labels is None and actions is None:
            raise ValueError("guidance needs labels or actions to drop; got neither")
        self.model, self.parameterization, self.window = model, parameterization, window
        self.net = model = extract_model_from_parallel(model)
        if labels is not None and not model.config.num_classes:
            raise ValueError("labels given to a model built without num_classes")
        device = model.device
        self.schedule = schedule.to(device)
        # Branches: (level the committed frames are seen at, drop labels and actions?), with their weights.
        branches, self.weights = [(context_noise, False)], [1.0 + (guidance - 1) + (history_guidance - 1)]
        if guidance != 1:
            branches.append((context_noise, True))
            self.weights.append(1.0 - guidance)
        if history_guidance != 1:
            branches.append((schedule.levels, False))
            self.weights.append(1.0 - history_guidance)
        self.levels = [level for level, _ in branches]
        drops = [drop for _, drop in branches]
        null_labels = None if labels is None else torch.full_like(labels, model.config.num_classes)
        self.labels = _per_branch(labels, null_labels, drops)  # [branches * B]
        null_actions = None if actions is None else torch.zeros_like(actions)
        self.actions = _per_branch(actions, null_actions, drops)  # [branches * B, frames, A]
        self.cache = model.new_cache(window, sink) if use_cache else None
        self.frames: Tensor | None = None  # without a cache: [branches * B, <= window, C, H, W] as fed
        self.timesteps: Tensor | None = None  # [branches * B, <= window]
        self.end = 0  # absolute index of the next frame

    @property
    def branches(self) -> int:
        return len(self.weights)

    def _actions(self, start: int, frames: int) -> Tensor | None:
        return None if self.actions is None else self.actions[:, start : start + frames]

    def commit(self, frames: Tensor, generator: torch.Generator | None = None) -> None:
        """Finished clean frames [B, n, C, H, W], n a multiple of `frames_per_block`, join the history."""
        frames = frames.detach()
        batch, n = frames.shape[:2]
        noise = _randn(frames, generator) if any(self.levels) else None
        fed, timesteps = [], []
        for level in self.levels:
            levels = torch.full((batch, n), level, device=frames.device)  # [B, n]
            fed.append(self.schedule.add_noise(frames, noise, levels) if level else frames)
            timesteps.append(self.schedule.timesteps(levels))
        fed, timesteps = torch.cat(fed), torch.cat(timesteps)  # [branches * B, n, C, H, W], [branches * B, n]
        if self.cache is not None:
            with torch.no_grad():
                self.model(
                    fed,
                    timesteps,
                    labels=self.labels,
                    actions=self._actions(self.end, n),
                    cache=self.cache,
                    update_cache=True,
                )
        else:
            if self.frames is not None:
                fed, timesteps = torch.cat([self.frames, fed], 1), torch.cat([self.timesteps, timesteps], 1)
            keep = max(0, fed.shape[1] - self.window)
            self.frames, self.timesteps = fed[:, keep:], timesteps[:, keep:]
        self.end += n

    def denoise(self, x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) [B, n, C, H, W] for frames x [B, n, C, H, W] at `levels` [B, n] following the history."""
        n = x.shape[1]
        sample = x.repeat(self.branches, 1, 1, 1, 1)  # [branches * B, n, C, H, W]
        timesteps = self.schedule.timesteps(levels).repeat(self.branches, 1)  # [branches * B, n]
        if self.cache is not None:
            actions = self._actions(self.end, n)
            out = self.model(sample, timesteps, labels=self.labels, actions=actions, cache=self.cache)
        else:
            start = self.end - (0 if self.frames is None else self.frames.shape[1])
            if self.frames is not None:
                sample = torch.cat([self.frames, sample], 1)
                timesteps = torch.cat([self.timesteps, timesteps], 1)
            actions = self._actions(start, sample.shape[1])
            out = self.model(sample, timesteps, labels=self.labels, actions=actions, frame_offset=start)
            out = out[:, -n:]
        if self.branches == 1:
            pred = out
        else:
            pred = sum(w * part for w, part in zip(self.weights, out.chunk(self.branches), strict=True))
        return self.schedule.to_x0_eps(pred, x, levels, self.parameterization)


def feed_plan(matrix: Tensor, block: int) -> list[tuple[int, int]]:
    """For each step of a chunk's matrix [S+1, n]: (frames finished before it, end of the frames fed).

    The leading whole blocks at level 0 are finished: they are committed and not fed again. Blocks after
    the last one that moves are not fed either: under block-causal attention no frame fed would see them.
    """
    plan = []
    for row, next_row in itertools.pairwise(matrix):
        noisy = row.nonzero()
        finished = (int(noisy[0]) if len(noisy) else len(row)) // block * block
        last = int((next_row != row).nonzero()[-1]) + 1
        plan.append((finished, -(-last // block) * block))
    return plan


def truncate(matrix: Tensor, frames: int) -> Tensor:
    """The matrix of the first `frames` columns only (for a last, shorter chunk), repeated rows dropped."""
    matrix = matrix[:, :frames]
    keep = torch.ones(len(matrix), dtype=torch.bool)
    keep[1:] = (matrix[1:] != matrix[:-1]).any(dim=1)
    return matrix[keep]


def chunk_schedule(
    model: CausalVideoTransformer,
    levels: int,
    scheduling: Matrix = "autoregressive",
    steps: int = 50,
    chunk: int | None = None,
    **options,
) -> tuple[Tensor, int]:
    """The scheduling matrix of one chunk, LongTensor [S+1, chunk], and the window: how many finished
    frames the model sees beside the frames it denoises (the horizon minus the most it feeds at once).

    `chunk` defaults to a custom matrix's width, an autoregressive block (`block`, default 1, rounded up to
    whole model blocks), or half the horizon (pyramid, sync). Autoregressive rollouts do not depend on it.
    """
    horizon, block = model.config.num_frames, model.config.frames_per_block
    if chunk is None:
        if not isinstance(scheduling, str):
            chunk = torch.as_tensor(scheduling).shape[-1]
        elif scheduling in ("autoregressive", "teacher"):
            chunk = -(-options.get("block", 1) // block) * block
        else:
            chunk = max(block, horizon // 2 // block * block)
    if not 1 <= chunk <= horizon or chunk % block:
        raise ValueError(
            f"chunk must be a multiple of frames_per_block={block} in 1..num_frames={horizon}, got {chunk}"
        )
    matrix = scheduling_matrix(scheduling, chunk, levels, steps, **options)
    fed = max(stop - finished for finished, stop in feed_plan(matrix, block))
    return matrix, horizon - fed


def denoise_step(
    history: History,
    x: Tensor,
    levels: Tensor,
    next_levels: Tensor,
    sampler: Sampler,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One row of a scheduling matrix: frames x [B, n, C, H, W] after the history, from `levels` to
    `next_levels` [B, n]; -> (x at the next levels, the x0 estimate). Runs with gradients if enabled."""
    x0, eps = history.denoise(x, levels)
    return sampler(history.schedule, x, x0, eps, levels, next_levels, generator), x0


def denoise_chunk(
    history: History,
    x: Tensor,
    matrix: Tensor,
    sampler: Sampler,
    generator: torch.Generator | None = None,
    exit_row: int | None = None,
) -> Tensor:
    """Take x [B, n, C, H, W] (pure noise, matrix row 0) through the rows of `matrix` [S+1, n] to clean
    frames, committing each finished block to `history`; -> the clean frames [B, n, C, H, W].

    `exit_row` (self-forcing): rows before it run without gradients, and the chunk ends at that row with
    the model's x0 estimate, computed with gradients if enabled, as its frames. With the last row it is
    the same chunk as without, the last step landing on x0.
    """
    block = history.net.config.frames_per_block
    levels = matrix.to(x.device)
    done = 0
    for m, (finished, stop) in enumerate(feed_plan(matrix, block)):
        if finished > done:
            history.commit(x[:, done:finished], generator)
            done = finished
        batch_levels = levels[m, done:stop].expand(len(x), -1)  # [B, fed]
        next_levels = levels[m + 1, done:stop].expand(len(x), -1)
        exiting = m == exit_row
        with torch.set_grad_enabled(torch.is_grad_enabled() and (exit_row is None or exiting)):
            fed, x0 = denoise_step(history, x[:, done:stop], batch_levels, next_levels, sampler, generator)
        x = torch.cat([x[:, :done], x0 if exiting else fed, x[:, stop:]], dim=1)
        if exiting:
            break
    history.commit(x[:, done:], generator)
    return x


def generate(
    history: History,
    frames: int,
    matrix: Tensor,
    sampler: Sampler,
    like: Tensor,
    generator: torch.Generator | None = None,
    exit_rows: Sequence[int | None] | None = None,
    progress: bool = False,
) -> Tensor:
    """`frames` new frames after `history`, chunk by chunk along `matrix` [S+1, chunk] from pure noise:
    -> [B, frames, C, H, W] in the dtype and on the device of `like` [B, ...]. `exit_rows[i]` is chunk
    i's `denoise_chunk` exit row (self-forcing trains on this very loop)."""
    config = history.net.config
    block = config.frames_per_block
    shape = (len(like), config.in_channels, *(g * config.patch_size for g in history.net.grid))
    total = -(-frames // block) * block  # whole blocks; the extra frames are cut at the end
    video = []
    with tqdm(total=frames, unit="frame", desc="rollout", disable=not progress) as bar:
        for i, start in enumerate(range(0, total, matrix.shape[1])):
            n = min(matrix.shape[1], total - start)
            noise = torch.randn(
                (shape[0], n, *shape[1:]), generator=generator, device=like.device, dtype=like.dtype
            )  # [B, n, C, H, W] at level K
            exit_row = None if exit_rows is None else exit_rows[i]
            video.append(denoise_chunk(history, noise, truncate(matrix, n), sampler, generator, exit_row))
            bar.update(min(n, frames - start))
    return torch.cat(video, dim=1)[:, :frames]


@torch.no_grad()
def rollout(
    model: CausalVideoTransformer,
    schedule: NoiseSchedule,
    parameterization: str,
    context: Tensor,
    frames: int,
    *,
    scheduling: Matrix = "autoregressive",
    steps: int = 50,
    chunk: int | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance: float = 1.0,
    history_guidance: float = 1.0,
    labels: Tensor | None = None,
    actions: Tensor | None = None,
    context_noise: int = 0,
    use_cache: bool = True,
    sink: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **schedule_options,
) -> Tensor:
    """Generate `frames` frames after the context [B, T0, C, H, W] (T0 may be 0): -> [B, T0 + frames, ...].

    Each chunk of new frames follows the scheduling matrix `scheduling` (a name or a custom matrix over
    the chunk's frames, with `schedule_options` such as `block=` and `offset=`, see `chunk_schedule`),
    `steps` steps per frame, with `sampler` (`ddim` with `eta`, `ddpm`, `euler` for flow schedules).
    labels [B], actions [B, T0 + frames, A]; `guidance` scales classifier-free guidance over them,
    `history_guidance` over the history (see `History`). Finished frames condition the model at level
    `context_noise`; the first `sink` frames stay in the cache's window for good (self-forcing can train
    with the same). `use_cache=False` recomputes the window at every step. Random draws come from
    `generator` (on the context's device), so a seeded generator repeats the video exactly.
    """
    config = model.config
    block = config.frames_per_block
    shape = (config.in_channels, *(g * config.patch_size for g in model.grid))
    if context.ndim != 5 or tuple(context.shape[2:]) != shape:
        raise ValueError(
            f"context must be [B, T0, C, H, W] with (C, H, W) = {shape}, got {list(context.shape)}"
        )
    batch, known = context.shape[:2]
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if known % block:
        raise ValueError(f"context has {known} frames; it must be a multiple of frames_per_block={block}")
    if labels is not None and labels.shape != (batch,):
        raise ValueError(f"labels must be [B] = [{batch}], got {list(labels.shape)}")
    if actions is not None and actions.shape[:2] != (batch, known + frames):
        raise ValueError(
            f"actions must be [B, T0 + frames, A] = [{batch}, {known + frames}, A], got {list(actions.shape)}"
        )
    step = Sampler(sampler, eta)
    step.check(schedule)
    matrix, window = chunk_schedule(model, schedule.levels, scheduling, steps, chunk, **schedule_options)
    if known > window:
        raise ValueError(
            f"context has {known} frames but the model sees at most {window} beside the "
            f"{config.num_frames - window} it denoises at once (num_frames={config.num_frames}); "
            "pass fewer context frames"
        )
    history = History(
        model,
        schedule,
        parameterization,
        window,
        labels=labels,
        actions=actions,
        guidance=guidance,
        history_guidance=history_guidance,
        context_noise=context_noise,
        use_cache=use_cache,
        sink=sink,
    )
    if known:
        history.commit(context, generator)
    new = generate(history, frames, matrix, step, context, generator, progress=progress)
    return torch.cat([context, new], dim=1)


class ModelNotFound(DforceError, FileNotFoundError):
    """A directory that does not hold a trained model."""


def load_model(directory: str | Path) -> tuple[CausalVideoTransformer, NoiseConfig]:
    """A model directory written by training: `save_pretrained` weights and config, and `noise.json`."""
    path = Path(directory)
    for name in "config.json", NoiseConfig.FILE:
        if not (path / name).is_file():
            raise ModelNotFound(f"{path}: no {name}; pass a model directory written by `dforce train`")
    return CausalVideoTransformer.from_pretrained(path).eval(), NoiseConfig.load(path)
