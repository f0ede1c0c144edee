"""Per-frame scores of generated video against ground truth: MSE, PSNR, SSIM, and for bouncing balls the
distance between each ball found in a generated frame (by its colour) and where the physics put it.

Frames are float in [-1, 1] (peak-to-peak range 2); every score is per clip and frame, [B, T], so that a
caller can average over clips and plot against the frame index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 2.0  # frames live in [-1, 1]
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004
COLOR_TOLERANCE = 60.0  # RGB distance (0..255) from a blend of a ball's colour over black
MIN_COVERAGE = 0.5  # fainter blends are too dark to tell colours apart
FOUND_FRACTION = 0.25  # a ball is found if at least this share of its disc has its colour near its centre
STRAY_FRACTION = 0.5  # and no more than this share of a disc has it farther away (noise is not a ball)


def _check_pair(fake: Tensor, real: Tensor) -> None:
    if fake.shape != real.shape or fake.ndim != 5:
        raise ValueError(
            f"fake and real must be [B, T, C, H, W] of one shape, got {list(fake.shape)}, {list(real.shape)}"
        )


def mse(fake: Tensor, real: Tensor) -> Tensor:
    """Mean squared error per frame: [B, T, C, H, W] twice -> float64 [B, T]."""
    _check_pair(fake, real)
    return (fake.double() - real.double()).square().mean(dim=(2, 3, 4))


def psnr(fake: Tensor, real: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB for the range [-1, 1]: float64 [B, T], inf for identical frames."""
    return 10 * torch.log10(DATA_RANGE**2 / mse(fake, real))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # [size, size]


def ssim(fake: Tensor, real: Tensor) -> Tensor:
    """Structural similarity per frame: float64 [B, T], 1 for identical frames.

    Gaussian window 11 x 11, sigma 1.5 (shrunk to the frame on smaller frames), K1 = 0.01, K2 = 0.03, over
    the valid region (no padding), averaged over channels and positions (Wang et al. 2004; skimage with
    gaussian_weights=True)."""
    _check_pair(fake, real)
    batch, frames, channels, height, width = fake.shape
    size = min(SSIM_WINDOW, height - 1 + height % 2, width - 1 + width % 2)  # odd, fits the frame
    window = _gaussian_window(size, SSIM_SIGMA, fake.device).expand(channels, 1, size, size)
    x = fake.double().flatten(0, 1)  # [B*T, C, H, W]
    y = real.double().flatten(0, 1)

    def blur(image: Tensor) -> Tensor:
        return F.conv2d(image, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    score = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean(dim=(1, 2, 3)).view(batch, frames)


def frame_metrics(fake: Tensor, real: Tensor) -> dict[str, Tensor]:
    """`mse`, `psnr`, `ssim`, each float64 [B, T]."""
    return {"mse": mse(fake, real), "psnr": psnr(fake, real), "ssim": ssim(fake, real)}


def find_balls(frames: Tensor, colors: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Where each ball is in frames [T, 3, H, W] (float in [-1, 1]), found by its colour.

    colors [N, 3] (RGB 0..255), radius [N] in pixels -> positions float64 [T, N, 2] (x, y in pixels, origin
    at the top-left corner, as `dforce.data.synthetic` records them; nan where not found) and found bool [T,
    N]. Each pixel is read as a blend of some ball's colour over the black background: it belongs to the ball
    whose blend line (a * colour, a in [0, 1]) passes nearest, if that is within 60 and a >= 1/2, with
    weight a, its coverage. A ball's position is the coverage-weighted centroid, exact to ~0.1 px on
    rendered clips; it is found if its coverage within two radii of that centroid adds up to a quarter of
    its disc and its coverage farther away to no more than half a disc (coloured noise is no ball).
    Reading rims as blends keeps the dark rim of a bright ball from passing for a darker ball of a similar
    hue.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {list(frames.shape)}")
    colors = colors.double().to(frames.device)
    pixels = (frames.double().clamp(-1, 1) + 1) * 127.5  # [T, 3, H, W] in 0..255
    # Each pixel as a blend of each ball's colour over black: coverage a_n and the distance to a_n * colour_n.
    alpha = torch.einsum("tchw,nc->tnhw", pixels, colors) / colors.square().sum(dim=1)[:, None, None]
    alpha = alpha.clamp(0, 1)  # [T, N, H, W]
    residual = torch.linalg.vector_norm(
        pixels[:, None] - alpha[:, :, None] * colors[None, :, :, None, None], dim=2
    )  # [T, N, H, W]
    best = residual.min(dim=1, keepdim=True)
    owner = torch.arange(len(colors), device=frames.device)[None, :, None, None] == best.indices
    match = owner & (best.values < COLOR_TOLERANCE) & (alpha >= MIN_COVERAGE)
    weight = torch.where(match, alpha, 0.0)  # [T, N, H, W] the ball's coverage of each pixel
    height, width = frames.shape[-2:]
    ys = torch.arange(height, dtype=torch.float64, device=frames.device) + 0.5  # pixel centres
    xs = torch.arange(width, dtype=torch.float64, device=frames.device) + 0.5
    count = weight.sum(dim=(2, 3))  # [T, N] area found, in pixels
    x = (weight * xs).sum(dim=(2, 3)) / count
    y = (weight * ys[:, None]).sum(dim=(2, 3)) / count
    # Found: enough of the colour within two radii of the centroid, and little of it elsewhere, so that
    # coloured noise spread over the frame is not taken for a ball.
    r = radius.double().to(frames.device)[None, :, None, None]  # [1, N, 1, 1]
    dist2 = (xs - x[..., None, None]) ** 2 + (ys[:, None] - y[..., None, None]) ** 2  # [T, N, H, W]
    near = (weight * (dist2 <= (2 * r) ** 2)).sum(dim=(2, 3))  # [T, N]
    disc = math.pi * radius.double().to(frames.device) ** 2  # [N]
    found = (near >= (FOUND_FRACTION * disc).clamp(min=1)) & (count - near <= STRAY_FRACTION * disc)
    positions = torch.stack([x, y], dim=-1)  # [T, N, 2]
    return torch.where(found[..., None], positions, math.nan), found


def ball_errors(frames: Tensor, states: Tensor, colors: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Distance in pixels between each ball found in frames [T, 3, H, W] and its recorded position.

    states [T, N, >= 2] (x, y first), colors [N, 3], radius [N] -> (mean distance over the balls found,
    float64 [T], nan where none is found; whether every ball was found, bool [T]).
    """
    positions, found = find_balls(frames, colors, radius)
    return position_errors(positions, found, states), found.all(dim=1)


def position_errors(positions: Tensor, found: Tensor, states: Tensor) -> Tensor:
    """`ball_errors`' distances from balls already found (`find_balls`) -> float64 [T]."""
    distance = torch.linalg.vector_norm(positions - states[..., :2].double().to(positions.device), dim=-1)
    return torch.where(found, distance, 0.0).sum(dim=1) / found.sum(dim=1)  # nan where nothing found


def ball_speed(positions: Tensor, found: Tensor, states: Tensor) -> Tensor:
    """How fast the balls found (`find_balls`: positions [T, N, 2], found [T, N]) move, against the recorded
    physics: a model can keep every ball in view and still let it slow to a halt, which neither the
    position error (large either way once the real ball has bounced a few times) nor `balls_found` shows.

    states [T, N, >= 2] (x, y first) -> float64 [T]: the summed displacement since the previous frame of the
    balls found in both frames over the same balls' recorded displacement (1: moving like the real balls,
    0: standing still); nan at t = 0 and where no ball is found in two frames in a row.
    """
    both = found[1:] & found[:-1]  # [T-1, N]
    moved = torch.linalg.vector_norm(positions.diff(dim=0), dim=-1)  # [T-1, N], nan where a ball is missing
    recorded = torch.linalg.vector_norm(states[..., :2].double().to(positions.device).diff(dim=0), dim=-1)
    real = torch.where(both, recorded, 0.0).sum(dim=1)  # [T-1]
    ratio = torch.where(both, moved, 0.0).sum(dim=1) / real
    ratio = torch.where(both.any(dim=1) & (real > 0), ratio, math.nan)
    return torch.cat([ratio.new_full((1,), math.nan), ratio])
