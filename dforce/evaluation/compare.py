"""`dforce compare EVAL EVAL ...`: evaluations (`dforce eval` folders) side by side, so that models scored
on the same clips with the same seed can be read against each other: every ball found and the ball error
per horizon-multiple band, each with its standard error over the clips, and the rollout speed."""

from __future__ import annotations

import json
from pathlib import Path

from dforce import DforceError
from dforce.evaluation.summary import BANDS, band_key

SAME = ("context_frames", "seed")  # settings that must agree for a side-by-side reading
SCORES = (
    ("all balls found", "balls_found", 2),
    ("ball error (px)", "ball_error", 1),
    ("ball speed / real", "ball_speed", 2),
    ("MSE", "mse", 4),
)


class CompareError(DforceError, ValueError):
    """Evaluations that cannot be compared: a missing folder, other clips or another seed."""


def read_eval(folder: str | Path) -> dict:
    """The `metrics.json` a `dforce eval --out FOLDER` wrote."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise CompareError(f"{path}: no such file; run `dforce eval ... --out {folder}` first")
    return json.loads(path.read_text())


def compare(folders: list[str | Path], names: list[str] | None = None) -> str:
    """A markdown table, a row per evaluation (named by `names` or its folder) and one for copying the
    last context frame: mean ± standard error over clips per band, and frames generated per second."""
    results = [read_eval(f) for f in folders]
    names = names or [str(f) for f in folders]
    if len(names) != len(results):
        raise CompareError(f"{len(names)} names for {len(results)} evaluations")
    first = results[0]
    for folder, result in zip(folders[1:], results[1:], strict=True):
        differs = [k for k in SAME if result["settings"][k] != first["settings"][k]]
        if result["clips"] != first["clips"] or result["horizon"] != first["horizon"]:
            differs.append("clips or horizon")
        if differs:
            raise CompareError(f"{folder} differs from {folders[0]} in {', '.join(differs)}: not one test")
    return table(results, names)


def table(results: list[dict], names: list[str]) -> str:
    """The table of `compare` for evaluation results (`dforce.evaluation.evaluate.evaluate`) of the same
    clips."""
    first = results[0]
    bands = [(lo, hi) for lo, hi in BANDS if band_key("mse", lo, hi) in first["summary"]]
    columns = [
        (f"{title} {lo}-{hi}x", band_key(key, lo, hi), digits)
        for title, key, digits in SCORES
        if band_key(key, *bands[0]) in first["summary"]
        for lo, hi in bands
    ]

    def cells(summary: dict) -> str:
        return " | ".join(
            f"{summary[key]:.{digits}f} ± {summary[key + '_se']:.{digits}f}" if key in summary else "–"
            for _, key, digits in columns
        )

    lines = [
        "| model | steps | frames/s | " + " | ".join(c for c, _, _ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name, result in zip(names, results, strict=True):
        speed = f"{result['frames_per_s']:.1f}"
        lines.append(f"| {name} | {result['settings']['steps']} | {speed} | {cells(result['summary'])} |")
    if "copy_last_frame" in first:  # the forecast every model must beat, on the same clips
        lines.append(f"| copy the last context frame | – | – | {cells(first['copy_last_frame'])} |")
    return (
        f"{first['clips']} clips, horizon {first['horizon']} frames, seed {first['settings']['seed']}; "
        "mean ± standard error over clips.\n\n" + "\n".join(lines) + "\n"
    )
