"""Counting monotone paths through the noise-level cube: multinomial coefficients, exact and in logs, and
the hypergeometric draw of where a uniform path stands after t steps (`dforce.diffusion.trajectory`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy
import torch
from torch import Tensor


def multinomial(counts: Sequence[int]) -> int:
    """(sum c)! / prod(c!), exactly."""
    out, total = 1, 0
    for c in counts:
        total += c
        out *= math.comb(total, c)
    return out


def log_multinomial(counts: Sequence[int]) -> float:
    return math.lgamma(sum(counts) + 1) - sum(math.lgamma(c + 1) for c in counts)


def hypergeometric(draws: Tensor, frames: int, levels: int, seed: int) -> Tensor:
    """Levels removed per frame after `draws` steps of a uniform path: [B] -> [B, frames].

    A uniform unit-step path is a uniform shuffle of the multiset {frame j repeated K times}; the
    counts among its first t entries are multivariate hypergeometric([K]*n, t), drawn exactly as n-1
    univariate hypergeometrics. torch has none, so numpy draws them from `seed` (reproducible; ~100x
    faster than shuffling n*K keys).
    """
    rng = numpy.random.default_rng(seed)
    left = draws.cpu().numpy().copy()  # [B] draws not yet assigned to a frame
    counts = numpy.empty((len(left), frames), dtype=numpy.int64)
    for j in range(frames - 1):
        counts[:, j] = rng.hypergeometric(levels, (frames - 1 - j) * levels, left)
        left -= counts[:, j]
    counts[:, -1] = left
    return torch.from_numpy(counts).to(draws.device)
