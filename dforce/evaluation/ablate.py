"""`dforce ablate CONFIG --weightings independent,paths,... --seeds 3 [key=value ...]`: train every
trajectory weighting with every seed, evaluate each model with every sampling schedule, and tabulate.

Each run is `dforce train CONFIG key=value ... trajectory.name=W seed=S data.seed=S` into
`OUT/runs/W/seedS` (OUT: the config's `output_dir`), so rerunning the command resumes an interrupted run
and skips finished ones; each evaluation is cached beside its run with its settings and the model's step,
and redone only when either changes. Every model is evaluated on the same held-out clips (the config's
`validation.shards`: `context_frames` real frames, then `rollout_frames` generated) with the same noise and
the same ELBO draws, sampled as its model's recipe says (`sampling.json`: the validation's steps, history
guidance and context noise) under each schedule of `--schedules`. Written to OUT:

    results.csv       one row per weighting, seed and schedule: scores inside / past the horizon, ELBO
    frames.csv        the same per generated frame index
    loss_by_level.csv held-out loss per noise-level bin under the weighting each model was trained with
    results.md        the table: mean +- std over seeds
    psnr_vs_frame.png PSNR against frame index, a line per weighting, a panel per schedule
    loss_by_level.png the held-out loss per noise bin, a line per weighting
    weightings.png    each weighting's heatmap: its exact edge mass for two frames on the cube's grid
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dforce import DforceError
from dforce.data.vae import load_decoder
from dforce.diffusion.recipe import resolve
from dforce.diffusion.scheduling import SCHEDULING_OPTIONS
from dforce.diffusion.trajectory import get_weighting
from dforce.evaluation.evaluate import (
    METRICS,
    Clips,
    EvalSettings,
    copy_last_frame,
    evaluate,
    read_clips,
)
from dforce.evaluation.plots import plot_curves, plot_weightings
from dforce.evaluation.summary import BANDS, band_key, summarise
from dforce.training.checkpoint import CHECKPOINTS, MODEL, list_checkpoints, load_model
from dforce.training.config import Config, load_config
from dforce.training.engine import LEVEL_BINS, Meter, make_loss
from dforce.training.train import train
from dforce.training.trainer import data_space

SCHEDULES = ("autoregressive", "pyramid", "sync")
TABLE = (  # (column, key in results, digits)
    ("PSNR in horizon (dB)", "psnr_in_horizon", 2),
    ("PSNR past horizon (dB)", "psnr_past_horizon", 2),
    ("SSIM past horizon", "ssim_past_horizon", 3),
    ("ball error past horizon (px)", "ball_error_past_horizon", 2),
    ("all balls found past horizon", "balls_found_past_horizon", 2),
    ("ELBO (bits/dim)", "elbo_bits_per_dim", 2),
)
BAND_TABLE = (  # the balls by horizon multiple: how long each weighting keeps them
    *((f"all balls found {lo}-{hi}x", band_key("balls_found", lo, hi), 2) for lo, hi in BANDS),
    *((f"ball error {lo}-{hi}x (px)", band_key("ball_error", lo, hi), 1) for lo, hi in BANDS),
    *((f"ball speed / real {lo}-{hi}x", band_key("ball_speed", lo, hi), 2) for lo, hi in BANDS),
)


class AblationError(DforceError, ValueError):
    """A grid that cannot run: no held-out data, an unknown weighting or schedule."""


def run_name(weighting: str, seed: int) -> str:
    return f"{weighting.replace(':', '-')}/seed{seed}"


def finished_step(config: Config) -> int | None:
    """The step of the newest checkpoint if the run has reached `max_steps` and exported its model."""
    output = Path(config.output_dir)
    checkpoints = list_checkpoints(output / CHECKPOINTS)
    step = int(checkpoints[-1].name[5:]) if checkpoints else None
    done = step is not None and step >= config.train.max_steps and (output / MODEL / "config.json").is_file()
    return step if done else None


def _cached(path: Path, key: dict, compute: Callable, *args) -> Any:
    """The JSON at `path` if it was computed for `key`, else `compute(*args)`, saved with the key."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=2) + "\n")
    return value


@torch.no_grad()
def held_out_loss_by_level(
    config: Config, model: torch.nn.Module, clips: Clips, batch_size: int
) -> list[float]:
    """Mean held-out loss per noise-level bin (`LEVEL_BINS` of them, nan if empty) under the run's own
    weighting, without training augmentations, over the clips' first horizon frames and fixed seeds."""
    loss_fn = make_loss(config, config.trajectory.name, model.frames_per_block, augment=False)
    meter = Meter(loss_fn.schedule.levels, model.device)
    video = clips.video[:, : config.data.clip_frames]
    for draw in range(4):  # four states per clip
        for start in range(0, len(video), batch_size):
            part = slice(start, start + batch_size)
            labels = None if clips.labels is None else clips.labels[part].to(model.device)
            actions = (
                None if clips.actions is None else clips.actions[part, : video.shape[1]].to(model.device)
            )
            x0 = video[part].to(model.device)
            out = loss_fn(model, x0, seed=draw * len(video) + start, labels=labels, actions=actions)
            meter.add(out, 0)
    mean = meter.bin_sum / meter.bin_count
    return [float(v) for v in mean.cpu()]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def _cell(values: Sequence[float], digits: int) -> str:
    mean, std = _stats(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def markdown_table(
    rows: list[dict],
    weightings: Sequence[str],
    schedules: Sequence[str],
    baseline: dict | None = None,
    table: Sequence[tuple[str, str, int]] = TABLE,
) -> str:
    """Mean ± std over seeds of the `table` columns (name, key, digits) that some row has, a row per
    weighting and schedule; then `baseline` (scores of copying the last context frame), if given."""
    columns = [name for name, key, _ in table if any(key in row for row in rows)]
    lines = [
        "| weighting | schedule | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for weighting in weightings:
        for schedule in schedules:
            cell = [r for r in rows if r["weighting"] == weighting and r["schedule"] == schedule]
            values = [
                _cell([r.get(key, math.nan) for r in cell], digits)
                for name, key, digits in table
                if name in columns
            ]
            lines.append(f"| {weighting} | {schedule} | " + " | ".join(values) + " |")
    if baseline is not None:
        values = [
            _cell([baseline.get(key, math.nan)], digits) for name, key, digits in table if name in columns
        ]
        lines.append("| copy the last context frame | – | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of differing keys as one CSV table, columns in order of first appearance."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def ablate(
    config_path: str | Path,
    weightings: Sequence[str],
    seeds: int,
    overrides: Sequence[str] = (),
    *,
    schedules: Sequence[str] = SCHEDULES,
    clips: int = 16,
    elbo_draws: int = 32,
    out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train, evaluate and tabulate the grid; return the output folder (see the module docstring)."""
    base = load_config(config_path, list(overrides))
    root = Path(out or base.output_dir)
    val = base.validation
    if not val.shards:
        raise AblationError(f"{config_path}: validation.shards must name held-out clips to evaluate on")
    if seeds < 1 or not weightings or not schedules:
        raise AblationError("need at least one weighting, one schedule and seeds >= 1")
    for name in weightings:  # fail before training anything
        try:
            block, cube = base.model.get("frames_per_block", 1), base.trajectory.cube_levels
            get_weighting(name, base.data.clip_frames, base.noise.levels, block, cube_levels=cube)
        except ValueError as error:
            raise AblationError(f"--weightings: {error}") from None
    unknown = sorted(set(schedules) - set(SCHEDULING_OPTIONS))
    if unknown:
        raise AblationError(f"--schedules: unknown {unknown}; choose from {', '.join(SCHEDULING_OPTIONS)}")
    space = data_space(base)  # latent runs are scored on decoded frames, with the shards' VAE
    decoder = None if space is None else load_decoder(space, "cuda" if torch.cuda.is_available() else "cpu")
    frames = val.context_frames + val.rollout_frames
    eval_clips = read_clips(val.shards, clips, frames, base.data.size, decoder)

    rows, frame_rows, loss_rows = [], [], []
    said: set[str] = set()  # the sampling lines printed, each once
    runs = [(w, base.seed + i) for w in weightings for i in range(seeds)]
    bar = tqdm(runs, desc="ablate", unit="run", disable=None if progress else True)
    for weighting, seed in bar:
        name = run_name(weighting, seed)
        config = load_config(
            config_path,
            [
                *overrides,
                f"trajectory.name={weighting}",
                f"seed={seed}",
                f"data.seed={seed}",
                f"output_dir={root / 'runs' / name}",
            ],
        )
        step = finished_step(config)
        if step is None:
            bar.set_postfix_str(f"training {name}")
            tqdm.write(f"ablate: training {name} for {config.train.max_steps} steps")
            train(config)
            step = finished_step(config)
        bar.set_postfix_str(f"evaluating {name}")
        model_dir = Path(config.output_dir) / MODEL
        model, noise = load_model(model_dir)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        eval_dir = Path(config.output_dir) / "eval"
        for schedule in schedules:
            # The model's recipe (a run exported before recipes: its config's) under each schedule
            recipe, line = resolve(
                model_dir,
                {"scheduling": schedule},
                fallback=(config.sampling_recipe(), "the run's config"),
                flags={"scheduling": "--schedules"},
            )
            if line not in said:
                said.add(line)
                tqdm.write(f"ablate: {line}")
            settings = EvalSettings(
                **dataclasses.asdict(recipe),
                context_frames=val.context_frames,
                seed=base.seed,
                batch_size=min(clips, 16),
                elbo_draws=elbo_draws,
            )
            key = {"step": step, "clips": clips, "shards": val.shards, **dataclasses.asdict(settings)}
            result = _cached(
                eval_dir / f"{schedule}.json", key, evaluate, model, noise, eval_clips, settings, decoder
            )
            rows.append({"weighting": weighting, "seed": seed, "schedule": schedule, **result["summary"]})
            frames = result["frames"]
            for i, index in enumerate(frames["index"]):
                metrics = {m: frames[m][i] for m in METRICS if m in frames}
                run = {"weighting": weighting, "seed": seed, "schedule": schedule}
                frame_rows.append({**run, "frame": index, **metrics})
        key = {"step": step, "clips": clips, "shards": val.shards}
        losses = _cached(
            eval_dir / "loss_by_level.json", key, held_out_loss_by_level, config, model, eval_clips, 16
        )
        for b, loss in enumerate(losses):
            loss_rows.append({"weighting": weighting, "seed": seed, "bin": b, "loss": loss})
    bar.close()

    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "results.csv", rows)
    write_csv(root / "frames.csv", frame_rows)
    write_csv(root / "loss_by_level.csv", loss_rows)
    horizon = eval_clips.pixel_frames(base.data.clip_frames)  # scores are of pixel frames
    index = list(range(eval_clips.pixel_frames(val.context_frames), eval_clips.real().shape[1]))
    _, baseline = summarise(copy_last_frame(eval_clips, val.context_frames), index, horizon)
    table = markdown_table(rows, weightings, schedules, baseline)
    bands = markdown_table(rows, weightings, schedules, baseline, BAND_TABLE)
    header = (
        f"{len(weightings)} weightings x {seeds} seeds, {base.train.max_steps} steps each; {clips} held-out "
        f"clips, {val.context_frames} context frames, {val.rollout_frames} generated, horizon {horizon}, "
        f"{val.sampling_steps} steps a frame. Mean ± std over seeds.\n\n"
    )
    by_band = "\nBy horizon multiple (frame t in band a-bx if a * horizon <= t < b * horizon):\n\n"
    (root / "results.md").write_text(header + table + by_band + bands)
    _plot(root, frame_rows, loss_rows, weightings, schedules, horizon)
    cube = base.trajectory.cube_levels or 16  # two frames on the cube's K x K grid: exact, and readable
    plot_weightings([get_weighting(w, 2, cube) for w in weightings], root / "weightings.png")
    return root


def _plot(
    root: Path,
    frame_rows: list[dict],
    loss_rows: list[dict],
    weightings: Sequence[str],
    schedules: Sequence[str],
    horizon: int,
) -> None:
    panels = {}
    for schedule in schedules:
        series = {}
        for weighting in weightings:
            cell = [r for r in frame_rows if r["weighting"] == weighting and r["schedule"] == schedule]
            index = sorted({r["frame"] for r in cell})
            stats = [_stats([r["psnr"] for r in cell if r["frame"] == t]) for t in index]
            series[weighting] = (
                index,
                [m for m, _ in stats],
                [0.0 if math.isnan(s) else s for _, s in stats],
            )
        panels[f"PSNR (dB), {schedule} sampling"] = series
    plot_curves(panels, root / "psnr_vs_frame.png", "frame index", horizon, "training horizon")
    centres = [(b + 0.5) / LEVEL_BINS for b in range(LEVEL_BINS)]
    series = {}
    for weighting in weightings:
        cell = [r for r in loss_rows if r["weighting"] == weighting]
        stats = [_stats([r["loss"] for r in cell if r["bin"] == b]) for b in range(LEVEL_BINS)]
        series[weighting] = (centres, [m for m, _ in stats], [0.0 if math.isnan(s) else s for _, s in stats])
    plot_curves(
        {"held-out loss by noise level (own weighting)": series},
        root / "loss_by_level.png",
        "noise level / K",
    )
