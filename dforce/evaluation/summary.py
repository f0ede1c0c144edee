"""Scores per clip and frame [N, F] -> their means per frame index, inside and past the training horizon,
and per horizon-multiple band with standard errors over clips: what `dforce eval`, `dforce ablate` and
`dforce compare` report."""

from __future__ import annotations

import math

import torch
from torch import Tensor

BANDS = ((0, 1), (1, 2), (2, 4), (4, 8))  # horizon multiples the summary reports a mean for


def _mean(values: Tensor) -> float:
    """Mean of the finite-or-inf values, nan-free (ball errors are nan where no ball is found)."""
    kept = values[~torch.isnan(values)]
    return kept.mean().item() if kept.numel() else math.nan


def band_key(name: str, low: int, high: int) -> str:
    """The summary key of a score's mean over frames `low * horizon <= t < high * horizon`."""
    return f"{name}_{low}-{high}x"


def summarise(scores: dict[str, Tensor], index: list[int], horizon: int) -> tuple[dict, dict]:
    """Scores [N, F] of frames `index` -> (the mean per frame index, the means inside and past the
    horizon, and per horizon-multiple band of `BANDS` that has frames: the mean and, as `..._se`, its
    standard error over the N clips, each clip's own mean in the band counted once)."""
    frames: dict[str, list] = {"index": index}
    summary: dict[str, float] = {}
    at = torch.tensor(index)
    inside = at < horizon
    for name, value in scores.items():
        frames[name] = [_mean(value[:, i]) for i in range(value.shape[1])]
        summary[f"{name}_in_horizon"] = _mean(value[:, inside])
        summary[f"{name}_past_horizon"] = _mean(value[:, ~inside])
        for low, high in BANDS:
            band = (at >= low * horizon) & (at < high * horizon)
            if not band.any():
                continue
            per_clip = value[:, band].nanmean(dim=1)  # [N], nan for a clip with no finite score
            per_clip = per_clip[~torch.isnan(per_clip)]
            se = per_clip.std() / math.sqrt(len(per_clip)) if len(per_clip) > 1 else math.nan
            summary[band_key(name, low, high)] = _mean(value[:, band])
            summary[band_key(name, low, high) + "_se"] = float(se)
    return frames, summary
