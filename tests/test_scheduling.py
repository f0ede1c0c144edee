"""Scheduling matrices: monotone paths from pure noise to clean, the named schedules' shapes, and
clear errors for malformed custom matrices and options."""

import math

import pytest
import torch

from dforce.diffusion.scheduling import scheduling_matrix, step_grid


@pytest.mark.parametrize("frames", [1, 3, 5])
@pytest.mark.parametrize(
    "name,options",
    [
        ("autoregressive", {}),
        ("autoregressive", {"block": 2}),
        ("pyramid", {}),
        ("pyramid", {"offset": 3}),
        ("sync", {}),
        ("teacher", {}),
    ],
)
def test_scheduling_matrices_are_monotone_paths(frames, name, options):
    levels, steps = 20, 4
    m = scheduling_matrix(name, frames, levels, steps, **options)
    assert m.dtype == torch.long and m.shape[1] == frames
    assert (m[0] == levels).all() and (m[-1] == 0).all()
    assert (m[1:] <= m[:-1]).all() and ((m[1:] < m[:-1]).any(dim=1)).all()
    changed = m[1:] != m[:-1]  # [S, frames]
    if name == "sync":
        assert len(m) == steps + 1 and (m == m[:, :1]).all()
    if name in ("autoregressive", "teacher"):
        block = options.get("block", 1)
        assert changed.sum(dim=1).max() <= block and len(m) == steps * math.ceil(frames / block) + 1
    if name == "pyramid":
        offset = options.get("offset", 1)
        start = changed.float().argmax(dim=0)  # first row at which each frame moves
        assert torch.equal(start, torch.arange(frames) * offset)


def test_scheduling_matrix_unit_steps_visit_every_level():
    m = scheduling_matrix("autoregressive", 2, 3, 3)
    assert m.tolist() == [[3, 3], [2, 3], [1, 3], [0, 3], [0, 2], [0, 1], [0, 0]]


@pytest.mark.parametrize(
    "matrix,message",
    [
        ([[3, 3], [0, 0], [0, 0]], "rows 1 and 2 are equal"),
        ([[3, 3], [1, 2], [2, 0], [0, 0]], "row 2 raises a level"),
        ([[3, 2], [0, 0]], "row 0 must be all 3"),
        ([[3, 3], [1, 0]], "last row must be all 0"),
        ([[3, 3, 3], [0, 0, 0]], "shape"),
        ([[3, 3], [4, 0], [0, 0]], "lie in 0..3"),
        ([[3.0, 3.0], [0.0, 0.0]], "integer"),
        ([[3, 3], [0]], "rectangular"),
    ],
)
def test_malformed_custom_matrix_is_a_clear_error(matrix, message):
    with pytest.raises(ValueError, match=message):
        scheduling_matrix(matrix, 2, 3, 1)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: scheduling_matrix("pyramid", 2, 3, 4), "steps"),
        (lambda: scheduling_matrix("sync", 2, 3, 3, block=2), "unknown options"),
        (
            lambda: scheduling_matrix("spiral", 2, 3, 3),
            "unknown schedule 'spiral'; choose from autoregressive",
        ),
        (lambda: scheduling_matrix("autoregressive", 2, 30, 3, shift=-1), "shift must be > 0"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_list_of_steps_is_self_forcings_warped_step_list():
    """Self-Forcing's [1000, 750, 500, 250] warped by shift 5 over 1000 levels: the timesteps its
    `warp_denoising_step` picks (1000 * 5t / (1 + 4t)), the same as 4 even steps with shift 5."""
    grid = step_grid([1000, 750, 500, 250], 1000, 5.0)
    assert grid.tolist() == [1000, 938, 833, 625, 0]
    assert torch.equal(grid, step_grid(4, 1000, 5.0))
    matrix = scheduling_matrix("autoregressive", 2, 1000, [1000, 750, 500, 250], block=1, shift=5.0)
    assert matrix[:, 0].tolist() == [1000, 938, 833, 625, 0, 0, 0, 0, 0]
    assert step_grid([1000, 400], 1000).tolist() == [1000, 400, 0]
    for bad in ([750, 500], [1000, 1000, 500], [1000, 0], []):
        with pytest.raises(ValueError, match="a list of steps must"):
            step_grid(bad, 1000)
