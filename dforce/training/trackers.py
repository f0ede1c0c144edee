"""Experiment trackers, through Accelerate's tracker API: started with the run's project, name and
hyperparameters, and sent rollout frames wherever they take images. (`dforce.training.config` checks the
names.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from dforce.training.config import Config
from dforce.training.run_record import flatten

# Where each tracker takes the run's name (`train.run_name`); TensorBoard writes under output_dir/logs.
RUN_NAME_KWARG = {"wandb": "name", "mlflow": "run_name"}
# Trackers whose `log_images` takes one image per key rather than a sequence of frames.
ONE_IMAGE = ("aim", "clearml")


def start_trackers(accelerator: Accelerator, config: Config) -> None:
    """`init_trackers` with the config's project, its dotted keys as hyperparameters, and the run name
    (default: the output directory's name) where the tracker takes one."""
    cfg = config.train
    name = cfg.run_name or Path(config.output_dir).name
    kwargs = {t: {RUN_NAME_KWARG[t]: name} for t in cfg.trackers if t in RUN_NAME_KWARG}
    accelerator.init_trackers(cfg.project, config=flat_config(config), init_kwargs=kwargs)


def log_frames(accelerator: Accelerator, key: str, frames: np.ndarray, step: int) -> None:
    """Frames uint8 [T, H, W, C] to every tracker that takes images (main process): TensorBoard, W&B
    and SwanLab as a sequence, Aim and ClearML as one strip [H, T * W, C]."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({key: frames}, step=step, dataformats="NHWC")
        elif tracker.name in ONE_IMAGE:
            tracker.log_images({key: np.concatenate(list(frames), axis=1)}, step=step)
        else:
            tracker.log_images({key: list(frames)}, step=step)


def flat_config(config: Config) -> dict[str, int | float | str | bool]:
    """Dotted keys with scalar values, as trackers (TensorBoard hparams) want them: lists as text, unset
    values and empty sections left out."""
    flat = flatten(dataclasses.asdict(config))
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in flat.items()
        if value is not None and value != {}
    }
