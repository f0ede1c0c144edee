"""Frame metrics on inputs whose scores are known: identical clips, constant offsets, a brute-force SSIM,
and balls found where the physics put them, or shifted by a known amount."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dforce.data.synthetic import bouncing_balls, render
from dforce.evaluation.metrics import ball_errors, ball_speed, find_balls, frame_metrics, mse, psnr, ssim


def random_clips(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identical_clips_score_perfectly():
    clip = random_clips(2, 3, 3, 16, 16)
    scores = frame_metrics(clip, clip.clone())
    assert all(score.shape == (2, 3) for score in scores.values())
    assert (scores["mse"] == 0).all() and torch.isinf(scores["psnr"]).all()
    torch.testing.assert_close(scores["ssim"], torch.ones(2, 3, dtype=torch.float64))


def test_a_constant_offset_has_known_scores():
    """Constant frames at m and m + c: MSE c^2, PSNR 10 log10(2^2 / c^2), and SSIM its luminance term
    (2 m (m + c) + C1) / (m^2 + (m + c)^2 + C1) since both frames have no structure."""
    m, c = -0.2, 0.3
    real = torch.full((1, 2, 3, 12, 12), m)
    fake = real + c
    assert mse(fake, real) == pytest.approx(c**2)
    assert psnr(fake, real) == pytest.approx(10 * math.log10(4 / c**2))
    c1 = (0.01 * 2) ** 2
    expected = (2 * m * (m + c) + c1) / (m**2 + (m + c) ** 2 + c1)
    torch.testing.assert_close(ssim(fake, real), torch.full((1, 2), expected, dtype=torch.float64))


def brute_force_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [C, H, W] images window by window, with the weighted statistics written out."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.02**2, 0.06**2
    scores = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[ch, i : i + size, j : j + size], y[ch, i : i + size, j : j + size]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
                scores.append(num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(scores))


def test_ssim_matches_a_window_by_window_computation():
    real = random_clips(1, 2, 2, 14, 15, seed=1)
    fake = (real + 0.3 * random_clips(1, 2, 2, 14, 15, seed=2)).clamp(-1, 1)
    got = ssim(fake, real)
    for t in range(2):
        assert got[0, t].item() == pytest.approx(brute_force_ssim(fake[0, t].numpy(), real[0, t].numpy()))
    assert (got < 0.99).all()


def test_metrics_name_mismatched_shapes():
    with pytest.raises(ValueError, match=r"one shape, got \[1, 2, 3, 8, 8\], \[1, 3, 3, 8, 8\]"):
        frame_metrics(torch.zeros(1, 2, 3, 8, 8), torch.zeros(1, 3, 3, 8, 8))


def as_frames(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("size", [16, 32])
def test_balls_are_found_where_the_physics_put_them(size):
    """Over whole clips, collisions and overlaps included: every ball found, within a fifth of a pixel."""
    for index in range(8):
        video, record = bouncing_balls(index, frames=16, size=size, num_balls=3)
        states = torch.tensor(record["states"])
        error, all_found = ball_errors(
            as_frames(video), states, torch.tensor(record["colors"]), torch.tensor(record["radius"])
        )
        assert all_found.all()
        assert error.max() < 0.4 and error.mean() < 0.15


def test_ball_speed_is_one_for_the_real_clip_zero_for_a_still_one_and_half_when_half_as_fast():
    video, record = bouncing_balls(0, frames=17, size=32, num_balls=1)
    states, colors, radius = (torch.tensor(record[k]) for k in ("states", "colors", "radius"))
    frames = as_frames(video)

    def speed(frames, states):
        return ball_speed(*find_balls(frames, colors, radius), states)

    real = speed(frames, states)
    assert real.shape == (17,) and math.isnan(real[0])
    assert real[1:].sub(1).abs().max() < 0.15  # the ball finder is exact to ~0.1 px, balls move >= 1 px
    still = speed(frames[:1].expand(17, -1, -1, -1), states)
    assert (still[1:] == 0).all()
    half = speed(frames[::2], states[::2])  # a frame moved on by two steps...
    slow = speed(frames[:9], states[::2])  # ...and by one: half the recorded speed
    assert half[1:].sub(1).abs().max() < 0.15  # (a bounce between two frames shortens the chord)
    assert slow[1:].mean().item() == pytest.approx(0.5, abs=0.05)
    empty = speed(torch.full_like(frames, -1), states)  # black: no ball, no speed
    assert empty.isnan().all()


def test_a_shifted_frame_is_off_by_the_shift():
    """Balls rendered at known places, the frame moved by (dx, dy) = (3, -2): each ball is sqrt(13) off."""
    states = np.array([[[8.0, 9.0, 0, 0], [22.5, 20.0, 0, 0], [10.0, 23.5, 0, 0]]])  # [1, 3, 4]
    radius = np.array([3.0, 4.0, 3.5])
    colors = np.array([[230, 25, 75], [245, 130, 48], [240, 50, 230]], dtype=np.float32)
    frames = as_frames(render(states, radius, colors, 32))
    shifted = torch.roll(frames, shifts=(-2, 3), dims=(2, 3))
    colors_t, radius_t = torch.from_numpy(colors), torch.from_numpy(radius)
    states_t = torch.from_numpy(states)
    error, all_found = ball_errors(frames, states_t, colors_t, radius_t)
    assert all_found.all() and error.item() < 0.05
    positions, found = find_balls(shifted, colors_t, radius_t)
    assert found.all()
    torch.testing.assert_close(
        positions[0], states_t[0, :, :2] + torch.tensor([3.0, -2.0]), atol=0.05, rtol=0
    )
    error, _ = ball_errors(shifted, states_t, colors_t, radius_t)
    assert error.item() == pytest.approx(math.sqrt(13), abs=0.05)


def test_a_missing_ball_is_not_found():
    states = np.array([[[8.0, 9.0, 0, 0], [22.5, 20.0, 0, 0]]] * 2)  # [2, 2, 4]
    radius, colors = np.array([3.0, 4.0]), np.array([[230, 25, 75], [0, 130, 200]], dtype=np.float32)
    frames = as_frames(render(states, radius, colors, 32))
    frames[1, :, 14:, 14:] = -1  # frame 1: the second ball painted black
    error, all_found = ball_errors(
        frames, torch.from_numpy(states), torch.from_numpy(colors), torch.from_numpy(radius)
    )
    assert all_found.tolist() == [True, False]
    assert error[1].item() < 0.05  # the first ball is still found, and scored
    blank = torch.full_like(frames, -1)  # nothing at all: no error to report
    error, all_found = ball_errors(
        blank, torch.from_numpy(states), torch.from_numpy(colors), torch.from_numpy(radius)
    )
    assert torch.isnan(error).all() and not all_found.any()


def test_coloured_noise_is_no_ball():
    """Uniform noise over [-1, 1] holds every colour somewhere, but nowhere a disc of it."""
    frames = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    colors = torch.tensor([[230.0, 25, 75], [60, 180, 75], [0, 130, 200]])
    _, found = find_balls(frames, colors, torch.tensor([3.0, 3.0, 3.0]))
    assert not found.any()
