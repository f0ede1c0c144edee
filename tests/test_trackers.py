"""Rollout frames reach every tracker that takes images, each in the form its `log_images` wants, and
the trackers start with the config's project and run name."""

from __future__ import annotations

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dforce.training.config import load_config
from dforce.training.trackers import log_frames, start_trackers


class Scalars(GeneralTracker):
    """A stand-in for a tracker without images (like MLflow's), under that tracker's name."""

    main_process_only = True
    requires_logging_directory = False
    name = "scalars"

    def __init__(self, name: str) -> None:
        self.name, self.images = name, []
        super().__init__()

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        pass


class Recording(Scalars):
    """A stand-in for a tracker that takes images and is not installed here."""

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.images.append((values, step, kwargs))


def test_frames_reach_every_tracker_that_takes_images(tmp_path):
    wandb, aim, scalars = Recording("wandb"), Recording("aim"), Scalars("mlflow")
    accelerator = Accelerator(
        log_with=["tensorboard", wandb, aim, scalars],
        project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")),
    )
    accelerator.init_trackers("project")
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)  # [T, H, W, C]
    log_frames(accelerator, "rollout", frames, step=7)
    accelerator.end_training()

    ((values, step, kwargs),) = wandb.images
    assert step == 7 and not kwargs and len(values["rollout"]) == 5
    assert all(np.array_equal(a, b) for a, b in zip(values["rollout"], frames, strict=True))
    ((values, step, _),) = aim.images
    assert values["rollout"].shape == (8, 5 * 6, 3)  # one strip, frames left to right
    assert np.array_equal(values["rollout"][:, 6:12], frames[1])
    (events,) = (tmp_path / "logs" / "project").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events), size_guidance={"images": 0})
    logged.Reload()
    (image,) = logged.Images("rollout")  # TensorBoard tiles the frames of one step into a grid
    assert (image.step, image.height, image.width) == (7, 8, 5 * 6)


def test_project_and_run_name(tmp_path, config_file):
    config = load_config(config_file, ["train.trackers=[tensorboard]", "train.project=balls"])
    accelerator = Accelerator(
        log_with=config.train.trackers,
        project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")),
    )
    start_trackers(accelerator, config)
    accelerator.log({"x": 1.0}, step=1)
    accelerator.end_training()
    assert list((tmp_path / "logs" / "balls").glob("events.out.tfevents.*"))

    class Spy:
        def init_trackers(self, project, config, init_kwargs):
            self.args = project, config, init_kwargs

    config.train.trackers, spy = ["wandb", "tensorboard"], Spy()
    start_trackers(spy, config)  # the run name defaults to the output directory's name
    assert spy.args[0] == "balls" and spy.args[2] == {"wandb": {"name": "run"}}
    assert spy.args[1]["train.lr"] == 2e-3 and spy.args[1]["output_dir"].endswith("run")
    config.train.run_name = "first"
    start_trackers(spy, config)
    assert spy.args[2] == {"wandb": {"name": "first"}}
