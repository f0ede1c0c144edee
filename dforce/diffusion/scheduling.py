"""Scheduling matrices: inference as one monotone path through the noise-level cube {0..K}^n.

A matrix [S+1, n] has a state (per-frame levels) per row, from all-K (pure noise) to all-0 (clean),
each row elementwise <= the one before: row r -> r+1 is one denoising step of the frames whose level
falls. Named schedules (autoregressive, pyramid, sync, teacher) are built here; any custom matrix is
validated. `dforce.diffusion.rollout` follows them; `dforce.diffusion.trajectory`'s `schedule:NAME` weighting
trains on them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

# The named schedules and the options each takes (all take `shift`).
SCHEDULING_OPTIONS = {
    "autoregressive": ("block", "shift"),
    "pyramid": ("block", "offset", "shift"),
    "sync": ("shift",),
    "teacher": ("shift",),
}


Steps = int | Sequence[int]  # a number of evenly spaced steps, or the levels each step starts from


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t -> shift * t / (1 + (shift - 1) * t) of t in [0, 1]: above 1 it moves levels
    towards noise (sampling grids here, self-forcing's distribution-matching levels in the loss)."""
    return shift * t / (1 + (shift - 1) * t)


def step_count(steps: Steps) -> int:
    """How many denoising steps `steps` (a count or a list of levels) takes."""
    return steps if isinstance(steps, int) else len(steps)


def step_grid(steps: Steps, levels: int, shift: float = 1.0) -> Tensor:
    """The levels a frame passes through, `levels` ... 0, LongTensor [S+1]: `steps` evenly spaced steps,
    or the explicit list of levels each step starts from (Self-Forcing's [1000, 750, 500, 250] of 1000
    levels, first = `levels`, descending), then `time_shift`ed; ValueError where two steps meet."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if isinstance(steps, int):
        if not 1 <= steps <= levels:
            raise ValueError(f"steps must be in 1..levels={levels}, got {steps}")
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    else:
        listed = [int(level) for level in steps]
        if not listed or listed[0] != levels or any(b >= a for a, b in itertools.pairwise(listed)):
            raise ValueError(
                f"a list of steps must start at {levels} and descend, ending above 0: got {listed}"
            )
        if listed[-1] < 1:
            raise ValueError(f"a list of steps must end above 0 (0 is where the last step lands): {listed}")
        t = torch.tensor([*listed, 0], dtype=torch.float64) / levels
    grid = (time_shift(t, shift) * levels).round().long()
    if (grid[1:] == grid[:-1]).any():
        raise ValueError(f"shift={shift} puts two of the {len(grid) - 1} steps on one level; use fewer steps")
    return grid


def scheduling_matrix(
    name: str | Sequence[Sequence[int]] | Tensor,
    frames: int,
    levels: int,
    steps: Steps,
    **options,
) -> Tensor:
    """Rows are states from all-`levels` to all-0, each elementwise <= the one before: [S+1, frames].

    `autoregressive` denoises `block` frames at a time (default 1), each in `steps` steps;
    `pyramid` starts frame j `offset` steps after frame j-1 (default 1); `sync` moves all frames
    together; `teacher` is autoregressive with one frame per block (the staircase edge of the
    cube when steps == levels). `shift` (every schedule, default 1) spaces the steps as
    t -> shift * t / (1 + (shift - 1) * t) of t = level / levels (SD3's timestep shift): above 1 it spends
    more of few steps at high noise. A list or tensor is taken as a custom matrix and validated.
    """
    if not isinstance(name, str):
        if options:
            raise ValueError(f"a custom scheduling matrix takes no options, got {sorted(options)}")
        return check_scheduling_matrix(name, frames, levels)
    if name not in SCHEDULING_OPTIONS:
        raise ValueError(
            f"unknown schedule '{name}'; choose from {', '.join(SCHEDULING_OPTIONS)} or give a matrix"
        )
    if unknown := set(options) - set(SCHEDULING_OPTIONS[name]):
        raise ValueError(f"schedule '{name}' got unknown options {sorted(unknown)}")
    grid = step_grid(steps, levels, options.get("shift", 1.0))  # [steps+1]
    steps = len(grid) - 1
    block = options.get("block", 1)
    offset = {"autoregressive": steps, "teacher": steps, "sync": 0}.get(name, options.get("offset", 1))
    if block < 1 or not 0 <= offset <= steps:
        raise ValueError(
            f"need block >= 1 and 0 <= offset <= steps={steps}, got block={block}, offset={offset}"
        )
    blocks = torch.arange(frames) // block  # [n] block of each frame
    rows = steps + int(blocks[-1]) * offset
    progress = torch.arange(rows + 1)[:, None] - blocks[None, :] * offset  # [S+1, n]
    return grid[progress.clamp(0, steps)]


def check_scheduling_matrix(matrix: Sequence[Sequence[int]] | Tensor, frames: int, levels: int) -> Tensor:
    """Validate a custom scheduling matrix and return it as LongTensor [S+1, frames]."""
    try:
        m = torch.as_tensor(matrix)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scheduling matrix is not a rectangular list of integers: {error}") from None
    if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
        raise ValueError(f"scheduling matrix must hold integer levels, got dtype {m.dtype}")
    if m.ndim != 2 or m.shape[1] != frames or m.shape[0] < 2:
        raise ValueError(
            f"scheduling matrix must have shape [S+1 >= 2, frames={frames}], got {list(m.shape)}"
        )
    m = m.long()
    if m.min() < 0 or m.max() > levels:
        raise ValueError(f"scheduling matrix levels must lie in 0..{levels}, got {m.min()}..{m.max()}")
    if (m[0] != levels).any():
        raise ValueError(f"scheduling matrix row 0 must be all {levels} (pure noise), got {m[0].tolist()}")
    if (m[-1] != 0).any():
        raise ValueError(f"scheduling matrix last row must be all 0 (clean), got {m[-1].tolist()}")
    for row in range(len(m) - 1):
        if (m[row + 1] > m[row]).any():
            raise ValueError(
                f"scheduling matrix row {row + 1} raises a level of row {row}: "
                f"{m[row].tolist()} -> {m[row + 1].tolist()}"
            )
        if (m[row + 1] == m[row]).all():
            raise ValueError(f"scheduling matrix rows {row} and {row + 1} are equal: {m[row].tolist()}")
    return m
