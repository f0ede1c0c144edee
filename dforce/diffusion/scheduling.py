"""Scheduling matrices: inference as one monotone path through the noise-level cube {0..K}^n.

A matrix [S+1, n] has a state (per-frame levels) per row, from all-K (pure noise) to all-0 (clean),
each row elementwise <= the one before: row r -> r+1 is one denoising step of the frames whose level
falls. Named schedules (autoregressive, pyramid, sync, teacher) are built here; any custom matrix is
validated. `dforce.diffusion.rollout` follows them; `dforce.diffusion.trajectory`'s `schedule:NAME` weighting
trains on them.
"""

from __future__ import annotations

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


def scheduling_matrix(
    name: str | Sequence[Sequence[int]] | Tensor,
    frames: int,
    levels: int,
    steps: int,
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
    if not 1 <= steps <= levels:
        raise ValueError(f"steps must be in 1..levels={levels}, got {steps}")
    if name not in SCHEDULING_OPTIONS:
        raise ValueError(
            f"unknown schedule '{name}'; choose from {', '.join(SCHEDULING_OPTIONS)} or give a matrix"
        )
    if unknown := set(options) - set(SCHEDULING_OPTIONS[name]):
        raise ValueError(f"schedule '{name}' got unknown options {sorted(unknown)}")
    block = options.get("block", 1)
    offset = {"autoregressive": steps, "teacher": steps, "sync": 0}.get(name, options.get("offset", 1))
    if block < 1 or not 0 <= offset <= steps:
        raise ValueError(
            f"need block >= 1 and 0 <= offset <= steps={steps}, got block={block}, offset={offset}"
        )
    shift = options.get("shift", 1.0)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    grid = (shift * t / (1 + (shift - 1) * t) * levels).round().long()  # [steps+1]
    if (grid[1:] == grid[:-1]).any():
        raise ValueError(f"shift={shift} puts two of the {steps} steps on one level; use fewer steps")
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
