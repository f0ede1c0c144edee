"""Bouncing balls: the built-in dataset, with known physics.

Coloured discs move in a square box with elastic collisions against the walls and each other (mass
proportional to area). Each clip is stored as a real H.264 video, so the demo runs the real decode
path, and its json record holds every ball's state per frame, `states` `[T, balls, 4]` = (x, y, vx, vy)
in pixels and pixels per frame, origin at the top-left corner, so rollouts can be scored against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dforce.data.shards import ShardSink, encode_video

COLORS = np.array(  # saturated and far apart, so balls stay apart in colour after YUV coding
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230]],
    dtype=np.float32,
)  # fmt: skip


def _collide(position: np.ndarray, velocity: np.ndarray, radius: np.ndarray, size: float) -> None:
    """Elastic bounces off the walls and between balls, in place."""
    for axis in range(2):
        low, high = radius, size - radius
        below, above = position[:, axis] < low, position[:, axis] > high
        position[below, axis] = 2 * low[below] - position[below, axis]
        position[above, axis] = 2 * high[above] - position[above, axis]
        velocity[below | above, axis] *= -1
    mass = radius**2
    for i in range(len(radius)):
        for j in range(i + 1, len(radius)):
            offset = position[j] - position[i]
            distance = float(np.hypot(*offset))
            overlap = radius[i] + radius[j] - distance
            if overlap <= 0 or distance == 0:
                continue
            normal = offset / distance
            closing = float((velocity[i] - velocity[j]) @ normal)
            if closing > 0:  # exchange momentum along the normal; kinetic energy is conserved
                impulse = 2 * closing / (1 / mass[i] + 1 / mass[j])
                velocity[i] -= impulse / mass[i] * normal
                velocity[j] += impulse / mass[j] * normal
            share = mass[j] / (mass[i] + mass[j])  # push apart, keeping the centre of mass
            position[i] -= normal * overlap * share
            position[j] += normal * overlap * (1 - share)


SPEED = (0.03, 0.06)  # the range of ball speeds, in frame sides per frame
RADIUS = (0.08, 0.14)  # the range of ball radii, in frame sides


def simulate(
    frames: int,
    size: int,
    num_balls: int,
    rng: np.random.Generator,
    substeps: int = 8,
    speed: tuple[float, float] = SPEED,
    radius: tuple[float, float] = RADIUS,
) -> tuple[np.ndarray, np.ndarray]:
    """States `[frames, balls, 4]` (x, y, vx, vy) and radii `[balls]` of one random clip; each ball's
    speed and radius drawn uniformly from `speed` and `radius` (frame sides per frame, frame sides)."""
    radius = rng.uniform(*radius, num_balls) * size
    position = np.zeros((num_balls, 2))
    for i in range(num_balls):  # rejection sampling of non-overlapping starting places
        for _ in range(1000):
            position[i] = rng.uniform(radius[i], size - radius[i], 2)
            gaps = np.hypot(*(position[:i] - position[i]).T) - radius[:i] - radius[i]
            if (gaps > 0).all():
                break
        else:
            raise ValueError(f"cannot place {num_balls} balls apart in a {size}x{size} frame")
    angle = rng.uniform(0, 2 * np.pi, num_balls)
    pixels = rng.uniform(*speed, num_balls) * size  # pixels per frame
    velocity = pixels[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # [balls, 2]
    states = np.zeros((frames, num_balls, 4))
    for t in range(frames):
        states[t] = np.concatenate([position, velocity], axis=1)
        for _ in range(substeps):
            position += velocity / substeps
            _collide(position, velocity, radius, size)
    return states, radius


def render(states: np.ndarray, radius: np.ndarray, colors: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased discs on black: uint8 `[T, size, size, 3]`."""
    centres = np.arange(size) + 0.5  # pixel centres
    frames = np.zeros((len(states), size, size, 3), dtype=np.float32)
    for k in range(len(radius)):
        x, y = states[:, k, 0, None, None], states[:, k, 1, None, None]  # [T, 1, 1]
        distance = np.sqrt((centres[None, None, :] - x) ** 2 + (centres[None, :, None] - y) ** 2)  # [T, H, W]
        alpha = np.clip(radius[k] + 0.5 - distance, 0, 1)[..., None]
        frames = frames * (1 - alpha) + alpha * colors[k]
    return np.round(frames).astype(np.uint8)


def bouncing_balls(
    index: int,
    frames: int = 32,
    size: int = 32,
    num_balls: int = 3,
    seed: int = 0,
    speed: tuple[float, float] = SPEED,
    radius: tuple[float, float] = RADIUS,
) -> tuple[np.ndarray, dict]:
    """Clip `index` of the dataset `seed`: uint8 frames `[T, size, size, 3]` and its physics record."""
    if num_balls > len(COLORS):
        raise ValueError(f"at most {len(COLORS)} balls, got {num_balls}")
    if frames < 1 or size < 8 or num_balls < 1:
        raise ValueError(f"need frames >= 1, size >= 8, balls >= 1; got {frames}, {size}, {num_balls}")
    if not 0 <= speed[0] <= speed[1] <= 0.25:
        raise ValueError(f"speed must be (low, high) with 0 <= low <= high <= 0.25 frame sides, got {speed}")
    if not 0 < radius[0] <= radius[1] <= 0.25:
        raise ValueError(f"radius must be (low, high) with 0 < low <= high <= 0.25 frame sides, got {radius}")
    rng = np.random.default_rng([seed, index])
    states, radii = simulate(frames, size, num_balls, rng, speed=speed, radius=radius)
    colors = COLORS[rng.permutation(len(COLORS))[:num_balls]]
    record = {
        "source": f"bouncing_balls/seed{seed}/{index}",
        "states": states.round(5).tolist(),
        "radius": radii.round(5).tolist(),
        "colors": colors.astype(int).tolist(),
    }
    return render(states, radii, colors, size), record


def write_bouncing_balls(
    out_dir: str | Path,
    num_clips: int = 512,
    frames: int = 32,
    size: int = 32,
    num_balls: int = 3,
    seed: int = 0,
    *,
    speed: tuple[float, float] = SPEED,
    radius: tuple[float, float] = RADIUS,
    fps: float = 10.0,
    crf: int = 0,
    prefix: str = "train",
    maxcount: int = 256,
    overwrite: bool = False,
) -> list[str]:
    """Write `num_clips` clips as webdataset shards `out_dir/PREFIX-%06d.tar`; the shard paths.

    Clip `i` depends only on (seed, i, frames, size, num_balls, speed, radius): use another seed for a
    held-out split.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    with ShardSink(out_dir, prefix, maxcount=maxcount, overwrite=overwrite) as sink:
        for index in range(num_clips):
            video, record = bouncing_balls(index, frames, size, num_balls, seed, speed, radius)
            record.update(fps=fps, frames=frames, height=size, width=size, seed=seed, index=index)
            sink.write(
                {"__key__": f"{seed:04d}_{index:07d}", "mp4": encode_video(video, fps, crf), "json": record}
            )
    return sink.shards
