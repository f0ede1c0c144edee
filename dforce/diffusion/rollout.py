"""Rollouts: context frames continued chunk by chunk, each chunk following one scheduling matrix.

Each chunk goes from pure noise to clean along `dforce.diffusion.trajectory.scheduling_matrix`. Finished
frames are committed to a `History` once, at the context-noise level, and the model sees the last `window` of
them beside the frames it denoises, so a video can be many times the training horizon. With the KV cache a
finished frame's keys and values are computed once; without it the window is recomputed at every step
(the reference). Self-forcing trains on this very loop (`generate` with exit rows).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from dforce.data.text import Text
from dforce.diffusion.history import History
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.sampler import Sampler
from dforce.diffusion.scheduling import scheduling_matrix
from dforce.models.backbone import Backbone

Matrix = str | Sequence[Sequence[int]] | Tensor


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
    model: Backbone,
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
    horizon, block = model.horizon, model.frames_per_block
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
    block = history.net.frames_per_block
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
    block = history.net.frames_per_block
    shape = (len(like), *history.net.frame_shape)
    total = -(-frames // block) * block  # whole blocks; the extra frames are cut at the end
    video = []
    with tqdm(total=frames, unit="frame", desc="rollout", disable=None if progress else True) as bar:
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
    model: Backbone,
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
    text: Text | None = None,
    text_guidance: float = 1.0,
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
    `text_guidance` over the text (of the B clips), `history_guidance` over the history (see `History`).
    Finished frames condition the model at level `context_noise`; the first `sink` frames stay in the
    cache's window for good (self-forcing can train with the same). `use_cache=False` recomputes the
    window at every step. Random draws come from `generator` (on the context's device), so a seeded
    generator repeats the video exactly.
    """
    block, shape = model.frames_per_block, model.frame_shape
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
    if text is not None and len(text.states) != batch:
        raise ValueError(f"text must be of B = {batch} clips, got {len(text.states)}")
    step = Sampler(sampler, eta)
    step.check(schedule)
    matrix, window = chunk_schedule(model, schedule.levels, scheduling, steps, chunk, **schedule_options)
    if known > window:
        raise ValueError(
            f"context has {known} frames but the model sees at most {window} beside the "
            f"{model.horizon - window} it denoises at once (num_frames={model.horizon}); "
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
        text=text,
        text_guidance=text_guidance,
        context_noise=context_noise,
        use_cache=use_cache,
        sink=sink,
    )
    if known:
        history.commit(context, generator)
    new = generate(history, frames, matrix, step, context, generator, progress=progress)
    return torch.cat([context, new], dim=1)
