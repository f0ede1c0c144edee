import json
import math

import numpy as np
import pytest

from dforce.cli import main
from dforce.data.clips import DataConfig
from dforce.data.loader import make_loader
from dforce.data.reading import read_samples
from dforce.data.synthetic import bouncing_balls, simulate


def test_deterministic_by_seed_and_index():
    video, record = bouncing_balls(3, frames=8, size=32, num_balls=3, seed=0)
    again, record_again = bouncing_balls(3, frames=8, size=32, num_balls=3, seed=0)
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    assert np.array_equal(video, again) and record == record_again
    assert not np.array_equal(video, bouncing_balls(4, frames=8, size=32, seed=0)[0])
    assert not np.array_equal(video, bouncing_balls(3, frames=8, size=32, seed=1)[0])


@pytest.mark.parametrize("seed", range(5))
def test_physics_is_elastic_and_stays_in_the_box(seed):
    size, balls = 32, 5
    states, radius = simulate(200, size, balls, np.random.default_rng(seed))  # [T, balls, 4], [balls]
    mass = radius**2
    energy = 0.5 * (mass * (states[..., 2:] ** 2).sum(-1)).sum(-1)  # [T]
    assert np.allclose(energy, energy[0], rtol=1e-9)
    position = states[..., :2]
    assert (position >= radius[:, None] - 1e-9).all() and (position <= size - radius[:, None] + 1e-9).all()
    gaps = np.linalg.norm(position[:, :, None] - position[:, None], axis=-1) - radius[:, None] - radius[None]
    off_diagonal = ~np.eye(balls, dtype=bool)
    assert gaps[:, off_diagonal].min() > -0.05 * radius.min()  # contacts resolve within a substep
    # Momentum changes only at the walls: between frames without a wall contact it is conserved.
    momentum = (mass[:, None] * states[..., 2:]).sum(1)  # [T, 2]
    near_wall = ((position - radius[:, None] < 1.5) | (size - radius[:, None] - position < 1.5)).any((1, 2))
    free = ~(near_wall[1:] | near_wall[:-1])
    assert np.allclose(momentum[1:][free], momentum[:-1][free], atol=1e-9)
    steady = np.isclose(states[1:, :, 2:], states[:-1, :, 2:]).all(-1)  # [T-1, balls]: no bounce
    moved = np.diff(position, axis=0)[steady]  # without a bounce the motion is uniform
    assert steady.mean() > 0.5 and np.allclose(moved, states[:-1, :, 2:][steady], atol=1e-6)


def test_recorded_positions_match_the_pixels():
    video, record = bouncing_balls(0, frames=6, size=64, num_balls=2, seed=2)
    states, colors = np.array(record["states"]), np.array(record["colors"])
    for t in range(6):
        for k in range(2):
            mask = np.abs(video[t].astype(int) - colors[k]).sum(-1) < 30  # [H, W] pixels of ball k
            y, x = np.nonzero(mask)
            assert mask.sum() > 10
            assert np.hypot(x.mean() + 0.5 - states[t, k, 0], y.mean() + 0.5 - states[t, k, 1]) < 1.0


def test_make_synthetic_shards_feed_the_loader(tmp_path, capsys):
    main(["make-synthetic", "--out", str(tmp_path), "--clips", "6", "--frames", "10", "--size", "32"])
    main(
        [
            "make-synthetic",
            "--out",
            str(tmp_path),
            "--clips",
            "2",
            "--frames",
            "10",
            "--prefix",
            "val",
            "--seed",
            "1",
        ]
    )
    assert "wrote 6 clips to 1 shards" in capsys.readouterr().out
    samples = list(read_samples(str(tmp_path / "train-000000.tar")))
    record = json.loads(samples[0]["json"])
    assert len(samples) == 6 and np.array(record["states"]).shape == (10, 3, 4) and record["fps"] == 10
    config = DataConfig(str(tmp_path / "train-*.tar"), clip_frames=4, clip_start=2, num_workers=0)
    batch = next(iter(make_loader(config, batch_size=3)))
    assert batch["video"].shape == (3, 4, 3, 32, 32) and batch["states"].shape == (3, 4, 3, 4)
    for key, clip, states in zip(batch["key"], batch["video"], batch["states"], strict=True):
        frames, record = bouncing_balls(int(key.split("_")[1]), frames=10, size=32, seed=0)
        assert np.allclose(states.numpy(), np.array(record["states"])[2:6], atol=1e-4)
        pixels = ((clip.permute(0, 2, 3, 1) + 1) * 127.5).numpy()  # [T, H, W, C]
        assert np.abs(pixels - frames[2:6]).max() <= 3  # near-lossless coding


def test_speed_range_sets_how_far_balls_move():
    size = 32
    states, _ = simulate(2, size, 4, np.random.default_rng(0), speed=(0.10, 0.12))
    speed = np.linalg.norm(states[0, :, 2:], axis=-1) / size  # [balls] in frame sides per frame
    assert ((speed >= 0.10) & (speed <= 0.12)).all()
    slow, _ = bouncing_balls(0, frames=4, size=size, num_balls=1, seed=0)
    fast, record = bouncing_balls(0, frames=4, size=size, num_balls=1, seed=0, speed=(0.2, 0.2))
    assert np.linalg.norm(np.array(record["states"])[0, 0, 2:]) == pytest.approx(0.2 * size)
    assert not np.array_equal(slow[1:], fast[1:])
    with pytest.raises(ValueError, match=r"speed must be \(low, high\)"):
        bouncing_balls(0, speed=(0.1, 0.05))


def test_radius_range_sets_ball_size():
    size = 16
    _, radius = simulate(2, size, 3, np.random.default_rng(0), radius=(0.2, 0.22))
    assert ((radius >= 0.2 * size) & (radius <= 0.22 * size)).all()
    video, record = bouncing_balls(0, frames=1, size=size, num_balls=1, radius=(0.25, 0.25))
    assert record["radius"] == [pytest.approx(0.25 * size)]
    lit = (video[0].max(axis=-1) > 0).sum()  # pixels the disc touches, its anti-aliased rim included
    assert math.pi * 4**2 <= lit <= math.pi * 5**2
    with pytest.raises(ValueError, match=r"radius must be \(low, high\)"):
        bouncing_balls(0, radius=(0.0, 0.1))
