"""Pictures: where in the noise-level cube each trajectory weighting spends its loss, and metric curves."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from dforce.diffusion.trajectory import Weighting

Curve = tuple[Sequence[float], Sequence[float], Sequence[float] | None]  # x, y, spread (+-) or None


def edge_mass_grid(weighting: Weighting) -> torch.Tensor:
    """Two frames: total edge probability leaving each state, [K+1, K+1] indexed (k_1, k_2)."""
    if weighting.frames != 2:
        raise ValueError(f"edge_mass_grid needs frames=2, got {weighting.frames}")
    K = weighting.cube_levels
    grid = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    for a, b in itertools.product(range(K + 1), repeat=2):
        grid[a, b] = weighting.edge_probability((a, b), 0) + weighting.edge_probability((a, b), 1)
    return grid


def level_marginals(weighting: Weighting, samples: int, bins: int, seed: int = 0) -> torch.Tensor:
    """Per frame, the distribution of its level over the states a path leaves: [frames, bins].

    States are weighted by their total edge mass sum_j w_j. (The level at which a frame is itself
    lowered is uniform under every weighting, since each path lowers each frame through every level.)
    """
    levels, weights = weighting.sample(samples, torch.Generator().manual_seed(seed))
    index = (levels * bins // (weighting.levels + 1)).clamp(max=bins - 1)  # [N, n] bin of each level
    visits = weights.double().sum(dim=1).expand(weighting.frames, -1)  # [n, N]
    hist = torch.zeros(weighting.frames, bins, dtype=torch.float64)
    hist.scatter_add_(1, index.T, visits)
    return hist / hist.sum(dim=1, keepdim=True).clamp(min=1e-12)


def plot_weightings(weightings: list[Weighting], out: str | Path, samples: int = 100_000) -> Path:
    """Save one heatmap per weighting: the exact edge mass for two frames, else per-frame level marginals."""
    cols = min(3, len(weightings))
    rows = math.ceil(len(weightings) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    for i, weighting in enumerate(weightings):
        ax = fig.add_subplot(rows, cols, i + 1)
        if weighting.frames == 2:
            image = ax.imshow(edge_mass_grid(weighting).T.numpy(), origin="lower", cmap="magma")
            ax.set(xlabel="level of frame 1", ylabel="level of frame 2")
        else:
            bins = min(weighting.levels + 1, 50)
            marginals = level_marginals(weighting, samples, bins)
            extent = (0, weighting.levels, weighting.frames + 0.5, 0.5)
            image = ax.imshow(marginals.numpy(), aspect="auto", cmap="magma", extent=extent)
            ax.set(xlabel="diffusion level", ylabel="frame")
        ax.set_title(repr(weighting), fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_curves(
    panels: dict[str, dict[str, Curve]],
    out: str | Path,
    xlabel: str,
    marker: float | None = None,
    marker_label: str = "",
    title: str | None = None,
) -> Path:
    """One panel per metric, one line per series (with a +- band where a spread is given); a dashed
    vertical line at `marker` (e.g. the training horizon). Missing values (nan) leave gaps."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.3 * rows), layout="constrained")
    for i, (name, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (x, y, spread) in series.items():
            (line,) = ax.plot(x, y, marker=".", label=label)
            if spread is not None:
                low = [m - s for m, s in zip(y, spread, strict=True)]
                high = [m + s for m, s in zip(y, spread, strict=True)]
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if marker is not None:
            ax.axvline(marker, color="grey", linestyle="--", linewidth=1, label=marker_label or None)
        ax.set(xlabel=xlabel, title=name)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
